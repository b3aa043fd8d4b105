"""The one normalisation step, (x - mean) / std per channel, and the loading wrapper built on it.

    model = Normalized(net, mean, std)        # takes pixel-space [0, 1] input
    z = normalize(x, channels(mean), channels(std)); x == denormalize(z, ...)

mean / std hold one value per channel, or one value for every channel (it broadcasts). The
buffers are not persistent: a `Normalized` has exactly its network's state dict, under "net.".
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

Values = Sequence[float] | torch.Tensor


def channels(values: Values, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Per-channel values as a (1, C, 1, 1) tensor; a tensor is copied as it is (its dtype and
    device kept)."""
    if torch.is_tensor(values):
        return values.detach().clone().view(1, -1, 1, 1)
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def denormalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return z * std + mean


class Normalize(nn.Module):
    """(x - mean) / std as a module (non-persistent buffers: no state dict entries)."""

    def __init__(self, mean: Values = (0.0,), std: Values = (1.0,)) -> None:
        super().__init__()
        self.register_buffer("mean", channels(mean), persistent=False)
        self.register_buffer("std", channels(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)


class Normalized(Normalize):
    """`net` behind a fixed (x - mean) / std step, so callers feed pixel-space [0, 1] input."""

    def __init__(self, net: nn.Module, mean: Values = (0.0,), std: Values = (1.0,)) -> None:
        super().__init__(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(x, self.mean, self.std))
