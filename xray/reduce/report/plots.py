"""The report's plots: ROC curves of every detector, a score histogram per detector, runtime
box plots; figures through matplotlib's object API, encoded by `xray.plots`."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from xray.plots import png_base64
from xray.reduce import metrics as M
from xray.reduce.formatting import fmt
from xray.reduce.report.tables import Unit


def roc_png(units: Sequence[Unit]) -> tuple[str | None, str]:
    """One plot, one ROC curve per detector over all its labelled models; None + why if none."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", linestyle=":", linewidth=1)
    drawn, reasons = 0, []
    for unit in units:
        pm = unit.per_model
        y = pm["y"].to_numpy(dtype=float)
        s = pm["score"].to_numpy(dtype=float)
        use = pm["usable"].to_numpy(dtype=bool) & ~np.isnan(y)
        auc = M.roc_auc(y[use], s[use])
        if not auc.defined:
            reasons.append(f"{unit.label}: {auc.reason}")
            continue
        fpr, tpr, _ = roc_curve(y[use].astype(int), s[use])
        ax.plot(fpr, tpr, linewidth=1.8, drawstyle="steps-post",
                label=f"{unit.label} (AUC {auc.value:.3f}, n={int(use.sum())})")
        drawn += 1
    if not drawn:
        return None, "No ROC curve: " + "; ".join(reasons or ["no detector scores"])
    ax.legend(loc="lower right", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate",
           ylabel="true positive rate", title="ROC per detector (all labelled models)")
    return png_base64(fig), "; ".join(reasons)


def hist_png(unit: Unit) -> str:
    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot()
    pm, threshold = unit.per_model, unit.threshold
    y = pm["y"].to_numpy(dtype=float)
    s = pm["score"].to_numpy(dtype=float)
    usable = pm["usable"].to_numpy(dtype=bool)
    finite = s[usable & np.isfinite(s)]
    if finite.size:
        bins = np.histogram_bin_edges(finite, bins=min(40, max(5, finite.size // 2)))
        for name, mask, color in (
            ("clean", y == 0, "tab:blue"), ("trojaned", y == 1, "tab:red"),
            ("no ground truth", np.isnan(y), "tab:gray"),
        ):
            values = s[usable & mask]
            if values.size:
                ax.hist(values, bins=bins, alpha=0.55, color=color,
                        label=f"{name} (n={values.size})")
        if not math.isnan(threshold):
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
                       label=f"threshold {threshold:.3g}")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no ok scores", ha="center", va="center", transform=ax.transAxes)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="score (higher = more likely trojaned)", ylabel="models",
           title=f"Scores: {unit.label}")
    return png_base64(fig)


def runtime(units: Sequence[Unit]) -> tuple[list[dict[str, str]], str | None]:
    """Runtime percentiles per detector (table) and one box plot of all of them."""
    rows, data, labels = [], [], []
    for unit in units:
        seconds = pd.to_numeric(unit.per_model["seconds"], errors="coerce").to_numpy(dtype=float)
        seconds = seconds[~np.isnan(seconds)]
        pct = M.runtime_percentiles(seconds)
        rows.append({"detector": unit.label, "n": str(seconds.size),
                     "p50": fmt(pct["p50"], 2), "p90": fmt(pct["p90"], 2),
                     "p99": fmt(pct["p99"], 2), "max": fmt(pct["max"], 2),
                     "total": fmt(float(seconds.sum()) if seconds.size else math.nan, 1)})
        if seconds.size:
            data.append(seconds)
            labels.append(unit.label)
    if not data:
        return rows, None
    fig = Figure(figsize=(min(10, 2.5 + 1.4 * len(data)), 3.6))
    ax = fig.add_subplot()
    ax.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 3})
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right", fontsize=8)
    positive = np.concatenate(data)
    if positive.min() > 0 and positive.max() / positive.min() > 50:
        ax.set_yscale("log")
    ax.set(ylabel="seconds per model", title="Runtime per detector (whiskers p1-p99)")
    return rows, png_base64(fig)
