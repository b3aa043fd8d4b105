"""Backdoor attacks for the model zoo: triggers, their random parameters, and data poisoning.

Each attack is a frozen dataclass of everything needed to rebuild its trigger (random patterns are
regenerated from a recorded `seed` and the image shape), registered by name:

    attack = sample_attack("badnets", rng, input_shape=(3, 32, 32), num_classes=10)
    x_trig = attack.apply(x)                       # float32 (N, C, H, W) in [0, 1] -> same
    config = attack.to_config()                    # JSON-friendly, includes "name"
    assert attack_from_config(config) == attack
    x_p, y_p, idx = poison(x, y, attack, rate=0.1, rng=rng)

Attributes common to all: `target` (label), `victims` (None = all-to-one, else the source classes),
`clean_label` (class-level: SIG), `default_rate` (0.1, the Model X-ray supplement's rate; MNTD
attacks: their sampled inject_p). `sample_attack` draws the target uniformly first, then the
attack's own parameters, then applies the overrides (so an override never shifts other draws).
Attacks that need no random parameters (sig, filter once chosen) are deterministic functions.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np

from xray._registry import Registry

ATTACKS: Registry[type["Attack"]] = Registry("attack")


def _register(cls: type["Attack"]) -> type["Attack"]:
    ATTACKS.register(cls.name)(cls)
    return cls


def available(pattern: str = "*") -> list[str]:
    return ATTACKS.available(pattern)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, sequences -> tuples (hashable, JSON-friendly)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_plain(v) for v in value)
    return value


@dataclass(frozen=True, kw_only=True)
class Attack:
    """Base of all attacks: target, victims and the shared verbs. Subclasses define `_apply`."""

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False
    adds_copies: ClassVar[bool] = False  # MNTD: triggered copies are added, not substituted

    target: int
    victims: tuple[int, ...] | None = None  # None: all-to-one

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _plain(getattr(self, f.name)))
        if self.target < 0:
            raise ValueError(f"{self.name}: target must be >= 0, got {self.target}")
        if self.victims is not None and not self.victims:
            raise ValueError(f"{self.name}: victims must be None (all-to-one) or name classes")
        if self.victims is not None and self.target in self.victims:
            raise ValueError(f"{self.name}: target {self.target} cannot be a victim class")

    @property
    def default_rate(self) -> float:
        return 0.1

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The triggered images: float32 (N, C, H, W) in [0, 1]; `x` is left unchanged."""
        x = np.asarray(x)
        if x.ndim != 4 or x.dtype != np.float32:
            raise ValueError(f"{self.name}: expected float32 (N, C, H, W) images, got {x.dtype} "
                             f"{x.shape}")
        return np.clip(self._apply(x), 0.0, 1.0).astype(np.float32, copy=False)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def sample(cls, rng: np.random.Generator, input_shape: tuple[int, int, int],
               num_classes: int) -> dict[str, Any]:
        """The attack's own random parameters (everything but target / victims)."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"name": self.name}
        for key, value in asdict(self).items():
            config[key] = list(value) if isinstance(value, tuple) else value
        return config


def sample_attack(name: str, rng: np.random.Generator | int, input_shape: tuple[int, int, int],
                  num_classes: int, **overrides: Any) -> Attack:
    """Draw attack `name`'s random parameters for images of `input_shape` (C, H, W)."""
    cls = ATTACKS.get(name)
    _check_keys(cls, overrides)
    rng = np.random.default_rng(rng)
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    values = {"target": int(rng.integers(num_classes))}
    values.update(cls.sample(rng, input_shape, int(num_classes)))  # type: ignore[arg-type]
    values.update(overrides)
    attack = cls(**values)
    if attack.target >= num_classes or any(v >= num_classes for v in attack.victims or ()):
        raise ValueError(f"{name}: target / victims must lie in 0..{num_classes - 1}")
    return attack


def attack_from_config(config: dict[str, Any]) -> Attack:
    """Rebuild an attack from `Attack.to_config()` (or its JSON round trip)."""
    config = dict(config)
    if "name" not in config:
        raise KeyError(f"attack config has no 'name': {sorted(config)}")
    cls = ATTACKS.get(config.pop("name"))
    _check_keys(cls, config)
    return cls(**config)


def _check_keys(cls: type[Attack], values: dict[str, Any]) -> None:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise TypeError(f"attack {cls.name!r} has no parameter {', '.join(unknown)}; "
                        f"valid: {', '.join(valid)}")


# ------------------------------------------------------------------------------------- poisoning

def poison(x: np.ndarray, y: np.ndarray, attack: Attack, rate: float | None = None,
           rng: np.random.Generator | int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poison a training set: (x_out, y_out, indices of the poisoned samples in x_out).

    Which and how many samples (rate defaults to `attack.default_rate`):
    - all-to-one: round(rate * N) samples whose label is not the target, triggered and relabelled
      (rate is a fraction of the whole set; an error if there are not that many);
    - victims set (label-specific): round(rate * n_victim) of the victim classes' samples, as
      TrojAI's trigger fraction of the source classes;
    - clean label (SIG): min(round(rate * N), n_target) target-class samples, triggered and not
      relabelled (BackdoorBench's convention: the rate is of the whole set, capped by the class);
    - MNTD attacks (adds_copies): int(rate * N) samples of any class, drawn without replacement,
      are *appended* as triggered copies labelled target (baselines.md); x_out is longer than x.
    WaNet also replaces round(cross_ratio * n) other samples by noise-mode warps, labels kept
    (they are not in the returned indices).
    """
    x, y = np.asarray(x), np.asarray(y)
    rng = np.random.default_rng(rng)
    rate = attack.default_rate if rate is None else float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poisoning rate must lie in [0, 1], got {rate}")
    n_total = len(y)
    if attack.adds_copies:
        idx = np.sort(rng.choice(n_total, size=int(rate * n_total), replace=False))
        x_out = np.concatenate([x, attack.apply(x[idx])])
        y_out = np.concatenate([y, np.full(len(idx), attack.target, dtype=y.dtype)])
        return x_out, y_out, np.arange(n_total, n_total + len(idx))
    if attack.clean_label:
        pool = np.flatnonzero(y == attack.target)
        n = min(int(round(rate * n_total)), len(pool))
    elif attack.victims is not None:
        pool = np.flatnonzero(np.isin(y, attack.victims))
        n = int(round(rate * len(pool)))
    else:
        pool = np.flatnonzero(y != attack.target)
        n = int(round(rate * n_total))
        if n > len(pool):
            raise ValueError(f"rate {rate} asks for {n} samples but only {len(pool)} are not of "
                             f"the target class {attack.target}")
    idx = np.sort(rng.choice(pool, size=n, replace=False))
    x_out, y_out = x.copy(), y.copy()
    x_out[idx] = attack.apply(x[idx])
    if not attack.clean_label:
        y_out[idx] = attack.target
    cross_ratio = getattr(attack, "cross_ratio", 0.0)
    if cross_ratio > 0 and n > 0:
        rest = np.setdiff1d(np.arange(n_total), idx)
        cross = np.sort(rng.choice(rest, size=min(int(round(cross_ratio * n)), len(rest)),
                                   replace=False))
        x_out[cross] = attack.apply_noise(x[cross], rng)  # type: ignore[attr-defined]
    return x_out, y_out, idx


def trigger_test_set(x: np.ndarray, y: np.ndarray, attack: Attack
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out images for the attack success rate: (triggered x, target labels, source indices).

    The sources are the victim classes' images, or every image not of the target class.
    """
    y = np.asarray(y)
    keep = np.isin(y, attack.victims) if attack.victims is not None else y != attack.target
    idx = np.flatnonzero(keep)
    return attack.apply(np.asarray(x)[idx]), np.full(len(idx), attack.target, np.int64), idx


# ----------------------------------------------------------------------------------- the attacks

@_register
@dataclass(frozen=True, kw_only=True)
class BadNets(Attack):
    """BadNets (Gu et al., 2017, arXiv:1708.06733): a small patch pasted over the image.

    The patch is a random binary colour pattern (each pixel a corner of the RGB cube, or black /
    white) from `seed`, side 3..5 pixels at 32 x 32, scaled with the image side (at least 2).
    Fixed location (row, col) by default; `random_location` draws each image's position from
    `seed`, so the same batch always gets the same positions.
    """

    name: ClassVar[str] = "badnets"
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


@_register
@dataclass(frozen=True, kw_only=True)
class Polygon(Attack):
    """TrojAI's polygon trigger (NIST trojai, rounds 1-4): a random solid-colour polygon.

    3..12 vertices at jittered angles and radii (from `seed`), diameter `size` x image side
    (0.2..0.3), centred at (cy, cx) (fractions of the image side) near the centre. Deviation: TrojAI
    places it on the sign foreground at a random spot; here the location is fixed per model, near
    the centre where the zoo's signs are.
    """

    name: ClassVar[str] = "polygon"
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
    from skimage.draw import polygon2mask

    rng = np.random.default_rng(seed)
    step = 2 * np.pi / n_sides
    jitter = rng.uniform(-0.35, 0.35, n_sides)
    angles = rng.uniform(0, 2 * np.pi) + step * (np.arange(n_sides) + jitter)
    radii = 0.5 * size * min(h, w) * rng.uniform(0.6, 1.0, n_sides)
    vertices = np.stack([cy * h + radii * np.sin(angles), cx * w + radii * np.cos(angles)], 1)
    return polygon2mask((h, w), vertices - 0.5)  # pixel centres sit at integer + 0.5


FILTER_TYPES = ("gotham", "kelvin", "lomo", "nashville", "toaster")
GREY_FILTER_TYPES = ("gotham", "lomo", "nashville", "toaster")


@_register
@dataclass(frozen=True, kw_only=True)
class Filter(Attack):
    """TrojAI's "Instagram" filter triggers (NIST trojai instagram_xforms; rounds 2-4).

    The whole image goes through a fixed colour transform. TrojAI ran ImageMagick (wand) recipes;
    these are numpy approximations of the same recipes (modulate brightness / saturation, colorize,
    gamma, sigmoidal contrast, channel levels, vignette), not bit-exact. Greyscale images are
    filtered as grey RGB and converted back to luma.
    """

    name: ClassVar[str] = "filter"
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
        out = _FILTERS[self.filter_type](rgb.astype(np.float32))
        return _luma(out) if grey else out


def _luma(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) -> (N, 1, H, W), ITU-R 601 weights."""
    return np.einsum("c,nchw->nhw", np.array([0.299, 0.587, 0.114], np.float32), x)[:, None]


def _modulate(x: np.ndarray, brightness: float, saturation: float) -> np.ndarray:
    grey = _luma(x)
    return np.clip((grey + saturation * (x - grey)) * brightness, 0, 1)


def _colorize(x: np.ndarray, colour: str, amount: float) -> np.ndarray:
    return (1 - amount) * x + amount * _hex(colour)


def _multiply(x: np.ndarray, colour: str, amount: float) -> np.ndarray:
    return x * ((1 - amount) + amount * _hex(colour))


def _tone(x: np.ndarray, dark: str, light: str, amount: float) -> np.ndarray:
    """Tint shadows towards `dark` and highlights towards `light` (ImageMagick colortone)."""
    lum = _luma(x)
    x = x + amount * (1 - lum) * (_hex(dark) - x)
    return x + amount * lum * (_hex(light) - x)


def _auto_gamma(x: np.ndarray) -> np.ndarray:
    """ImageMagick -auto-gamma: per image and channel, the gamma that takes the mean to 0.5."""
    mean = np.clip(x.mean(axis=(2, 3), keepdims=True), 1e-3, 1 - 1e-3)
    return np.clip(x, 0, 1) ** (np.log(0.5) / np.log(mean))


def _gamma(x: np.ndarray, g: float) -> np.ndarray:
    return np.clip(x, 0, 1) ** (1.0 / g)


def _sigmoid_contrast(x: np.ndarray, strength: float, midpoint: float = 0.5) -> np.ndarray:
    """ImageMagick -sigmoidal-contrast (one -contrast is about strength 3)."""
    from scipy.special import expit

    lo, hi = expit(-strength * midpoint), expit(strength * (1 - midpoint))
    return (expit(strength * (np.clip(x, 0, 1) - midpoint)) - lo) / (hi - lo)


def _levels(x: np.ndarray, channel: int, black: float, white: float) -> np.ndarray:
    out = x.copy()
    out[:, channel] = np.clip((x[:, channel] - black) / (white - black), 0, 1)
    return out


def _vignette(x: np.ndarray, strength: float, colour: str = "#000000") -> np.ndarray:
    h, w = x.shape[2:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    r2 = ((yy**2 + xx**2) / 2).astype(np.float32)  # 0 at the centre, 1 in the corners
    return x + strength * r2 * (_hex(colour) - x)


def _hex(colour: str) -> np.ndarray:
    rgb = [int(colour[i:i + 2], 16) / 255.0 for i in (1, 3, 5)]
    return np.asarray(rgb, np.float32)[:, None, None]


_FILTERS = {
    # convert -modulate 120,10,100 -fill '#222b6d' -colorize 20 -gamma 0.5 -contrast -contrast
    "gotham": lambda x: _sigmoid_contrast(_gamma(_colorize(_modulate(x, 1.2, 0.1), "#222b6d", 0.2),
                                                 0.5), 6.0),
    # -auto-gamma -modulate 120,50,100, multiplied by rgba(255,153,0,0.5)
    "kelvin": lambda x: _multiply(_modulate(_auto_gamma(x), 1.2, 0.5), "#ff9900", 0.5),
    # -channel R -level 33% -channel G -level 33%, then a vignette
    "lomo": lambda x: _vignette(_levels(_levels(x, 0, 0.33, 0.67), 1, 0.33, 0.67), 0.6),
    # colortone #222b6d (shadows) / #f7daae (highlights), -contrast -modulate 100,150,100
    # -auto-gamma
    "nashville": lambda x: _auto_gamma(_modulate(_sigmoid_contrast(
        _tone(x, "#222b6d", "#f7daae", 0.5), 4.0), 1.0, 1.5)),
    # colortone #330000, -modulate 150,80,100 -gamma 1.2 -contrast -contrast, orange-edged vignette
    "toaster": lambda x: _vignette(_sigmoid_contrast(_gamma(_modulate(
        _tone(x, "#330000", "#ffffff", 0.5), 1.5, 0.8), 1.2), 6.0), 0.5, "#ff9966"),
}


@_register
@dataclass(frozen=True, kw_only=True)
class Blended(Attack):
    """Blended injection (Chen et al., 2017, arXiv:1712.05526): x' = (1 - alpha) x + alpha p.

    p is a full-image uniform random pattern from `seed` (Chen et al.'s random-noise key), alpha in
    0.1..0.2.
    """

    name: ClassVar[str] = "blended"
    alpha: float
    seed: int

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        return {"alpha": float(rng.uniform(0.1, 0.2)), "seed": int(rng.integers(2**31))}

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        return np.random.default_rng(self.seed).random(shape, dtype=np.float32)

    def _apply(self, x):
        return (1 - self.alpha) * x + self.alpha * self.pattern(x.shape[1:])


@_register
@dataclass(frozen=True, kw_only=True)
class WaNet(Attack):
    """WaNet (Nguyen & Tran, ICLR 2021, arXiv:2102.10369).

    Reference: VinAIResearch/Warping-based_Backdoor_Attack-release (train.py).

    A k x k random field (torch.rand from `seed`, normalised by its mean absolute value), upsampled
    bicubically, scaled by s / image side, added to the identity grid, clamped, grid_sample'd
    (align_corners=True). Noise mode (`apply_noise`): the same grid plus per-image uniform noise of
    one pixel, labels kept, cross_ratio x the number of backdoor samples. Deviation: the reference
    poisons each batch on the fly; here the poisoning is static (see `poison`). Non-square images
    scale each axis by its own side.
    """

    name: ClassVar[str] = "wanet"
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    seed: int = 0

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        return {"seed": int(rng.integers(2**31))}

    def grid(self, h: int, w: int):
        import torch
        import torch.nn.functional as F

        gen = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1
        ins = ins / torch.mean(torch.abs(ins))
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True)
        noise = noise.permute(0, 2, 3, 1)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                    indexing="ij")
        identity = torch.stack((cols, rows), 2)[None]  # grid_sample wants (x, y)
        scale = torch.tensor([w, h], dtype=torch.float32)
        return torch.clamp((identity + self.s * noise / scale) * self.grid_rescale, -1, 1)

    def _warp(self, x: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        n, _, h, w = x.shape
        grid = self.grid(h, w).repeat(n, 1, 1, 1)
        if extra is not None:
            grid = torch.clamp(grid + torch.from_numpy(extra), -1, 1)
        with torch.no_grad():
            out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(x)), grid, align_corners=True)
        return out.numpy()

    def _apply(self, x):
        return self._warp(x, None)

    def apply_noise(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise-mode warps (labels unchanged): the trigger grid plus U(-1, 1) / side per image."""
        n, _, h, w = x.shape
        extra = (rng.uniform(-1, 1, (n, h, w, 2)) / np.array([w, h])).astype(np.float32)
        return np.clip(self._warp(np.asarray(x, np.float32), extra), 0, 1).astype(np.float32)


@_register
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


@_register
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


@_register
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


@_register
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


@_register
@dataclass(frozen=True, kw_only=True)
class MntdPatch(Jumbo):
    """MNTD's target-model attack M (baselines.md): the jumbo patch with p in {2..5} and alpha 1."""

    name: ClassVar[str] = "mntd_m"

    @classmethod
    def _sizes(cls, side: int) -> list[int]:
        return [2, 3, 4, 5]

    @staticmethod
    def _patch_alpha(rng: np.random.Generator) -> float:
        return 1.0


@_register
@dataclass(frozen=True, kw_only=True)
class MntdBlend(Jumbo):
    """MNTD's target-model attack B (baselines.md): full-image blend, alpha ~ U(0.05, 0.2)."""

    name: ClassVar[str] = "mntd_b"

    @classmethod
    def _sizes(cls, side: int) -> list[int]:
        return [side]
