"""Helpers shared by the attacks whose trigger is a trained image-to-image network (LIRA,
input-aware): seeded construction, padding to the network's stride, running it on numpy images,
and its weights as named artifacts."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with torch's global generator seeded by `seed`, leaving the caller's RNG state
    as it was (layer initialisers draw from the global generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def padded(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           multiple: int) -> torch.Tensor:
    """fn(x) for a network that halves the image `log2(multiple)` times: x is padded
    (replicating its border) up to a multiple of `multiple` on each side, the output cropped
    back."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return fn(x)
    top, left = ph // 2, pw // 2
    out = fn(F.pad(x, (left, pw - left, top, ph - top), mode="replicate"))
    return out[..., top:top + h, left:left + w]


@torch.no_grad()
def run_numpy(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray,
              batch_size: int = 256) -> np.ndarray:
    """fn over float32 (N, C, H, W) numpy images in batches, on the CPU."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = [fn(xt[i:i + batch_size]) for i in range(0, len(xt), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros_like(x)


def to_artifacts(prefix: str, net: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().clone() for k, v in net.state_dict().items()}


def from_artifacts(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = prefix + "."
    state = {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
    if not state:
        raise KeyError(f"no {prefix!r} weights among the artifacts {sorted(tensors)[:5]}")
    return state


def batch_source_first(src: torch.Tensor) -> torch.Tensor:
    """Positions of a batch with the images the trigger may flip (`src` True) first, each group
    in batch order."""
    return torch.argsort((~src).to(torch.int8), stable=True)
