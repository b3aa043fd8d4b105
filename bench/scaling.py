"""Cluster scale: scan throughput on 1 vs 2 simulated Ray nodes, scheduler overhead, and the
driver's peak memory for a 10,000-row manifest.

    .venv/bin/python bench/scaling.py [--round DIR] [--rows 10000]

- two_node_speedup: models/s with two 1-CPU nodes (ray.cluster_utils.Cluster) over one 1-CPU
  node, same manifest, same config, measured back to back; no Ray dashboard (as `xray scan`'s
  local instance). The manifest is the round's models
  `--copies` times over under distinct model ids (default 4: 64 rows for the 16-model demo
  round): with 16 rows on 2 actors the last model's tail, when one actor idles while the other
  finishes, is ~5% of the run and the figure measures the round size, not the scheduler; real
  rounds are hundreds to thousands of models.
- scheduler_overhead_share: on the two-node run, (actor-seconds available - seconds actors spent
  inside scan_model) / seconds inside scan_model, from the first submission to the last result.
- driver_peak_mb_10k: peak RSS of a separate driver process that plans and scans a manifest of
  `--rows` tiny models (hard links to one 8 x 8 digits model, a 1-plane Model X-ray), measured by
  the kernel (ru_maxrss of that process).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import record  # noqa: E402

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from xray.config import parse_config  # noqa: E402
from xray.runner import run_scan  # noqa: E402

SCAN = parse_config({"seed": 0, "detectors": {"modelxray": {"params": {"num_planes": 4,
                                                                          "resolution": 40}}}})


def _repeated_manifest(round_dir: str, copies: int, tmp: str) -> str:
    """The round's records `copies` times over, model ids suffixed -c<k> (same files)."""
    import dataclasses

    from xray.io.manifest import read_manifest, write_manifest

    records = read_manifest(round_dir)
    rows = [dataclasses.replace(r, model_id=f"{r.model_id}-c{k}")
            for k in range(copies) for r in records]
    path = os.path.join(tmp, "repeated.parquet")
    write_manifest(rows, path)
    return path


def _throughput(manifest: str, nodes: int, out: str) -> tuple[float, object]:
    # No dashboard, as `xray scan` starts its local instance: on 2 shared cores the dashboard
    # process alone took ~10% of a core from the actors (2.2 vs 2.9 models/s on two nodes).
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        summary = run_scan(manifest, out, SCAN,
                           num_cpus_per_actor=1, show_progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return summary.models_scanned / summary.schedule_seconds, summary


def _tiny_manifest(tmp: str, rows: int) -> str:
    """`rows` manifest rows, each a hard link to one tiny trained model."""
    from xray.io.manifest import write_manifest
    from xray.io.records import ModelRecord
    from xray.zoo.build import build_round
    from xray.zoo.recipe import parse_recipe

    round_dir = os.path.join(tmp, "one")
    build_round(parse_recipe({
        "name": "one", "dataset": {"name": "digits"}, "architecture": "mntd_cifar_cnn",
        "training": {"preset": "small", "epochs": 2}, "examples_per_class": 1,
        "groups": [{"count": 1}]}), round_dir, workers=1, show_progress=False)
    models = os.path.join(tmp, "models")
    os.makedirs(models)
    source = os.path.join(round_dir, "id-00000000", "model.safetensors")
    examples = os.path.join(round_dir, "id-00000000", "clean_example_data")
    records = []
    for i in range(rows):
        path = os.path.join(models, f"m{i:05d}.safetensors")
        os.link(source, path)
        records.append(ModelRecord(model_id=f"m{i:05d}", uri=path, format="safetensors",
                                   architecture="mntd_cifar_cnn", num_classes=10,
                                   input_shape=(1, 8, 8), examples_uri=examples))
    manifest = os.path.join(tmp, "manifest.parquet")
    write_manifest(records, manifest)
    return manifest


DRIVER = """
import resource, sys
from xray.config import parse_config
from xray.runner import run_scan
config = parse_config({"detectors": {"modelxray": {"params": {"num_planes": 1, "resolution": 4}}}})
summary = run_scan(sys.argv[1], sys.argv[2], config, show_progress=False, in_flight_per_actor=4)
print(summary.models_scanned, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--round", default="/tmp/demo1/round",
                        help="a built round (default: the demo round; built there if missing)")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--copies", type=int, default=4,
                        help="scan the round's models this many times over (distinct ids)")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.round, "manifest.csv")):
        subprocess.run([sys.executable, "-m", "xray.cli", "zoo", "build", "--recipe", "demo",
                        "--out", args.round], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        repeated = _repeated_manifest(args.round, args.copies, tmp)
        one, _ = _throughput(repeated, 1, os.path.join(tmp, "one"))
        two, summary = _throughput(repeated, 2, os.path.join(tmp, "two"))
        available = summary.schedule_seconds * summary.num_actors
        overhead = (available - summary.actor_seconds) / summary.actor_seconds
        manifest = _tiny_manifest(tmp, args.rows)
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", DRIVER, manifest, os.path.join(tmp, "big")],
                             check=True, capture_output=True, text=True).stdout.split()
        big_seconds = time.perf_counter() - started
    scanned, peak_mb = int(out[-2]), float(out[-1])
    figures = {"two_node_speedup": two / one, "scheduler_overhead_share": overhead,
               "driver_peak_mb_10k": peak_mb, "models_per_second_one_node": one,
               "models_per_second_two_nodes": two, "rows_scanned_10k": scanned,
               "models_per_run": summary.models_scanned,
               "seconds_10k": big_seconds}
    path = record("scaling", f".venv/bin/python bench/scaling.py --copies {args.copies}", figures,
                  notes={"load_average": os.getloadavg(), "rusage_self_mb":
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    print(path.read_text())


if __name__ == "__main__":
    main()
