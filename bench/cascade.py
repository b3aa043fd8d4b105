"""Benchmark: cascade scanning (issue 22). Today: the shared upstream run.

    .venv/bin/python bench/cascade.py [--round DIR] [--models N] [--threads 1]
    # writes bench/results/cascade.json

shared_upstream_speedup: seconds of {nc, nc+exray, abs, abs+exray} (small presets) scanned one
detector at a time over seconds of the four in one scan (`xray.scanning.scan_model` shares NC's
and ABS's run with their composed twins), on the same `--models` models of the round (evenly
spaced, clean and trojaned). identical_rows: 1 when both ways give the same scores, targets and
steps for every model and detector.

Round: the demo round (/tmp/demo1/round if it exists, else built with `xray zoo build --recipe
demo`), as bench/inversion.py. The cascade's other figures (cost_share, cross entropies, the
adaptive Model X-ray grid, idle_tail_share) come with the stages and the scheduler.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_round, record  # noqa: E402

DETECTORS = ["nc", "nc+exray", "abs", "abs+exray"]


def _key(row: dict) -> tuple:
    stats = json.loads(row["stats_json"])
    return row["status"], row["score"], row["predicted_target"], stats.get("steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--round", type=Path, default=None)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from xray.config import parse_config
    from xray.io.manifest import read_manifest
    from xray.scanning import scan_model

    records = read_manifest(str(args.round or demo_round()))
    step = max(1, len(records) // args.models)
    records = records[::step][:args.models]
    config = parse_config({"seed": 0, "detectors": {n: {"preset": "small"} for n in DETECTORS}})
    specs = list(config.detectors)

    together, apart = {}, {}
    t0 = time.perf_counter()
    for rec in records:
        for row in scan_model(rec, [s.build() for s in specs], config)["scores"]:
            together[rec.model_id, row["detector"]] = _key(row)
    seconds_together = time.perf_counter() - t0
    t0 = time.perf_counter()
    for rec in records:
        for spec in specs:
            (row,) = scan_model(rec, [spec.build()], config)["scores"]
            apart[rec.model_id, row["detector"]] = _key(row)
    seconds_apart = time.perf_counter() - t0
    figures = {"shared_upstream_speedup": seconds_apart / seconds_together,
               "seconds_apart": seconds_apart, "seconds_together": seconds_together,
               "identical_rows": float(together == apart), "models": len(records)}
    notes = {"detectors": DETECTORS, "threads": args.threads,
             "models": [r.model_id for r in records]}
    path = record("cascade", " ".join(["python bench/cascade.py", *sys.argv[1:]]), figures,
                  notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
