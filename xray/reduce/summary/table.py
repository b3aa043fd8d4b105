"""One summary row per unit x group: counts, coverage, threshold metrics, ROC-AUC, TrojAI
cross-entropy, Brier, runtime and notes (see the package docstring)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from xray.reduce import metrics as M
from xray.reduce.calibrate import trained_on_flag
from xray.reduce.summary.groups import _groups
from xray.reduce.summary.units import CLEAN_QUANTILE, threshold_clean_models, unit_frames

MAX_FPR = 0.05
SUMMARY_COLUMNS = [
    "detector", "detector_version", "config_hash", "group_by", "group",
    "n", "n_poisoned", "n_clean", "n_unlabelled",
    "n_ok", "n_missing", "n_error", "n_not_applicable", "n_timeout", "n_crashed", "n_not_scored",
    "n_bad_score", "coverage",
    "threshold", "threshold_source", "threshold_n_clean", "n_flagged", "TP", "FP", "FN", "TN",
    "accuracy",
    "best_threshold", "best_accuracy",
    "roc_auc", "roc_auc_reason", "roc_auc_thresholds", "tpr_at_fpr", "max_fpr",
    "ce", "ce_ci95", "brier", "probability_source",
    "ce_missing_as_half", "ce_ci95_missing_as_half", "roc_auc_missing_as_half",
    "score_median", "runtime_p50", "runtime_p90", "runtime_p99", "runtime_max",
    "n_superseded", "n_training_models", "notes",
]

_INT_COLUMNS = [
    "n", "n_poisoned", "n_clean", "n_unlabelled", "n_ok", "n_missing", "n_error",
    "n_not_applicable", "n_timeout", "n_crashed", "n_not_scored", "n_bad_score",
    "threshold_n_clean", "n_flagged", "TP", "FP", "FN", "TN",
    "n_superseded", "n_training_models",
]

_STR_COLUMNS = [
    "detector", "detector_version", "config_hash", "group_by", "group", "threshold_source",
    "roc_auc_reason", "probability_source", "notes",
]


def _notes(**metrics: Any) -> str:
    seen: dict[str, list[str]] = {}
    for name, m in metrics.items():
        reason = getattr(m, "reason", None)
        if reason:
            seen.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names)}: {reason}" for reason, names in seen.items())


def _group_row(
    unit: dict[str, Any], group_by: str, value: str, sub: pd.DataFrame, threshold: float,
    threshold_source: str, threshold_n_clean: int | None, superseded: int, max_fpr: float,
) -> dict[str, Any]:
    y = sub["y"].to_numpy(dtype=float)
    s = sub["score"].to_numpy(dtype=float)
    p = sub["probability"].to_numpy(dtype=float)
    usable = sub["usable"].to_numpy(dtype=bool)
    status = sub["status"].to_numpy(dtype=object)
    labelled = ~np.isnan(y)
    n, n_lab = len(sub), int(labelled.sum())
    use = labelled & usable
    yu, su, pu = y[use], s[use], p[use]
    has_threshold = not math.isnan(threshold)

    row: dict[str, Any] = dict(unit, group_by=group_by, group=value)
    row.update(
        n=n,
        n_poisoned=int((y == 1).sum()),
        n_clean=int((y == 0).sum()),
        n_unlabelled=n - n_lab,
        n_ok=int(usable.sum()),
        n_missing=int((~usable).sum()),
        n_error=int((status == "error").sum()),
        n_not_applicable=int((status == "not_applicable").sum()),
        n_timeout=int((status == "timeout").sum()),
        n_crashed=int((status == "crashed").sum()),
        n_not_scored=int(pd.isna(sub["status"]).sum()),
        n_bad_score=int(((status == "ok") & ~usable).sum()),
        coverage=float(usable.sum() / n) if n else math.nan,
        threshold=threshold,
        threshold_source=threshold_source,
        threshold_n_clean=threshold_n_clean,
        n_flagged=int((s[usable] >= threshold).sum()) if has_threshold else None,
        max_fpr=max_fpr,
        score_median=float(np.median(s[usable])) if usable.any() else math.nan,
        n_superseded=superseded,
    )

    no_truth = None if n_lab else M.Metric(math.nan, f"no ground truth ({n} unlabelled models)")
    if has_threshold and use.any():
        c = M.confusion_counts(yu, su, threshold)
        row.update(TP=c.tp, FP=c.fp, FN=c.fn, TN=c.tn)
    else:
        row.update(TP=None, FP=None, FN=None, TN=None)
    acc = no_truth or (
        M.accuracy(yu, su, threshold) if has_threshold else M.Metric(math.nan, "no threshold")
    )
    best_thr, best_acc = (no_truth, no_truth) if no_truth else M.best_threshold(yu, su)
    auc = no_truth or M.roc_auc(yu, su)
    auc_t = no_truth or M.roc_auc_thresholds(yu, pu)
    tpr = no_truth or M.tpr_at_fpr(yu, su, max_fpr)
    if no_truth:
        ce = M.CrossEntropy(math.nan, math.nan, no_truth.reason)
        brier = no_truth
    else:
        ce, brier = M.cross_entropy(yu, pu), M.brier(yu, pu)

    # TrojAI convention: every labelled model counts; no usable score -> probability 0.5.
    p_half = np.where(usable, p, np.nan)[labelled]
    y_lab = y[labelled]
    if no_truth:
        ce_half, auc_half = M.CrossEntropy(math.nan, math.nan, no_truth.reason), no_truth
    else:
        ce_half = M.cross_entropy(y_lab, p_half, missing=0.5)
        auc_half = M.roc_auc(y_lab, np.where(np.isnan(p_half), 0.5, p_half))

    rt = M.runtime_percentiles(pd.to_numeric(sub["seconds"], errors="coerce").to_numpy(dtype=float))
    sources = set(sub.loc[usable, "probability_source"])
    row.update(
        accuracy=acc.value,
        best_threshold=best_thr.value,
        best_accuracy=best_acc.value,
        roc_auc=auc.value,
        roc_auc_reason=auc.reason,
        roc_auc_thresholds=auc_t.value,
        tpr_at_fpr=tpr.value,
        ce=ce.value,
        ce_ci95=ce.ci95,
        brier=brier.value,
        probability_source=(sources.pop() if len(sources) == 1 else "mixed" if sources else None),
        ce_missing_as_half=ce_half.value,
        ce_ci95_missing_as_half=ce_half.ci95,
        roc_auc_missing_as_half=auc_half.value,
        runtime_p50=rt["p50"],
        runtime_p90=rt["p90"],
        runtime_p99=rt["p99"],
        runtime_max=rt["max"],
    )
    notes = _notes(
        accuracy=acc, best_threshold=best_thr, roc_auc=auc, roc_auc_thresholds=auc_t,
        tpr_at_fpr=tpr, ce=ce, brier=brier, ce_missing_as_half=ce_half,
        roc_auc_missing_as_half=auc_half,
    )
    if n_lab and n - n_lab:
        left_out = f"{n - n_lab} unlabelled models left out of metrics"
        notes = "; ".join(filter(None, [notes, left_out]))
    flags = [trained_on_flag(v) for v in sub.loc[usable, "stats_json"]]
    row["n_training_models"] = sum(f is True for f in flags)
    if row["n_training_models"]:
        notes = "; ".join(filter(None, [notes, (
            f"{row['n_training_models']} of {n} models are training models of calibrator "
            f"{unit['config_hash']}: in-sample, not held-out figures")]))
    elif any(f is None for f in flags):
        notes = "; ".join(filter(None, [notes, (
            f"calibrator {unit['config_hash']} lists no training models: leakage not checked")]))
    row["notes"] = notes or None
    return row


def summarize(
    scores: pd.DataFrame,
    thresholds: Mapping[str, float] | None = None,
    group_by: Iterable[str] | None = None,
    *,
    max_fpr: float = MAX_FPR,
    clean_quantile: float = CLEAN_QUANTILE,
) -> pd.DataFrame:
    """One row per (detector, detector_version, config_hash) x group; see the module docstring.

    thresholds: {detector name: threshold}, overriding calibration. group_by: group names among
    "attack", "architecture" and tag keys; default all of them (tag keys as found in tags_json).
    The group "all" is always there.
    """
    group_by = None if group_by is None else list(group_by)
    rows = []
    for unit, per_model, thr, source, superseded in unit_frames(scores, thresholds, clean_quantile):
        n_clean = threshold_clean_models(per_model, source)
        for kind, value, mask in _groups(per_model, group_by):
            if mask.any():
                rows.append(_group_row(
                    unit, kind, value, per_model[mask], thr, source, n_clean, superseded, max_fpr
                ))
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    for col in _INT_COLUMNS:
        df[col] = df[col].astype("Int64")
    for col in SUMMARY_COLUMNS:
        if col not in _INT_COLUMNS and col not in _STR_COLUMNS:
            df[col] = df[col].astype(float)
    for col in _STR_COLUMNS:
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df
