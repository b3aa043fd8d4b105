"""Benchmark: the HTML report of a 2,000-model run (and, for scale, of a 10,000-model one).

    .venv/bin/python bench/report.py [--models 2000] [--large 10000]   # bench/results/report.json

The run is synthetic but goes through the real schema and sink (`results.sink.write_part`): per
model three detectors' score rows (modelxray, nc, exray; separations 2.0 / 1.0 / 0.3 between
clean and trojaned, 1 in 50 rows an error, 1 in 200 a timeout; ground truth on every model, a
third trojaned with one of three attacks; two architectures, two datasets as tags), one
inverted trigger per model for nc (a 32 x 32 mask and a 3 x 32 x 32 pattern as np.save bytes,
as inversion detectors write them) and a runs row. The model files and the manifest do not
exist, so the drill-down draws inverted triggers but no Model X-ray planes (those re-run the
detector: seconds per model, outside this measure).

Figures:
  seconds_2000_models   wall time of render_report on the 2,000-model output (target < 60 s),
                        reading the tables included; best of 2 (the machine is shared).
  html_megabytes        size of that report.html (MB = 1e6 bytes).
  seconds_10000_models, html_megabytes_10000   the same for 10,000 models (one run).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record  # noqa: E402

from xray.reduce.report import render_report  # noqa: E402
from xray.results.sink import write_part  # noqa: E402

DETECTORS = {"modelxray": 2.0, "nc": 1.0, "exray": 0.3}
ATTACKS = ("badnets", "polygon", "blended")
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def synthetic_run(out: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    run = "R1"
    scores, triggers = [], []
    for i in range(n):
        model = f"id-{i:08d}"
        poisoned = i % 3 == 0
        attack = ATTACKS[i % len(ATTACKS)] if poisoned else None
        tags = json.dumps({"dataset": "signs" if i % 2 else "mnist", "round": "bench"})
        for name, separation in DETECTORS.items():
            status = "error" if rng.random() < 0.02 else "timeout" if rng.random() < 0.005 else "ok"
            score = float(rng.normal(separation * poisoned, 1.0))
            scores.append({
                "run_id": run, "model_id": model, "model_digest": f"d{i}", "detector": name,
                "detector_version": "1", "config_hash": f"h{name}", "status": status,
                "error": None if status == "ok" else f"RuntimeError: synthetic {status}\n  ...",
                "score": score if status == "ok" else None,
                "predicted_target": int(rng.integers(10)),
                "stats_json": json.dumps({"probability": float(1 / (1 + np.exp(-score)))}),
                "seconds": float(rng.gamma(2.0, 3.0 if name == "modelxray" else 8.0)),
                "worker": f"node{i % 4}:1", "architecture": "nin" if i % 5 else "preact_resnet18",
                "num_classes": 10, "gt_poisoned": poisoned, "gt_target": 0 if poisoned else None,
                "gt_attack": attack, "tags_json": tags,
                "finished_at": T0 + timedelta(seconds=i)})
        mask = np.zeros((1, 32, 32), np.float32)
        r, c = rng.integers(0, 28, 2)
        mask[0, r:r + 4, c:c + 4] = 1.0
        triggers.append({
            "run_id": run, "model_id": model, "model_digest": f"d{i}", "detector": "nc",
            "config_hash": "hnc", "trigger_index": 0, "victim": None, "target": 0,
            "kind": "patch", "size": 16.0, "reasr": float(rng.random()), "stats_json": "{}",
            "mask": _npy(mask), "pattern": _npy(rng.random((3, 32, 32)).astype(np.float32)),
            "kernel": None})
    for start in range(0, len(scores), 20_000):
        write_part(str(out), "scores", run, scores[start:start + 20_000])
    for start in range(0, len(triggers), 5_000):
        write_part(str(out), "triggers", run, triggers[start:start + 5_000])
    config = {"seed": 0, "detectors": {name: {"preset": "small", "params": {}}
                                       for name in DETECTORS}}
    write_part(str(out), "runs", run, [{
        "run_id": run, "config_hash": "bench", "config_json": json.dumps(config),
        "code_version": "bench", "manifest_uri": str(out / "absent-manifest.csv"),
        "manifest_digest": "0" * 16, "models_total": n, "models_planned": n,
        "started_at": T0, "finished_at": T0 + timedelta(hours=1)}])


def measure(n: int, repeats: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        synthetic_run(out, n)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            path = render_report(str(out))
            best = min(best, time.perf_counter() - started)
        size = Path(path).stat().st_size / 1e6
    return best, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--large", type=int, default=10000, help="0 = skip the large run")
    args = parser.parse_args()
    assert render_report  # imported above: matplotlib / pandas import time is not in the figure
    seconds, size = measure(args.models, repeats=2)
    print(f"{args.models} models: {seconds:.1f} s, {size:.2f} MB")
    figures = {"seconds_2000_models": seconds, "html_megabytes": size}
    if args.large:
        large_s, large_mb = measure(args.large, repeats=1)
        print(f"{args.large} models: {large_s:.1f} s, {large_mb:.2f} MB")
        figures.update(seconds_10000_models=large_s, html_megabytes_10000=large_mb)
    path = record("report", "python bench/report.py", figures,
                  notes={"models": args.models, "large": args.large,
                         "detectors": list(DETECTORS)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
