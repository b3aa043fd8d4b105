"""Per unit (detector, detector_version, config_hash): one row per model of the unit's runs, its
threshold, probabilities and verdicts (see the package docstring); `with_probability`, the
same probabilities beside each score row."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from xray.reduce import metrics as M
from xray.reduce.calibrate import row_probability
from xray.results.sink import json_object

UNIT = ["detector", "detector_version", "config_hash"]
CLEAN_QUANTILE = 0.95
# A clean_q threshold resting on fewer clean models than this gets a warning: below 20 clean
# models the 0.95 quantile lies between the two largest clean scores, so one model sets it and
# its false-positive rate (nominally 5%, in-sample) is a rough guess.
MIN_CLEAN_MODELS = 20


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


def verdicts(per_model: pd.DataFrame, threshold: float) -> pd.Series:
    """The one verdict rule, per model of a unit's per-model frame (`unit_frames`):
    "trojaned" (score >= threshold) or "clean" for a usable score, "no threshold" when the unit
    has none; a model without a usable score gets no verdict but why: its status ("error",
    "not_applicable", "timeout", "crashed"), "bad score" (status ok, score not finite) or "not
    scored" (no row of this unit). Only "trojaned" / "clean" are verdicts: metrics, flips and
    drill-downs ignore the rest."""
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


def threshold_clean_models(per_model: pd.DataFrame, source: str) -> int | None:
    """How many clean models a ``clean_q`` threshold rests on (known-clean models of the unit
    with a usable score); None for a threshold set otherwise (given, best_separating, none)."""
    if not source.startswith("clean_q"):
        return None
    return int(((per_model["y"] == 0) & per_model["usable"]).sum())


def probability_scale(y: np.ndarray, s: np.ndarray) -> float:
    """The default map's scale for one unit: the standard deviation (ddof 1) of its clean models'
    usable scores when there are two or more and they differ, else of all its usable scores,
    else 1. `s` is NaN where a model has no usable score."""
    for values in (s[(y == 0) & ~np.isnan(s)], s[~np.isnan(s)]):
        if values.size >= 2:
            spread = float(np.std(values, ddof=1))
            if spread > 0 and math.isfinite(spread):
                return spread
    return 1.0


def probabilities(score: np.ndarray, usable: np.ndarray, stats_json: Any, threshold: float,
                  scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(probability, probability_source) per row of one unit: the row's own finite
    ``probability`` statistic ("stats": a calibrated map, e.g. the combined detector's stacker,
    MNTD's meta-classifier), else the default map ``logistic((score - threshold) / scale)``
    ("logistic"). NaN with source None where the row has no usable score, or no threshold."""
    score = np.asarray(score, dtype=float)
    usable = np.asarray(usable, dtype=bool)
    p_stat = np.array([row_probability(v) for v in stats_json], dtype=float)
    p_map = M.logistic((score - threshold) / scale)
    p = np.where(usable, np.where(np.isnan(p_stat), p_map, p_stat), np.nan)
    source = np.where(np.isnan(p_stat), "logistic", "stats").astype(object)
    return p, np.where(np.isnan(p), None, source)


@dataclass
class _Unit:
    """One unit as `unit_frames` gives it, with its default map's scale and its rows."""

    key: dict[str, str]
    per_model: pd.DataFrame
    threshold: float
    source: str
    superseded: int
    scale: float
    rows: np.ndarray  # positions of the unit's rows in the scores frame


def _units(scores: pd.DataFrame, thresholds: Mapping[str, float] | None,
           clean_quantile: float) -> list[_Unit]:
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
    groups = scores.groupby(UNIT, sort=True, dropna=False).indices
    for key, positions in sorted(groups.items()):
        rows = scores.iloc[positions]
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
        scale = probability_scale(y, s)
        per_model["probability"], per_model["probability_source"] = probabilities(
            s, per_model["usable"], per_model["stats_json"], threshold, scale)
        out.append(_Unit(unit, per_model, threshold, source, superseded, scale, positions))
    return out


def unit_frames(
    scores: pd.DataFrame, thresholds: Mapping[str, float] | None = None,
    clean_quantile: float = CLEAN_QUANTILE,
) -> list[tuple[dict[str, Any], pd.DataFrame, float, str, int]]:
    """Per unit: (unit key dict, one row per model, threshold, threshold source, n superseded).

    The per-model frame is indexed by model_id and holds y (1 / 0 / NaN), attack, architecture,
    tags, status (NaN = not scored), score, usable, probability, probability_source, seconds,
    error. Shared by `summarize` and the report's plots.
    """
    return [(u.key, u.per_model, u.threshold, u.source, u.superseded)
            for u in _units(scores, thresholds, clean_quantile)]


def with_probability(
    scores: pd.DataFrame, thresholds: Mapping[str, float] | None = None,
    clean_quantile: float = CLEAN_QUANTILE,
) -> pd.DataFrame:
    """`scores` with ``probability`` and ``probability_source`` columns after ``score``: every
    row mapped to [0, 1] as the summary maps it (`probabilities`, with its unit's threshold and
    scale), so detectors compare on one scale. Rows without a usable score (status not ok, score
    not finite) get NaN. Computed when read; the stored rows hold what the detector produced."""
    out = scores.drop(columns=["probability", "probability_source"], errors="ignore")
    p = np.full(len(out), np.nan)
    source = np.full(len(out), None, dtype=object)
    for unit in _units(out, thresholds, clean_quantile):
        rows = out.iloc[unit.rows]
        score = pd.to_numeric(rows["score"], errors="coerce").to_numpy(dtype=float)
        usable = rows["status"].eq("ok").to_numpy(dtype=bool) & np.isfinite(score)
        p[unit.rows], source[unit.rows] = probabilities(
            score, usable, rows["stats_json"], unit.threshold, unit.scale)
    at = out.columns.get_loc("score") + 1
    out.insert(at, "probability", p)
    out.insert(at + 1, "probability_source", source)
    return out
