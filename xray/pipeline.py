"""Pipelines that scan and then reduce, so that the reducer only ever reads tables.

    result = score_testset(round_dir, out_uri, calibrator=cal)   # scan (or reuse) + harness figures
    cascade = run_cascade(round_dir, out_uri, config)   # a config with stages: cheap, then costly

The flow is one way: `xray.runner.run_scan` writes the tables, then a function of
`xray.reduce` reads them. Commands and jobs that need both call a function here.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd

from xray.config import ScanConfig, Stage, stable_hash, stage_dict
from xray.io.manifest import read_manifest
from xray.reduce.calibrate import CASCADE, Calibrator, combined_rows
from xray.reduce.harness import TestsetResult, run_scores, testset_report
from xray.results.sink import frame_rows, read_table, write_part
from xray.runner import RunSummary, run_scan


def score_testset(round_uri: str, out_uri: str, *, run_id: str | None = None, config: Any = None,
                  calibrator: Any = None, scan_kwargs: Mapping[str, Any] | None = None,
                  write_combined: bool = True,
                  allow_training_models: bool = False) -> TestsetResult:
    """Scan a round's models (skipping those already scored with this config) or reuse run
    `run_id` of `out_uri`, then score them as the TrojAI harness does
    (`xray.reduce.harness.testset_report`, which says what is written).

    config: the scan's configuration (default: the calibrator's training configuration, else
    the default one); after a scan, the rows of every run of `out_uri` that this configuration
    produced (same detector, version and config hash) are scored.
    """
    if run_id is not None:
        scores = run_scores(out_uri, run_id)
    else:
        config = config or (calibrator.scan_config() if calibrator is not None else ScanConfig())
        run_id = run_scan(round_uri, out_uri, config, **dict(scan_kwargs or {})).run_id
        scores = _of_config(read_table(out_uri, "scores"), config)
    return testset_report(round_uri, out_uri, scores, run_id, calibrator=calibrator,
                          write_combined=write_combined,
                          allow_training_models=allow_training_models)


def _of_config(scores: Any, config: ScanConfig) -> Any:
    """The rows of the detectors of `config` as it configures them."""
    if not len(scores):
        return scores
    built = [d.build() for d in config.detectors]
    keys = {(d.name, d.version, config.detector_hash(d)) for d in built}
    key = list(zip(scores["detector"], scores["detector_version"], scores["config_hash"]))
    return scores[[k in keys for k in key]]


# ---------------------------------------------------------------- cascade
CASCADE_VERSION = "1"


@dataclass
class StageOutcome:
    """What one stage of a cascade did: the models it ran on, the run that scanned them (rows
    already scored by an earlier run are reused, as in any scan), its detectors' seconds on
    those models (reused rows count the seconds they took), and how many went on."""
    number: int  # 1-based
    detectors: tuple[str, ...]
    models: int
    run: RunSummary
    detector_seconds: float
    went_on: int = 0


@dataclass
class CascadeSummary:
    stages: list[StageOutcome] = field(default_factory=list)
    decided_at: dict[str, int] = field(default_factory=dict)  # model_id -> stage number
    run_id: str = ""  # the run whose folder holds the cascade's rows (the last stage's)

    @property
    def detector_seconds(self) -> float:
        return sum(s.detector_seconds for s in self.stages)


def stage_calibrators(config: ScanConfig) -> list[Calibrator | None]:
    """Each stage's calibrator, loaded (None: the default map), checked to read only scores of
    its stage or earlier ones: a stage cannot use scores it has not computed yet."""
    calibrators, available = [], set()
    for number, stage in enumerate(config.stages, 1):
        available |= set(stage.detectors)
        if stage.calibrator is None:
            calibrators.append(None)
            continue
        cal = Calibrator.load(stage.calibrator)
        later = sorted(set(cal.detector_names) - available)
        if later:
            raise ValueError(
                f"stages[{number - 1}].calibrator {stage.calibrator}: fitted on "
                f"{', '.join(later)}, which stage {number} has not run yet (fit it with "
                f"xray calibrate --detectors {','.join(sorted(available))})")
        calibrators.append(cal)
    return calibrators


def run_cascade(manifest_uri: str, out_uri: str, config: ScanConfig,
                **scan_kwargs: Any) -> CascadeSummary:
    """Scan in stages (config.stages): stage 1's detectors on every model, each later stage's
    only on the models the stage before left uncertain (its calibrator's probability inside its
    `uncertain` band, or among its `uncertain_share` nearest 0.5; a model without any usable
    score there is uncertain too). Every stage is an ordinary scan (`run_scan`, keyed and
    resumed per detector as any scan), so re-running the cascade scans nothing twice.

    Each model's final probability is the one of the last stage it reached; it is written as a
    row of detector "cascade" (stats: probability, stage, the probability after each stage it
    passed, seconds per stage), so the summary and report show the cascade beside the single
    detectors and which stage decided each model. scan_kwargs: run_scan's options."""
    if not config.stages:
        raise ValueError("run_cascade: the config has no stages (use run_scan)")
    calibrators = stage_calibrators(config)  # a bad calibrator fails before any scan
    all_ids = [r.model_id for r in read_manifest(manifest_uri, root=scan_kwargs.get("root"))]
    summary = CascadeSummary()
    active = list(all_ids)
    history: dict[str, list[dict[str, Any]]] = {mid: [] for mid in all_ids}
    so_far: list[str] = []
    for number, (stage, calibrator) in enumerate(zip(config.stages, calibrators), 1):
        so_far += stage.detectors
        run = run_scan(manifest_uri, out_uri, config.only(stage.detectors),
                       model_ids=active, **scan_kwargs)
        scores = _of_config(read_table(out_uri, "scores", model_ids=active),
                            config.only(so_far))
        outcome = StageOutcome(number, stage.detectors, len(active), run, 0.0)
        decision = combined_rows(scores, calibrator).set_index("model_id")
        seconds = _seconds_by_model(scores, stage.detectors)
        outcome.detector_seconds = float(sum(seconds.values()))
        for mid in active:
            row = decision.loc[mid] if mid in decision.index else None
            p = float(row["score"]) if row is not None and row["status"] == "ok" else math.nan
            history[mid].append({"probability": p, "seconds": seconds.get(mid, 0.0),
                                 "row": row})
        last = number == len(config.stages)
        going_on = [] if last else uncertain_models(
            {mid: history[mid][-1]["probability"] for mid in active}, stage)
        for mid in set(active) - set(going_on):
            summary.decided_at[mid] = number
        outcome.went_on = len(going_on)
        summary.stages.append(outcome)
        active = going_on
        if not active:
            break
    summary.run_id = summary.stages[-1].run.run_id
    rows = _cascade_rows(history, summary.decided_at, config, calibrators)
    write_part(out_uri, "scores", summary.run_id, frame_rows(rows))
    return summary


def uncertain_models(probabilities: Mapping[str, float], stage: Stage) -> list[str]:
    """The models a stage passes on: probability inside stage.uncertain, or the
    stage.uncertain_share of them nearest 0.5 (rounded up). No probability (NaN): uncertain."""
    missing = [m for m, p in probabilities.items() if not math.isfinite(p)]
    scored = {m: p for m, p in probabilities.items() if math.isfinite(p)}
    if stage.uncertain is not None:
        lo, hi = stage.uncertain
        return sorted(missing + [m for m, p in scored.items() if lo <= p <= hi])
    share = float(stage.uncertain_share or 0.0)
    count = math.ceil(share * len(probabilities) - 1e-9)
    nearest = sorted(scored, key=lambda m: (abs(scored[m] - 0.5), m))
    return sorted((missing + nearest)[:max(count, len(missing))])


def _seconds_by_model(scores: pd.DataFrame, detectors: tuple[str, ...]) -> dict[str, float]:
    rows = scores[scores["detector"].isin(detectors)]
    return rows.groupby("model_id")["seconds"].sum().astype(float).to_dict()


def _cascade_rows(history: Mapping[str, list[dict[str, Any]]], decided_at: Mapping[str, int],
                  config: ScanConfig, calibrators: list[Calibrator | None]) -> pd.DataFrame:
    """One score row of detector "cascade" per model decided, from the decisive stage's
    combined row (its probability, model facts and ground truth)."""
    config_hash = _cascade_hash(config, calibrators)
    now = dt.datetime.now(dt.timezone.utc)
    out = []
    for mid, number in sorted(decided_at.items()):
        stages = history[mid]
        row = stages[number - 1]["row"]
        if row is None:  # no row at all: nothing of the model was scored
            continue
        row = {"model_id": mid, **row.to_dict()}
        stats = json.loads(row["stats_json"] or "{}")
        p = stages[number - 1]["probability"]
        stats.update(stage=number, stages=len(config.stages),
                     stage_probabilities=[s["probability"] if math.isfinite(s["probability"])
                                          else None for s in stages],
                     stage_seconds=[s["seconds"] for s in stages],
                     stage_detectors=[list(st.detectors) for st in config.stages[:len(stages)]])
        if math.isfinite(p):
            stats["probability"] = p
        row.update(detector=CASCADE, detector_version=CASCADE_VERSION, config_hash=config_hash,
                   finished_at=now, seconds=float(sum(s["seconds"] for s in stages)),
                   stats_json=json.dumps(stats, sort_keys=True))
        out.append(row)
    return pd.DataFrame(out)


def _cascade_hash(config: ScanConfig, calibrators: list[Calibrator | None]) -> str:
    """The cascade's identity: its detectors' hashes, its stages' rules and calibrators."""
    built = {d.name: d.build() for d in config.detectors}
    return stable_hash({"stages": [
        {**stage_dict(stage), "calibrator": cal.id if cal is not None else None,
         "detectors": sorted(config.detector_hash(built[n]) for n in stage.detectors)}
        for stage, cal in zip(config.stages, calibrators)]})
