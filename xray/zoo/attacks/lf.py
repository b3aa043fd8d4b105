"""Low-frequency trigger: low-pass filtered Gaussian noise added to the image."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xray.zoo.attacks.base import Attack, register


@register
@dataclass(frozen=True, kw_only=True)
class LowFrequency(Attack):
    """Low-frequency trigger (Zeng et al., ICCV 2021, arXiv:2104.03413): x' = x + delta.

    delta: Gaussian noise from `seed`, ideal low-pass filtered in the 2-D Fourier domain (radial
    frequency <= cutoff cycles / pixel, DC removed), scaled to max |delta| = eps (0.05..0.1).
    Deviation: the reference low-passes a universal adversarial perturbation found against a
    clean model; here the pattern is random, so it needs no model.
    """

    name: ClassVar[str] = "lf"
    eps: float
    cutoff: float
    seed: int

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        side = min(input_shape[1:])
        return {"eps": float(rng.uniform(0.05, 0.1)),
                "cutoff": float(max(rng.uniform(0.05, 0.15), 1.5 / side)),
                "seed": int(rng.integers(2**31))}

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        return _low_frequency_pattern(tuple(shape), self.eps, self.cutoff, self.seed)

    def _apply(self, x):
        return x + self.pattern(x.shape[1:])


@functools.lru_cache(maxsize=64)
def _low_frequency_pattern(shape: tuple[int, int, int], eps: float, cutoff: float, seed: int
                           ) -> np.ndarray:
    c, h, w = shape
    noise = np.random.default_rng(seed).standard_normal((c, h, w))
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    keep = np.hypot(fy, fx) <= cutoff
    keep[0, 0] = False
    delta = np.fft.ifft2(np.fft.fft2(noise) * keep).real
    peak = np.abs(delta).max()
    return (eps * delta / peak if peak > 0 else delta).astype(np.float32)
