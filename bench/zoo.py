"""Zoo throughput: models trained per minute for the demo recipe on this machine, and the share
of worker time spent outside the optimisation step (data generation, poisoning, evaluation,
writing the round, process start-up).

    .venv/bin/python bench/zoo.py [--recipe demo] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import record  # noqa: E402

from xray.zoo.build import build_round  # noqa: E402
from xray.zoo.recipe import load_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
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
                         f"--workers {args.workers}", figures)
    print(path.read_text())


if __name__ == "__main__":
    main()
