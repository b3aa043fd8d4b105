"""BppAttack: colour-depth squeezing with Floyd-Steinberg dithering."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xray.zoo.attacks.base import Attack, register


@register
@dataclass(frozen=True, kw_only=True)
class BPP(Attack):
    """BppAttack (Wang et al., CVPR 2022, arXiv:2205.13383).

    Reference: RU-System-Software-and-Security/BppAttack.

    Colour-depth squeezing to 2**bits levels per channel with Floyd-Steinberg dithering (the
    reference's floydDitherspeed: 7/16 right, 3/16 down-left, 5/16 down, 1/16 down-right, raster
    order), vectorised over images and channels. Deviations: quantised values are clipped to
    [0, 1] (the reference can round past the top level); the reference's adversarial "negative"
    training samples (which need the model being trained) are not made here.
    """

    name: ClassVar[str] = "bpp"
    bits: int = 3
    dither: bool = True

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        return {"bits": int(rng.integers(3, 6))}

    def _apply(self, x):
        q = float(2**self.bits - 1)
        if not self.dither:
            return np.rint(x * q) / q
        n, c, h, w = x.shape
        buf = np.zeros((h + 1, w + 2, n, c), np.float32)  # pixel-major; a zero border takes spills
        buf[:h, 1:w + 1] = x.transpose(2, 3, 0, 1)
        for i in range(h):
            row, below = buf[i], buf[i + 1]
            for j in range(1, w + 1):
                new = np.clip(np.rint(row[j] * q), 0, q) / q
                err = row[j] - new
                row[j] = new
                row[j + 1] += err * 0.4375
                below[j - 1] += err * 0.1875
                below[j] += err * 0.3125
                below[j + 1] += err * 0.0625
        return buf[:h, 1:w + 1].transpose(2, 3, 0, 1)
