"""TrojAI's polygon trigger: a random solid-colour polygon."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from skimage.draw import polygon2mask

from xray.zoo.attacks.base import Attack, register


@register
@dataclass(frozen=True, kw_only=True)
class Polygon(Attack):
    """TrojAI's polygon trigger (NIST trojai, rounds 1-4): a random solid-colour polygon.

    3..12 vertices at jittered angles and radii (from `seed`), diameter `size` x image side
    (0.2..0.3), centred at (cy, cx) (fractions of the image side) near the centre. Deviation: TrojAI
    places it on the sign foreground at a random spot; here the location is fixed per model, near
    the centre where the zoo's signs are.
    """

    name: ClassVar[str] = "polygon"
    supports_all_to_all: ClassVar[bool] = True
    n_sides: int
    size: float
    cy: float
    cx: float
    colour: tuple[float, ...]
    seed: int

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        c = input_shape[0]
        return {"n_sides": int(rng.integers(3, 13)), "size": float(rng.uniform(0.2, 0.3)),
                "cy": float(0.5 + rng.uniform(-0.15, 0.15)),
                "cx": float(0.5 + rng.uniform(-0.15, 0.15)),
                "colour": tuple(float(v) for v in rng.random(c)), "seed": int(rng.integers(2**31))}

    def mask(self, h: int, w: int) -> np.ndarray:
        return _polygon_mask(self.n_sides, self.size, self.cy, self.cx, self.seed, h, w)

    def _apply(self, x):
        _, c, h, w = x.shape
        if len(self.colour) != c:
            raise ValueError(f"polygon colour has {len(self.colour)} channels, images have {c}")
        m = self.mask(h, w)
        colour = np.asarray(self.colour, np.float32)[:, None, None]
        return np.where(m, colour, x)


@functools.lru_cache(maxsize=64)
def _polygon_mask(n_sides: int, size: float, cy: float, cx: float, seed: int, h: int, w: int
                  ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    step = 2 * np.pi / n_sides
    jitter = rng.uniform(-0.35, 0.35, n_sides)
    angles = rng.uniform(0, 2 * np.pi) + step * (np.arange(n_sides) + jitter)
    radii = 0.5 * size * min(h, w) * rng.uniform(0.6, 1.0, n_sides)
    vertices = np.stack([cy * h + radii * np.sin(angles), cx * w + radii * np.cos(angles)], 1)
    return polygon2mask((h, w), vertices - 0.5)  # pixel centres sit at integer + 0.5
