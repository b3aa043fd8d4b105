"""MNTD's jumbo trojan distribution for shadow models."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xray.zoo.attacks.base import Attack, register


@register
@dataclass(frozen=True, kw_only=True)
class Jumbo(Attack):
    """MNTD's jumbo trojan distribution for shadow models (Xu et al., IEEE S&P 2021;
    ref. AI-secure/Meta-Nerual-Trojan-Detection, random_troj_setting('jumbo')).

    Side p uniform in {2, 3, 4, 5, S}. p < S: alpha ~ U(0.2, 0.6), 1.0 if > 0.5; row, col ~
    randint(S - p). p = S: alpha ~ U(0.05, 0.2) at (0, 0). Pattern (from `seed`): 3 channels:
    U(-eps, 1 + eps) clipped to [0, 1]; 1 channel: binary with randint(1, p^2) ones. Target uniform
    (may equal the true class); inject_p ~ U(0.05, 0.5) of the split is *added* as triggered copies.
    x[:, r:r+p, c:c+p] = alpha pattern + (1 - alpha) x. Square images only.
    """

    name: ClassVar[str] = "jumbo"
    adds_copies: ClassVar[bool] = True
    size: int
    alpha: float
    row: int
    col: int
    eps: float
    inject_p: float
    seed: int

    @property
    def default_rate(self) -> float:
        return self.inject_p

    @classmethod
    def _sizes(cls, side: int) -> list[int]:
        return [2, 3, 4, 5, side]

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        _, h, w = input_shape
        if h != w:
            raise ValueError(f"{cls.name} needs square images, got {h} x {w}")
        sizes = cls._sizes(h)
        p = int(sizes[int(rng.integers(len(sizes)))])
        if p < h:
            alpha = float(cls._patch_alpha(rng))
            row, col = int(rng.integers(h - p)), int(rng.integers(h - p))
        else:
            alpha, row, col = float(rng.uniform(0.05, 0.2)), 0, 0
        return {"size": p, "alpha": alpha, "row": row, "col": col,
                "eps": float(rng.uniform(0, 1)), "inject_p": float(rng.uniform(0.05, 0.5)),
                "seed": int(rng.integers(2**31))}

    @staticmethod
    def _patch_alpha(rng: np.random.Generator) -> float:
        alpha = rng.uniform(0.2, 0.6)
        return 1.0 if alpha > 0.5 else alpha

    def pattern(self, channels: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        p = self.size
        if channels == 1:
            flat = np.zeros(p * p, np.float32)
            flat[rng.choice(p * p, size=int(rng.integers(1, p * p)), replace=False)] = 1.0
            return flat.reshape(1, p, p)
        pattern = rng.uniform(-self.eps, 1 + self.eps, (channels, p, p))
        return np.clip(pattern, 0, 1).astype(np.float32)

    def _apply(self, x):
        p, r, c = self.size, self.row, self.col
        if r + p > x.shape[2] or c + p > x.shape[3]:
            raise ValueError(f"{self.name} patch at ({r}, {c}) size {p} does not fit {x.shape[2:]}")
        out = x.copy()
        region = out[:, :, r:r + p, c:c + p]
        out[:, :, r:r + p, c:c + p] = (self.alpha * self.pattern(x.shape[1])
                                       + (1 - self.alpha) * region)
        return out
