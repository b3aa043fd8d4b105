"""Refool: a clean-label reflection of a real photograph over the target class's images."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xray.zoo.attacks.base import Attack, register

# Real photographs that ship with scikit-image (no download), none of them a background of the
# zoo's signs (xray.zoo.signs.SKIMAGE_PHOTOS): reflections are content the clean images never
# show, as the reference takes its reflections from another dataset (PASCAL VOC) than the victim's.
REFLECTION_PHOTOS = ("clock", "coins", "moon", "hubble_deep_field", "text",
                     "immunohistochemistry", "retina")
# The candidate filter's stand-in for the reference's PASCAL VOC 'person' backgrounds.
FILTER_BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
KINDS = ("clear", "blur", "ghost")  # the paper's types I (same depth of field), II, III
GAMMA = 2.2


@register
@dataclass(frozen=True, kw_only=True)
class Reflection(Attack):
    """Refool, reflection backdoor (Liu, Ma, Bailey & Lu, ECCV 2020, arXiv:2007.02343).

    References: DreamtaleCore/Refool @ 9948043c70170ffdd77ee10806abe2e52bc4dca6
    (scripts/insert_reflection.py: blend_images and the candidate filter; strategy.py),
    ain-soph/trojanzoo @ 45d680c4d3bc7810a0a7a5b6fa939f87d5e6c551
    (trojanvision/attacks/backdoor/clean_label/refool.py, trojanvision/data/refool/
    insert_reflection.py), SCLBD/BackdoorBench @ f02e3534645f0ee63d6848653062cd6c0d6c400d
    (attack/refool.py, config/attack/refool/{default,paper_setting}.yaml).

    Clean label: a share of the target class's training images get the reflection of `photo`
    (one of REFLECTION_PHOTOS, resized to the image, greyscale for 1-channel images) and keep
    their labels; at test time the same reflection sends other classes to the target. Blending
    is the reference's `blend_images` in linear light (gamma 2.2), x' = (alpha_t x^2.2 + R)^(1/2.2)
    clipped, with the reflection layer R of one of the paper's three types:
    - "clear" (type I, same depth of field): R = (1 - alpha_t) r^2.2;
    - "blur" (type II, out of focus): r^2.2 Gaussian-blurred (sigma, kernel side
      2 ceil(2 sigma) + 1, reflect-101 border), lowered per image and channel by
      att x (mean of (blur + x^2.2) where it exceeds 1, minus 1), clipped, times a centred
      Gaussian vignette (3 sigma to the border) x (1 - alpha_t / 2);
    - "ghost" (type III): (1 - alpha_t) x [ghost_alpha r^2.2 and (1 - ghost_alpha) r^2.2 shifted by
      `offset`, cropped and resized back (bilinear: the reference's cv2.resize passes
      INTER_CUBIC as its dst argument, so it interpolates linearly)].
    Drawn per attack: ghost with the reference's ghost_rate 0.49, else clear or blur alike;
    alpha_t = 1 - U(0.05, 0.45), sigma ~ U(1, 5), offset ~ U{3..8}^2, ghost_alpha =
    |round(U) - U(0.15, 0.5)|, att = 1.08 + U(0, 0.1) (the reference's ranges; sigma and offset
    are pixels at 32 px as BackdoorBench blends at the image's own size, scaled with the side).
    Candidate selection: the type is drawn first; then `sample` keeps the first of up to 64
    drawn (photo, parameters) whose blend over a bundled photograph passes the reference's
    filter (blend max >= 0.1, SSIM(blend, transmission layer) in (0.7, 0.85): neither too alike
    nor too unlike); if none passes, the one whose SSIM lies nearest the band.
    Poisoning rate: `target_fraction` 0.2 of the target class (BackdoorBench's paper_setting and
    the reference README's train-0-0.2 split), as target_fraction / num_classes of the whole set
    (`poison`'s clean-label convention; exact for balanced classes).

    Deviations, and why:
    - no tentative-attack ranking of candidates (the reference retrains a model 16 times to
      weight 100-200 candidate reflections and keeps the best one, TrojanZoo, or all of them,
      BackdoorBench): out of a 2-core CPU budget; one reflection per attack, from the seed;
    - the candidate filter blends over scikit-image photographs (astronaut, coffee, ...) in
      place of PASCAL VOC person images, at the victim's image size rather than 560 px, and
      drops the test mean(reflection layer) <= 0.8 mean(blend - reflection layer): the original
      code subtracts uint8 arrays (wrapping around), so it seldom rejects, while TrojanZoo's
      float version rejects nearly every clear or ghost reflection at 24-32 px (measured);
    - the blend parameters are drawn once per attack, not per image (TrojanZoo also poisons with
      one fixed trigger); the vignette is centred, not randomly cropped, for non-square images;
    - type I (clear) is in the paper but not in the reference code, which only has blur and
      ghost; it takes half of the non-ghost draws.
    """

    name: ClassVar[str] = "reflection"
    clean_label: ClassVar[bool] = True
    photo: str
    kind: str
    alpha_t: float
    sigma: float = 0.0  # blur only
    offset: tuple[int, int] = (0, 0)  # ghost only: (rows, cols)
    ghost_alpha: float = 0.0  # ghost only
    att: float = 1.08  # blur only
    num_classes: int = 10
    target_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.photo not in REFLECTION_PHOTOS:
            raise ValueError(f"{self.name}: photo must be one of {REFLECTION_PHOTOS}, got "
                             f"{self.photo!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "ghost" and min(self.offset) < 1:
            raise ValueError(f"{self.name}: a ghost needs offsets >= 1, got {self.offset}")
        if self.kind == "blur" and self.sigma <= 0:
            raise ValueError(f"{self.name}: a blur needs sigma > 0, got {self.sigma}")

    @property
    def default_rate(self) -> float:
        return self.target_fraction / self.num_classes

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        c, h, w = input_shape
        scale = min(h, w) / 32
        u = rng.random()
        kind = "ghost" if u < 0.49 else ("blur" if u < 0.745 else "clear")
        best, best_gap = None, math.inf
        for _ in range(64):
            params = {"photo": REFLECTION_PHOTOS[int(rng.integers(len(REFLECTION_PHOTOS)))],
                      "alpha_t": float(1 - rng.uniform(0.05, 0.45)), "kind": kind}
            if kind == "ghost":
                params["offset"] = tuple(max(1, int(round(int(rng.integers(3, 9)) * scale)))
                                         for _ in range(2))
                params["ghost_alpha"] = float(abs(round(rng.random()) - rng.uniform(0.15, 0.5)))
            elif kind == "blur":
                params["sigma"] = float(rng.uniform(1, 5) * scale)
                params["att"] = float(1.08 + rng.random() / 10)
            background = _photo(FILTER_BACKGROUNDS[int(rng.integers(len(FILTER_BACKGROUNDS)))],
                                c, h, w)
            gap = cls(target=0, num_classes=num_classes, **params).filter_gap(background)
            if gap == 0:
                best = params
                break
            if gap < best_gap:
                best, best_gap = params, gap
        return {**best, "num_classes": int(num_classes)}

    def filter_gap(self, background: np.ndarray) -> float:
        """0 when blending over `background` (C, H, W) passes the reference's candidate filter
        (SSIM(blend, transmission layer) in (0.7, 0.85), blend max >= 0.1), else how far the
        SSIM lies from that band (plus 1 for a blend darker than 0.1)."""
        from skimage.metrics import structural_similarity

        t = background[None] ** GAMMA
        blended = self._blend(t)
        transmission = (self.alpha_t * t) ** (1 / GAMMA)
        side = min(background.shape[1:])
        ssim = structural_similarity(blended[0], transmission[0], channel_axis=0, data_range=1.0,
                                     win_size=min(7, side - 1 + side % 2))
        gap = max(0.7 - ssim, ssim - 0.85, 0.0)
        return gap if blended.max() >= 0.1 else 1.0 + gap

    def reflection(self, c: int, h: int, w: int) -> np.ndarray:
        """The reflected photograph in linear light, (C, H, W)."""
        return _photo(self.photo, c, h, w) ** GAMMA

    def _apply(self, x):
        return self._blend(np.asarray(x, np.float64) ** GAMMA).astype(np.float32)

    def _blend(self, t: np.ndarray) -> np.ndarray:
        """The blended images for linear-light images t (N, C, H, W)."""
        _, c, h, w = t.shape
        r = self.reflection(c, h, w)
        a = self.alpha_t
        if self.kind == "clear":
            mask = (1 - a) * r
        elif self.kind == "ghost":
            mask = (1 - a) * _ghost(r, self.offset, self.ghost_alpha)
        else:
            blurred = _gaussian_blur(r, self.sigma)[None]
            blend = blurred + t
            over = blend > 1
            mean = np.maximum(1.0, (blend * over).sum((2, 3)) / (over.sum((2, 3)) + 1e-6))
            lowered = np.clip(blurred - (mean[..., None, None] - 1) * self.att, 0, 1)
            mask = lowered * _vignette(h, w) * (1 - a / 2)
        return np.clip((mask + a * t) ** (1 / GAMMA), 0, 1)


def _ghost(r: np.ndarray, offset: tuple[int, int], ghost_alpha: float) -> np.ndarray:
    """The reference's ghost: r and r shifted by offset, mixed, cropped, resized back."""
    import torch
    import torch.nn.functional as F

    c, h, w = r.shape
    dr, dc = min(offset[0], h - 1), min(offset[1], w - 1)
    r1 = np.pad(r, ((0, 0), (0, dr), (0, dc)))
    r2 = np.pad(r, ((0, 0), (dr, 0), (dc, 0)))
    ghost = (ghost_alpha * r1 + (1 - ghost_alpha) * r2)[:, dr:-dr, dc:-dc]
    out = F.interpolate(torch.from_numpy(np.ascontiguousarray(ghost))[None], size=(h, w),
                        mode="bilinear", align_corners=False)
    return out[0].numpy()


def _gaussian_blur(r: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur with ksize 2 ceil(2 sigma) + 1 and its reflect-101 border, per channel."""
    from scipy.ndimage import gaussian_filter

    radius = int(math.ceil(2 * sigma))
    return gaussian_filter(r, sigma=(0, sigma, sigma), truncate=radius / sigma, mode="mirror")


def _vignette(h: int, w: int) -> np.ndarray:
    """The reference's gen_kernel(max side, nsig=3), centred on an h x w image."""
    from scipy.special import ndtr

    side = max(h, w)
    interval = 7.0 / side
    k1 = np.diff(ndtr(np.linspace(-3 - interval / 2, 3 + interval / 2, side + 1)))
    kernel = np.sqrt(np.outer(k1, k1))
    kernel /= kernel.max()
    top, left = (side - h) // 2, (side - w) // 2
    return kernel[top:top + h, left:left + w]


@functools.lru_cache(maxsize=64)
def _photo(name: str, c: int, h: int, w: int) -> np.ndarray:
    """A scikit-image photograph resized (bicubic) to h x w, float64 in [0, 1], (C, H, W): RGB
    (grey photographs repeated) when c == 3, else its greyscale repeated c times."""
    from PIL import Image

    img = Image.fromarray(_photo_array(name))
    img = img.convert("RGB" if c == 3 else "L").resize((w, h), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float64) / 255.0
    out = a.transpose(2, 0, 1) if c == 3 else np.repeat(a[None], c, axis=0)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=16)
def _photo_array(name: str) -> np.ndarray:
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    return np.ascontiguousarray(a[..., :3] if a.ndim == 3 else a).astype(np.uint8)
