"""Run a scan over a manifest on Ray: plan, actor pool, streaming sink, progress.

Actors build their detectors once and call `scanning.scan_model` per model; results are consumed
unordered and written to the sink at once. Back-pressure: at most `in_flight_per_actor` models
are submitted per actor, so driver memory stays bounded for any manifest size. An actor that
dies mid-model (its process killed) is restarted by Ray and the model resubmitted, up to
`max_retries`, after which it is recorded as `crashed`.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

import ray
import torch
from ray.exceptions import (ActorUnavailableError, GetTimeoutError, RayActorError,
                            WorkerCrashedError)

from xray.code_identity import code_version
from xray.config import ScanConfig
from xray.io.manifest import manifest_digest, read_manifest
from xray.progress import Progress
from xray.results.lease import OutputLease
from xray.results.locations import manifest_columns
from xray.results.schema import ANSWERED_STATUSES
from xray.results.sink import ParquetSink, write_part
from xray.runner.plan import PlannedModel, plan
from xray.scanning import scan_stack, score_row

log = logging.getLogger(__name__)
# How long an actor may take to start a model handed to it (a restart: a new process imports
# torch and builds the detectors) before that model is charged anyway; and how long the driver
# waits for an actor to say what it is doing.
START_GRACE_S = 120.0
STATUS_TIMEOUT_S = 2.0
SHOWN_ERRORS = 5  # failed rows a RunSummary keeps for the CLI


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
    failures_by_node: dict[str, int] = field(default_factory=dict)
    actor_seconds: float = 0.0  # time actors spent inside scan_model, summed
    schedule_seconds: float = 0.0  # wall time from the first submission to the last result
    # from the moment an actor first ran out of work (nothing left to hand out) to the last
    # result: the run's straggler tail, which the longest-first plan keeps short
    idle_tail_seconds: float = 0.0
    num_actors: int = 0
    # the first failed rows (model_id, detector, status, error text), for the CLI to show what
    # failed without a trip to the report; every failed row is in the scores table
    first_errors: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def idle_tail_share(self) -> float:
        """idle_tail_seconds over schedule_seconds (0 when nothing was scheduled)."""
        return self.idle_tail_seconds / self.schedule_seconds if self.schedule_seconds else 0.0

    @property
    def failed_rows(self) -> int:
        """Rows that failed (neither ok nor not_applicable)."""
        return sum(n for status, n in self.status_counts.items()
                   if status not in ANSWERED_STATUSES)

    @property
    def not_applicable(self) -> int:
        """Rows of detectors that do not apply to their model (not failures)."""
        return self.status_counts.get("not_applicable", 0)

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Account one model's rows: it failed when a row is neither ok nor not_applicable."""
        self.models_scanned += 1
        self.rows += len(rows)
        failed = False
        for row in rows:
            self.status_counts[row["status"]] = self.status_counts.get(row["status"], 0) + 1
            if row["status"] not in ANSWERED_STATUSES:
                failed = True
                if len(self.first_errors) < SHOWN_ERRORS:
                    self.first_errors.append((row["model_id"], row["detector"], row["status"],
                                              row.get("error") or ""))
        node = (rows[0]["worker"] if rows else "").split(":")[0] or "driver"
        self.failures_by_node.setdefault(node, 0)
        if failed:
            self.failures += 1
            self.failures_by_node[node] += 1


def unit_key(items: tuple[PlannedModel, ...]) -> str:
    """Names one unit of work (a model or a stack) between the driver and an actor."""
    return "\n".join(f"{i.record.model_id}@{i.digest}" for i in items)


# `running` answers from its own thread while `scan` works: the driver's clock for a model
# starts when the actor starts it, not when it was handed over (an actor may still be
# restarting then). Scans stay one at a time (the default group's concurrency is 1).
@ray.remote(concurrency_groups={"status": 1})
class ScanActor:
    """Builds the detectors once; scans one model per call."""

    def __init__(self, config: ScanConfig, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.config = config
        self.detectors = {d.name: d.build() for d in config.detectors}
        node = ray.get_runtime_context().get_node_id()[:12]
        # node:host:pid — the node id tells simulated nodes on one host apart.
        self.worker = f"{node}:{socket.gethostname()}:{os.getpid()}"
        self.current: tuple[str, float] | None = None  # (unit_key, monotonic start)

    def scan(self, items: tuple[PlannedModel, ...], run_id: str) -> list[dict[str, Any]]:
        """One model, or a stack of models of one architecture with the same pending
        detectors (scored together where a detector supports it)."""
        started = time.perf_counter()
        self.current = (unit_key(items), time.monotonic())
        try:
            detectors = [self.detectors[name] for name in items[0].detectors]
            results = scan_stack([i.record for i in items], detectors, self.config,
                                 digests=[i.digest for i in items], run_id=run_id,
                                 worker=self.worker)
        finally:
            self.current = None
        for result in results:
            result["actor_seconds"] = (time.perf_counter() - started) / len(items)
        return results

    @ray.method(concurrency_group="status")
    def running(self) -> tuple[str, float] | None:
        """(unit_key, seconds since it started) of the unit being scanned now, or None."""
        current = self.current
        return None if current is None else (current[0], time.monotonic() - current[1])

    def where(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "gpus": ray.get_gpu_ids()}


class ClusterUnreachable(ValueError):
    """--address names a Ray cluster that does not answer (a bad option value: the CLI reports
    it in one line like any other)."""


# Seconds a cluster address gets to accept a TCP connection before the scan gives up (Ray's
# own client keeps retrying an unreachable GCS for minutes).
CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ClusterUnreachable unless `address` ("host:port" or "ray://host:port"; "auto" and
    "local" are Ray's own words and are not probed) accepts a TCP connection within `timeout`."""
    target = address.split("://", 1)[-1]
    if address in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as err:
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at {address} within {timeout:.0f} s ({err}); is it "
            "running (`ray status` on its head node), and is --address its GCS host:port "
            "(default port 6379) or ray://host:10001?") from None


def ensure_ray(address: str | None) -> None:
    """Connect to `address`, or start a local instance when none is given (run_scan has
    already checked that the address answers: `check_reachable`)."""
    if ray.is_initialized():
        return
    # ray.init installs its own SIGTERM handler; keep the caller's (the CLI's, which ends the
    # command through its `finally` blocks) where there was one.
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING, configure_logging=False)
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_scan(manifest_uri: str, out_uri: str, config: ScanConfig, *, address: str | None = None,
             num_actors: int | None = None, num_cpus_per_actor: float = 1,
             num_gpus_per_actor: float = 0, in_flight_per_actor: int = 2, max_retries: int = 2,
             retry_errors: bool = False, show_progress: bool = True,
             run_id: str | None = None, flush_seconds: float = 10.0, stack_size: int = 1,
             on_result: Callable[[dict[str, Any]], None] | None = None,
             root: str | None = None,
             model_ids: Collection[str] | None = None) -> RunSummary:
    """Scan every model of the manifest not yet scored with `config`; rows stream to
    <out>/scores and <out>/triggers. `on_result` is called with each model's rows as they land
    (progress hooks for jobs). Rows become durable (a Parquet part) at least every
    `flush_seconds`; a driver killed mid-run loses at most that window, which the next run of
    the same command scans again. `stack_size` > 1 sends up to that many models of one
    architecture to an actor together (Model X-ray scores them in one vmapped pass: worth it on
    a GPU, where one small model leaves the device idle). While another driver scans into
    `out_uri`, raises xray.results.lease.LeaseHeld before planning anything. `root`: refuse a
    manifest with a model or examples URI outside it (ManifestError naming row and field).
    `model_ids`: scan only these models of the manifest (a cascade's later stages)."""
    started = time.monotonic()
    if num_actors is not None and num_actors < 1:  # no actor would ever take a model: a hang
        raise ValueError(f"num_actors must be at least 1 (or None: fill the cluster), not "
                         f"{num_actors}")
    if address:
        check_reachable(address)  # before anything is written to out_uri
    records = read_manifest(manifest_uri, root=root)
    if model_ids is not None:
        wanted = set(model_ids)
        records = [r for r in records if r.model_id in wanted]
    built = [d.build() for d in config.detectors]
    run_id = run_id or new_run_id()
    # One writer per output folder: a second driver here would plan from the same scored set
    # and scan everything twice (xray.results.lease).
    with OutputLease(out_uri, run_id) as lease:
        summary = _scan_holding_lease(
            lease, records, built, manifest_uri, out_uri, config, run_id, address=address,
            num_actors=num_actors, num_cpus_per_actor=num_cpus_per_actor,
            num_gpus_per_actor=num_gpus_per_actor, in_flight_per_actor=in_flight_per_actor,
            max_retries=max_retries, retry_errors=retry_errors, show_progress=show_progress,
            flush_seconds=flush_seconds, stack_size=stack_size, on_result=on_result)
    summary.seconds = time.monotonic() - started
    return summary


def _scan_holding_lease(lease: OutputLease, records: list[Any], built: list[Any],
                        manifest_uri: str, out_uri: str, config: ScanConfig, run_id: str, *,
                        address: str | None, num_actors: int | None, num_cpus_per_actor: float,
                        num_gpus_per_actor: float, in_flight_per_actor: int, max_retries: int,
                        retry_errors: bool, show_progress: bool, flush_seconds: float,
                        stack_size: int,
                        on_result: Callable[[dict[str, Any]], None] | None) -> RunSummary:
    started_at = dt.datetime.now(dt.timezone.utc)
    keys = [(d.name, d.version, config.detector_hash(d)) for d in built]
    pending = plan(records, out_uri, keys, retry_errors=retry_errors)
    summary = RunSummary(run_id, out_uri, len(records), len(pending))
    runs_row = {"run_id": run_id, "config_hash": config.config_hash,
                "config_json": config.to_json(), "code_version": code_version(),
                **manifest_columns(manifest_uri, out_uri),  # absolute, and relative to out
                "manifest_digest": manifest_digest(records),
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
        pool = _ActorPool(config, num_actors, num_cpus_per_actor, num_gpus_per_actor)
        try:
            with ParquetSink(out_uri, "scores", run_id, flush_seconds=flush_seconds) as scores, \
                    ParquetSink(out_uri, "triggers", run_id,
                                flush_seconds=flush_seconds) as triggers, \
                    Progress(len(pending), f"scan {run_id}", disable=not show_progress) as bar:

                def deliver(result: dict[str, Any]) -> None:
                    lease.check()  # taken over: stop before writing beside the new holder
                    scores.write(result["scores"])
                    triggers.write(result["triggers"])
                    summary.record(result["scores"])
                    summary.actor_seconds += result.get("actor_seconds", 0.0)
                    by_node = summary.failures_by_node
                    bar.update(ok=all(r["status"] in ANSWERED_STATUSES for r in result["scores"]),
                               **({"failures_by_node": by_node} if len(by_node) > 1 else {}))
                    if on_result:
                        on_result(result)

                scheduling_started = time.monotonic()
                scheduler = _Scheduler(pool, run_id, config, built, in_flight_per_actor,
                                       max_retries, config.model_time_limit_s)
                scheduler.run(stacks(pending, stack_size), deliver)
                ended = time.monotonic()
                summary.schedule_seconds = ended - scheduling_started
                if scheduler.tail_started is not None:
                    summary.idle_tail_seconds = ended - scheduler.tail_started
                summary.num_actors = num_actors
        finally:
            pool.shutdown()
    write_part(out_uri, "runs", run_id,
               [{**runs_row, "finished_at": dt.datetime.now(dt.timezone.utc)}])
    return summary


# Storage settings a worker needs to read what the driver reads, and to retry as it does;
# forwarded when the driver has them (a cluster whose nodes carry their own credentials simply
# leaves them unset).
FORWARDED_ENV = ("XRAY_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE",
                 "XRAY_STORAGE_ATTEMPTS", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


def stacks(pending: list[PlannedModel], size: int) -> list[tuple[PlannedModel, ...]]:
    """Units of work: single models, or up to `size` models sharing architecture, class count,
    input shape and pending detectors (in plan order within each group)."""
    if size <= 1:
        return [(item,) for item in pending]
    groups: dict[tuple, list[PlannedModel]] = {}
    for item in pending:
        r = item.record
        groups.setdefault((r.architecture, r.num_classes, tuple(r.input_shape),
                           item.detectors), []).append(item)
    return [tuple(g[i:i + size]) for g in groups.values() for i in range(0, len(g), size)]


class _ActorPool:
    """The scan actors; each restarts (Ray max_restarts) when its process dies."""

    def __init__(self, config: ScanConfig, n: int, num_cpus: float, num_gpus: float) -> None:
        threads = int(max(1, num_cpus))
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": -1}
        if env:
            options["runtime_env"] = {"env_vars": env}
        self.actors = [ScanActor.options(**options).remote(config, threads) for _ in range(n)]
        self._wait_ready(options)

    def _wait_ready(self, options: dict[str, Any], timeout: float = 600.0) -> None:
        """Block until every actor has started (process up, torch imported, detectors built),
        so a request the cluster cannot satisfy fails here with a clear message instead of
        hanging, and scheduling time is not charged with start-up."""
        ready, pending = ray.wait([a.where.remote() for a in self.actors],
                                  num_returns=len(self.actors), timeout=timeout)
        if pending:
            raise RuntimeError(
                f"{len(pending)} of {len(self.actors)} scan actors did not start within "
                f"{timeout:.0f} s (each asks for num_cpus={options['num_cpus']}, "
                f"num_gpus={options['num_gpus']}; cluster has {ray.cluster_resources()})")
        ray.get(ready)  # an actor whose constructor failed raises here

    def restart(self, index: int) -> None:
        """Kill actor `index` (e.g. stuck past its time limit); Ray restarts it."""
        ray.kill(self.actors[index], no_restart=False)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


@dataclass
class _Task:
    items: tuple[PlannedModel, ...]  # one model, or a stack
    attempt: int = 0
    avoid: int | None = None  # actor it last died on: retry elsewhere when there is a choice


class _Scheduler:
    """Bounded in-flight submission, unordered consumption, retries and time limits.

    Ray runs an actor's calls in submission order, so the head of each actor's queue is the
    model it is working on. Its clock starts when the previous one returned; once that clock
    passes the time limit, the actor is asked how long it has really been on the model
    (`ScanActor.running`), and the clock moves to when the actor started it (a restart or a slow
    hand-over is not charged). A model past the time limit by the actor's own count, or one the
    actor has not started START_GRACE_S after the limit, gets a `timeout` row and its actor is
    restarted (the others queued behind it are resubmitted, not charged an attempt)."""

    def __init__(self, pool: _ActorPool, run_id: str, config: ScanConfig, built: list[Any],
                 in_flight_per_actor: int, max_retries: int, time_limit: float | None) -> None:
        self.pool, self.run_id, self.config = pool, run_id, config
        self.by_name = {d.name: d for d in built}
        self.cap, self.max_retries, self.time_limit = in_flight_per_actor, max_retries, time_limit
        n = len(pool.actors)
        self.queues: list[deque[tuple[Any, _Task]]] = [deque() for _ in range(n)]
        self.head_since = [0.0] * n
        self.cooling_until = [0.0] * n  # an actor being restarted takes no work until then
        self.todo: deque[_Task] = deque()
        self.tail_started: float | None = None  # when an actor first had no work left to get

    def _failure_rows(self, task: _Task, status: str, error: str) -> list[dict[str, Any]]:
        return [{"scores": [score_row(item.record, item.digest, self.by_name[name],
                                      self.config.detector_hash(self.by_name[name]), status,
                                      run_id=self.run_id, error=error, worker="driver")
                            for name in item.detectors], "triggers": []}
                for item in task.items]

    def _submit(self) -> None:
        while self.todo:
            task = self.todo[0]
            now = time.monotonic()
            ready = [i for i in range(len(self.queues)) if self.cooling_until[i] <= now]
            if not ready:
                return
            index = min(ready, key=lambda i: (len(self.queues[i]), i == task.avoid))
            if len(self.queues[index]) >= self.cap:
                return
            self.todo.popleft()
            if not self.queues[index]:
                self.head_since[index] = time.monotonic()
            ref = self.pool.actors[index].scan.remote(task.items, self.run_id)
            self.queues[index].append((ref, task))

    def _pop(self, index: int, ref: Any) -> tuple[_Task, bool]:
        """Remove `ref` from its actor's queue: (its task, whether it was running = the head)."""
        queue = self.queues[index]
        for k, (r, task) in enumerate(queue):
            if r == ref:
                del queue[k]
                self.head_since[index] = time.monotonic()
                return task, k == 0
        raise KeyError(ref)

    def _running_for(self, overdue: list[int]) -> dict[int, float | None]:
        """Per overdue actor, the seconds it has been scanning the head of its queue; None when
        it is not on it (still starting or restarting, already done with it: its result is on
        the way, or dead: its scan ref fails too) or does not answer within STATUS_TIMEOUT_S."""
        asks = {i: self.pool.actors[i].running.remote() for i in overdue}
        ray.wait(list(asks.values()), num_returns=len(asks), timeout=STATUS_TIMEOUT_S)
        out: dict[int, float | None] = {}
        for i, ref in asks.items():
            try:
                running = ray.get(ref, timeout=0)
            except (GetTimeoutError, RayActorError, WorkerCrashedError):
                running = None
            on_head = running is not None and running[0] == unit_key(self.queues[i][0][1].items)
            out[i] = float(running[1]) if on_head else None
        return out

    def _expire(self, deliver: Callable[[dict[str, Any]], None]) -> None:
        if not self.time_limit:
            return
        now = time.monotonic()
        overdue = [i for i, queue in enumerate(self.queues)
                   if queue and now - self.head_since[i] > self.time_limit]
        if not overdue:
            return
        running_for = self._running_for(overdue)
        now = time.monotonic()
        for index in overdue:
            queue, running = self.queues[index], running_for[index]
            if running is not None and running <= self.time_limit:
                self.head_since[index] = now - running  # count from the actor's start
                continue
            if running is None and now - self.head_since[index] <= self.time_limit + START_GRACE_S:
                continue  # not started yet, or just finished: not charged
            _, task = queue.popleft()
            log.warning("model %s passed the time limit of %.0f s; restarting its actor",
                        _names(task), self.time_limit)
            requeue = [t for _, t in queue]
            queue.clear()
            self.pool.restart(index)
            self.todo.extendleft(reversed(requeue))
            for result in self._failure_rows(task, "timeout",
                                             f"time limit of {self.time_limit} s exceeded"):
                deliver(result)

    def run(self, units: list[tuple[PlannedModel, ...]],
            deliver: Callable[[dict[str, Any]], None]) -> None:
        self.todo.extend(_Task(unit) for unit in units)
        self._submit()
        while any(self.queues) or self.todo:
            refs = [ref for queue in self.queues for ref, _ in queue]
            ready = ray.wait(refs, num_returns=1, timeout=1.0)[0] if refs else []
            if not refs:
                time.sleep(0.2)  # every actor is restarting
            for ref in ready:
                index = next(i for i, q in enumerate(self.queues) if any(r == ref for r, _ in q))
                task, was_running = self._pop(index, ref)
                try:
                    results = ray.get(ref)
                except (RayActorError, WorkerCrashedError) as err:
                    self._after_worker_death(task, was_running, index, err, deliver)
                    continue
                for result in results:
                    deliver(result)
            self._expire(deliver)
            self._submit()
            if (self.tail_started is None and not self.todo
                    and not all(self.queues) and any(self.queues)):
                self.tail_started = time.monotonic()

    def _after_worker_death(self, task: _Task, was_running: bool, index: int,
                            err: Exception, deliver: Callable[[dict[str, Any]], None]) -> None:
        """Only the model the dead worker was running is charged an attempt; those queued
        behind it (or sent while it restarted) go back to the queue as they were."""
        self.cooling_until[index] = time.monotonic() + 1.0
        if isinstance(err, ActorUnavailableError) or not was_running:
            self.todo.appendleft(_Task(task.items, task.attempt, avoid=index))
        elif task.attempt < self.max_retries:
            log.warning("model %s: worker died (%s); retrying on another actor",
                        _names(task), type(err).__name__)
            self.todo.appendleft(_Task(task.items, task.attempt + 1, avoid=index))
        else:
            for result in self._failure_rows(task, "crashed", f"worker died {task.attempt + 1} "
                                             f"times: {type(err).__name__}: {err}"):
                deliver(result)


def _names(task: _Task) -> str:
    return ", ".join(item.record.model_id for item in task.items)
