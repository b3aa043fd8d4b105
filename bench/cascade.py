"""Benchmark: cascade scanning (issue 22): stages, the shared upstream run, the adaptive grid.

    .venv/bin/python bench/cascade.py [--part shared] [--round DIR] [--models N] [--threads 1]
    .venv/bin/python bench/cascade.py --part adaptive [--exray-round DIR] [--models N]
    .venv/bin/python bench/cascade.py --part stages [--workdir DIR] [--actors 2]
    # each writes their figures into bench/results/cascade.json, keeping the other part's

--part shared (default): shared_upstream_speedup: seconds of {nc, nc+exray, abs, abs+exray}
(small presets) scanned one detector at a time over seconds of the four in one scan
(`xray.scanning.scan_model` shares NC's and ABS's run with their composed twins), on the same
`--models` models of the round (evenly spaced, clean and trojaned). identical_rows: 1 when both
ways give the same scores, targets and steps for every model and detector.

--part adaptive: Model X-ray (N 4, R 100, seed 0) on every model of the demo round and of the
EX-RAY round (`--models N`: the first N of each), full grid vs grid="adaptive":
modelxray_adaptive_forward_share (adaptive forwards over full forwards, both rounds; per round
_demo, _exray), modelxray_adaptive_grid_agreement (share of grid points labelled the same, all
planes and models), modelxray_adaptive_max_re_difference / _max_ats_difference (largest
|adaptive - full| of a model's mean RE / ATS), modelxray_adaptive_seconds_ratio (adaptive
seconds over full seconds, all models; model loading excluded).

--part stages (bench/_cascade_stages.py, whose docstring says how): calibrators fitted on the
zoo round cascade_train, the cascade (stage 1 weights + karm; stage 2 the other detectors whose
training-round ROC-AUC reaches 0.75, on the models with a stage-1 probability in [0.1, 0.9])
measured on cascade_test:
cost_share, cascade_cross_entropy, all_detectors_cross_entropy, and each detector's calibrated
CE / AUC.

Rounds: the demo round (/tmp/demo1/round if it exists, else built with `xray zoo build --recipe
demo`), as bench/inversion.py; the EX-RAY round (`--exray-round`, else bench/_common's, built if
missing). idle_tail_share is bench/scheduling.py's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_round, exray_round, record  # noqa: E402

DETECTORS = ["nc", "nc+exray", "abs", "abs+exray"]


def _key(row: dict) -> tuple:
    stats = json.loads(row["stats_json"])
    return row["status"], row["score"], row["predicted_target"], stats.get("steps")


def shared(args) -> None:
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
             "models": [r.model_id for r in records], "command_shared": _command()}
    path = record("cascade", _command(), figures, notes, merge=True)
    print(path.read_text())


def _command() -> str:
    return " ".join(["python bench/cascade.py", *sys.argv[1:]])


def adaptive(args) -> None:
    import numpy as np

    from xray.detectors.base import ScanContext, ScanData
    from xray.detectors.modelxray import ModelXray
    from xray.io.examples import load_examples
    from xray.io.manifest import read_manifest
    from xray.io.model_loading import load_model

    rounds = {"demo": args.round or demo_round(),
              "exray": exray_round(args.exray_round) if args.exray_round else exray_round()}
    params = {"num_planes": 4, "resolution": 100}
    forwards = {name: [0, 0] for name in rounds}      # adaptive, full
    seconds = [0.0, 0.0]
    same = points = 0
    re_diff = ats_diff = 0.0
    per_model = {}
    for name, round_dir in rounds.items():
        records = read_manifest(str(round_dir))
        if args.models:
            records = records[:args.models]
        for rec in records:
            model = load_model(rec)
            x, y = load_examples(rec)
            data = ScanData(x=x, y=y, num_classes=rec.num_classes, mean=tuple(rec.mean),
                            std=tuple(rec.std))
            with torch.inference_mode():  # warm-up: the first forward's one-off costs
                model.eval()(torch.rand(128, *x.shape[1:]).contiguous(
                    memory_format=torch.channels_last))
            results = []
            for k, grid in enumerate(("adaptive", "full")):
                det = ModelXray(ModelXray.Params(**params, grid=grid))
                t0 = time.perf_counter()
                results.append(det.score(model, data, ScanContext(seed=0)))
                seconds[k] += time.perf_counter() - t0
                forwards[name][k] += results[-1].stats["forwards"]
            ada, full = results
            grids = [np.stack([p["pred"] for p in r.artifacts["planes"]]) for r in results]
            agree = int((grids[0] == grids[1]).sum())
            same += agree
            points += grids[1].size
            re_diff = max(re_diff, abs(ada.stats["re"] - full.stats["re"]))
            ats_diff = max(ats_diff, abs(ada.stats["ats"] - full.stats["ats"]))
            per_model[f"{name}/{rec.model_id}"] = {
                "poisoned": bool(rec.poisoned),
                "forward_share": ada.stats["forwards"] / full.stats["forwards"],
                "agreement": agree / grids[1].size,
                "re_full": full.stats["re"], "re_adaptive": ada.stats["re"],
                "ats_full": full.stats["ats"], "ats_adaptive": ada.stats["ats"]}
            print(name, rec.model_id, per_model[f"{name}/{rec.model_id}"], flush=True)
    total = [sum(f[k] for f in forwards.values()) for k in (0, 1)]
    figures = {"modelxray_adaptive_forward_share": total[0] / total[1],
               "modelxray_adaptive_grid_agreement": same / points,
               "modelxray_adaptive_max_re_difference": re_diff,
               "modelxray_adaptive_max_ats_difference": ats_diff,
               "modelxray_adaptive_seconds_ratio": seconds[0] / seconds[1],
               **{f"modelxray_adaptive_forward_share_{n}": f[0] / f[1]
                  for n, f in forwards.items()}}
    notes = {"adaptive": {"command": _command(), "threads": args.threads, **params, "seed": 0,
                          "rounds": {n: str(d) for n, d in rounds.items()},
                          "seconds_adaptive": seconds[0], "seconds_full": seconds[1],
                          "forwards_adaptive": total[0], "forwards_full": total[1],
                          "models": per_model}}
    path = record("cascade", _command(), figures, notes, merge=True)
    print(json.dumps(figures, indent=2))
    print(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["shared", "adaptive", "stages"], default="shared")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cascade-bench"),
                    help="stages: where the two rounds and their scans live (reused)")
    ap.add_argument("--actors", type=int, default=2, help="stages: scan actors")
    ap.add_argument("--round", type=Path, default=None, help="the demo round")
    ap.add_argument("--exray-round", type=Path, default=None)
    ap.add_argument("--models", type=int, default=None,
                    help="shared: models of the round (default 4); adaptive: the first N of "
                         "each round (default all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "shared":
        args.models = args.models or 4
        shared(args)
    elif args.part == "adaptive":
        adaptive(args)
    else:
        from _cascade_stages import measure

        figures, notes = measure(args.workdir, args.actors)
        path = record("cascade", _command(), figures,
                      {"stages": {"command": _command(), **notes}}, merge=True)
        print(json.dumps(figures, indent=2))
        print(path)


if __name__ == "__main__":
    main()
