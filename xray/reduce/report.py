"""A self-contained HTML report of one output folder: runs, summary, plots, errors, scores.

Self-contained: plots are inline base64 PNGs and the page references nothing on the network,
so it can be mailed or attached to a CI run. Plots use matplotlib's object API with the Agg
canvas (no pyplot, no global backend switch); the page is the jinja2 template
templates/report.html.j2 with autoescaping on.
"""
from __future__ import annotations

import base64
import io
import json
import math
import posixpath
from datetime import datetime, timezone
from typing import Any, Mapping

import jinja2
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from xray.io import storage
from xray.reduce import metrics as M
from xray.reduce.summary import load_scores, summarize, unit_frames

MAX_ROWS = 5000  # per-model and error tables; the rest is counted, not shown

_SUMMARY_VIEW = [
    ("detector", "detector"), ("group", "group"), ("n", "n"), ("troj", "n_poisoned"),
    ("clean", "n_clean"), ("unlab", "n_unlabelled"), ("missing", "n_missing"),
    ("coverage", "coverage"), ("threshold", "threshold"), ("thr source", "threshold_source"),
    ("TP", "TP"), ("FP", "FP"), ("FN", "FN"), ("TN", "TN"), ("acc", "accuracy"),
    ("best thr", "best_threshold"), ("best acc", "best_accuracy"), ("ROC-AUC", "roc_auc"),
    ("AUC r1-4", "roc_auc_thresholds"), ("TPR@FPR", "tpr_at_fpr"), ("CE", "ce"),
    ("CE ci95", "ce_ci95"), ("Brier", "brier"), ("CE miss=0.5", "ce_missing_as_half"),
    ("AUC miss=0.5", "roc_auc_missing_as_half"), ("p source", "probability_source"),
    ("p50 s", "runtime_p50"), ("p90 s", "runtime_p90"), ("max s", "runtime_max"),
    ("notes", "notes"),
]
_SUMMARY_TEXT = {"detector", "group", "thr source", "p source", "notes"}

_SUMMARY_HELP = (
    "score >= threshold means trojaned. Attack groups hold the trojaned models of that attack "
    "and all clean models. Missing = models without an ok score: left out of the plain metrics, "
    "counted as probability 0.5 in the 'miss=0.5' columns (TrojAI convention). CE / Brier use "
    "the detector's 'probability' statistic when present, else the provisional "
    "logistic(score - threshold)."
)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or x is pd.NA:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if math.isnan(x):
            return "-"
        return f"{float(x):.{digits}g}" if abs(x) >= 1e4 else f"{float(x):.{digits}f}"
    return str(x)


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _unit_label(unit: Mapping[str, str], several: bool) -> str:
    if not several:
        return unit["detector"]
    return f"{unit['detector']} {unit['detector_version']} [{unit['config_hash'][:8]}]"


def _roc_png(label: str, per_model: pd.DataFrame) -> str:
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", linestyle=":", linewidth=1)
    y = per_model["y"].to_numpy(dtype=float)
    s = per_model["score"].to_numpy(dtype=float)
    usable = per_model["usable"].to_numpy(dtype=bool)
    attacks = per_model["attack"].to_numpy(dtype=object)
    curves = [("all", np.ones(len(y), dtype=bool))]
    for a in sorted(set(attacks[y == 1])):  # as in the summary: one attack's models vs clean
        curves.append((f"attack={a}", ((attacks == a) & (y == 1)) | (y == 0)))
    drawn = 0
    for name, mask in curves:
        use = mask & usable & ~np.isnan(y)
        auc = M.roc_auc(y[use], s[use])
        if not auc.defined:
            continue
        fpr, tpr, _ = roc_curve(y[use].astype(int), s[use])
        ax.plot(fpr, tpr, linewidth=2 if name == "all" else 1,
                label=f"{name} (AUC {auc.value:.3f}, n={int(use.sum())})")
        drawn += 1
    if drawn:
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no ROC: needs trojaned and clean\nmodels with ok scores",
                ha="center", va="center", fontsize=9)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC: {label}")
    return _png(fig)


def _hist_png(label: str, per_model: pd.DataFrame, threshold: float) -> str:
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    y = per_model["y"].to_numpy(dtype=float)
    s = per_model["score"].to_numpy(dtype=float)
    usable = per_model["usable"].to_numpy(dtype=bool)
    scored = s[usable]
    if scored.size:
        finite = scored[np.isfinite(scored)]
        bins = np.histogram_bin_edges(finite, bins=min(30, max(5, finite.size // 2)))
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
    ax.set(xlabel="score", ylabel="models", title=f"Scores: {label}")
    return _png(fig)


def _read_runs(out_uri: str, run_id: str | None) -> tuple[dict[str, Any] | None, str]:
    """The runs table, read loosely: whatever columns are there; None plus a note otherwise."""
    fs, path = storage.filesystem(storage.join(out_uri, "runs"))
    try:
        if not fs.exists(path):
            return None, "No runs table."
        dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        df = dataset.to_table().to_pandas()
    except Exception as exc:  # a report should still render with a damaged runs table
        return None, f"The runs table could not be read: {type(exc).__name__}: {exc}"
    if "run_id" not in df.columns and "run" in df.columns:
        df["run_id"] = df["run"]
    if run_id is not None and "run_id" in df.columns:
        df = df[df["run_id"].astype(str) == str(run_id)]
    if df.empty:
        return None, "No matching run in the runs table."
    columns = [c for c in (
        "run_id", "started_at", "finished_at", "code_version", "manifest_uri", "manifest_digest",
        "models_total", "models_planned", "config_hash",
    ) if c in df.columns]
    if "started_at" in df.columns:
        df = df.sort_values("started_at", kind="stable")
    rows = []
    for _, r in df.iterrows():
        config = r.get("config_json")
        if isinstance(config, str):
            try:
                config = json.dumps(json.loads(config), indent=2, sort_keys=True)
            except ValueError:
                pass
        rows.append({"cells": [_fmt(r[c]) for c in columns], "config": config or None})
    return {"columns": columns, "rows": rows}, ""


def _errors(scores: pd.DataFrame) -> tuple[list[dict[str, Any]], int]:
    bad = scores[scores["status"] != "ok"].sort_values(["detector", "model_id"], kind="stable")
    rows = []
    for _, r in bad.head(MAX_ROWS).iterrows():
        error = r["error"] if isinstance(r["error"], str) else ""
        rows.append({
            "model_id": r["model_id"], "detector": r["detector"], "status": r["status"],
            "run_id": r["run_id"], "worker": _fmt(r["worker"]), "seconds": _fmt(r["seconds"], 1),
            "error": error, "first_line": (error.strip().splitlines() or [""])[-1][:200],
        })
    return rows, max(0, len(bad) - MAX_ROWS)


def _model_table(units: list, several: bool) -> tuple[dict[str, Any], int]:
    """Model x detector cells: score (``*`` at or above the threshold), else the status."""
    if not units:
        return {"columns": [], "rows": []}, 0
    meta = pd.concat([pm[["y", "attack", "architecture", "tags"]] for _, pm, *_ in units])
    meta = meta[~meta.index.duplicated(keep="first")].sort_index()
    y = meta["y"].to_numpy(dtype=float)
    table = pd.DataFrame(
        {
            "model": meta.index.astype(str),
            "trojaned": np.where(np.isnan(y), "-", np.where(y == 1, "yes", "no")),
            "attack": np.where(y == 1, meta["attack"].astype(str), "-"),
            "architecture": meta["architecture"].astype(str).to_numpy(),
            "tags": [", ".join(f"{k}={v}" for k, v in sorted(t.items())) for t in meta["tags"]],
        },
        index=meta.index,
    )
    for unit, pm, threshold, _, _ in units:
        score = pm["score"].to_numpy(dtype=float)
        flagged = ~np.isnan(score) & (score >= threshold) if not math.isnan(threshold) else False
        cell = np.where(
            pm["usable"].to_numpy(dtype=bool),
            np.char.add([f"{v:.4g}" for v in score], np.where(flagged, "*", "")),
            pm["status"].astype(object).where(pm["status"].notna(), "").astype(str).to_numpy(),
        )
        column = pd.Series(cell, index=pm.index).reindex(table.index).fillna("")
        table[_unit_label(unit, several)] = column
    shown = table.head(MAX_ROWS)
    rows = shown.to_numpy().tolist()
    return {"columns": list(table.columns), "rows": rows}, len(table) - len(shown)


def _summary_view(summary: pd.DataFrame) -> dict[str, Any]:
    rows = []
    for _, r in summary.iterrows():
        row = {}
        for title, col in _SUMMARY_VIEW:
            if col == "group":
                row[title] = "all" if r["group_by"] == "all" else f"{r['group_by']}={r['group']}"
            else:
                row[title] = _fmt(r[col])
        rows.append(row)
    return {"columns": [t for t, _ in _SUMMARY_VIEW], "rows": rows, "text_columns": _SUMMARY_TEXT}


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("xray.reduce", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report(
    out_uri: str,
    run_id: str | None = None,
    html_path: str | None = None,
    *,
    thresholds: Mapping[str, float] | None = None,
) -> str:
    """Render the HTML report of <out> (one run, or all) and return where it was written.

    html_path defaults to <out>/report.html; any fsspec URI works, written atomically.
    thresholds: as in `summarize`.
    """
    scores = load_scores(out_uri, run_id)
    summary = summarize(scores, thresholds)
    units = unit_frames(scores, thresholds)
    several = len({u["detector"] for u, *_ in units}) < len(units)

    detectors = []
    for unit, per_model, threshold, source, _ in units:
        label = _unit_label(unit, several)
        detectors.append({
            "label": label, "version": unit["detector_version"], "config_hash": unit["config_hash"],
            "threshold": _fmt(threshold, 4), "threshold_source": source,
            "roc_png": _roc_png(label, per_model),
            "hist_png": _hist_png(label, per_model, threshold),
        })
    runs, runs_note = _read_runs(out_uri, run_id)
    errors, errors_left_out = _errors(scores)
    models, models_left_out = _model_table(units, several)

    html = _environment().get_template("report.html.j2").render(
        title=run_id or posixpath.basename(str(out_uri).rstrip("/")) or str(out_uri),
        out_uri=str(out_uri),
        run_id=run_id,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        n_rows=len(scores),
        n_models=int(scores["model_id"].nunique()) if len(scores) else 0,
        n_units=len(units),
        runs=runs,
        runs_note=runs_note,
        summary=_summary_view(summary),
        summary_help=_SUMMARY_HELP,
        detectors=detectors,
        errors=errors,
        errors_left_out=errors_left_out,
        models=models,
        models_left_out=models_left_out,
    )
    target = html_path or storage.join(out_uri, "report.html")
    storage.write_text(target, html)
    return str(target)
