"""Run a scan over a manifest on Ray: plan, actor pool, streaming sink, progress.

Actors build their detectors once and call `scan.scan_model` per model; results are consumed
unordered and written to the sink at once. Back-pressure: at most `in_flight_per_actor` models
are submitted per actor, so driver memory stays bounded for any manifest size. An actor that
dies mid-model (its process killed) is restarted by Ray and the model resubmitted, up to
`max_retries`, after which it is recorded as `crashed`.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, WorkerCrashedError

from xray import __version__
from xray.config import ScanConfig
from xray.io.manifest import manifest_digest, read_manifest
from xray.progress import Progress
from xray.results.sink import ParquetSink, write_part
from xray.runner.plan import PlannedModel, plan
from xray.scan import scan_model, score_row

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    out_uri: str
    models_total: int
    models_planned: int
    models_scanned: int = 0
    failures: int = 0
    seconds: float = 0.0
    rows: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)


@ray.remote
class ScanActor:
    """Builds the detectors once; scans one model per call."""

    def __init__(self, config: ScanConfig, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.config = config
        self.detectors = {d.name: d.build() for d in config.detectors}
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def scan(self, item: PlannedModel, run_id: str) -> dict[str, Any]:
        detectors = [self.detectors[name] for name in item.detectors]
        return scan_model(item.record, detectors, self.config, digest=item.digest,
                          run_id=run_id, worker=self.worker)

    def pid(self) -> int:
        return os.getpid()


def code_version() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"xray {__version__}" + (f" ({sha})" if sha else "")


def ensure_ray(address: str | None) -> None:
    """Connect to `address`, or start a local instance when none is given."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING, configure_logging=False)


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_scan(manifest_uri: str, out_uri: str, config: ScanConfig, *, address: str | None = None,
             num_actors: int | None = None, num_cpus_per_actor: float = 1,
             num_gpus_per_actor: float = 0, in_flight_per_actor: int = 2, max_retries: int = 2,
             retry_errors: bool = False, show_progress: bool = True,
             run_id: str | None = None) -> RunSummary:
    started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc)
    records = read_manifest(manifest_uri)
    built = [d.build() for d in config.detectors]
    keys = [(d.name, d.version, config.detector_hash(d)) for d in built]
    pending = plan(records, out_uri, keys, retry_errors=retry_errors)
    run_id = run_id or new_run_id()
    summary = RunSummary(run_id, out_uri, len(records), len(pending))
    runs_row = {"run_id": run_id, "config_hash": config.config_hash,
                "config_json": config.to_json(), "code_version": code_version(),
                "manifest_uri": str(manifest_uri), "manifest_digest": manifest_digest(records),
                "models_total": len(records), "models_planned": len(pending),
                "started_at": started_at, "finished_at": None}
    write_part(out_uri, "runs", run_id, [runs_row])
    log.info("run %s: %d models in manifest, %d to scan", run_id, len(records), len(pending))

    if pending:
        ensure_ray(address)
        if num_actors is None:
            resources = ray.cluster_resources()
            by_cpu = int(resources.get("CPU", 1) // max(num_cpus_per_actor, 1e-9))
            by_gpu = (int(resources.get("GPU", 0) // num_gpus_per_actor)
                      if num_gpus_per_actor else by_cpu)
            num_actors = max(1, min(by_cpu, by_gpu, len(pending)))
        actors = [ScanActor.options(num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor,
                                    max_restarts=-1).remote(config, int(max(1, num_cpus_per_actor)))
                  for _ in range(num_actors)]
        with ParquetSink(out_uri, "scores", run_id) as scores, \
                ParquetSink(out_uri, "triggers", run_id) as triggers, \
                Progress(len(pending), f"scan {run_id}", disable=not show_progress) as bar:
            _drive(actors, pending, run_id, config, built, scores, triggers, bar, summary,
                   in_flight_per_actor, max_retries)
        for actor in actors:
            ray.kill(actor)
    write_part(out_uri, "runs", run_id, [{**runs_row, "finished_at": dt.datetime.now(dt.timezone.utc)}])
    summary.seconds = time.monotonic() - started
    return summary


def _drive(actors, pending, run_id, config, built, scores, triggers, bar, summary,
           in_flight_per_actor, max_retries) -> None:
    queue: deque[tuple[PlannedModel, int]] = deque((item, 0) for item in pending)
    in_flight: dict[Any, tuple[Any, PlannedModel, int]] = {}
    load = {i: 0 for i in range(len(actors))}
    by_name = {d.name: d for d in built}

    def submit() -> None:
        while queue:
            idle = min(load, key=load.get)
            if load[idle] >= in_flight_per_actor:
                return
            item, attempt = queue.popleft()
            ref = actors[idle].scan.remote(item, run_id)
            in_flight[ref] = (idle, item, attempt)
            load[idle] += 1

    submit()
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        ref = ready[0]
        actor_index, item, attempt = in_flight.pop(ref)
        load[actor_index] -= 1
        try:
            result = ray.get(ref)
        except (RayActorError, WorkerCrashedError) as err:
            if attempt < max_retries:
                log.warning("model %s: worker died (%s); retrying", item.record.model_id, err)
                queue.append((item, attempt + 1))
                submit()
                continue
            result = {"scores": [score_row(
                item.record, item.digest, by_name[name], config.detector_hash(by_name[name]),
                "crashed", run_id=run_id,
                error=f"worker died {attempt + 1} times: {type(err).__name__}: {err}")
                for name in item.detectors], "triggers": []}
        scores.write(result["scores"])
        triggers.write(result["triggers"])
        ok = all(r["status"] == "ok" for r in result["scores"])
        for row in result["scores"]:
            summary.status_counts[row["status"]] = summary.status_counts.get(row["status"], 0) + 1
        summary.rows += len(result["scores"])
        summary.models_scanned += 1
        summary.failures += 0 if ok else 1
        bar.update(ok=ok)
        submit()
