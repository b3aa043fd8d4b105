"""SIG: a clean-label horizontal sinusoid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xray.zoo.attacks.base import Attack, register


@register
@dataclass(frozen=True, kw_only=True)
class SIG(Attack):
    """SIG (Barni et al., ICIP 2019, arXiv:1902.11237): clean-label horizontal sinusoid.

    x' = x + delta sin(2 pi j f / W) on every channel and row (j = column), delta = 20/255, f = 6;
    only target-class training images are poisoned and they keep their labels.
    """

    name: ClassVar[str] = "sig"
    clean_label: ClassVar[bool] = True
    delta: float = 20 / 255
    frequency: float = 6.0

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        return {}

    def _apply(self, x):
        w = x.shape[3]
        signal = self.delta * np.sin(2 * np.pi * np.arange(w) * self.frequency / w)
        return x + signal.astype(np.float32)
