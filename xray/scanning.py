"""Scan one model with the configured detectors: pure, no Ray, no sinks.

    rows = scan_model(record, detectors, config)   # {"scores": [...], "triggers": [...]}
    rows = scan_loaded(record, model, data, detectors, config)   # a model already in memory

A model that cannot be read or loaded, or a detector that raises, becomes a `status="error"`
row carrying the error text (`not_applicable` when the detector does not apply to the model,
`timeout` past its time: `status_of_error`); nothing here ever stops a run. Detectors see the
model, the clean examples and the architecture facts: never the record's ground truth.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import math
import time
import traceback
from typing import Any, Sequence

import numpy as np
import torch

from xray.config import ScanConfig
from xray.detectors.base import DeadlinePassed, NotApplicable, ScanContext, ScanData
from xray.io.examples import load_examples
from xray.io import storage
from xray.io.model_loading import check_model_file, load_model
from xray.io.records import ModelRecord
from xray.jsonsafe import json_safe
from xray.models.device import resolve_device

log = logging.getLogger(__name__)


def file_facts(uri: str) -> tuple[str, int]:
    """(fingerprint, size in bytes) of a model file from storage metadata, without reading the
    weights. The fingerprint is the object's ETag / checksum where the store has one, else size
    and modification time: a changed file gets a new one and is scanned again (rewriting
    identical bytes may too). The creation time counts only on a store that has nothing else
    (fsspec's memory filesystem): a local file's "created" is its ctime, which a chmod, a rename
    or a copy that keeps mtimes (cp -p, rsync -t) changes without touching the weights."""
    fs, path = storage.filesystem(uri)
    info = storage.with_retries(lambda: fs.info(path))
    keys = ("ETag", "etag", "checksum", "size", "mtime", "LastModified")
    ident = {k: str(info[k]) for k in keys if k in info}
    if set(ident) <= {"size"} and "created" in info:
        ident["created"] = str(info["created"])
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return digest, int(info.get("size") or 0)


def model_fingerprint(uri: str) -> str:
    check_model_file(uri)  # a device, FIFO or oversized file: an error row before any read
    return file_facts(uri)[0]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)




def _npy(array: Any) -> bytes | None:
    if array is None:
        return None
    buf = io.BytesIO()
    np.save(buf, np.asarray(array.detach().cpu() if torch.is_tensor(array) else array))
    return buf.getvalue()


def score_row(record: ModelRecord, digest: str, detector: Any, config_hash: str, status: str,
              *, run_id: str = "", error: str | None = None, score: float | None = None,
              target: int | None = None, stats: dict[str, Any] | None = None,
              seconds: float | None = None, worker: str = "") -> dict[str, Any]:
    return {
        "run_id": run_id, "model_id": record.model_id, "model_digest": digest,
        "detector": detector.name, "detector_version": detector.version,
        "config_hash": config_hash, "status": status, "error": error,
        "score": None if score is None or not math.isfinite(score) else float(score),
        "predicted_target": None if target is None else int(target),
        "stats_json": json.dumps(json_safe(stats or {}), sort_keys=True),
        "seconds": seconds, "worker": worker, "architecture": record.architecture,
        "num_classes": record.num_classes, "gt_poisoned": record.poisoned,
        "gt_target": record.target, "gt_attack": record.attack,
        "tags_json": record.tags_json(), "finished_at": _now(),
    }


def trigger_rows(record: ModelRecord, digest: str, detector: Any, config_hash: str,
                 triggers: list[dict[str, Any]], run_id: str = "") -> list[dict[str, Any]]:
    rows = []
    for i, t in enumerate(triggers):
        stats = {k: v for k, v in t.items()
                 if k not in ("victim", "target", "kind", "size", "reasr", "mask", "pattern",
                              "kernel")}
        rows.append({
            "run_id": run_id, "model_id": record.model_id, "model_digest": digest,
            "detector": detector.name, "config_hash": config_hash, "trigger_index": i,
            "victim": t.get("victim"), "target": t.get("target"), "kind": t.get("kind"),
            "size": t.get("size"), "reasr": t.get("reasr"),
            "stats_json": json.dumps(json_safe(stats), sort_keys=True),
            "mask": _npy(t.get("mask")), "pattern": _npy(t.get("pattern")),
            "kernel": _npy(t.get("kernel")),
        })
    return rows


def _error_text(err: BaseException) -> str:
    if isinstance(err, NotApplicable):  # an answer, not a failure: no traceback to read
        return f"{type(err).__name__}: {err}"
    return f"{type(err).__name__}: {err}\n" + "".join(traceback.format_tb(err.__traceback__)[-3:])


def scan_model(record: ModelRecord, detectors: Sequence[Any], config: ScanConfig, *,
               digest: str | None = None, run_id: str = "", worker: str = "",
               keep_artifacts: bool = False) -> dict[str, Any]:
    """Run every detector on one model. Returns {"scores": rows, "triggers": rows} and, with
    keep_artifacts, {"artifacts": {detector: DetectorResult.artifacts}} (for pictures)."""
    return scan_stack([record], detectors, config, digests=[digest], run_id=run_id,
                      worker=worker, keep_artifacts=keep_artifacts)[0]


def stop_margin(time_limit: float) -> float:
    """Seconds before the runner's kill at which detectors are told their time is up, so they
    stop with what they have (and their row is written) instead of being killed. The runner
    counts from when the actor starts the model (it asks the actor), but polls about once a
    second and the result still has to travel back: 10% of the limit, 1 s to 30 s."""
    return min(30.0, max(1.0, 0.1 * time_limit))


def status_of_error(err: BaseException) -> str:
    """The row status of a model or detector that raised `err`. timeout: the model's time ran
    out; not_applicable: the detector does not apply to this model (final, not a failure);
    retryable: the storage failed for a reason that may pass (xray.io.storage.is_transient), so
    the next run scans it again; error: final."""
    if isinstance(err, DeadlinePassed):
        return "timeout"
    if isinstance(err, NotApplicable):
        return "not_applicable"
    return "retryable" if storage.is_transient(err) else "error"


def _load_inputs(record: ModelRecord, config: ScanConfig, device: torch.device):
    model = load_model(record, allow_pickle=config.allow_pickle, device=str(device))
    x, y = load_examples(record, max_per_class=config.examples_per_class)
    data = ScanData(x=x.to(device), y=y.to(device), num_classes=record.num_classes,
                    mean=tuple(record.mean), std=tuple(record.std))
    return model, data


def scan_stack(records: Sequence[ModelRecord], detectors: Sequence[Any], config: ScanConfig, *,
               digests: Sequence[str | None] | None = None, run_id: str = "", worker: str = "",
               keep_artifacts: bool = False) -> list[dict[str, Any]]:
    """`scan_model` for several models at once (one result per record, same order). Detectors
    that offer `score_stack(models, datas, ctx)` score the models that loaded in one pass (the
    caller groups models of one architecture); the others, or a stack that fails, go one by one.
    """
    device = resolve_device(config.device)
    started = time.monotonic()
    hashes = {d.name: config.detector_hash(d) for d in detectors}
    digests = list(digests or [None] * len(records))
    outs = [{"scores": [], "triggers": [], "artifacts": {}} for _ in records]
    loaded: list[tuple[int, Any, ScanData]] = []
    for k, record in enumerate(records):
        try:
            digests[k] = digests[k] or model_fingerprint(record.uri)
        except Exception as err:  # unreadable URI: an error row, not a crashed run
            digests[k] = "unreadable"
            outs[k]["scores"] = _error_rows(record, "unreadable", detectors, hashes, err,
                                            run_id, worker)
            continue
        try:
            model, data = _load_inputs(record, config, device)
        except Exception as err:
            outs[k]["scores"] = _error_rows(record, digests[k], detectors, hashes, err,
                                            run_id, worker)
            continue
        loaded.append((k, model, data))
    _run_detectors(records, loaded, outs, [str(d) for d in digests], detectors, config, device,
                   started, run_id=run_id, worker=worker, keep_artifacts=keep_artifacts)
    return outs


def scan_loaded(record: ModelRecord, model: torch.nn.Module, data: ScanData,
                detectors: Sequence[Any], config: ScanConfig, *, digest: str = "in-memory",
                run_id: str = "", worker: str = "",
                keep_artifacts: bool = False) -> dict[str, Any]:
    """`scan_model` for a model already in memory (no file read): `model` takes pixel-space
    input in [0, 1] (normalisation folded in) and is in eval mode, `data` holds its clean
    examples; both on `config.device`. `record` names the model in the rows."""
    out: dict[str, Any] = {"scores": [], "triggers": [], "artifacts": {}}
    _run_detectors([record], [(0, model, data)], [out], [digest], detectors, config,
                   resolve_device(config.device), time.monotonic(), run_id=run_id,
                   worker=worker, keep_artifacts=keep_artifacts)
    return out


def _run_detectors(records: Sequence[ModelRecord], loaded: list[tuple[int, Any, ScanData]],
                   outs: list[dict[str, Any]], digests: Sequence[str], detectors: Sequence[Any],
                   config: ScanConfig, device: torch.device, started: float, *, run_id: str,
                   worker: str, keep_artifacts: bool) -> None:
    """Every detector on the loaded models ((index into records, model, data)); rows go to
    outs[index]. `started`: when the unit of work began (the time limit counts from there)."""
    limit = config.model_time_limit_s
    hashes = {d.name: config.detector_hash(d) for d in detectors}

    def context(detector: Any) -> ScanContext:
        # The runner's time limit covers the whole unit of work (one model or one stack), from
        # the moment it started here; detectors get what is left of it, less the stop margin.
        deadline = None if not limit else limit - stop_margin(limit) - (time.monotonic() - started)
        return ScanContext(device=device, seed=config.seed, deadline=deadline,
                           logger=logging.getLogger(f"xray.detector.{detector.name}"))

    # A composed scanner (abs+exray, ...) and its vanilla upstream (abs) with the same upstream
    # parameters share one upstream run per model, whichever comes first in the config; the
    # second one's row counts only its own seconds (none for the vanilla scanner).
    needed = [d.upstream_key() for d in detectors if hasattr(d, "upstream_key")]
    upstream_runs: list[list[tuple[Any, Any]]] = [[] for _ in records]  # per model: (key, result)

    def upstream_run(k: int, key: Any) -> Any:
        return next((r for known, r in upstream_runs[k] if known == key), None)

    def score_one(detector: Any, k: int, model: Any, data: ScanData) -> Any:
        if hasattr(detector, "upstream_key"):
            key = detector.upstream_key()
            result = detector.score(model, data, context(detector),
                                    upstream=upstream_run(k, key))
            shared = result.artifacts["upstream_result"]
        else:
            key = (type(detector), getattr(detector, "params", None))
            result = upstream_run(k, key) if key in needed else None
            if result is None:
                result = detector.score(model, data, context(detector))
            shared = result
        if key in needed and upstream_run(k, key) is None:
            upstream_runs[k].append((key, shared))
        return result

    for detector in detectors:
        results: dict[int, tuple[Any, float]] = {}
        if hasattr(detector, "score_stack") and len(loaded) > 1:
            t0 = time.perf_counter()
            try:
                stacked = detector.score_stack([m for _, m, _ in loaded],
                                               [d for _, _, d in loaded], context(detector))
                each = (time.perf_counter() - t0) / len(loaded)
                results = {k: (r, each) for (k, _, _), r in zip(loaded, stacked)}
            except Exception as err:  # score them one by one instead
                log.warning("%s: stacked scoring failed (%s); one model at a time",
                            detector.name, err)
        for k, model, data in loaded:
            record, out = records[k], outs[k]
            if k not in results:
                t0 = time.perf_counter()
                try:
                    results[k] = (score_one(detector, k, model, data),
                                  time.perf_counter() - t0)
                except Exception as err:
                    log.log(logging.INFO if isinstance(err, NotApplicable) else logging.WARNING,
                            "detector %s on %s: %s", detector.name, record.model_id, err)
                    out["scores"].append(score_row(
                        record, digests[k], detector, hashes[detector.name], status_of_error(err),
                        run_id=run_id, error=_error_text(err),
                        seconds=time.perf_counter() - t0, worker=worker))
                    continue
            result, seconds = results[k]
            out["scores"].append(score_row(
                record, digests[k], detector, hashes[detector.name], "ok", run_id=run_id,
                score=result.score, target=result.target, stats=result.stats, seconds=seconds,
                worker=worker))
            out["triggers"].extend(trigger_rows(record, digests[k], detector,
                                                hashes[detector.name], result.triggers,
                                                run_id=run_id))
            if keep_artifacts:
                out["artifacts"][detector.name] = result.artifacts


def _error_rows(record: ModelRecord, digest: str, detectors: Sequence[Any],
                hashes: dict[str, str], err: BaseException, run_id: str,
                worker: str) -> list[dict[str, Any]]:
    text, status = _error_text(err), status_of_error(err)
    return [score_row(record, digest, d, hashes[d.name], status, run_id=run_id, error=text,
                      worker=worker) for d in detectors]
