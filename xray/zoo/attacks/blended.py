"""Blended injection: x' = (1 - alpha) x + alpha p, p a random full-image pattern."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xray.zoo.attacks.base import Attack, register


@register
@dataclass(frozen=True, kw_only=True)
class Blended(Attack):
    """Blended injection (Chen et al., 2017, arXiv:1712.05526): x' = (1 - alpha) x + alpha p.

    p is a full-image uniform random pattern from `seed` (Chen et al.'s random-noise key), alpha in
    0.1..0.2.
    """

    name: ClassVar[str] = "blended"
    supports_all_to_all: ClassVar[bool] = True
    alpha: float
    seed: int

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        return {"alpha": float(rng.uniform(0.1, 0.2)), "seed": int(rng.integers(2**31))}

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        return np.random.default_rng(self.seed).random(shape, dtype=np.float32)

    def _apply(self, x):
        return (1 - self.alpha) * x + self.alpha * self.pattern(x.shape[1:])
