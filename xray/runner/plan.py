"""The plan: the manifest minus what is already scored with this config (no Ray here)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from xray.io.records import ModelRecord
from xray.results.schema import ANSWERED_STATUSES
from xray.results.sink import read_table
from xray.scanning import file_facts

# Outcomes that are final for a (model, detector, config): scanning again would give the same.
# `timeout`, `crashed` and `retryable` rows are retried on the next run, `error` rows too with
# retry_errors; `not_applicable` never (the model's architecture does not change).
FINAL_STATUSES = (*ANSWERED_STATUSES, "error")


@dataclass(frozen=True)
class PlannedModel:
    record: ModelRecord
    digest: str
    detectors: tuple[str, ...]  # the detectors still to run on it
    size: int = 0  # bytes of the model file: a proxy for how heavy it is to scan


def fingerprints(records: Sequence[ModelRecord], threads: int = 16) -> list[tuple[str, int]]:
    """(fingerprint, size) of every model file (metadata only), in parallel; ("unreadable", 0)
    for a file that cannot be stat'ed (the scan then records the error)."""

    def one(record: ModelRecord) -> tuple[str, int]:
        try:
            return file_facts(record.uri)
        except Exception:
            return "unreadable", 0

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, records))


def plan(records: Sequence[ModelRecord], out_uri: str,
         detector_keys: Sequence[tuple[str, str, str]],
         retry_errors: bool = False) -> list[PlannedModel]:
    """Models that still lack a final row for one of `detector_keys` (name, version, hash)."""
    facts = fingerprints(records)
    done_statuses = ANSWERED_STATUSES if retry_errors else FINAL_STATUSES
    existing = read_table(out_uri, "scores")
    done: set[tuple[Any, ...]] = set()
    if len(existing):
        final = existing[existing["status"].isin(done_statuses)]
        done = set(zip(final["model_id"], final["model_digest"], final["detector"],
                       final["detector_version"], final["config_hash"]))
    pending = []
    for record, (digest, size) in zip(records, facts):
        todo = tuple(key[0] for key in detector_keys
                     if (record.model_id, digest, *key) not in done)
        if todo:
            pending.append(PlannedModel(record, digest, todo, size))
    return longest_first(pending, previous_seconds(existing), kind_seconds(existing))


def newest_rows(existing: Any) -> Any:
    """The timed rows of earlier runs, the newest per (model, detector): what a model's
    detectors took the last time each ran."""
    rows = existing.dropna(subset=["seconds"])
    return rows.sort_values("finished_at").groupby(["model_id", "detector"]).tail(1)


def previous_seconds(existing: Any) -> dict[str, float]:
    """Per model id, the seconds its detectors took in earlier runs (newest_rows, summed): how
    long it will take again."""
    if not len(existing):
        return {}
    return newest_rows(existing).groupby("model_id")["seconds"].sum().to_dict()


def kind_seconds(existing: Any) -> dict[tuple[str, int], float]:
    """Per (architecture, class count), the median seconds of the models of that kind in
    earlier runs (as previous_seconds counts them): how long a new model of the kind takes."""
    if not len(existing):
        return {}
    newest = newest_rows(existing).dropna(subset=["architecture", "num_classes"])
    per_model = newest.groupby(["model_id", "architecture", "num_classes"])["seconds"].sum()
    by_kind = per_model.groupby(level=["architecture", "num_classes"]).median()
    return {(str(a), int(k)): float(v) for (a, k), v in by_kind.items()}


def longest_first(items: list[PlannedModel], seconds: dict[str, float] | None = None,
                  by_kind: dict[tuple[str, int], float] | None = None) -> list[PlannedModel]:
    """The pending models, the longest expected first (longest-processing-time order: the run
    then ends on short models, not on one straggler while the other actors idle). Expected
    seconds: the model's own in an earlier run, else the median of earlier models of its
    architecture and class count (`kind_seconds`), else its file size times the median seconds
    per byte of the models that have both, else the size alone. (File size alone ranks models
    of different architectures badly: bench/scheduling.py measured it.)"""
    seconds, by_kind = seconds or {}, by_kind or {}
    rates = sorted(seconds[p.record.model_id] / p.size for p in items
                   if p.record.model_id in seconds and p.size > 0)
    rate = rates[len(rates) // 2] if rates else 1.0

    def expected(p: PlannedModel) -> float:
        if p.record.model_id in seconds:
            return seconds[p.record.model_id]
        kind = (str(p.record.architecture), int(p.record.num_classes))
        return by_kind.get(kind, p.size * rate)

    return sorted(items, key=lambda p: (-expected(p), p.record.model_id))
