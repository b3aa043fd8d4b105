"""The one module that draws model pictures (inverted triggers beside the ground truth) and turns
figures into PNG bytes, for the report and `xray explain` alike.

matplotlib's object API only: a `matplotlib.figure.Figure` on its own Agg canvas, never pyplot,
never a global backend switch, so drawing is safe in any process (a Ray worker, a notebook, a
test) and leaves no state behind. Arrays in, figures out: nothing here reads a table or a model.

    fig = panels_figure([[("clean example", image, None), ("|difference|", diff, "magma")]])
    png = png_bytes(fig, dpi=80)            # or png_base64 for an inline <img>

Images are (H, W) or (H, W, C) for imshow (`as_image`, `as_mask` convert from the CHW layout of
the scanners); values outside [0, 1] are clipped for display.

Model X-ray's decision-boundary planes are drawn here too (`planes_figure`, from the plane dicts
the detector returns as artifacts), titled with what a reader needs to judge them: a `Headline`
(model id, ground truth and true target, each detector's verdict, score against threshold and
predicted target) above, planes numbered from 1 ("plane 1 of 8", as the report's captions count),
a legend of the class colours under them with the predicted target highlighted, and optionally
trigger panels beside them.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from xray.reduce.formatting import is_missing

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


def _known(value: Any) -> bool:
    return not is_missing(value)


def _num(value: Any) -> str:
    return f"{float(value):.4g}" if _known(value) else "-"


@dataclass(frozen=True)
class Finding:
    """One detector's word on a model: its verdict ("trojaned", "clean", "no threshold", or why
    there is none: "error", "timeout", ...), score, threshold and predicted target."""

    detector: str
    verdict: str
    score: float | None = None
    threshold: float | None = None
    predicted_target: int | None = None

    def text(self, true_target: int | None = None) -> str:
        verdict = self.verdict.upper() if self.verdict == "trojaned" else self.verdict
        parts = [f"{self.detector}: {verdict}"]
        if _known(self.score):
            if _known(self.threshold):
                relation = ">=" if float(self.score) >= float(self.threshold) else "<"
                parts.append(f"score {_num(self.score)} {relation} threshold "
                             f"{_num(self.threshold)}")
            else:
                parts.append(f"score {_num(self.score)}, no threshold")
        target = (f"predicted target {int(self.predicted_target)}"
                  if _known(self.predicted_target) else "no predicted target")
        if _known(true_target):
            target += f" vs true {int(true_target)}"
        return ", ".join(parts + [target])


@dataclass(frozen=True)
class Headline:
    """What a model picture's title says: the model, its ground truth (trojaned / clean /
    unknown) and true target when known, and each detector's `Finding`."""

    model_id: str
    truth: str = "unknown"
    true_target: int | None = None
    findings: tuple[Finding, ...] = ()

    @property
    def predicted_target(self) -> int | None:
        """The first finding's predicted target (the detector the picture is about)."""
        for finding in self.findings:
            if _known(finding.predicted_target):
                return int(finding.predicted_target)
        return None

    def text(self) -> str:
        truth = f"ground truth {self.truth}"
        if _known(self.true_target):
            truth += f", true target {int(self.true_target)}"
        lines = [f"{self.model_id} ({truth})"]
        lines += [f.text(self.true_target) for f in self.findings]
        return "\n".join(lines)


def class_colours(num_classes: int) -> list[tuple[float, ...]]:
    """One colour per class (tab10 / tab20, gist_rainbow beyond 20: the reference's choice)."""
    if num_classes <= 10:
        return [colormaps["tab10"](i) for i in range(num_classes)]
    if num_classes <= 20:
        return [colormaps["tab20"](i) for i in range(num_classes)]
    cmap = colormaps["gist_rainbow"]
    return [cmap(float(t)) for t in np.linspace(0.0, 1.0, num_classes)]


def _draw_panels(fig: Any, rows: Sequence[Sequence[Panel]]) -> None:
    cols = max(len(r) for r in rows)
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


def panels_figure(rows: Sequence[Sequence[Panel]], headline: Headline | None = None) -> Figure:
    """A grid, one row per list of panels (the widest row sets the columns), under the
    headline's title when given. A 2-D image with a colormap is scaled to [0, its max];
    without one (grey) and in colour to [0, 1]."""
    cols = max(len(r) for r in rows)
    lines = headline.text().count("\n") + 1 if headline else 0
    fig = Figure(figsize=(max(1.9 * cols, 5.0 if headline else 0.0),
                          2.0 * len(rows) + 0.22 * lines), layout="constrained")
    _draw_panels(fig, rows)
    if headline:
        fig.suptitle(headline.text(), fontsize=8, x=0.01, ha="left")
    return fig


def _class_legend(fig: Any, width: int, colours: Sequence[Any], predicted: int | None,
                  true_target: int | None) -> Any:
    """The class-colour legend under the planes; the predicted target (bold, framed) and the
    true target named."""
    handles = []
    for label in range(width):
        role = []
        if predicted is not None and label == predicted:
            role.append("predicted target")
        if true_target is not None and label == true_target:
            role.append("true target")
        text = f"{label}" + (f" = {' & '.join(role)}" if role else "")
        handles.append(Patch(facecolor=colours[label], label=text,
                             edgecolor="black" if label == predicted else "none",
                             linewidth=2.5 if label == predicted else 0.0))
    rows = math.ceil(width / 6)
    ncols = math.ceil(width / rows)
    # matplotlib fills a legend column by column: order the entries so they read row by row
    handles = [handles[r * ncols + c] for c in range(ncols) for r in range(rows)
               if r * ncols + c < width]
    legend = fig.legend(handles=handles, loc="outside lower center", fontsize=9,
                        ncols=ncols, title="class colours", title_fontsize=9,
                        handlelength=1.4, columnspacing=1.0, frameon=False)
    for text in legend.get_texts():
        if "predicted target" in text.get_text():
            text.set_fontweight("bold")
    return legend


def planes_figure(planes: Sequence[Mapping[str, Any]], num_classes: int,
                  headline: Headline | None = None, total: int | None = None,
                  triggers: Sequence[Sequence[Panel]] = (), cols: int = 4) -> Figure:
    """Model X-ray's decision-boundary planes (its `planes` artifacts: pred grid, c1 / c2
    coordinates, the three samples, dominating label and share, RE, ATS), at most `cols` per
    row, each titled "plane k of total" (k from 1); the headline above, the class-colour legend
    below (predicted and true target marked), and `triggers` (rows of panels, as
    `panels_figure`) beside them when given."""
    planes = list(planes)
    if not planes:
        raise ValueError("planes_figure: no planes to draw")
    total = total or len(planes)
    width = max(int(num_classes), max(int(np.max(p["pred"])) + 1 for p in planes))
    colours = class_colours(width)
    cmap = ListedColormap(colours)
    cols = max(1, min(cols, len(planes)))
    rows = math.ceil(len(planes) / cols)
    trigger_cols = max((len(r) for r in triggers), default=0)
    lines = headline.text().count("\n") + 1 if headline else 0
    fig = Figure(figsize=(3.3 * cols + 1.9 * trigger_cols,
                          max(3.5 * rows, 2.0 * len(triggers)) + 0.25 * lines + 0.9),
                 layout="constrained")
    if triggers:
        left, right = fig.subfigures(1, 2, width_ratios=[3.3 * cols, 1.9 * trigger_cols],
                                     wspace=0.02)
        _draw_panels(right, triggers)
        right.suptitle("triggers", fontsize=9)
    else:
        left = fig
    markers = ("o", "^", "X")
    for n, plane in enumerate(planes):
        ax = left.add_subplot(rows, cols, n + 1)
        c1, c2 = np.asarray(plane["c1"]), np.asarray(plane["c2"])
        ax.imshow(np.asarray(plane["pred"]).T, origin="lower", cmap=cmap, vmin=-0.5,
                  vmax=width - 0.5, interpolation="nearest", aspect="auto",
                  extent=(c1[0], c1[-1], c2[0], c2[-1]))
        samples = []
        for k, (xy, label) in enumerate(zip(plane["sample_coords"], plane["sample_labels"])):
            ax.scatter([xy[0]], [xy[1]], s=70, marker=markers[k % 3], c=[colours[int(label)]],
                       edgecolors="black", linewidths=1.2, zorder=3)
            samples.append(Line2D([], [], marker=markers[k % 3], linestyle="",
                                  markerfacecolor=colours[int(label)], markeredgecolor="black",
                                  label=f"sample of {int(label)}"))
        ax.legend(handles=samples, loc="lower left", fontsize=6, framealpha=0.8,
                  handletextpad=0.2, borderpad=0.3)
        ax.set_title(f"plane {n + 1} of {total}: label {plane['dominating_label']} covers "
                     f"{100 * plane['dominating_share']:.0f}%\n"
                     f"RE {plane['re']:.3f}  ATS {plane['ats']:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    _class_legend(fig, width, colours, headline.predicted_target if headline else None,
                  headline.true_target if headline and _known(headline.true_target) else None)
    if headline:
        fig.suptitle(headline.text(), fontsize=10, x=0.01, ha="left")
    return fig
