"""A self-contained HTML report of one output folder: what a person reads after a scan.

    render_report(out_uri, run_id=None, html_path=None)    # -> where the HTML was written

Sections, in page order: the runs (config, code version, manifest and its digest), coverage
(models with no ok score and why, manifest models never scored), the summary per detector x group,
ROC curves of every detector on one plot, score histograms split by ground truth with the
threshold marked, runtime percentiles per detector, errors and timeouts, a drill-down per model
(every detector's score and verdict, Model X-ray's decision-boundary planes, inverted triggers
from the `triggers` table beside the ground-truth trigger), and the table of all scores.

Self-contained: plots are inline base64 PNGs, styles are inline, and the page references nothing
else (no script, font or stylesheet), so it opens from disk or from object storage and can be
mailed or attached to a CI run. Plots use matplotlib's object API with the Agg canvas (no pyplot,
no global backend switch); the page is the jinja2 template templates/report.html.j2 with
autoescaping on.

Scale: the page's cost grows with the number of detectors, not of models, except for
* the drill-down: by default only models some detector flags (score >= threshold) or gets wrong
  (verdict != ground truth), misclassified first, at most `max_drilldown` of them (the rest are
  counted); `drilldown_models` names models to show first whatever their verdicts;
* the per-model tables (coverage, errors, all scores): at most MAX_ROWS rows each, the rest
  counted.

Drill-down pictures re-run work and read model files, so they need the run's manifest and model
files to be readable from where the report is made; when they are not, the entry says why and the
page renders all the same:
* Model X-ray planes: the detector is re-run on the model with the run's configuration (same
  seed, same examples), limited to its first `planes` planes. Planes are drawn one after the
  other from one seeded generator, so plane k of the limited run is plane k of the scan; the
  page checks this against the scan's stored per-plane RE and says whether they match.
* Inverted triggers: rows of the `triggers` table (mask / pattern as np.save bytes, pixel space
  assumed; values outside [0, 1] are clipped for display), drawn with one clean example of the
  model stamped as (1 - mask) * x + mask * pattern.
* Ground-truth trigger: when the model's directory holds a zoo/TrojAI config.json with a
  `trigger` the zoo's attacks can rebuild, the same clean example with the true trigger applied
  and the difference it makes; else the first poisoned example image when there is one.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from xray.io import storage
from xray.results.sink import json_object, read_runs, read_table
from xray.reduce import metrics as M
from xray.reduce.formatting import fmt
from xray.reduce.summary import load_scores, summarize, unit_frames, verdicts

MAX_ROWS = 5000  # per-model and error tables; the rest is counted, not shown
DEFAULT_MAX_DRILLDOWN = 20  # models with a drill-down section, by default
DEFAULT_PLANES = 3  # Model X-ray planes re-run and drawn per drill-down model
MAX_TRIGGERS_PER_DETECTOR = 3  # inverted triggers drawn per model and detector
PLANES_RTOL = 1e-4  # re-run per-plane RE vs the scan's stored value

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
    ("train models", "n_training_models"), ("notes", "notes"),
]
_SUMMARY_TEXT = {"detector", "group", "thr source", "p source", "notes"}

_SUMMARY_HELP = (
    "score >= threshold means trojaned. Attack groups hold the trojaned models of that attack "
    "and all clean models. Missing = models without an ok score: left out of the plain metrics, "
    "counted as probability 0.5 in the 'miss=0.5' columns (TrojAI convention). CE / Brier use "
    "the detector's 'probability' statistic when present, else the provisional "
    "logistic(score - threshold)."
)


# --------------------------------------------------------------------------------------------
# Small helpers


def _png(fig: Figure, dpi: int = 100) -> str:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _last_line(text: Any) -> str:
    if not isinstance(text, str):
        return ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # scan.py's error text is "Type: message" then a traceback: the first line says what failed
    return (lines[0] if lines else "")[:200]


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


@dataclass
class _Unit:
    """One (detector, version, config_hash) with its per-model frame (see summary.unit_frames)."""

    key: dict[str, str]
    per_model: pd.DataFrame
    threshold: float
    source: str
    label: str
    verdicts: pd.Series = field(default=None)  # type: ignore[assignment]

    @property
    def detector(self) -> str:
        return self.key["detector"]


def _unit_label(unit: Mapping[str, str], several: bool) -> str:
    if not several:
        return unit["detector"]
    return f"{unit['detector']} {unit['detector_version']} [{unit['config_hash'][:8]}]"


def _units(scores: pd.DataFrame, thresholds: Mapping[str, float] | None) -> list[_Unit]:
    frames = unit_frames(scores, thresholds)
    several = len({u["detector"] for u, *_ in frames}) < len(frames)
    units = []
    for key, per_model, threshold, source, _ in frames:
        unit = _Unit(key, per_model, threshold, source, _unit_label(key, several))
        unit.verdicts = verdicts(per_model, threshold)
        units.append(unit)
    return units


def _truth(y: float) -> str:
    return "unknown" if math.isnan(y) else "trojaned" if y == 1 else "clean"


# --------------------------------------------------------------------------------------------
# Runs


def _read_runs_frame(out_uri: str, run_id: str | None) -> tuple[pd.DataFrame, str]:
    """The runs table (one row per run: its end row when there is one), or empty plus a note."""
    try:
        runs = read_runs(out_uri, run_id)
    except Exception as exc:  # a report should still render with a damaged runs table
        return pd.DataFrame(), f"The runs table could not be read: {type(exc).__name__}: {exc}"
    if runs.empty:
        fs, path = storage.filesystem(storage.join(out_uri, "runs"))
        return pd.DataFrame(), ("No matching run in the runs table." if fs.exists(path)
                                else "No runs table.")
    return runs, ""


def _runs_view(runs: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for _, r in runs.iterrows():
        config = r.get("config_json")
        pretty = None
        if isinstance(config, str):
            try:
                pretty = json.dumps(json.loads(config), indent=2, sort_keys=True)
            except ValueError:
                pretty = config
        started, finished = r.get("started_at"), r.get("finished_at")
        duration = "unfinished"
        if not _is_missing(finished) and not _is_missing(started) and finished is not pd.NaT:
            duration = f"{(finished - started).total_seconds():.1f} s"
        fields = [
            ("run", r.get("run_id")), ("started", started), ("finished", finished),
            ("duration", duration), ("code version", r.get("code_version")),
            ("manifest", r.get("manifest_uri")), ("manifest digest", r.get("manifest_digest")),
            ("models in manifest", r.get("models_total")),
            ("models planned", r.get("models_planned")), ("config hash", r.get("config_hash")),
        ]
        out.append({"run_id": fmt(r.get("run_id")),
                    "fields": [(k, fmt(v) if v is not pd.NaT else "-") for k, v in fields],
                    "config": pretty})
    return out


# --------------------------------------------------------------------------------------------
# Plots


def _roc_png(units: Sequence[_Unit]) -> tuple[str | None, str]:
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
    return _png(fig), "; ".join(reasons)


def _hist_png(unit: _Unit) -> str:
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
    return _png(fig)


def _runtime(units: Sequence[_Unit]) -> tuple[list[dict[str, str]], str | None]:
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
    return rows, _png(fig)


# --------------------------------------------------------------------------------------------
# Coverage, errors, per-model table


def _coverage(units: Sequence[_Unit]) -> tuple[list[dict[str, str]], list[dict[str, str]], int]:
    """Per detector counts, and the models with no ok score with the reason (capped)."""
    counts, missing = [], []
    for unit in units:
        pm, verdicts = unit.per_model, unit.verdicts
        usable = pm["usable"].to_numpy(dtype=bool)
        reasons = verdicts[~usable].value_counts()
        counts.append({"detector": unit.label, "models": str(len(pm)),
                       "ok": str(int(usable.sum())), "missing": str(int((~usable).sum())),
                       "why": ", ".join(f"{n} {r}" for r, n in reasons.items()) or "-"})
        for model_id, row in pm[~usable].iterrows():
            why = verdicts[model_id]
            if why == "bad score":
                why = "ok status but the score is not finite"
            missing.append({"model_id": str(model_id), "detector": unit.label,
                            "status": verdicts[model_id], "why": why,
                            "error": _last_line(row["error"])})
    shown = missing[:MAX_ROWS]
    return counts, shown, len(missing) - len(shown)


def _errors(scores: pd.DataFrame) -> tuple[list[dict[str, Any]], int, list[dict[str, str]]]:
    bad = scores[scores["status"] != "ok"].sort_values(["detector", "model_id"], kind="stable")
    rows = []
    for _, r in bad.head(MAX_ROWS).iterrows():
        error = r["error"] if isinstance(r["error"], str) else ""
        rows.append({
            "model_id": r["model_id"], "detector": r["detector"], "status": r["status"],
            "run_id": r["run_id"], "worker": fmt(r["worker"]), "seconds": fmt(r["seconds"], 1),
            "error": error, "first_line": _last_line(error),
        })
    by_status = []
    if len(scores):
        table = scores.groupby(["detector", "status"]).size().unstack(fill_value=0)
        for detector, r in table.iterrows():
            by_status.append({"detector": str(detector),
                              "counts": ", ".join(f"{k} {int(v)}" for k, v in r.items() if v)})
    return rows, max(0, len(bad) - MAX_ROWS), by_status


def _model_table(units: Sequence[_Unit], drilled: set[str]) -> tuple[dict[str, Any], int]:
    """Model x detector cells: score (``*`` at or above the threshold), else the status."""
    if not units:
        return {"columns": [], "rows": []}, 0
    meta = pd.concat([u.per_model[["y", "attack", "architecture", "tags"]] for u in units])
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
    for unit in units:
        pm, threshold = unit.per_model, unit.threshold
        score = pm["score"].to_numpy(dtype=float)
        flagged = ~np.isnan(score) & (score >= threshold) if not math.isnan(threshold) else False
        cell = np.where(
            pm["usable"].to_numpy(dtype=bool),
            np.char.add([f"{v:.4g}" for v in score], np.where(flagged, "*", "")),
            pm["status"].astype(object).where(pm["status"].notna(), "").astype(str).to_numpy(),
        )
        column = pd.Series(cell, index=pm.index).reindex(table.index).fillna("")
        table[unit.label] = column
    shown = table.head(MAX_ROWS)
    rows = [{"cells": cells, "link": model_id in drilled}
            for model_id, cells in zip(shown.index, shown.to_numpy().tolist())]
    return {"columns": list(table.columns), "rows": rows}, len(table) - len(shown)


def _leakage_warning(summary: pd.DataFrame) -> str:
    """The warning put before the summary when a calibrator scored its own training models
    (the summary's n_training_models; see xray.reduce.summary)."""
    overall = summary[(summary["group_by"] == "all") & (summary["n_training_models"] > 0)]
    if not len(overall):
        return ""
    units = ", ".join(f"{r.detector} [{r.config_hash}]: {r.n_training_models} of {r.n}"
                      for r in overall.itertuples())
    return (f"WARNING: models a calibrator was trained on are scored by it ({units}); those "
            "rows' figures are in-sample, not held out (column 'train models'). ")


def _summary_view(summary: pd.DataFrame) -> dict[str, Any]:
    rows = []
    for _, r in summary.iterrows():
        row = {}
        for title, col in _SUMMARY_VIEW:
            if col == "group":
                row[title] = "all" if r["group_by"] == "all" else f"{r['group_by']}={r['group']}"
            else:
                row[title] = fmt(r[col])
        rows.append(row)
    return {"columns": [t for t, _ in _SUMMARY_VIEW], "rows": rows, "text_columns": _SUMMARY_TEXT}


# --------------------------------------------------------------------------------------------
# Drill-down: which models


def select_drilldown(units: Sequence[Any], max_models: int = DEFAULT_MAX_DRILLDOWN,
                     forced: Iterable[str] = ()) -> tuple[list[tuple[str, list[str]]], int]:
    """Models to drill into, with why: `forced` first (in the order given), then models some
    detector got wrong (verdict != ground truth), then models some detector flagged; model id
    order within each. Returns (at most max_models (model_id, reasons)), how many were left out.
    `units`: the report's units (or summary.unit_frames tuples)."""
    reasons: dict[str, list[str]] = {}
    wrong: set[str] = set()
    for unit in units:
        if not isinstance(unit, _Unit):
            key, pm, thr, source, _ = unit
            unit = _Unit(key, pm, thr, source, key["detector"])
            unit.verdicts = verdicts(pm, thr)
        y = unit.per_model["y"]
        for model_id, verdict in unit.verdicts.items():
            if verdict not in ("trojaned", "clean"):
                continue
            truth = y[model_id]
            if not math.isnan(truth) and (verdict == "trojaned") != (truth == 1):
                kind = "false positive" if verdict == "trojaned" else "false negative"
                reasons.setdefault(model_id, []).append(f"{kind} of {unit.label}")
                wrong.add(model_id)
            elif verdict == "trojaned":
                reasons.setdefault(model_id, []).append(f"flagged by {unit.label}")
    forced = [m for m in dict.fromkeys(str(m) for m in forced)]
    ordered = forced + sorted(m for m in wrong if m not in forced) + sorted(
        m for m in reasons if m not in wrong and m not in forced)
    picked = ordered[:max(0, int(max_models))] if max_models is not None else ordered
    for m in forced:
        reasons.setdefault(m, []).insert(0, "asked for")
    return [(m, reasons.get(m, [])) for m in picked], len(ordered) - len(picked)


# --------------------------------------------------------------------------------------------
# Drill-down: pictures


class _Sources:
    """Lazy, cached access to what drill-down pictures need: run configs, manifests, examples."""

    def __init__(self, runs: pd.DataFrame) -> None:
        self.runs = runs
        self._manifests: dict[str, Any] = {}
        self._configs: dict[str, Any] = {}
        self._examples: dict[str, Any] = {}

    def _config(self, run: pd.Series) -> Any:
        from xray.config import parse_config

        run_id = str(run["run_id"])
        if run_id not in self._configs:
            try:
                self._configs[run_id] = parse_config(json.loads(run["config_json"]),
                                                     source=f"run {run_id}")
            except Exception as exc:
                self._configs[run_id] = exc
        return self._configs[run_id]

    def manifest(self, uri: str) -> dict[str, Any] | Exception:
        from xray.io.manifest import read_manifest

        if uri not in self._manifests:
            try:
                self._manifests[uri] = {r.model_id: r for r in read_manifest(uri)}
            except Exception as exc:
                self._manifests[uri] = exc
        return self._manifests[uri]

    def record(self, model_id: str) -> tuple[Any, str]:
        """The model's manifest record from the newest run whose manifest has it; (None, why)."""
        notes = []
        if self.runs.empty or "manifest_uri" not in self.runs.columns:
            return None, "no runs table to find the model's manifest"
        for _, run in self.runs.iloc[::-1].iterrows():
            records = self.manifest(str(run["manifest_uri"]))
            if isinstance(records, Exception):
                notes.append(f"manifest {run['manifest_uri']} unreadable: "
                             f"{type(records).__name__}: {records}")
                continue
            if model_id in records:
                return records[model_id], ""
        return None, "; ".join(dict.fromkeys(notes)) or "the model is in no run's manifest"

    def detector_config(self, key: Mapping[str, str]) -> tuple[Any, Any, str]:
        """(ScanConfig, built detector) of a run whose config reproduces the unit's hash."""
        if self.runs.empty or "config_json" not in self.runs.columns:
            return None, None, "no runs table holding the scan's configuration"
        for _, run in self.runs.iloc[::-1].iterrows():
            config = self._config(run)
            if isinstance(config, Exception):
                continue
            for spec in config.detectors:
                if spec.name != key["detector"]:
                    continue
                try:
                    detector = spec.build()
                except Exception:
                    continue
                if config.detector_hash(detector) == key["config_hash"]:
                    return config, detector, ""
        return None, None, (f"no run's configuration reproduces {key['detector']} "
                            f"{key['detector_version']} [{key['config_hash'][:8]}] with the "
                            "current code (detector version or parameters changed?)")

    def examples(self, record: Any) -> tuple[Any, Any] | Exception:
        from xray.io.examples import load_examples

        if record.model_id not in self._examples:
            try:
                x, y = load_examples(record, max_per_class=1)
                self._examples[record.model_id] = (x.numpy(), y.numpy())
            except Exception as exc:
                self._examples[record.model_id] = exc
        return self._examples[record.model_id]


def _planes_png(unit: _Unit, model_id: str, record: Any, sources: _Sources,
                planes: int) -> tuple[str | None, str]:
    """Model X-ray's first `planes` planes of the model, re-run with the scan's configuration."""
    from xray.detectors.modelxray import plot_planes
    from xray.scan import scan_model

    config, detector, why = sources.detector_config(unit.key)
    if detector is None:
        return None, why
    full = int(detector.params.num_planes)
    limited = type(detector)(dataclasses.replace(detector.params, num_planes=min(full, planes)))
    result = scan_model(record, [limited], dataclasses.replace(config, device="auto"),
                        keep_artifacts=True)
    row = result["scores"][0]
    if row["status"] != "ok":
        return None, f"re-running Model X-ray failed: {_last_line(row['error'])}"
    drawn = result["artifacts"][limited.name]["planes"]
    buffer = io.BytesIO()
    plot_planes(drawn, record.num_classes, buffer, max_planes=len(drawn))
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    note = f"planes 1-{len(drawn)} of the scan's {full}, re-run with its configuration"
    stored = json_object(unit.per_model.at[model_id, "stats_json"]).get("re_per_plane")
    if isinstance(stored, list) and len(stored) >= len(drawn):
        rerun = np.array([p["re"] for p in drawn], dtype=float)
        scan = np.array(stored[:len(drawn)], dtype=float)
        if np.allclose(rerun, scan, rtol=PLANES_RTOL, atol=1e-9):
            note += "; per-plane RE matches the scan"
        else:
            note += (f"; per-plane RE differs from the scan (max |diff| "
                     f"{float(np.max(np.abs(rerun - scan))):.3g}): model file or examples changed?")
    return png, note


def _npy(blob: Any) -> np.ndarray | None:
    if blob is None or (isinstance(blob, float) and math.isnan(blob)):
        return None
    try:
        return np.load(io.BytesIO(bytes(blob)), allow_pickle=False)
    except Exception:
        return None


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) from (H, W), (1, H, W), (1, 1, H, W) or (C, H, W) (max over channels)."""
    m = np.asarray(mask, dtype=np.float32)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim == 3:
        m = m.max(axis=0)
    return m


def _as_image(pattern: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) for imshow from (C, H, W) / (1, C, H, W) / (H, W)."""
    p = np.asarray(pattern, dtype=np.float32)
    while p.ndim > 3 and p.shape[0] == 1:
        p = p[0]
    if p.ndim == 3:
        p = p[0] if p.shape[0] == 1 else np.transpose(p, (1, 2, 0))
    return np.clip(p, 0.0, 1.0)


def _model_dir(record: Any) -> str:
    return record.uri.rsplit("/", 1)[0] if "/" in record.uri else "."


def _ground_truth_trigger(record: Any, x: np.ndarray) -> tuple[dict[str, Any] | None, str]:
    """The true trigger of a trojaned model: applied to `x` (1, C, H, W), from the model dir's
    config.json; else the first poisoned example image. (None, why) when neither is there."""
    from xray.zoo.round import trigger_config

    trigger = trigger_config(record.uri)
    description = json.dumps(trigger, sort_keys=True) if trigger else ""
    if trigger:
        try:
            from xray.zoo.attacks import attack_from_config

            stamped = attack_from_config(trigger).apply(x.astype(np.float32))
            return {"stamped": stamped[0], "diff": np.abs(stamped[0] - x[0]).max(axis=0),
                    "text": description}, ""
        except Exception:  # an attack this code cannot rebuild: fall back to an image
            pass
    poisoned = storage.join(_model_dir(record), "poisoned_example_data")
    names = [n for n in storage.listdir(poisoned) if n.lower().endswith(".png")]
    if names:
        from PIL import Image

        with Image.open(io.BytesIO(storage.read_bytes(storage.join(poisoned, names[0])))) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return {"stamped": np.transpose(image, (2, 0, 1)), "diff": None,
                "text": description or f"poisoned example {names[0]}"}, ""
    return None, "no trigger description or poisoned example beside the model"


def _triggers_for(triggers: pd.DataFrame, model_id: str, unit: _Unit,
                  predicted_target: Any) -> pd.DataFrame:
    """The unit's inverted triggers of one model (newest run): those for the detector's predicted
    target first, then by REASR (descending), at most MAX_TRIGGERS_PER_DETECTOR."""
    if triggers.empty:
        return triggers
    rows = triggers[(triggers["model_id"] == model_id)
                    & (triggers["detector"] == unit.key["detector"])
                    & (triggers["config_hash"] == unit.key["config_hash"])]
    if rows.empty:
        return rows
    rows = rows[rows["run_id"] == sorted(rows["run_id"])[-1]]
    hit = rows["target"].eq(predicted_target) if not _is_missing(predicted_target) else False
    order = rows.assign(_hit=hit, _reasr=pd.to_numeric(rows["reasr"], errors="coerce").fillna(-1.0))
    order = order.sort_values(["_hit", "_reasr", "trigger_index"], ascending=[False, False, True])
    return order.head(MAX_TRIGGERS_PER_DETECTOR)


def _triggers_png(model_id: str, record: Any, truth: float, found: list[tuple[str, pd.Series]],
                  sources: _Sources) -> tuple[str | None, list[str], list[dict[str, str]]]:
    """One figure: the ground-truth trigger row (trojaned models) and one row per inverted
    trigger (mask, pattern, stamped example). Returns (png or None, notes, trigger table)."""
    notes: list[str] = []
    table = [{"detector": label, "index": fmt(r["trigger_index"]), "target": fmt(r["target"]),
              "victim": "all" if _is_missing(r["victim"]) else fmt(r["victim"]),
              "kind": fmt(r["kind"]), "size": fmt(r["size"]), "reasr": fmt(r["reasr"])}
             for label, r in found]
    x = None
    if record is not None:
        examples = sources.examples(record)
        if isinstance(examples, Exception):
            notes.append(f"examples unreadable: {type(examples).__name__}: {examples}")
        else:
            xs, ys = examples
            targets = {int(r["target"]) for _, r in found if not _is_missing(r["target"])}
            if record.target is not None:
                targets.add(int(record.target))
            pick = next((i for i in range(len(ys)) if int(ys[i]) not in targets), 0)
            x = xs[pick:pick + 1]
    rows: list[list[tuple[str, np.ndarray | None, str | None]]] = []
    if truth == 1 and record is not None and x is not None:
        gt, why = _ground_truth_trigger(record, x)
        if gt is None:
            notes.append(f"ground-truth trigger: {why}")
        else:
            row = [("clean example", _as_image(x[0]), None),
                   ("true trigger applied", _as_image(gt["stamped"]), None)]
            if gt["diff"] is not None:
                row.append(("|difference|", gt["diff"], "magma"))
            rows.append(row)
            notes.append(f"ground truth: {gt['text']}")
    for label, r in found:
        mask, pattern = _npy(r["mask"]), _npy(r["pattern"])
        title = f"{label} #{int(r['trigger_index'])} -> {fmt(r['target'])}"
        row = []
        if mask is not None:
            row.append((f"{title}: mask", _as_mask(mask), "gray"))
        if pattern is not None:
            row.append(("pattern", _as_image(pattern), None))
        if x is not None:  # re-applied exactly as the scanner applied it (TriggerCandidate)
            try:
                import torch

                from xray.detectors.inversion.core import TriggerCandidate

                candidate = TriggerCandidate.from_row(r.to_dict())
                stamped = candidate.apply(torch.as_tensor(x, dtype=torch.float32))[0].numpy()
                row.append(("stamped example", _as_image(stamped), None))
            except Exception as exc:  # a row this build cannot re-apply: draw the rest
                notes.append(f"{title}: cannot re-apply ({type(exc).__name__}: {exc})")
        if not row:
            notes.append(f"{title}: no mask or pattern stored ({fmt(r['kind'])} trigger)")
            continue
        rows.append(row)
    if not rows:
        return None, notes, table
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
    return _png(fig, dpi=80), notes, table


def _read_triggers(out_uri: str, run_id: str | None, model_ids: Sequence[str]) -> pd.DataFrame:
    """The `triggers` rows of the drill-down models only (filtered while reading)."""
    return read_table(out_uri, "triggers", run_id=run_id, model_ids=list(model_ids))


def _drilldown(picked: Sequence[tuple[str, list[str]]], units: Sequence[_Unit],
               scores: pd.DataFrame, runs: pd.DataFrame, out_uri: str, run_id: str | None,
               planes: int, show_progress: bool = False) -> list[dict[str, Any]]:
    from xray.progress import Progress

    sources = _Sources(runs)
    ids = [m for m, _ in picked]
    triggers = _read_triggers(out_uri, run_id, ids)
    targets = scores.drop_duplicates(["model_id", "detector", "config_hash"], keep="last")
    targets = targets.set_index(["model_id", "detector", "config_hash"])
    entries: list[dict[str, Any]] = []
    with Progress(len(picked), "report drill-down", disable=not show_progress) as bar:
        for model_id, reasons in picked:
            entries.append(_drill_entry(model_id, reasons, units, triggers, targets, sources,
                                        planes))
            bar.update()
    return entries


def _drill_entry(model_id: str, reasons: list[str], units: Sequence[_Unit],
                 triggers: pd.DataFrame, targets: pd.DataFrame, sources: _Sources,
                 planes: int) -> dict[str, Any]:
    """One model's drill-down: facts, every detector's verdict, planes, triggers."""
    present = [u for u in units if model_id in u.per_model.index]
    if not present:
        return {"model_id": model_id, "reasons": reasons, "truth": "unknown",
                "facts": [], "detectors": [], "planes": [], "triggers_png": None,
                "trigger_rows": [], "notes": ["no score row for this model"]}
    first = present[0].per_model.loc[model_id]
    y = float(first["y"])
    detectors, found = [], []
    for unit in present:
        r = unit.per_model.loc[model_id]
        verdict = unit.verdicts[model_id]
        key = (model_id, unit.key["detector"], unit.key["config_hash"])
        target = targets["predicted_target"].get(key) if key in targets.index else None
        correct = None
        if verdict in ("trojaned", "clean") and not math.isnan(y):
            correct = (verdict == "trojaned") == (y == 1)
        detectors.append({
            "label": unit.label, "status": fmt(r["status"]) if not _is_missing(
                r["status"]) else "not scored",
            "score": fmt(r["score"], 4), "threshold": fmt(unit.threshold, 4),
            "verdict": verdict, "correct": correct,
            "target": fmt(target) if not _is_missing(target) else "-",
            "seconds": fmt(r["seconds"], 2), "error": _last_line(r["error"])})
        for _, t in _triggers_for(triggers, model_id, unit, target).iterrows():
            found.append((unit.label, t))
    record, why = sources.record(model_id)
    notes = [] if record is not None else [f"pictures not drawn: {why}"]
    drawn_planes = []
    if record is not None and planes > 0:
        for unit in present:
            if unit.detector != "modelxray" or not unit.per_model.at[model_id, "usable"]:
                continue
            try:
                png, note = _planes_png(unit, model_id, record, sources, planes)
            except Exception as exc:  # one model's picture never stops the report
                png, note = None, f"planes not drawn: {type(exc).__name__}: {exc}"
            drawn_planes.append({"label": unit.label, "png": png, "note": note})
    try:
        triggers_png, trigger_notes, trigger_rows = _triggers_png(
            model_id, record, y, found, sources)
    except Exception as exc:
        triggers_png, trigger_notes, trigger_rows = None, [
            f"triggers not drawn: {type(exc).__name__}: {exc}"], []
    facts = [("ground truth", _truth(y))]
    if y == 1:
        facts.append(("attack", str(first["attack"])))
        if record is not None and record.target is not None:
            facts.append(("true target", str(record.target)))
    facts.append(("architecture", str(first["architecture"])))
    if first["tags"]:
        facts.append(("tags", ", ".join(f"{k}={v}" for k, v in sorted(first["tags"].items()))))
    return {"model_id": model_id, "reasons": reasons, "truth": _truth(y),
            "facts": facts, "detectors": detectors, "planes": drawn_planes,
            "triggers_png": triggers_png, "trigger_rows": trigger_rows,
            "notes": notes + trigger_notes}


# --------------------------------------------------------------------------------------------
# The page


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
    max_drilldown: int = DEFAULT_MAX_DRILLDOWN,
    drilldown_models: Sequence[str] = (),
    planes: int = DEFAULT_PLANES,
    show_progress: bool = False,
) -> str:
    """Render the HTML report of <out> (one run, or all) and return where it was written.

    html_path defaults to <out>/report.html; any fsspec URI works, written atomically.
    thresholds: as in `summarize`. max_drilldown: models with a drill-down section (flagged or
    misclassified ones, misclassified first; 0 = none). drilldown_models: models to drill into
    first whatever their verdicts. planes: Model X-ray planes re-run and drawn per drill-down
    model (0 = none). show_progress: a progress bar over the drill-down models (their pictures
    re-run detectors).
    """
    scores = load_scores(out_uri, run_id)
    summary = summarize(scores, thresholds)
    units = _units(scores, thresholds)
    runs, runs_note = _read_runs_frame(out_uri, run_id)

    roc_png, roc_note = _roc_png(units) if units else (None, "No scores.")
    detectors = [{"label": u.label, "version": u.key["detector_version"],
                  "config_hash": u.key["config_hash"], "threshold": fmt(u.threshold, 4),
                  "threshold_source": u.source, "hist_png": _hist_png(u)} for u in units]
    runtime_rows, runtime_png = _runtime(units)
    coverage_counts, coverage_missing, coverage_left_out = _coverage(units)
    errors, errors_left_out, errors_by_status = _errors(scores)
    picked, drill_left_out = select_drilldown(units, max_drilldown, drilldown_models)
    drilldown = _drilldown(picked, units, scores, runs, out_uri, run_id, planes, show_progress)
    models, models_left_out = _model_table(units, {m for m, _ in picked})
    labelled = bool(units) and any((~np.isnan(u.per_model["y"].to_numpy(dtype=float))).any()
                                   for u in units)

    html = _environment().get_template("report.html.j2").render(
        title=run_id or posixpath.basename(str(out_uri).rstrip("/")) or str(out_uri),
        out_uri=str(out_uri),
        run_id=run_id,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        n_rows=len(scores),
        n_models=int(scores["model_id"].nunique()) if len(scores) else 0,
        n_units=len(units),
        labelled=labelled,
        runs=_runs_view(runs),
        runs_note=runs_note,
        never_scored=_never_scored(runs, scores),
        coverage_counts=coverage_counts,
        coverage_missing=coverage_missing,
        coverage_left_out=coverage_left_out,
        summary=_summary_view(summary),
        summary_help=_leakage_warning(summary) + _SUMMARY_HELP,
        roc_png=roc_png,
        roc_note=roc_note,
        detectors=detectors,
        runtime_rows=runtime_rows,
        runtime_png=runtime_png,
        errors=errors,
        errors_left_out=errors_left_out,
        errors_by_status=errors_by_status,
        drilldown=drilldown,
        drill_left_out=drill_left_out,
        max_drilldown=max_drilldown,
        no_threshold=[u.label for u in units if math.isnan(u.threshold)],
        models=models,
        models_left_out=models_left_out,
    )
    target = html_path or storage.join(out_uri, "report.html")
    storage.write_text(target, html)
    return str(target)


def _never_scored(runs: pd.DataFrame, scores: pd.DataFrame) -> dict[str, Any]:
    """Models of the runs' manifests that have no score row at all (any detector)."""
    if runs.empty or "manifest_uri" not in runs.columns:
        return {"models": [], "left_out": 0, "note": "no runs table: not checked"}
    sources = _Sources(runs)
    seen = set(scores["model_id"].astype(str)) if len(scores) else set()
    missing: dict[str, str] = {}
    notes = []
    for uri in dict.fromkeys(runs["manifest_uri"].astype(str)):
        records = sources.manifest(uri)
        if isinstance(records, Exception):
            notes.append(f"manifest {uri} unreadable here ({type(records).__name__}): not checked")
            continue
        for model_id in records:
            if model_id not in seen:
                missing.setdefault(model_id, uri)
    ids = sorted(missing)
    return {"models": ids[:MAX_ROWS], "left_out": max(0, len(ids) - MAX_ROWS),
            "note": "; ".join(notes)}
