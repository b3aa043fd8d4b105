"""Benchmark: what a fresh process pays before a detector does any work.

    .venv/bin/python bench/startup.py [--repeats 5]   # writes bench/results/startup.json

Every scan actor, zoo build worker and `xray scan` / `xray trojai detect` process imports the
scan path and builds its detectors before its first model. In one run, side by side, each a
fresh interpreter, median of `--repeats`:

- scan_startup_seconds: import xray.runner.scan_run and build every registered detector (what
  an actor's constructor does), for rounds of in-project nets.
- scan_startup_seconds_eager_imports: the same after `import torchvision, scipy.stats` (what
  every process paid before 2026-12-07, when xray imported both at module level: torchvision
  pulls in torch._dynamo).
- startup_speedup: the second over the first.
- ray_actor_pool_seconds: a local Ray instance already up, the wall time from asking for two
  ScanActors to both answering (a scan's fixed cost on top of its models; 2 cores).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record  # noqa: E402

PROBE = """
import time
started = time.perf_counter()
{pre}
import xray.runner.scan_run
from xray import detectors
[detectors.build(name) for name in detectors.available() if name != "mntd"]  # mntd: an artifact
print(time.perf_counter() - started)
"""


def fresh_process_seconds(pre: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def actor_pool_seconds(repeats: int) -> float:
    import ray

    from xray.config import parse_config
    from xray.runner.scan_run import _ActorPool, ensure_ray

    ensure_ray(None)
    config = parse_config({"seed": 0, "detectors": {"weights": {}}})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pool = _ActorPool(config, 2, 1, 0)
        times.append(time.perf_counter() - started)
        pool.shutdown()
    ray.shutdown()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lazy, eager = [], []
    for _ in range(args.repeats):  # alternated: both see the same load
        lazy.append(fresh_process_seconds(""))
        eager.append(fresh_process_seconds("import torchvision, scipy.stats"))
    figures = {"scan_startup_seconds": statistics.median(lazy),
               "scan_startup_seconds_eager_imports": statistics.median(eager)}
    figures["startup_speedup"] = (figures["scan_startup_seconds_eager_imports"]
                                  / figures["scan_startup_seconds"])
    figures["ray_actor_pool_seconds"] = actor_pool_seconds(args.repeats)
    path = record("startup", f".venv/bin/python bench/startup.py --repeats {args.repeats}",
                  figures)
    print(path.read_text())


if __name__ == "__main__":
    main()
