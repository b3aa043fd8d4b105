"""One side of a comparison: an output folder (optionally OUT@RUN_ID), its scores, summary and
per detector the unit compared (the configuration with the newest row)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd

from xray.reduce.compare.tolerances import CompareUsageError
from xray.reduce.summary import load_scores, summarize, unit_frames
from xray.results.sink import read_runs


def parse_side(spec: str) -> tuple[str, str | None]:
    """"OUT" or "OUT@RUN_ID" -> (out, run_id or None)."""
    spec = str(spec)
    if "@" in spec:
        out, run = spec.rsplit("@", 1)
        if out and run and "/" not in run:
            return out, run
    return spec, None


@dataclass
class _Side:
    spec: str
    out: str
    run_id: str | None
    scores: pd.DataFrame
    summary: pd.DataFrame
    units: dict[str, tuple]  # detector -> (unit key, per-model frame, threshold, source)
    ignored: list[dict[str, str]]
    runs: pd.DataFrame


def _runs(out: str, run_id: str | None) -> pd.DataFrame:
    try:
        return read_runs(out, run_id)
    except Exception:  # the comparison of scores does not need it
        return pd.DataFrame()


def load_side(spec: str, thresholds: Mapping[str, float] | None = None) -> _Side:
    out, run_id = parse_side(spec)
    try:
        scores = load_scores(out, run_id)
    except Exception as err:
        raise CompareUsageError(
            f"{spec}: cannot read scores: {type(err).__name__}: {err}") from None
    if scores.empty:
        raise CompareUsageError(f"{spec}: no scores under {out}"
                                + (f" for run {run_id}" if run_id else ""))
    try:
        frames = unit_frames(scores, thresholds)
    except ValueError as err:  # thresholds naming a detector this side does not have
        raise CompareUsageError(f"{spec}: {err}") from None
    candidates: dict[str, list[tuple[Any, tuple]]] = {}
    for key, per_model, threshold, source, _ in frames:
        rows = scores[(scores["detector"] == key["detector"])
                      & (scores["detector_version"] == key["detector_version"])
                      & (scores["config_hash"] == key["config_hash"])]
        candidates.setdefault(key["detector"], []).append(
            (rows["finished_at"].max(), (key, per_model, threshold, source)))
    units: dict[str, tuple] = {}
    ignored = []
    for name, found in candidates.items():
        found.sort(key=lambda c: c[0])
        units[name] = found[-1][1]
        ignored += [{**unit[0], "reason": f"older configuration of {name}"}
                    for _, unit in found[:-1]]
    summary = summarize(scores, thresholds)
    kept = {(k["detector"], k["detector_version"], k["config_hash"]) for k, *_ in units.values()}
    summary = summary[[tuple(r) in kept for r in summary[["detector", "detector_version",
                                                          "config_hash"]].itertuples(index=False)]]
    return _Side(spec, out, run_id, scores, summary.reset_index(drop=True), units, ignored,
                 _runs(out, run_id))
