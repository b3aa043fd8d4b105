"""BadNets: a small random patch pasted over the image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xray.zoo.attacks.base import Attack, register


@register
@dataclass(frozen=True, kw_only=True)
class BadNets(Attack):
    """BadNets (Gu et al., 2017, arXiv:1708.06733): a small patch pasted over the image.

    The patch is a random binary colour pattern (each pixel a corner of the RGB cube, or black /
    white) from `seed`, side 3..5 pixels at 32 x 32, scaled with the image side (at least 2).
    Fixed location (row, col) by default; `random_location` draws each image's position from
    `seed`, so the same batch always gets the same positions.
    """

    name: ClassVar[str] = "badnets"
    supports_all_to_all: ClassVar[bool] = True
    size: int
    row: int
    col: int
    seed: int
    random_location: bool = False

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        _, h, w = input_shape
        size = max(2, int(round(int(rng.integers(3, 6)) * min(h, w) / 32)))
        return {"size": size, "row": int(rng.integers(0, h - size + 1)),
                "col": int(rng.integers(0, w - size + 1)), "seed": int(rng.integers(2**31))}

    def pattern(self, channels: int) -> np.ndarray:
        p = np.random.default_rng(self.seed).integers(0, 2, (channels, self.size, self.size))
        return (p if p.any() else 1 - p).astype(np.float32)  # never an all-black patch

    def _apply(self, x):
        n, c, h, w = x.shape
        s = self.size
        if self.random_location:
            loc_rng = np.random.default_rng((self.seed, 1))
            rows, cols = loc_rng.integers(0, h - s + 1, n), loc_rng.integers(0, w - s + 1, n)
        else:
            if self.row + s > h or self.col + s > w:
                raise ValueError(f"badnets patch at ({self.row}, {self.col}) size {s} does not fit "
                                 f"{h} x {w} images")
            rows, cols = np.full(n, self.row), np.full(n, self.col)
        out = x.copy()
        p = self.pattern(c)
        for i, (r, q) in enumerate(zip(rows, cols)):
            out[i, :, r:r + s, q:q + s] = p
        return out
