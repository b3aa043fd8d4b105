"""The one module that draws model pictures (inverted triggers beside the ground truth) and turns
figures into PNG bytes, for the report and `xray explain` alike.

matplotlib's object API only: a `matplotlib.figure.Figure` on its own Agg canvas, never pyplot,
never a global backend switch, so drawing is safe in any process (a Ray worker, a notebook, a
test) and leaves no state behind. Arrays in, figures out: nothing here reads a table or a model.

    fig = panels_figure([[("clean example", image, None), ("|difference|", diff, "magma")]])
    png = png_bytes(fig, dpi=80)            # or png_base64 for an inline <img>

Images are (H, W) or (H, W, C) for imshow (`as_image`, `as_mask` convert from the CHW layout of
the scanners); values outside [0, 1] are clipped for display.

The decision-boundary planes of Model X-ray are drawn by `xray.detectors.modelxray.plot_planes`
(object API as well); it belongs here and should move when the detectors are next touched.
"""
from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# one panel: (title, image (H, W) or (H, W, C), colormap for a 2-D image or None)
Panel = tuple[str, np.ndarray, "str | None"]


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (tight bounding box, no software tag, so equal figures give
    equal bytes)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def png_base64(fig: Figure, dpi: int = 100) -> str:
    """The figure as base64 PNG text, for an inline data: URI."""
    return base64.b64encode(png_bytes(fig, dpi)).decode("ascii")


def as_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) from (H, W), (1, H, W), (1, 1, H, W) or (C, H, W) (max over channels)."""
    m = np.asarray(mask, dtype=np.float32)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim == 3:
        m = m.max(axis=0)
    return m


def as_image(pattern: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) for imshow from (C, H, W) / (1, C, H, W) / (H, W), clipped to
    [0, 1]."""
    p = np.asarray(pattern, dtype=np.float32)
    while p.ndim > 3 and p.shape[0] == 1:
        p = p[0]
    if p.ndim == 3:
        p = p[0] if p.shape[0] == 1 else np.transpose(p, (1, 2, 0))
    return np.clip(p, 0.0, 1.0)


def panels_figure(rows: Sequence[Sequence[Panel]]) -> Figure:
    """A grid, one row per list of panels (the widest row sets the columns). A 2-D image with
    a colormap is scaled to [0, its max]; without one (grey) and in colour to [0, 1]."""
    cols = max(len(r) for r in rows)
    fig = Figure(figsize=(1.9 * cols, 2.0 * len(rows)))
    for i, row in enumerate(rows):
        for j, (title, image, cmap) in enumerate(row):
            ax = fig.add_subplot(len(rows), cols, i * cols + j + 1)
            if image.ndim == 2:
                ax.imshow(image, cmap=cmap or "gray", interpolation="nearest",
                          vmin=0.0, vmax=max(1e-6, float(image.max())) if cmap else 1.0)
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig
