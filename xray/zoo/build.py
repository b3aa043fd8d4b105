"""Build a round from a recipe: train the pending models in parallel processes, write each as it
finishes, then index the round. Re-running the same recipe skips models already written (and
models already recorded as failed)."""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from xray.io import storage
from xray.io.records import ModelRecord
from xray.progress import Progress
from xray.zoo import round as round_writer
from xray.zoo.data import Dataset, load_dataset
from xray.zoo.recipe import ModelSpec, Recipe, model_seed
from xray.zoo.train import train_model

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    round_uri: str
    records: list[ModelRecord]
    trained: int
    skipped: int
    failed: list[dict[str, Any]]
    seconds_optimising: float
    seconds_in_workers: float


@lru_cache(maxsize=4)
def _dataset(name: str, params_items: tuple) -> Dataset:
    return load_dataset(name, **dict(params_items))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def train_and_write(recipe: Recipe, spec: ModelSpec, round_uri: str) -> dict[str, Any]:
    """One model, end to end, in a worker: train (retrying with a new seed while a trojaned model
    misses the ASR floor, up to recipe.max_attempts) and write its directory or its failure."""
    dataset = _dataset(recipe.dataset, tuple(sorted(recipe.dataset_params.items())))
    optimising = total = 0.0
    for attempt in range(recipe.max_attempts):
        attempt_spec = spec if attempt == 0 else dataclasses.replace(
            spec, seed=model_seed(recipe.seed, spec.index, attempt))
        trained = train_model(attempt_spec, dataset)
        optimising += trained.seconds_optimising
        total += trained.seconds_total
        if trained.asr is None or trained.asr >= recipe.asr_floor:
            config = round_writer.write_model_dir(round_uri, trained, dataset, recipe)
            return {"model_id": spec.model_id, "ok": True, "clean_accuracy": trained.clean_accuracy,
                    "asr": trained.asr, "attempts": attempt + 1, "seconds_optimising": optimising,
                    "seconds": total, "attack": config["attack"]}
    reason = (f"attack success rate {trained.asr:.3f} below the floor {recipe.asr_floor} after "
              f"{recipe.max_attempts} attempt(s)")
    failure = round_writer.write_failure(round_uri, trained, reason)
    return {**failure, "ok": False, "attempts": recipe.max_attempts,
            "seconds_optimising": optimising, "seconds": total}


def build_round(recipe: Recipe, round_uri: str, workers: int | None = None,
                show_progress: bool = True) -> BuildResult:
    """Train every model of `recipe` not yet in `round_uri`, `workers` processes at a time."""
    storage.makedirs(round_uri)
    specs = recipe.model_specs()
    skip = round_writer.completed_model_ids(round_uri) | round_writer.failed_model_ids(round_uri)
    pending = [s for s in specs if s.model_id not in skip]
    workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    failed: list[dict[str, Any]] = []
    optimising = in_workers = 0.0
    log.info("round %s: %d models in recipe, %d already written, %d to train on %d workers",
             round_uri, len(specs), len(specs) - len(pending), len(pending), workers)
    if pending:
        ctx = mp.get_context("spawn")  # torch and fork do not mix reliably
        with Progress(len(pending), f"zoo build {recipe.name}", disable=not show_progress) as bar, \
                ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                    initargs=(threads,)) as pool:
            futures = {pool.submit(train_and_write, recipe, s, round_uri): s for s in pending}
            not_done = set(futures)
            while not_done:
                finished, not_done = wait(not_done, return_when=FIRST_COMPLETED)
                for future in finished:
                    outcome = future.result()  # a crash in a worker is a bug: let it surface
                    optimising += outcome["seconds_optimising"]
                    in_workers += outcome["seconds"]
                    if not outcome["ok"]:
                        failed.append(outcome)
                    bar.update(ok=outcome["ok"])
    records = round_writer.write_round_index(round_uri, recipe)
    return BuildResult(round_uri=round_uri, records=records, trained=len(pending) - len(failed),
                       skipped=len(specs) - len(pending), failed=failed,
                       seconds_optimising=optimising, seconds_in_workers=in_workers)
