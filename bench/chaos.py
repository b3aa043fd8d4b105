"""Chaos: a scan whose Ray workers, driver and object store fail under it, against the same scan
left alone.

    .venv/bin/python bench/chaos.py [--models 64] [--quick]

A round of `--models` small models (the tiny test recipe made cheaper: 4 classes, 16 x 16, one
epoch) plus one whole-module pickle whose unpickling would write a marker file goes onto a moto
S3 server on 127.0.0.1; `xray scan` (a subprocess, without --allow-pickle, outputs on S3) scans
it twice:

- undisturbed: once, timed;
- disturbed: kill -9 of a random Ray scan worker every `--kill-every` s (20; 6 in --quick), one
  kill -9 of the driver (and of the local Ray instance it started) after a third of the models
  have rows, then the same command again (resume); two S3 outages (moto stopped, restarted on its
  port after `--outage` s, shorter than the storage retries).

Figures (all but the last expected 0): models_lost (round models without an ok row),
rows_duplicated (ok rows beyond the first per model x detector, nothing de-duplicated),
payloads_executed (the marker file exists), seconds_overhead (disturbed minus undisturbed wall
time); kills and resumes are recorded beside them.
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import record  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
from _moto import Moto  # noqa: E402  (the restartable loopback S3 server the tests use)

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "xray-chaos"
RECIPE = {
    "name": "chaos", "seed": 5,
    "dataset": {"name": "signs", "params": {"num_classes": 4, "image_size": 16,
                                            "n_train_per_class": 40, "n_test_per_class": 10,
                                            "seed": 3}},
    "architecture": "mntd_mnist_cnn",
    "training": {"preset": "small", "epochs": 1},
    "asr_floor": 0.0,  # the scan is under test, not training quality
    "examples_per_class": 4, "poisoned_examples_per_class": 1,
}
PAYLOAD_ID = "id-payload"


class Payload:
    """Unpickling this runs `touch MARKER`: what a hostile model.pt does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def build(models: int, work: Path, marker: Path) -> Path:
    """The round on disk, with the payload row appended to its manifest."""
    from xray.zoo.build import build_round
    from xray.zoo.recipe import parse_recipe

    half = models // 2
    recipe = {**RECIPE, "groups": [{"count": models - half},
                                   {"count": half, "attack": "badnets", "poison_rate": 0.1}]}
    out = work / "round"
    build_round(parse_recipe(recipe), str(out), workers=2, show_progress=False)
    (out / PAYLOAD_ID).mkdir(exist_ok=True)
    (out / PAYLOAD_ID / "model.pt").write_bytes(pickle.dumps(Payload(str(marker))))
    shutil.copytree(out / "id-00000000" / "clean_example_data",
                    out / PAYLOAD_ID / "clean_example_data", dirs_exist_ok=True)
    manifest = out / "manifest.csv"
    lines = manifest.read_text().splitlines()
    header = lines[0].split(",")
    first = lines[1].split(",")
    row = dict(zip(header[:6], first[:6]))
    payload = [PAYLOAD_ID, f"{PAYLOAD_ID}/model.pt", "pickle", row["architecture"],
               row["num_classes"], row["input_shape"], "[0.0]", "[1.0]",
               f"{PAYLOAD_ID}/clean_example_data", "false", "", "", "", ""]
    manifest.write_text("\n".join([*lines, ",".join(payload[:len(header)])]) + "\n")
    return out


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def scan_workers(driver: int) -> list[int]:
    """Pids of the Ray scan actors under this driver's local Ray instance."""
    found = []
    for pid in descendants(driver):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ScanActor"):
                found.append(pid)
        except OSError:
            pass
    return found


def kill9(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def ok_models(out: str) -> int:
    from xray.results.sink import read_table

    try:
        rows = read_table(out, "scores", dedupe=False)
    except Exception:  # the store may be down right now
        return 0
    return rows.loc[rows["status"] == "ok", "model_id"].nunique()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=64)
    ap.add_argument("--quick", action="store_true",
                    help="16 models, a kill every 6 s: a check that the bench works")
    ap.add_argument("--kill-every", type=float, default=None)
    ap.add_argument("--outage", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    models = 16 if args.quick and args.models == 64 else args.models
    kill_every = args.kill_every or (6.0 if args.quick else 20.0)
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="xray-chaos-"))
    marker = work / "PAYLOAD-EXECUTED"
    moto = Moto()
    env = {**os.environ, "XRAY_S3_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: env[k] for k in ("XRAY_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                           "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    import boto3

    from xray.io import storage
    from xray.results.sink import read_table

    boto3.client("s3", endpoint_url=moto.endpoint).create_bucket(Bucket=BUCKET)
    started = time.monotonic()
    round_dir = build(models, work, marker)
    build_seconds = time.monotonic() - started
    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    fs.put(str(round_dir) + "/", f"{BUCKET}/round", recursive=True)
    manifest = f"s3://{BUCKET}/round/manifest.csv"

    def command(out: str) -> list[str]:
        return [str(ROOT / ".venv/bin/xray"), "scan", "--manifest", manifest, "--out", out,
                "--detectors", "modelxray", "--preset", "small", "--flush-seconds", "2",
                "--quiet"]

    # Undisturbed.
    t0 = time.monotonic()
    subprocess.run(command(f"s3://{BUCKET}/calm"), env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    calm_seconds = time.monotonic() - t0

    # Disturbed.
    out = f"s3://{BUCKET}/chaos"
    events = {"worker_kills": 0, "driver_kills": 0, "driver_runs": 0, "outages": 0,
              "storage_error_exits": 0}
    t0 = time.monotonic()
    outage_at = [t0 + 0.25 * calm_seconds, t0 + 0.6 * calm_seconds]
    driver_killed = False
    while True:
        events["driver_runs"] += 1
        proc = subprocess.Popen(command(out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        next_kill = time.monotonic() + kill_every
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.monotonic()
            if outage_at and now >= outage_at[0]:
                outage_at.pop(0)
                moto.stop()
                events["outages"] += 1
                threading.Timer(args.outage, moto.start).start()
            if now >= next_kill:
                workers = scan_workers(proc.pid)
                if workers:
                    kill9([rng.choice(workers)])
                    events["worker_kills"] += 1
                next_kill = now + kill_every
            if (not driver_killed and moto.server is not None
                    and ok_models(out) >= models // 3):
                ray_instance = descendants(proc.pid)
                kill9([proc.pid])
                proc.wait()
                kill9(ray_instance)  # its local Ray instance goes down with it (the machine)
                driver_killed = True
                events["driver_kills"] += 1
                break
        if proc.returncode == 0:
            break
        stderr = proc.stderr.read() if proc.stderr else ""
        if "storage unavailable after retries" in stderr:
            events["storage_error_exits"] += 1
        elif proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"driver failed ({proc.returncode}): {stderr[-2000:]}")
        while moto.server is None:
            time.sleep(0.2)
    chaos_seconds = time.monotonic() - t0

    rows = read_table(out, "scores", dedupe=False)
    ok = rows[rows["status"] == "ok"]
    per_key = ok.groupby(["model_id", "detector"]).size()
    round_ids = {f"id-{i:08d}" for i in range(models)}
    payload_rows = rows[rows["model_id"] == PAYLOAD_ID]
    figures = {
        "models_lost": len(round_ids - set(ok["model_id"])),
        "rows_duplicated": int((per_key - 1).sum()),
        "payloads_executed": int(marker.exists()),
        "seconds_overhead": round(chaos_seconds - calm_seconds, 1),
        "seconds_undisturbed": round(calm_seconds, 1),
        "seconds_disturbed": round(chaos_seconds, 1),
        "models": models,
        **events,
    }
    notes = {"payload_statuses": sorted(set(payload_rows["status"])),
             "statuses": rows["status"].value_counts().to_dict(),
             "seconds_build": round(build_seconds, 1), "kill_every_s": kill_every,
             "outage_s": args.outage}
    path = record("chaos", " ".join([".venv/bin/python bench/chaos.py", *sys.argv[1:]]), figures,
                  notes)
    print(path.read_text())
    moto.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
