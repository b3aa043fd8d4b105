"""The report's tables: units with their verdicts, runs, coverage, errors, the summary view and
the per-model table, as plain rows for the template."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from xray.io import storage
from xray.reduce.calibrate.features import CASCADE
from xray.reduce.formatting import first_line, fmt, is_missing
from xray.reduce.summary import unit_frames, verdicts
from xray.results import locations
from xray.results.schema import ANSWERED_STATUSES
from xray.results.sink import json_object, read_runs

MAX_ROWS = 5000  # per-model and error tables; the rest is counted, not shown

# the full summary table: (column title, summary column, what it means: the glossary under it)
_SUMMARY_VIEW = [
    ("detector", "detector", "detector name (with version and config hash when one detector "
     "has several configurations)"),
    ("group", "group", "the models counted: all; attack=A (that attack's trojaned models and "
     "every clean model); architecture=...; a manifest tag=value"),
    ("n", "n", "models in the group"),
    ("troj", "n_poisoned", "trojaned models (ground truth)"),
    ("clean", "n_clean", "clean models (ground truth)"),
    ("unlab", "n_unlabelled", "models without ground truth (scores and verdicts only)"),
    ("missing", "n_missing", "models without a usable score (error, timeout, crashed, not "
     "scored, non-finite score)"),
    ("coverage", "coverage", "share of the group's models with a usable score"),
    ("threshold", "threshold", "score >= threshold means trojaned"),
    ("thr source", "threshold_source", "how the threshold was set: given (--threshold), "
     "clean_q0.95 (0.95 quantile of the known-clean models' scores: about 5% of them flagged, "
     "in-sample), best_separating, none"),
    ("thr clean models", "threshold_n_clean", "how many clean models a clean_q0.95 threshold "
     "rests on (below 20 its false-positive rate is a rough guess)"),
    ("TP", "TP", "true positives: trojaned models flagged"),
    ("FP", "FP", "false positives: clean models flagged"),
    ("FN", "FN", "false negatives: trojaned models not flagged"),
    ("TN", "TN", "true negatives: clean models not flagged"),
    ("acc", "accuracy", "accuracy at the threshold, (TP + TN) / labelled models with a usable "
     "score"),
    ("best thr", "best_threshold", "the threshold with the best accuracy on this group "
     "(in-sample)"),
    ("best acc", "best_accuracy", "that best accuracy (in-sample, optimistic)"),
    ("ROC-AUC", "roc_auc", "area under the ROC curve of the scores (1 = perfect ranking, "
     "0.5 = chance)"),
    ("AUC r1-4", "roc_auc_thresholds", "ROC-AUC as the TrojAI rounds 1-4 harness computes it, "
     "over the probabilities"),
    ("TPR@FPR", "tpr_at_fpr", "true-positive rate (share of trojaned models flagged) at a "
     "false-positive rate of at most 5%"),
    ("CE", "ce", "TrojAI cross-entropy of the probabilities against the ground truth (lower is "
     "better; 0.693 = always saying 0.5)"),
    ("CE ci95", "ce_ci95", "95% confidence interval of CE"),
    ("Brier", "brier", "Brier score: mean squared error of the probabilities (lower is better)"),
    ("CE miss=0.5", "ce_missing_as_half", "CE with every labelled model counted, a model "
     "without a usable score as probability 0.5 (TrojAI's rule)"),
    ("AUC miss=0.5", "roc_auc_missing_as_half", "ROC-AUC the same way"),
    ("p source", "probability_source", "where the probabilities come from: stats (the "
     "detector's own calibrated 'probability'), logistic (the default map logistic((score - "
     "threshold) / sd of the clean scores)), mixed"),
    ("p50 s", "runtime_p50", "median seconds per model"),
    ("p90 s", "runtime_p90", "90th percentile of seconds per model"),
    ("max s", "runtime_max", "most seconds a model took"),
    ("train models", "n_training_models", "models a calibrator scored that it was trained on "
     "(in-sample figures)"),
    ("notes", "notes", "why metrics are NaN, unlabelled models left out, leakage"),
]
_SUMMARY_TEXT = {"detector", "group", "thr source", "p source", "notes"}
# the short table shown by default: (title, summary column)
_SUMMARY_SHORT = [
    ("detector", "detector"), ("group", "group"), ("models", "n"), ("ROC-AUC", "roc_auc"),
    ("TPR at 5% FPR", "tpr_at_fpr"), ("CE", "ce"), ("accuracy", "accuracy"),
]

SUMMARY_HELP = (
    "score >= threshold means trojaned. ROC-AUC: how well the scores rank trojaned above clean "
    "models (1 perfect, 0.5 chance); TPR at 5% FPR: the share of trojaned models caught while "
    "flagging at most 5% of clean ones; CE: TrojAI cross-entropy of the probabilities (lower "
    "is better, 0.693 = a coin); accuracy: at the threshold. The full table and what each of "
    "its columns means are one click below."
)


@dataclass
class Unit:
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


def unit_label(unit: Mapping[str, str], several: bool) -> str:
    if not several:
        return unit["detector"]
    return f"{unit['detector']} {unit['detector_version']} [{unit['config_hash'][:8]}]"


def build_units(scores: pd.DataFrame, thresholds: Mapping[str, float] | None) -> list[Unit]:
    frames = unit_frames(scores, thresholds)
    several = len({u["detector"] for u, *_ in frames}) < len(frames)
    units = []
    for key, per_model, threshold, source, _ in frames:
        unit = Unit(key, per_model, threshold, source, unit_label(key, several))
        unit.verdicts = verdicts(per_model, threshold)
        units.append(unit)
    return units


def truth_text(y: float) -> str:
    return "unknown" if math.isnan(y) else "trojaned" if y == 1 else "clean"


# --------------------------------------------------------------------------------------------
# Runs


class Manifests:
    """Lazy, cached manifests of the runs: every model's record (for the drill-down's facts and
    pictures) and the models a run planned (for the never-scored list). Each run's manifest is
    found through xray.results.locations (against where `out_uri` is now)."""

    def __init__(self, runs: pd.DataFrame, out_uri: str) -> None:
        self.runs, self.out_uri = runs, str(out_uri)
        self._located: dict[str, locations.ManifestLocation] = {}
        self._manifests: dict[locations.ManifestLocation, dict[str, Any] | Exception] = {}

    def of_run(self, run: Mapping[str, Any]) -> tuple[str, dict[str, Any] | Exception]:
        """(where the run's manifest was read, its records by model id or the read's error)."""
        key = str(run.get("run_id"))
        if key not in self._located:
            self._located[key] = locations.locate_manifest(run, self.out_uri)
        where = self._located[key]
        if where not in self._manifests:
            try:
                self._manifests[where] = {r.model_id: r for r in locations.read_located(where)}
            except Exception as exc:
                self._manifests[where] = exc
        return where.uri, self._manifests[where]

    def record(self, model_id: str) -> tuple[Any, str]:
        """The model's manifest record from the newest run whose manifest has it; (None, why)."""
        notes = []
        if self.runs.empty or "manifest_uri" not in self.runs.columns:
            return None, "no runs table to find the model's manifest"
        for _, run in self.runs.iloc[::-1].iterrows():
            uri, records = self.of_run(run)
            if isinstance(records, Exception):
                notes.append(f"manifest {uri} unreadable: {type(records).__name__}: {records}")
                continue
            if model_id in records:
                return records[model_id], ""
        return None, "; ".join(dict.fromkeys(notes)) or "the model is in no run's manifest"


def read_runs_frame(out_uri: str, run_id: str | None) -> tuple[pd.DataFrame, str]:
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


def runs_view(runs: pd.DataFrame) -> list[dict[str, Any]]:
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
        if not is_missing(finished) and not is_missing(started) and finished is not pd.NaT:
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


def never_scored(runs: pd.DataFrame, scores: pd.DataFrame, manifests: Manifests) -> dict[str, Any]:
    """Models of the runs' manifests that have no score row at all (any detector)."""
    if runs.empty or "manifest_uri" not in runs.columns:
        return {"models": [], "left_out": 0, "note": "no runs table: not checked"}
    seen = set(scores["model_id"].astype(str)) if len(scores) else set()
    missing: dict[str, str] = {}
    notes = []
    for _, run in runs.iterrows():
        uri, records = manifests.of_run(run)
        if isinstance(records, Exception):
            notes.append(f"manifest {uri} unreadable here ({type(records).__name__}): not checked")
            continue
        for model_id in records:
            if model_id not in seen:
                missing.setdefault(model_id, uri)
    notes = list(dict.fromkeys(notes))
    ids = sorted(missing)
    return {"models": ids[:MAX_ROWS], "left_out": max(0, len(ids) - MAX_ROWS),
            "note": "; ".join(notes)}


# --------------------------------------------------------------------------------------------
# Coverage, errors, summary, per-model table


def coverage_rows(units: Sequence[Unit]) -> tuple[list[dict[str, str]], list[dict[str, str]], int]:
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
                            "error": first_line(row["error"])})
    shown = missing[:MAX_ROWS]
    return counts, shown, len(missing) - len(shown)


def error_rows(scores: pd.DataFrame) -> tuple[list[dict[str, Any]], int, list[dict[str, str]]]:
    """The failed rows (capped; not_applicable ones are answers, counted in by_status and the
    coverage table only), how many were left out, and per detector its rows per status."""
    bad = scores[~scores["status"].isin(ANSWERED_STATUSES)].sort_values(
        ["detector", "model_id"], kind="stable")
    rows = []
    for _, r in bad.head(MAX_ROWS).iterrows():
        error = r["error"] if isinstance(r["error"], str) else ""
        rows.append({
            "model_id": r["model_id"], "detector": r["detector"], "status": r["status"],
            "run_id": r["run_id"], "worker": fmt(r["worker"]), "seconds": fmt(r["seconds"], 1),
            "error": error, "first_line": first_line(error),
        })
    by_status = []
    if len(scores):
        table = scores.groupby(["detector", "status"]).size().unstack(fill_value=0)
        for detector, r in table.iterrows():
            by_status.append({"detector": str(detector),
                              "counts": ", ".join(f"{k} {int(v)}" for k, v in r.items() if v)})
    return rows, max(0, len(bad) - MAX_ROWS), by_status


def cascade_view(scores: pd.DataFrame) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A cascade's stages (models run, models decided, detector-seconds, their share of all)
    and, per model, the stage that decided it; ([], {}) without cascade rows. Read from the
    rows of detector "cascade" (xray.pipeline.run_cascade), the latest configuration's."""
    rows = scores[scores["detector"] == CASCADE]
    if not len(rows):
        return [], {}
    rows = rows[rows["config_hash"] == rows.sort_values("finished_at")["config_hash"].iloc[-1]]
    stats = [json_object(s) for s in rows["stats_json"]]
    decided = {str(m): int(st["stage"]) for m, st in zip(rows["model_id"], stats)
               if "stage" in st}
    n = max((int(st.get("stages", 0)) for st in stats), default=0)
    seconds = [sum(float(st["stage_seconds"][k]) for st in stats
                   if len(st.get("stage_seconds", ())) > k) for k in range(n)]
    total = sum(seconds)
    view = []
    for k in range(n):
        names = next((st["stage_detectors"][k] for st in stats
                      if len(st.get("stage_detectors", ())) > k), [])
        view.append({
            "number": k + 1, "detectors": ", ".join(names),
            "models": sum(len(st.get("stage_seconds", ())) > k for st in stats),
            "decided": sum(stage == k + 1 for stage in decided.values()),
            "seconds": fmt(seconds[k], 1),
            "share": fmt(seconds[k] / total, 3) if total else "-"})
    return view, decided


def model_table(units: Sequence[Unit], drilled: set[str],
                decided_at: Mapping[str, int] | None = None) -> tuple[dict[str, Any], int]:
    """Model x detector cells: score (``*`` at or above the threshold), else the status; with a
    cascade, the stage that decided each model (`decided_at`)."""
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
    if decided_at:
        table["cascade stage"] = [str(decided_at.get(m, "-")) for m in table.index]
    shown = table.head(MAX_ROWS)
    rows = [{"cells": cells, "link": model_id in drilled}
            for model_id, cells in zip(shown.index, shown.to_numpy().tolist())]
    return {"columns": list(table.columns), "rows": rows}, len(table) - len(shown)


def leakage_warning(summary: pd.DataFrame) -> str:
    """The warning put before the summary when a calibrator scored its own training models
    (the summary's n_training_models; see xray.reduce.summary)."""
    overall = summary[(summary["group_by"] == "all") & (summary["n_training_models"] > 0)]
    if not len(overall):
        return ""
    units = ", ".join(f"{r.detector} [{r.config_hash}]: {r.n_training_models} of {r.n}"
                      for r in overall.itertuples())
    return (f"WARNING: models a calibrator was trained on are scored by it ({units}); those "
            "rows' figures are in-sample, not held out (column 'train models'). ")


def _summary_cell(r: pd.Series, col: str) -> str:
    if col == "group":
        return "all" if r["group_by"] == "all" else f"{r['group_by']}={r['group']}"
    return fmt(r[col])


def summary_view(summary: pd.DataFrame) -> dict[str, Any]:
    """The summary for the template: `short` (AUC, TPR at 5% FPR, CE, accuracy per detector x
    group), the full table and its glossary (every column title with what it means)."""
    full = [{title: _summary_cell(r, col) for title, col, _ in _SUMMARY_VIEW}
            for _, r in summary.iterrows()]
    short = [{title: _summary_cell(r, col) for title, col in _SUMMARY_SHORT}
             for _, r in summary.iterrows()]
    return {"columns": [t for t, _, _ in _SUMMARY_VIEW], "rows": full,
            "text_columns": _SUMMARY_TEXT,
            "short_columns": [t for t, _ in _SUMMARY_SHORT], "short_rows": short,
            "glossary": [(t, f"{meaning} ({col})") for t, col, meaning in _SUMMARY_VIEW]}
