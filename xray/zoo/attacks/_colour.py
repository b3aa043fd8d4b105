"""numpy approximations of the ImageMagick operations behind TrojAI's "Instagram" filters
(modulate, colorize, colortone, gamma, sigmoidal contrast, levels, vignette), on float32
(N, 3, H, W) images in [0, 1].
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit


def luma(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) -> (N, 1, H, W), ITU-R 601 weights."""
    return np.einsum("c,nchw->nhw", np.array([0.299, 0.587, 0.114], np.float32), x)[:, None]


def modulate(x: np.ndarray, brightness: float, saturation: float) -> np.ndarray:
    grey = luma(x)
    return np.clip((grey + saturation * (x - grey)) * brightness, 0, 1)


def colorize(x: np.ndarray, colour: str, amount: float) -> np.ndarray:
    return (1 - amount) * x + amount * hex_colour(colour)


def multiply(x: np.ndarray, colour: str, amount: float) -> np.ndarray:
    return x * ((1 - amount) + amount * hex_colour(colour))


def tone(x: np.ndarray, dark: str, light: str, amount: float) -> np.ndarray:
    """Tint shadows towards `dark` and highlights towards `light` (ImageMagick colortone)."""
    lum = luma(x)
    x = x + amount * (1 - lum) * (hex_colour(dark) - x)
    return x + amount * lum * (hex_colour(light) - x)


def auto_gamma(x: np.ndarray) -> np.ndarray:
    """ImageMagick -auto-gamma: per image and channel, the gamma that takes the mean to 0.5."""
    mean = np.clip(x.mean(axis=(2, 3), keepdims=True), 1e-3, 1 - 1e-3)
    return np.clip(x, 0, 1) ** (np.log(0.5) / np.log(mean))


def gamma(x: np.ndarray, g: float) -> np.ndarray:
    return np.clip(x, 0, 1) ** (1.0 / g)


def sigmoid_contrast(x: np.ndarray, strength: float, midpoint: float = 0.5) -> np.ndarray:
    """ImageMagick -sigmoidal-contrast (one -contrast is about strength 3)."""
    lo, hi = expit(-strength * midpoint), expit(strength * (1 - midpoint))
    return (expit(strength * (np.clip(x, 0, 1) - midpoint)) - lo) / (hi - lo)


def levels(x: np.ndarray, channel: int, black: float, white: float) -> np.ndarray:
    out = x.copy()
    out[:, channel] = np.clip((x[:, channel] - black) / (white - black), 0, 1)
    return out


def vignette(x: np.ndarray, strength: float, colour: str = "#000000") -> np.ndarray:
    h, w = x.shape[2:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    r2 = ((yy**2 + xx**2) / 2).astype(np.float32)  # 0 at the centre, 1 in the corners
    return x + strength * r2 * (hex_colour(colour) - x)


def hex_colour(colour: str) -> np.ndarray:
    rgb = [int(colour[i:i + 2], 16) / 255.0 for i in (1, 3, 5)]
    return np.asarray(rgb, np.float32)[:, None, None]
