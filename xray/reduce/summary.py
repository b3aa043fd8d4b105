"""From the `scores` long table to one summary row per detector x group.

Reading: `load_scores` returns the de-duplicated `scores` rows of one run or of all runs (one row
per SCORE_KEY: the latest ok row, else the latest row), through the one reader of the result
tables, `xray.results.sink.read_table`; `deduplicate` is `xray.results.sink.dedupe_scores`.

Summarising (`summarize`) works on *units* and *models*:

* A unit is one (detector, detector_version, config_hash): results of different detector code or
  parameters are never pooled.
* A unit's models are every model that appears, under any detector, in the runs where the unit
  has rows. A model the unit did not score (no row, error, timeout, crash, NaN score) is
  *missing*: it is counted in the coverage columns, left out of the plain metrics and counted as
  probability 0.5 in the ``*_missing_as_half`` metrics (the TrojAI convention for models a
  submission did not reach). If the unit has several rows for one model (e.g. the model file
  changed between runs), the latest ok row is used, else the latest row; ``n_superseded`` counts
  the others.
* Groups, in columns ``group_by`` (the kind) and ``group`` (the value): ``all``/``all``;
  ``attack`` = each gt_attack value of the trojaned models, with the group
  holding the trojaned models of that attack *and every clean model* as the negatives (so each
  attack group answers "trojaned-by-this-attack vs clean"; unlabelled models are in no attack
  group); ``architecture`` = each architecture; and each key of ``tags_json`` (dataset, round,
  split, ...) = each of its values, over the models that carry the key.
* Threshold (``score >= threshold`` -> trojaned), per detector, recorded in ``threshold_source``:
  ``given`` (the `thresholds` argument), else ``clean_q<quantile>`` = `calibrate_threshold` over
  the unit's known-clean models (an in-sample FPR of about 1 - quantile), else
  ``best_separating`` (the best accuracy threshold over all labelled models), else ``none``.
* Probability (for CE, Brier and the threshold-form ROC-AUC), per model: the detector's stat
  ``probability`` when its stats_json has a finite one, else ``logistic(score - threshold)``.
  PROVISIONAL: the logistic map has unit scale whatever the detector's score scale is, so CE and
  Brier through it compare runs of one detector, not detectors with each other; a fitted
  calibrator will replace it. ``probability_source`` says which was used (stats / logistic /
  mixed).
* Leakage: ``n_training_models`` counts the group's models whose row a calibrator made for one
  of its own training models (the combined detector's stats ``trained_on``, see
  xray.reduce.calibrate); their probabilities are in-sample, and ``notes`` says so (or that a
  calibrator without its training list could not be checked). Marked, not refused: a corpus
  may legitimately include the training round.
* Models without ground truth (gt_poisoned null) are counted (``n_unlabelled``, ``n_flagged``,
  ``score_median``) but left out of every metric; a group with no labelled model has NaN metrics
  with the reason in ``roc_auc_reason`` / ``notes``.
"""
from __future__ import annotations

import io
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xray.io import storage
from xray.reduce import metrics as M
from xray.reduce.calibrate import row_probability, trained_on_flag
from xray.reduce.formatting import fmt
from xray.results.sink import dedupe_scores, json_object, read_table

UNIT = ["detector", "detector_version", "config_hash"]
CLEAN_QUANTILE = 0.95
MAX_FPR = 0.05

SUMMARY_COLUMNS = [
    "detector", "detector_version", "config_hash", "group_by", "group",
    "n", "n_poisoned", "n_clean", "n_unlabelled",
    "n_ok", "n_missing", "n_error", "n_timeout", "n_crashed", "n_not_scored", "n_bad_score",
    "coverage",
    "threshold", "threshold_source", "n_flagged", "TP", "FP", "FN", "TN", "accuracy",
    "best_threshold", "best_accuracy",
    "roc_auc", "roc_auc_reason", "roc_auc_thresholds", "tpr_at_fpr", "max_fpr",
    "ce", "ce_ci95", "brier", "probability_source",
    "ce_missing_as_half", "ce_ci95_missing_as_half", "roc_auc_missing_as_half",
    "score_median", "runtime_p50", "runtime_p90", "runtime_p99", "runtime_max",
    "n_superseded", "n_training_models", "notes",
]
_INT_COLUMNS = [
    "n", "n_poisoned", "n_clean", "n_unlabelled", "n_ok", "n_missing", "n_error", "n_timeout",
    "n_crashed", "n_not_scored", "n_bad_score", "n_flagged", "TP", "FP", "FN", "TN",
    "n_superseded", "n_training_models",
]
_STR_COLUMNS = [
    "detector", "detector_version", "config_hash", "group_by", "group", "threshold_source",
    "roc_auc_reason", "probability_source", "notes",
]


# --------------------------------------------------------------------------------------------
# Reading


deduplicate = dedupe_scores  # the name users import from here; the rule lives in results/


def load_scores(out_uri: str, run_id: str | None = None) -> pd.DataFrame:
    """The de-duplicated `scores` rows under <out>/scores/run=*/ (one run, or all): the results
    reader `xray.results.sink.read_table`, one row per SCORE_KEY (`deduplicate`). No scores:
    an empty frame with the schema's columns."""
    return read_table(out_uri, "scores", run_id=run_id)


# --------------------------------------------------------------------------------------------
# Per-model preparation


def _label(value: Any) -> float:
    """gt_poisoned as 1.0 / 0.0 / NaN (unknown)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    return 1.0 if bool(value) else 0.0


def _text(value: Any, default: str = "unknown") -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return default
    return str(value)


def _models(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per model_id: ground truth, architecture and tags of its latest row."""
    latest = scores.sort_values("finished_at", kind="stable")
    latest = latest.drop_duplicates("model_id", keep="last")
    return pd.DataFrame(
        {
            "model_id": latest["model_id"].astype(str).to_numpy(),
            "y": [_label(v) for v in latest["gt_poisoned"]],
            "attack": [_text(v) for v in latest["gt_attack"]],
            "architecture": [_text(v) for v in latest["architecture"]],
            "tags": [json_object(v) for v in latest["tags_json"]],
        }
    ).set_index("model_id")


def _unit_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per model for one unit (latest usable, else latest) and how many were dropped."""
    score = pd.to_numeric(rows["score"], errors="coerce").astype(float)
    rows = rows.assign(
        _usable=rows["status"].eq("ok") & np.isfinite(score.to_numpy()),
        score=score,
    )
    rows = rows.sort_values(["_usable", "finished_at"], kind="stable")
    chosen = rows.drop_duplicates("model_id", keep="last").set_index("model_id")
    return chosen, len(rows) - len(chosen)


def _unit_threshold(
    detector: str, y: np.ndarray, s: np.ndarray, thresholds: Mapping[str, float] | None,
    quantile: float,
) -> tuple[float, str]:
    if thresholds and detector in thresholds and thresholds[detector] is not None:
        return float(thresholds[detector]), "given"
    clean = s[(y == 0) & ~np.isnan(s)]
    if clean.size:
        return M.calibrate_threshold(clean, quantile).value, f"clean_q{quantile:g}"
    labelled = ~np.isnan(y) & ~np.isnan(s)
    if labelled.any():
        thr, _ = M.best_threshold(y[labelled], s[labelled])
        if thr.defined:
            return thr.value, "best_separating"
    return math.nan, "none"


# --------------------------------------------------------------------------------------------
# Groups


def _groups(
    models: pd.DataFrame, group_by: Sequence[str] | None
) -> list[tuple[str, str, np.ndarray]]:
    """(group_by, group, boolean mask over `models`) for every group asked for."""
    tag_keys = sorted({k for tags in models["tags"] for k, v in tags.items() if _scalar(v)})
    if group_by is None:
        group_by = ["attack", "architecture", *tag_keys]
    y = models["y"].to_numpy()
    out = [("all", "all", np.ones(len(models), dtype=bool))]
    for name in group_by:
        if name == "all":
            continue
        if name == "attack":
            attacks = models["attack"].to_numpy()
            for value in sorted(set(attacks[y == 1])):
                out.append(("attack", value, ((y == 1) & (attacks == value)) | (y == 0)))
        elif name == "architecture":
            archs = models["architecture"].to_numpy()
            for value in sorted(set(archs)):
                out.append(("architecture", value, archs == value))
        else:
            values = np.array(
                [str(t[name]) if name in t and _scalar(t[name]) else None for t in models["tags"]],
                dtype=object,
            )
            for value in sorted({v for v in values if v is not None}):
                out.append((name, value, values == value))
    return out


def _scalar(value: Any) -> bool:
    return value is not None and not isinstance(value, (dict, list))


# --------------------------------------------------------------------------------------------
# Summary


def _notes(**metrics: Any) -> str:
    seen: dict[str, list[str]] = {}
    for name, m in metrics.items():
        reason = getattr(m, "reason", None)
        if reason:
            seen.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names)}: {reason}" for reason, names in seen.items())


def _group_row(
    unit: dict[str, Any], group_by: str, value: str, sub: pd.DataFrame, threshold: float,
    threshold_source: str, superseded: int, max_fpr: float,
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
        n_timeout=int((status == "timeout").sum()),
        n_crashed=int((status == "crashed").sum()),
        n_not_scored=int(pd.isna(sub["status"]).sum()),
        n_bad_score=int(((status == "ok") & ~usable).sum()),
        coverage=float(usable.sum() / n) if n else math.nan,
        threshold=threshold,
        threshold_source=threshold_source,
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


def verdicts(per_model: pd.DataFrame, threshold: float) -> pd.Series:
    """The one verdict rule, per model of a unit's per-model frame (`unit_frames`):
    "trojaned" (score >= threshold) or "clean" for a usable score, "no threshold" when the unit
    has none; a model without a usable score gets no verdict but why: its status ("error",
    "timeout", "crashed"), "bad score" (status ok, score not finite) or "not scored" (no row of
    this unit). Only "trojaned" / "clean" are verdicts: metrics, flips and drill-downs ignore
    the rest."""
    usable = per_model["usable"].to_numpy(dtype=bool)
    score = per_model["score"].to_numpy(dtype=float)
    status = per_model["status"]
    why = np.where(status.isna().to_numpy(), "not scored",
                   np.where(status.eq("ok").to_numpy(), "bad score", status.astype(str).to_numpy()))
    if math.isnan(threshold):
        verdict = np.full(len(score), "no threshold", dtype=object)
    else:
        verdict = np.where(score >= threshold, "trojaned", "clean")
    return pd.Series(np.where(usable, verdict, why).astype(object), index=per_model.index)


def unit_frames(
    scores: pd.DataFrame, thresholds: Mapping[str, float] | None = None,
    clean_quantile: float = CLEAN_QUANTILE,
) -> list[tuple[dict[str, Any], pd.DataFrame, float, str, int]]:
    """Per unit: (unit key dict, one row per model, threshold, threshold source, n superseded).

    The per-model frame is indexed by model_id and holds y (1 / 0 / NaN), attack, architecture,
    tags, status (NaN = not scored), score, usable, probability, probability_source, seconds,
    error. Shared by `summarize` and the report's plots.
    """
    if scores.empty:
        return []
    unknown = sorted(set(thresholds or {}) - set(scores["detector"]))
    if unknown:
        raise ValueError(
            f"thresholds name detectors without scores: {unknown}; "
            f"detectors present: {sorted(set(scores['detector']))}"
        )
    models = _models(scores)
    out = []
    for key, rows in scores.groupby(UNIT, sort=True, dropna=False):
        unit = dict(zip(UNIT, (str(k) for k in key)))
        runs = set(rows["run_id"])
        universe = sorted(set(scores.loc[scores["run_id"].isin(runs), "model_id"]))
        chosen, superseded = _unit_rows(rows)
        per_model = models.loc[universe].join(
            chosen[["status", "score", "_usable", "stats_json", "seconds", "error"]], how="left"
        )
        per_model["usable"] = per_model["_usable"].eq(True).to_numpy(dtype=bool)
        per_model = per_model.drop(columns="_usable")
        y = per_model["y"].to_numpy(dtype=float)
        s = np.where(per_model["usable"], per_model["score"].to_numpy(dtype=float), np.nan)
        threshold, source = _unit_threshold(unit["detector"], y, s, thresholds, clean_quantile)
        p_stat = np.array([row_probability(v) for v in per_model["stats_json"]], dtype=float)
        p_logit = M.logistic(s - threshold)
        per_model["probability"] = np.where(np.isnan(p_stat), p_logit, p_stat)
        per_model["probability_source"] = np.where(np.isnan(p_stat), "logistic", "stats")
        out.append((unit, per_model, threshold, source, superseded))
    return out


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
        for kind, value, mask in _groups(per_model, group_by):
            if mask.any():
                rows.append(_group_row(
                    unit, kind, value, per_model[mask], thr, source, superseded, max_fpr
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


# --------------------------------------------------------------------------------------------
# Output


def format_table(summary: pd.DataFrame) -> str:
    """A compact fixed-width text table of a summary, for a terminal."""
    if summary.empty:
        return "(no scores)"
    table = pd.DataFrame(
        {
            "detector": summary["detector"],
            "group": [
                "all" if g == "all" else f"{g}={v}"
                for g, v in zip(summary["group_by"], summary["group"])
            ],
            "n": summary["n"].map(fmt),
            "troj/clean": [
                f"{fmt(a)}/{fmt(b)}" for a, b in zip(summary["n_poisoned"], summary["n_clean"])
            ],
            "miss": summary["n_missing"].map(fmt),
            "thr": [
                f"{fmt(t)}({src})"
                for t, src in zip(summary["threshold"], summary["threshold_source"])
            ],
            "acc": summary["accuracy"].map(fmt),
            "best_acc": summary["best_accuracy"].map(fmt),
            "auc": summary["roc_auc"].map(fmt),
            "ce±ci95": [
                "-" if fmt(c) == "-" else f"{fmt(c)}±{fmt(ci)}"
                for c, ci in zip(summary["ce"], summary["ce_ci95"])
            ],
            "ce(0.5)": summary["ce_missing_as_half"].map(fmt),
            "brier": summary["brier"].map(fmt),
            "tpr@fpr": summary["tpr_at_fpr"].map(fmt),
            "p50_s": summary["runtime_p50"].map(lambda x: fmt(x, 1)),
        }
    )
    return table.to_string(index=False)


def write_summary(out_uri: str, summary: pd.DataFrame) -> str:
    """Write <out>/summary/summary.parquet atomically; returns its URI."""
    uri = storage.join(out_uri, "summary", "summary.parquet")
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(summary, preserve_index=False), buffer)
    storage.atomic_write_bytes(uri, buffer.getvalue())
    return uri
