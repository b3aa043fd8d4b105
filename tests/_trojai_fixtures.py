"""Session fixtures of the TrojAI tests: the tiny round exported in the TrojAI layout (r2 and
r4 dialects, whole-module pickles) and a scores table of the tiny round (a fast Model X-ray
setting, scanned in-process) to calibrate and score on. Imported by conftest.py."""
from __future__ import annotations

import datetime as dt

import pytest

# Model X-ray with 2 planes of 16 x 16 points: the real algorithm, cheap enough for tests.
FAST_CONFIG = {"seed": 0, "detectors": {"modelxray": {"params": {"num_planes": 2,
                                                                  "resolution": 16}}}}
TRAIN_RUN = "tiny-train"


@pytest.fixture(scope="session")
def trojai_rounds(tiny_round, tmp_path_factory):
    """{"r2": dir, "r4": dir}: the tiny round exported as TrojAI rounds (pickles)."""
    from xray.zoo.trojai_export import export_trojai_round

    round_dir, _ = tiny_round
    base = tmp_path_factory.mktemp("trojai")
    out = {}
    for dialect in ("r2", "r4"):
        out[dialect] = base / dialect
        export_trojai_round(str(round_dir), str(out[dialect]), dialect=dialect, allow_pickle=True)
    return out


@pytest.fixture(scope="session")
def tiny_scores(tiny_round, tmp_path_factory):
    """(out dir, run id, {model_id: score row}) of the safe-format tiny round scanned with
    FAST_CONFIG by scanning.scan_model (the workers' function), written as one run."""
    import json

    from xray.config import parse_config
    from xray.io.manifest import manifest_digest, read_manifest
    from xray.results.sink import write_part
    from xray.scanning import scan_model

    round_dir, _ = tiny_round
    out = tmp_path_factory.mktemp("tiny-scores") / "out"
    config = parse_config(FAST_CONFIG)
    detectors = [d.build() for d in config.detectors]
    records = read_manifest(str(round_dir))
    rows = []
    started = dt.datetime.now(dt.timezone.utc)
    for record in records:
        rows.extend(scan_model(record, detectors, config, run_id=TRAIN_RUN)["scores"])
    write_part(str(out), "scores", TRAIN_RUN, rows)
    write_part(str(out), "runs", TRAIN_RUN, [{
        "run_id": TRAIN_RUN, "config_hash": config.config_hash, "config_json": config.to_json(),
        "code_version": "test", "manifest_uri": str(round_dir),
        "manifest_digest": manifest_digest(records), "models_total": len(records),
        "models_planned": len(records), "started_at": started,
        "finished_at": dt.datetime.now(dt.timezone.utc)}])
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    return out, TRAIN_RUN, {r["model_id"]: r for r in rows}, json.dumps(FAST_CONFIG)


class PidPayload:
    """Unpickling this appends the unpickling process's pid to a file (a stand-in for code an
    adversarial model.pt would run). Unpickling needs only `exec`, not this class."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        code = f"import os; open({self.path!r}, 'a').write(str(os.getpid()) + '\\n')"
        return (exec, (code,))
