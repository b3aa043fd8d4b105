"""Synthetic traffic signs, TrojAI style: a generated, offline, learnable classification task.

After the TrojAI round 1-4 data generator (NIST, trojai `datagen`): a sign foreground (a
solid-colour shape with a border and a symbol glyph in DejaVu Sans Bold, which ships with
matplotlib) is randomly scaled, rotated and colour-jittered, then composited onto a random crop of
a real photograph; the whole image then gets a brightness change and a little Gaussian noise.
The class is the sign design (shape + colour + glyph).

Deviations from TrojAI: the foregrounds are drawn here (TrojAI used a fixed set of sign images);
backgrounds are crops of the photographs that ship with scikit-image and scikit-learn (TrojAI used
KITTI / Cityscapes road scenes); no perspective warp (a small independent x/y scale jitter stands
in for it), no weather or blur effects.

Class designs do not depend on the seed: class k is shape `k mod 8`, fill colour `k mod 7` and
glyph `k mod 11`, so any two of the first seven classes differ in all three attributes and the
designs are unique up to 8 * 7 * 11 = 616 classes. The seed only draws the samples.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# (name, number of vertices or 0 for a circle, rotation of the first vertex in degrees from "up")
SHAPES: tuple[tuple[str, int, float], ...] = (
    ("circle", 0, 0.0),
    ("triangle", 3, 0.0),
    ("square", 4, 45.0),
    ("octagon", 8, 22.5),
    ("inverted_triangle", 3, 180.0),
    ("diamond", 4, 0.0),
    ("pentagon", 5, 0.0),
    ("hexagon", 6, 30.0),
)
# (name, fill RGB); light fills get a black border and glyph, dark ones white.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (200, 30, 40)),
    ("blue", (30, 80, 190)),
    ("yellow", (245, 205, 30)),
    ("green", (20, 140, 60)),
    ("white", (235, 235, 235)),
    ("black", (25, 25, 25)),
    ("purple", (120, 50, 150)),
)
GLYPHS: tuple[str, ...] = ("!", "P", "X", "\u2191", "\u2192", "50", "+", "H", "\u2605", "?", "Z")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(GLYPHS)  # 616 (8, 7, 11 are pairwise coprime)

# Photographs available without a download (no pooch): scikit-image data functions and the two
# scikit-learn sample images. Greyscale ones are repeated to three channels.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "grass", "gravel", "brick")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


@dataclass(frozen=True)
class SignsParams:
    num_classes: int = 10
    image_size: int = 32
    n_train_per_class: int = 500
    n_test_per_class: int = 100
    seed: int = 0
    sign_scale: tuple[float, float] = (0.55, 0.85)  # sign diameter / image side
    max_rotation: float = 15.0  # degrees, uniform in [-max, max]
    max_shift: float = 0.1  # sign centre offset / image side, per axis
    background_crop: tuple[float, float] = (0.15, 0.6)  # crop side / photo's shorter side


@dataclass(frozen=True)
class SignDesign:
    shape: str
    colour: str
    glyph: str


def design(k: int) -> SignDesign:
    """The sign design of class k (independent of any seed)."""
    if not 0 <= k < MAX_CLASSES:
        raise ValueError(f"sign class {k} out of range 0..{MAX_CLASSES - 1}")
    return SignDesign(SHAPES[k % len(SHAPES)][0], COLOURS[k % len(COLOURS)][0],
                      GLYPHS[k % len(GLYPHS)])


def make_signs(params: SignsParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 (N, 3, S, S) in [0, 1] and int64 labels.

    Train and test are drawn from independent child seeds of `params.seed`, so changing the test
    count leaves the training images unchanged. Samples come in a seeded random order.
    """
    if not 1 <= params.num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {params.num_classes}")
    if params.image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {params.image_size}")
    train_seq, test_seq = np.random.SeedSequence(params.seed).spawn(2)
    x_tr, y_tr = _render(params, params.n_train_per_class, np.random.default_rng(train_seq))
    x_te, y_te = _render(params, params.n_test_per_class, np.random.default_rng(test_seq))
    return x_tr, y_tr, x_te, y_te


def _render(params: SignsParams, n_per_class: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    size = params.image_size
    labels = rng.permutation(np.repeat(np.arange(params.num_classes, dtype=np.int64), n_per_class))
    n = len(labels)
    templates = [_template(k, _template_size(size)) for k in range(params.num_classes)]
    photos = _photos()
    out = np.empty((n, size, size, 3), dtype=np.float32)
    # Every random number is drawn up front, in one fixed order, from the one generator.
    photo_idx = rng.integers(len(photos), size=n)
    crop_frac = rng.uniform(*params.background_crop, size=n)
    crop_pos = rng.random((n, 2))
    flip = rng.random(n) < 0.5
    scale = rng.uniform(*params.sign_scale, size=n)
    aspect = rng.uniform(0.9, 1.1, size=(n, 2))
    angle = rng.uniform(-params.max_rotation, params.max_rotation, size=n)
    shift = rng.uniform(-params.max_shift, params.max_shift, size=(n, 2)) * size
    gain = rng.uniform(0.85, 1.15, size=(n, 3)).astype(np.float32)  # sign colour jitter
    brightness = rng.uniform(0.75, 1.15, size=n).astype(np.float32)  # whole image
    noise_sd = rng.uniform(0.0, 0.01, size=n).astype(np.float32)  # faint, not to mask triggers
    noise = rng.standard_normal((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        out[i] = _background(photos[photo_idx[i]], size, crop_frac[i], crop_pos[i], flip[i])
        diam = scale[i] * size
        w, h = (max(2, round(diam * a)) for a in aspect[i])
        sign = templates[labels[i]].resize((w, h), Image.BILINEAR)
        sign = sign.rotate(angle[i], resample=Image.BILINEAR, expand=True)
        _composite(out[i], np.asarray(sign, dtype=np.float32) / 255.0, gain[i],
                   size / 2 + shift[i, 0], size / 2 + shift[i, 1])
    out *= brightness[:, None, None, None]
    out += noise_sd[:, None, None, None] * noise
    np.clip(out, 0.0, 1.0, out=out)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)), labels


def _background(photo: Image.Image, size: int, frac: float, pos: np.ndarray, flip: bool
                ) -> np.ndarray:
    side = frac * min(photo.size)
    left = pos[0] * (photo.size[0] - side)
    top = pos[1] * (photo.size[1] - side)
    crop = photo.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side),
                        reducing_gap=2.0)
    arr = np.asarray(crop, dtype=np.float32) / 255.0
    return arr[:, ::-1] if flip else arr


def _composite(canvas: np.ndarray, sign: np.ndarray, gain: np.ndarray, cx: float, cy: float
               ) -> None:
    """Blend a premultiplied-alpha sign (h, w, 4) onto canvas (S, S, 3) in place, centred at
    (cx, cy); `gain` scales the sign's colour channels."""
    h, w = sign.shape[:2]
    size = canvas.shape[0]
    top, left = int(round(cy - h / 2)), int(round(cx - w / 2))
    t0, l0 = max(0, -top), max(0, -left)
    t1, l1 = min(h, size - top), min(w, size - left)
    if t1 <= t0 or l1 <= l0:
        return
    patch = sign[t0:t1, l0:l1]
    alpha = patch[..., 3:4]
    region = canvas[top + t0:top + t1, left + l0:left + l1]
    region *= 1.0 - alpha
    region += np.minimum(patch[..., :3] * gain, alpha)


def _template_size(image_size: int) -> int:
    return max(64, 2 * image_size)


@functools.lru_cache(maxsize=1024)
def _template(k: int, size: int) -> Image.Image:
    """RGBa image (size x size) of class k's sign, drawn 4x supersampled then reduced."""
    d = design(k)
    big = 4 * size
    fill = dict(COLOURS)[d.colour]
    ink = (20, 20, 20) if sum(fill) > 500 else (245, 245, 245)
    _, n_vertices, rotation = next(s for s in SHAPES if s[0] == d.shape)
    img = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    centre, radius = big / 2, big / 2 - 1
    border = 0.13 * radius
    if n_vertices == 0:
        draw.ellipse(_box(centre, radius), fill=ink + (255,))
        draw.ellipse(_box(centre, radius - border), fill=fill + (255,))
    else:
        inner = radius - border / math.cos(math.pi / n_vertices)  # constant border width
        draw.polygon(_polygon(centre, radius, n_vertices, rotation), fill=ink + (255,))
        draw.polygon(_polygon(centre, inner, n_vertices, rotation), fill=fill + (255,))
    # Triangles: the glyph goes on the incircle (radius R/2), lower or higher as the tip points.
    if n_vertices == 3:
        glyph_height, dy = 0.42 * radius, (0.12 if rotation == 0 else -0.12) * radius
    else:
        glyph_height, dy = 0.75 * radius, 0.0
    font = ImageFont.truetype(_font_path(), int(glyph_height))
    draw.text((centre, centre + dy), d.glyph, fill=ink + (255,), font=font, anchor="mm")
    # Premultiplied alpha ("RGBa"), so that later resampling does not bleed black into the edges.
    return img.resize((size, size), Image.LANCZOS).convert("RGBa")


def _box(centre: float, radius: float) -> tuple[float, float, float, float]:
    return (centre - radius, centre - radius, centre + radius, centre + radius)


def _polygon(centre: float, radius: float, n: int, rotation: float) -> list[tuple[float, float]]:
    angles = np.deg2rad(rotation + 360.0 * np.arange(n) / n)
    return [(centre + radius * math.sin(a), centre - radius * math.cos(a)) for a in angles]


def _font_path() -> str:
    # Local: matplotlib is here only for its bundled font file (and skimage / sklearn below only
    # for their sample photographs): seconds of imports that most callers of this module skip.
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf")


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    """The background photographs as RGB PIL images, loaded once per process."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    arrays = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    arrays += [load_sample_image(name) for name in SKLEARN_PHOTOS]
    photos = []
    for a in arrays:
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        photos.append(Image.fromarray(np.ascontiguousarray(a[..., :3]).astype(np.uint8), "RGB"))
    return tuple(photos)
