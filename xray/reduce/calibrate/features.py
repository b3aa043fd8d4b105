"""Per-model inputs of the combined detector: a score row's probability, the scalar statistics
that may be features, and the feature dict of one model (see the package docstring)."""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from xray.results.sink import json_object

COMBINED = "combined"
CASCADE = "cascade"
# Score rows made from other detectors' rows (the combined detector, a cascade's final
# probability): never an input of a calibrator.
DERIVED_DETECTORS = (COMBINED, CASCADE)
EXCLUDED_STATS = {"seed", "num_planes", "resolution", "probability", "num_classes", "target",
                  "steps", "seconds"}
_EXCLUDED_SUFFIXES = ("_label", "_index", "_indices", "_labels", "_seed")


def row_probability(stats_json: Any) -> float:
    """The finite 'probability' statistic of a score row, else NaN."""
    try:
        p = float(json_object(stats_json).get("probability"))
    except (TypeError, ValueError):
        return math.nan
    return p if math.isfinite(p) else math.nan


def scalar_stats(stats: Mapping[str, Any]) -> dict[str, float]:
    """The numeric scalar statistics that may be features (see EXCLUDED_STATS)."""
    out = {}
    for key, value in stats.items():
        if key in EXCLUDED_STATS or key.endswith(_EXCLUDED_SUFFIXES):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


TARGET_AGREEMENT = "target_agreement"
MIN_TARGETS_TO_AGREE = 3  # with fewer named targets agreement says little


def target_agreement(targets: Sequence[int]) -> float | None:
    """How many of the detectors that name a target class name the most named one (None below
    MIN_TARGETS_TO_AGREE). Detectors that each invert or probe the model their own way land on
    the same class when a backdoor makes it a shortcut; on a clean model they scatter (measured
    on the evaluation rounds, 9 or 10 detectors: clean models 2-4, all-to-one and label-specific
    trojaned ones median 5-6; docs/fidelity/combined.md). It has no scale, so it transfers
    between rounds where the detectors' score scales move. A count, not a share: a detector
    that did not finish (trojai-detect's time budget) lowers it instead of inflating the share
    of the rest (measured with 5 of 12 detectors dropped per test model: CE 0.376 counted,
    0.387 as a share)."""
    if len(targets) < MIN_TARGETS_TO_AGREE:
        return None
    return float(Counter(targets).most_common(1)[0][1])


def _predicted_target(result: Mapping[str, Any]) -> int | None:
    target = result.get("target")
    try:
        return None if target is None or pd.isna(target) else int(target)
    except (TypeError, ValueError):
        return None


def features_from_results(results: Mapping[str, Mapping[str, Any]],
                          num_classes: int | None) -> dict[str, float]:
    """Feature dict of one model from {detector: {"score": float, "stats": dict, "target":
    int | None}} (ok results only; an absent detector is simply not in `results`)."""
    feats: dict[str, float] = {}
    if num_classes:
        feats["log2_num_classes"] = math.log2(max(int(num_classes), 2))
    named = [t for t in map(_predicted_target, results.values()) if t is not None]
    agreement = target_agreement(named)
    if agreement is not None:
        feats[TARGET_AGREEMENT] = agreement
    for name, result in results.items():
        score = result.get("score")
        if score is None or not math.isfinite(float(score)):
            continue
        feats[f"{name}.score"] = float(score)
        for key, value in scalar_stats(result.get("stats") or {}).items():
            feats[f"{name}.{key}"] = value
    return feats


def _usable(scores: pd.DataFrame) -> pd.DataFrame:
    score = pd.to_numeric(scores["score"], errors="coerce")
    return scores[scores["status"].eq("ok") & np.isfinite(score.astype(float))]


def _latest(scores: pd.DataFrame) -> pd.DataFrame:
    """One usable row per (model_id, detector): the latest."""
    rows = _usable(scores).sort_values("finished_at", kind="stable")
    return rows.drop_duplicates(["model_id", "detector"], keep="last")


def model_results(scores: pd.DataFrame) -> dict[str, dict[str, dict[str, Any]]]:
    """{model_id: {detector: {"score", "stats", "target", "row"}}} from score rows (latest
    usable; "target" is the row's predicted_target)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in _latest(scores[~scores["detector"].isin(DERIVED_DETECTORS)]).to_dict("records"):
        out.setdefault(str(row["model_id"]), {})[str(row["detector"])] = {
            "score": float(row["score"]), "stats": json_object(row.get("stats_json")),
            "target": row.get("predicted_target"), "row": row}
    return out
