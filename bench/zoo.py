"""Zoo throughput: models trained per minute for the demo recipe on this machine, and the share
of worker time spent outside the optimisation step (data generation, poisoning, evaluation,
writing the round, process start-up). `--attacks`: one model per registered attack (and the
label-specific / all-to-all mappings of BadNets) on the demo recipe's data, architecture and
training, with each attack's defaults: figures asr_<attack>, clean_acc_<attack>,
seconds_<attack> (merged into the same results file).

    .venv/bin/python bench/zoo.py [--recipe demo] [--workers N]
    .venv/bin/python bench/zoo.py --attacks [--out DIR] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import record  # noqa: E402

from xray.zoo import attacks  # noqa: E402
from xray.zoo.build import build_round  # noqa: E402
from xray.zoo.recipe import load_recipe, parse_recipe  # noqa: E402
from xray.zoo.round import model_configs  # noqa: E402

# Shadow-set attacks: MNTD's distributions, not attacks a scanner meets in one model.
SHADOW_ONLY = {"jumbo"}


def attack_recipe() -> tuple[dict, list[dict]]:
    """(recipe, its groups with their figure labels): the demo recipe's data, architecture and
    training; one model per attack (defaults), one clean model, and BadNets label-specific and
    all-to-all; nothing fails (floor 0)."""
    demo = load_recipe("demo").raw
    groups: list[dict] = [{"count": 1}]
    groups += [{"count": 1, "attack": name} for name in attacks.available()
               if name not in SHADOW_ONLY]
    groups += [{"count": 1, "attack": "badnets", "attack_params": {"victims": 3},
                "tag": "badnets_label_specific"},
               {"count": 1, "attack": "badnets", "attack_params": {"all_to_all": True},
                "tag": "badnets_all_to_all"}]
    return {**{k: demo[k] for k in ("dataset", "architecture", "training")},
            "name": "bench_attacks", "seed": 2027, "asr_floor": 0.0, "max_attempts": 1,
            "examples_per_class": 2, "poisoned_examples_per_class": 1,
            "groups": [{k: v for k, v in g.items() if k != "tag"} for g in groups]}, groups


def bench_attacks(out: str, workers: int) -> None:
    raw, groups = attack_recipe()
    started = time.perf_counter()
    result = build_round(parse_recipe(raw), out, workers=workers)
    figures: dict[str, float] = {"attacks_wall_seconds": time.perf_counter() - started}
    for group, config in zip(groups, model_configs(out)):
        label = group.get("tag") or group.get("attack") or "clean"
        figures[f"clean_acc_{label}"] = config["clean_accuracy"]
        figures[f"seconds_{label}"] = config["seconds"]
        if config["asr"] is not None:
            figures[f"asr_{label}"] = config["asr"]
    if result.failed:
        raise SystemExit(f"{len(result.failed)} models failed: {result.failed}")
    path = record("zoo", f".venv/bin/python bench/zoo.py --attacks --out {out} "
                         f"--workers {workers}", figures, merge=True)
    print(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--attacks", action="store_true",
                        help="one model per attack on the demo data (asr_/clean_acc_/seconds_)")
    parser.add_argument("--out", default="/tmp/xray-bench-attacks/round",
                        help="--attacks: the round folder (kept: a re-run resumes)")
    args = parser.parse_args()
    if args.attacks:
        bench_attacks(args.out, args.workers)
        return
    recipe = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = build_round(recipe, os.path.join(tmp, "round"), workers=args.workers)
        wall = time.perf_counter() - started
    models = result.trained + len(result.failed)
    busy = wall * args.workers  # worker-seconds available
    figures = {
        "models_per_minute": models / (wall / 60),
        "outside_training_share": 1 - result.seconds_optimising / busy,
        "wall_seconds": wall,
        "models": models,
        "failed": len(result.failed),
    }
    path = record("zoo", f".venv/bin/python bench/zoo.py --recipe {args.recipe} "
                         f"--workers {args.workers}", figures, merge=True)
    print(path.read_text())


if __name__ == "__main__":
    main()
