"""Fixed tiny models and inputs for tests/test_golden.py (golden figures from the authors' code).

Everything here is deterministic and needs no training: weights and images come from numpy's
PCG64 generator (`np.random.default_rng(seed)`, a stream numpy keeps stable), cast to float32.
The same functions built the inputs the authors' code was run on when the golden figures were
recorded (docs/fidelity/golden.md), so both implementations see identical models and inputs.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    return torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))


def tiny_cnn(seed: int, channels: int = 3, side: int = 8, classes: int = 5,
             width: int = 8, gain: float = 1.0) -> nn.Sequential:
    """conv3(C->4)-relu-maxpool2-conv3(4->width)-relu | flatten-fc(16)-relu-fc(classes).

    An nn.Sequential so the authors' `children[:i+1]` / `children[i+1:]` split is plain: index 4
    (the second ReLU) ends the feature extractor h (EX-RAY's inner layer), g is the rest.
    He-scaled normal weights, small normal biases, from default_rng(seed); the last layer's
    weights and bias are multiplied by `gain` (large logits: MM-BD's ascent saturates quickly)."""
    rng = np.random.default_rng(seed)
    half = side // 2
    net = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, width, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * half * half, 16), nn.ReLU(), nn.Linear(16, classes))
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                w = layer.weight
                fan_in = int(np.prod(w.shape[1:]))
                w.copy_(_normal(rng, tuple(w.shape), (2.0 / fan_in) ** 0.5))
                layer.bias.copy_(_normal(rng, tuple(layer.bias.shape), 0.1))
        net[-1].weight.mul_(gain)
        net[-1].bias.mul_(gain)
    return net.eval()


def images(seed: int, n: int, channels: int = 3, side: int = 8) -> torch.Tensor:
    """n images U[0, 1)^(C, side, side), float32."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.random((n, channels, side, side)).astype(np.float32))


class Normalize(nn.Module):
    """(x - mean) / std per channel: folds a normalisation into a model (xray's convention)."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def by_prediction(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own labels for x (the tiny models are untrained: 'clean' labels are what
    they predict)."""
    with torch.no_grad():
        return model(x).argmax(1)


# Model X-ray: the model takes normalised input in the reference (BackdoorBench), pixel input
# here with the normalisation folded in. MX_NET is the former, Normalize + MX_NET the latter.
MX_MEAN = (0.5, 0.4, 0.3)
MX_STD = (0.25, 0.2, 0.3)


def modelxray_triplet(net: nn.Module) -> tuple[list[int], torch.Tensor, list[int]]:
    """Indices, pixel images and labels of a fixed triplet: the first three of images(7, 64)
    whose predicted labels (normalised input through `net`) are all different; the labels are
    those predictions (ground truth of an untrained model)."""
    x = images(7, 64)
    z = (x - torch.tensor(MX_MEAN).view(1, 3, 1, 1)) / torch.tensor(MX_STD).view(1, 3, 1, 1)
    pred = by_prediction(net, z).tolist()
    idx: list[int] = []
    for i, label in enumerate(pred):
        if label not in [pred[j] for j in idx]:
            idx.append(i)
        if len(idx) == 3:
            break
    return idx, x[idx], [pred[i] for i in idx]


# MNTD: tiny shadow models (1 x 8 x 8 inputs, 5 classes), labels 1 = "trojaned" (arbitrary: the
# nets are untrained; the golden test checks the meta-classifier's arithmetic, not detection).
MNTD_SHAPE = (1, 8, 8)
MNTD_CLASSES = 5
MNTD_LABELS = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
MNTD_IS_VAL = [False] * 6 + [True] * 4
MNTD_QUERY_MEAN = (0.1307,)
MNTD_QUERY_STD = (0.3081,)


def mntd_shadow_nets() -> list[nn.Sequential]:
    return [tiny_cnn(100 + i, channels=1, classes=MNTD_CLASSES) for i in range(len(MNTD_LABELS))]


def mntd_target_net() -> nn.Sequential:
    return tiny_cnn(200, channels=1, classes=MNTD_CLASSES)


# EX-RAY: tiny_cnn(3); clean images = the first 12 of images(11, 300) predicted 1 and the first
# 12 predicted 4, in file order; two patch triggers (4 x 4 at the top-left corner, one colour).
EXRAY_SPLIT = 4  # h = net[:5] (to the second ReLU, 8 x 4 x 4 features), g = net[5:]
EXRAY_TRIGGERS = [(4, 1, (1.0, 0.0, 1.0)), (1, 4, (0.0, 1.0, 1.0))]  # (victim, target, colour)


def exray_data() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    net = tiny_cnn(3)
    x = images(11, 300)
    y = by_prediction(net, x)
    keep = torch.cat([torch.nonzero(y == c).flatten()[:12] for c in (1, 4)]).sort().values
    return net, x[keep], y[keep]


def exray_trigger_mask(side: int = 8) -> torch.Tensor:
    mask = torch.zeros(side, side)
    mask[:4, :4] = 1.0
    return mask


# Neural Cleanse: a fixed sequence of step means (attack accuracy, mask L1) driving the cost
# schedule and the early stop: 7 failures (the cost is 0: a "down" while still 0), 10 successes
# with a shrinking L1 (cost set to 1e-3 at the 5th, doubled 5 later), 5 failures (cost down),
# then successes with no better L1 until the early stop (both flags set, 25 steps without a new
# best L1).
def nc_sequence() -> list[tuple[float, float]]:
    seq = [(0.5, 50.0)] * 7
    seq += [(1.0, 48.0 - i) for i in range(10)]
    seq += [(0.9, 30.0)] * 5
    seq += [(1.0, 40.0)] * 38
    return seq
