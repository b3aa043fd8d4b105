"""The combined detector's score rows for the reducer (`combined_rows`, `with_combined`) and the
trained_on mark the summary, report and score-testset read."""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any, Mapping

import pandas as pd

from xray.reduce.calibrate.artifact import STACKER_VERSION, Calibrator
from xray.reduce.calibrate.default_map import DEFAULT_VERSION, default_combined
from xray.reduce.calibrate.features import COMBINED, DERIVED_DETECTORS, model_results
from xray.results.schema import SCORES
from xray.results.sink import json_object

log = logging.getLogger(__name__)


def combined_rows(scores: pd.DataFrame, calibrator: Calibrator | None = None) -> pd.DataFrame:
    """One `scores`-schema row per model of detector "combined": score = stats.probability =
    the stacker's probability (or the default map without a calibrator). A model with no usable
    detector score gets a status "error" row saying so (missing, never filled in).

    With a calibrator, stats.trained_on says whether the model is one of its training models
    (`Calibrator.trained_on`; None: the artifact cannot tell). Such rows are marked, not
    refused: scoring a corpus that includes the training round is legitimate, and the readers
    (summary, report, score-testset) say which figures are in-sample."""
    scores = scores[~scores["detector"].isin(DERIVED_DETECTORS)]
    if not len(scores):
        return SCORES.empty_table().to_pandas()
    if calibrator is not None:
        scores = _matching(scores, calibrator)
    results = model_results(scores)
    latest = scores.sort_values("finished_at", kind="stable")
    latest = latest.drop_duplicates("model_id", keep="last")
    version = STACKER_VERSION if calibrator is not None else DEFAULT_VERSION
    config_hash = calibrator.id if calibrator is not None else "default-map"
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for base in latest.to_dict("records"):
        mid = str(base["model_id"])
        res = results.get(mid, {})
        k = base.get("num_classes")
        k = None if k is None or pd.isna(k) else int(k)
        if calibrator is not None:
            res = {d: r for d, r in res.items() if d in calibrator.detector_names}
        inputs = {d: r["score"] for d, r in res.items()}
        row = {key: base.get(key) for key in SCORES.names}
        row.update(detector=COMBINED, detector_version=version, config_hash=config_hash,
                   predicted_target=None, worker="", finished_at=now,
                   model_digest=str(res[next(iter(res))]["row"]["model_digest"]) if res
                   else str(base["model_digest"]),
                   run_id=str(max((r["row"]["run_id"] for r in res.values()),
                                  default=base["run_id"])),
                   seconds=float(sum(float(r["row"].get("seconds") or 0.0) for r in res.values())))
        if not res:
            row.update(status="error", score=None, error="no detector has an ok score for this "
                       "model", stats_json=json.dumps({"inputs": {}}))
        else:
            if calibrator is not None:
                p, how = calibrator.predict_results(res, k), f"stacker {calibrator.id}"
            else:
                p, best = default_combined(res, k)
                how = f"default map of {best}"
            missing = sorted(set(calibrator.detector_names if calibrator else res) - set(res))
            stats = {"probability": p, "source": how, "inputs": inputs, "missing": missing}
            if calibrator is not None:
                stats["trained_on"] = _trained_on(calibrator, mid, res)
            row.update(status="ok", error=None, score=p,
                       stats_json=json.dumps(stats, sort_keys=True))
        rows.append(row)
    return pd.DataFrame(rows, columns=SCORES.names)


def _trained_on(calibrator: Calibrator, model_id: str,
                results: Mapping[str, Mapping[str, Any]]) -> bool | None:
    """Whether the model, as any of its input rows has it, is a training model."""
    flags = {calibrator.trained_on(model_id, r["row"]["model_digest"]) for r in results.values()}
    return True if True in flags else (None if None in flags else False)


def trained_on_flag(stats_json: Any) -> bool | None:
    """A score row's trained_on mark, as the summary, report and score-testset read it: True
    (a training model of the calibrator that made the row), None (a calibrator that cannot
    tell), False (not one, or a row no calibrator made)."""
    stats = json_object(stats_json)
    if "trained_on" not in stats:
        return False
    return stats["trained_on"] if isinstance(stats["trained_on"], bool) else None


def _matching(scores: pd.DataFrame, calibrator: Calibrator) -> pd.DataFrame:
    """Rows of the detectors the calibrator knows, preferring its version / config hash."""
    parts = []
    for d in calibrator.detectors:
        rows = scores[scores["detector"] == d["name"]]
        same = rows[(rows["detector_version"] == d["version"])
                    & (rows["config_hash"] == d["config_hash"])]
        if len(rows) and not len(same):
            log.warning("calibrator %s was trained on %s %s [%s]; scoring rows of another "
                        "version / config", calibrator.id, d["name"], d["version"],
                        d["config_hash"])
        parts.append(same if len(same) else rows)
    return pd.concat(parts) if parts else scores.iloc[0:0]


def with_combined(scores: pd.DataFrame, calibrator: Calibrator | None = None) -> pd.DataFrame:
    """`scores` plus the combined detector's rows: what summarize / render_report take to
    report the combined detector beside the single ones."""
    combined = combined_rows(scores, calibrator)
    if not len(combined):
        return scores
    return pd.concat([scores[scores["detector"] != COMBINED], combined], ignore_index=True)
