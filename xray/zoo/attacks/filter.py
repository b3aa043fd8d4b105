"""TrojAI's "Instagram" filter triggers: the whole image through a fixed colour transform."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xray.zoo.attacks import _colour as C
from xray.zoo.attacks.base import Attack, register


FILTER_TYPES = ("gotham", "kelvin", "lomo", "nashville", "toaster")
GREY_FILTER_TYPES = ("gotham", "lomo", "nashville", "toaster")

FILTERS = {
    # convert -modulate 120,10,100 -fill '#222b6d' -colorize 20 -gamma 0.5 -contrast -contrast
    "gotham": lambda x: C.sigmoid_contrast(
        C.gamma(C.colorize(C.modulate(x, 1.2, 0.1), "#222b6d", 0.2), 0.5), 6.0),
    # -auto-gamma -modulate 120,50,100, multiplied by rgba(255,153,0,0.5)
    "kelvin": lambda x: C.multiply(C.modulate(C.auto_gamma(x), 1.2, 0.5), "#ff9900", 0.5),
    # -channel R -level 33% -channel G -level 33%, then a vignette
    "lomo": lambda x: C.vignette(C.levels(C.levels(x, 0, 0.33, 0.67), 1, 0.33, 0.67), 0.6),
    # colortone #222b6d (shadows) / #f7daae (highlights), -contrast -modulate 100,150,100
    # -auto-gamma
    "nashville": lambda x: C.auto_gamma(C.modulate(C.sigmoid_contrast(
        C.tone(x, "#222b6d", "#f7daae", 0.5), 4.0), 1.0, 1.5)),
    # colortone #330000, -modulate 150,80,100 -gamma 1.2 -contrast -contrast, orange-edged vignette
    "toaster": lambda x: C.vignette(C.sigmoid_contrast(C.gamma(C.modulate(
        C.tone(x, "#330000", "#ffffff", 0.5), 1.5, 0.8), 1.2), 6.0), 0.5, "#ff9966"),
}


@register
@dataclass(frozen=True, kw_only=True)
class Filter(Attack):
    """TrojAI's "Instagram" filter triggers (NIST trojai instagram_xforms; rounds 2-4).

    The whole image goes through a fixed colour transform. TrojAI ran ImageMagick (wand) recipes;
    these are numpy approximations of the same recipes (modulate brightness / saturation, colorize,
    gamma, sigmoidal contrast, channel levels, vignette), not bit-exact. Greyscale images are
    filtered as grey RGB and converted back to luma.
    """

    name: ClassVar[str] = "filter"
    supports_all_to_all: ClassVar[bool] = True
    filter_type: str  # one of FILTER_TYPES; drawn from GREY_FILTER_TYPES for 1-channel images

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.filter_type not in FILTER_TYPES:
            raise ValueError(f"unknown filter_type {self.filter_type!r}; valid: {FILTER_TYPES}")

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        # kelvin is mostly a colour cast: on greyscale images it is nearly the identity.
        types = FILTER_TYPES if input_shape[0] != 1 else GREY_FILTER_TYPES
        return {"filter_type": types[int(rng.integers(len(types)))]}

    def _apply(self, x):
        grey = x.shape[1] == 1
        rgb = np.repeat(x, 3, axis=1) if grey else x
        if rgb.shape[1] != 3:
            raise ValueError(f"filter needs 1 or 3 channels, got {x.shape[1]}")
        out = FILTERS[self.filter_type](rgb.astype(np.float32))
        return C.luma(out) if grey else out
