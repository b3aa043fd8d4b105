"""Benchmark: the runner's order of work and the run's idle tail (issue 22, scheduling).

    .venv/bin/python bench/scheduling.py [--rounds DIR DIR ...] [--actors 2] [--detector modelxray]
    # writes bench/results/scheduling.json

One mixed manifest of every model of the given rounds (default: `demo_round()`, 16
mntd_mnist_cnn at 32 x 32 with 10 classes, and `exray_round()`, 10 NiN at 24 x 24 with 5
classes; ids prefixed by round) is scanned on a local Ray instance with
`--actors` actors, after a first scan (seed 0) has given every model its seconds: the compared
scans use seed 1 (a new config: every model is planned again) on copies of that output, once in
the plan's order before this change (heaviest file, lightest, second heaviest, ...:
`interleave`, kept here for the comparison) and once in today's longest-first order
(`xray.runner.plan.longest_first`, from the first scan's seconds).

idle_tail_share_{before,after}: RunSummary.idle_tail_seconds (from the first actor left without
work to the last result) over schedule_seconds; idle_tail_seconds_*, schedule_seconds_* beside.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_round, exray_round, record  # noqa: E402


def interleave(items: list, seconds: dict | None = None, by_kind: dict | None = None) -> list:
    """The plan's order before longest-first: heaviest, lightest, second heaviest, ..."""
    ordered = sorted(items, key=lambda p: (-p.size, p.record.model_id))
    out, lo, hi = [], 0, len(ordered) - 1
    while lo <= hi:
        out.append(ordered[lo])
        if lo != hi:
            out.append(ordered[hi])
        lo, hi = lo + 1, hi - 1
    return out


def mixed_manifest(rounds: list[Path], path: Path) -> int:
    from xray.io.manifest import read_manifest, write_manifest

    records = []
    for r in rounds:
        prefix = r.parent.name if r.name == "round" else r.name  # demo-bench/round -> demo-bench
        records += [dataclasses.replace(rec, model_id=f"{prefix}-{rec.model_id}")
                    for rec in read_manifest(str(r))]
    write_manifest(records, str(path))
    return len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=Path, nargs="+", default=None,
                    help="default: the demo round and the EX-RAY bench round (built if missing)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--detector", default="modelxray")
    ap.add_argument("--preset", default=None, help="the detector's preset (default: its default)")
    args = ap.parse_args()

    import xray.runner.plan as plan_module
    from xray.config import parse_config
    from xray.runner import run_scan

    work = Path(tempfile.mkdtemp(prefix="xray-scheduling-"))
    manifest = work / "manifest.csv"
    rounds = args.rounds or [demo_round(), exray_round()]
    models = mixed_manifest(rounds, manifest)
    preset = {"preset": args.preset} if args.preset else {}
    base = parse_config({"seed": 0, "detectors": {args.detector: preset}})
    again = parse_config({"seed": 1, "detectors": {args.detector: preset}})
    figures: dict[str, float] = {"models": models, "actors": args.actors}
    # a first scan gives every model its seconds; the compared scans (another seed: a new
    # config, so everything is planned again) start from copies of it
    run_scan(str(manifest), str(work / "base"), base, num_actors=args.actors,
             show_progress=False)
    longest_first = plan_module.longest_first
    for label, order in (("before", interleave), ("after", longest_first)):
        shutil.copytree(work / "base", work / label)
        plan_module.longest_first = order
        try:
            summary = run_scan(str(manifest), str(work / label), again,
                               num_actors=args.actors, show_progress=False)
        finally:
            plan_module.longest_first = longest_first
        assert summary.failures == 0 and summary.models_scanned == models, summary
        figures[f"idle_tail_share_{label}"] = summary.idle_tail_share
        figures[f"idle_tail_seconds_{label}"] = summary.idle_tail_seconds
        figures[f"schedule_seconds_{label}"] = summary.schedule_seconds
    path = record("scheduling", " ".join(["python bench/scheduling.py", *sys.argv[1:]]),
                  figures, {"rounds": [str(r) for r in rounds],
                            "detector": args.detector, "preset": args.preset})
    print(path.read_text())


if __name__ == "__main__":
    main()
