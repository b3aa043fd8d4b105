"""Pipelines that scan and then reduce, so that the reducer only ever reads tables.

    result = score_testset(round_dir, out_uri, calibrator=cal)   # scan (or reuse) + harness figures

The flow is one way: `xray.runner.run_scan` writes the tables, then a function of
`xray.reduce` reads them. Commands and jobs that need both call a function here.
"""
from __future__ import annotations

from typing import Any, Mapping

from xray.config import ScanConfig
from xray.reduce.harness import TestsetResult, run_scores, testset_report
from xray.results.sink import read_table
from xray.runner import run_scan


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
