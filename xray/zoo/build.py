"""Build a round from a recipe: train the pending models in parallel processes, write each as it
finishes, then index the round. Re-running the same recipe skips models already written (and
models already recorded as failed); a round holding models of another version of the recipe is
refused (RecipeChanged), so an edited recipe never resumes into a mixed round; so is one whose
models were trained with triggers this code no longer draws from the same seeds (AttackChanged:
an attack's defaults changed), while such stale recorded failures are deleted and trained again.

A group with `stack: K` (K > 1) trains its models K at a time in one vectorised pass
(xray.zoo.stacked; MNTD shadow sets): pending models of such groups are pooled by
(architecture, training recipe, K) across groups and cut into stacks of K, one stack per worker
task. Groups without `stack` (the default) train one model per task, as before."""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from xray.io import storage
from xray.io.records import ModelRecord
from xray.progress import Progress
from xray.results.lease import OutputLease
from xray.zoo import round as round_writer
from xray.zoo.attacks import ATTACKS, check_params
from xray.zoo.data import Dataset, load_dataset
from xray.zoo.recipe import ModelSpec, Recipe, model_seed
from xray.zoo.stacked import train_stack
from xray.zoo.train import TrainedModel, drawn_trigger, resolve_training_device, train_model

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


def recipe_dataset(recipe: Recipe) -> Dataset:
    """The recipe's data set, loaded once per process (lists in its parameters, e.g. signs'
    sign_scale: [0.4, 0.7], become tuples so they can key the cache)."""
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.dataset_params.items()}
    return _dataset(recipe.dataset, tuple(sorted(params.items())))


@lru_cache(maxsize=4)
def _dataset(name: str, params_items: tuple) -> Dataset:
    return load_dataset(name, **dict(params_items))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def train_and_write(recipe: Recipe, spec: ModelSpec, round_uri: str, device: str = "cpu"
                    ) -> dict[str, Any]:
    """One model, end to end, in a worker: train (retrying with a new seed while a trojaned model
    misses the ASR floor, up to recipe.max_attempts) and write its directory or its failure."""
    dataset = recipe_dataset(recipe)
    optimising = total = 0.0
    for attempt in range(recipe.max_attempts):
        attempt_spec = spec if attempt == 0 else dataclasses.replace(
            spec, seed=model_seed(recipe.seed, spec.index, attempt))
        trained = train_model(attempt_spec, dataset, device, attack_cache_uri(round_uri))
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


def attack_cache_uri(round_uri: str) -> str:
    """Where a round keeps what learned-trigger attacks learn once for many models (a clean
    surrogate, an encoder, an optimised patch): xray.zoo.attacks.AttackKit.cache_uri."""
    return storage.join(round_uri, "_attack_cache")


def spec_groups(recipe: Recipe) -> list[dict[str, Any]]:
    """The recipe group each of recipe.model_specs() comes from, in the same order."""
    return [group for group in recipe.groups for _ in range(int(group.get("count", 1)))]


def _stack_size(group: dict[str, Any]) -> int:
    k = int(group.get("stack", 1) or 1)
    if k < 1:
        raise ValueError(f"group stack must be >= 1, got {group.get('stack')!r}")
    return k


STACKING = ("auto", "on", "off")


def use_stacks(stacking: str, device: torch.device) -> bool:
    """Whether `stack: K` groups train stacked: "on", "off", or "auto" = only on an accelerator
    (on CPUs one-by-one training measured 2.8x faster than stacked: bench/stacked_training.py)."""
    if stacking not in STACKING:
        raise ValueError(f"stacking {stacking!r}: choose one of {', '.join(STACKING)}")
    return stacking == "on" or (stacking == "auto" and device.type != "cpu")


def plan_tasks(recipe: Recipe, pending: list[ModelSpec], stacked: bool = True
               ) -> list[tuple[bool, list[ModelSpec]]]:
    """Worker tasks as (stacked, specs): one spec trained alone, or (when `stacked`) a stack of
    up to K same-architecture, same-training specs from groups with `stack: K` (pooled across
    groups, in model order). Attacks that train the model themselves always train alone."""
    if not stacked:
        return [(False, [spec]) for spec in pending]
    size = {s.model_id: _stack_size(g) for s, g in zip(recipe.model_specs(), spec_groups(recipe))}
    tasks: list[tuple[bool, list[ModelSpec]]] = []
    pools: dict[tuple, list[ModelSpec]] = {}
    for spec in pending:
        k = size.get(spec.model_id, 1)
        if k == 1 or (spec.attack and ATTACKS.get(spec.attack).trains_model):
            tasks.append((False, [spec]))
        else:
            pools.setdefault((spec.architecture, spec.training, k), []).append(spec)
    for (_, _, k), specs in pools.items():
        tasks.extend((True, specs[i:i + k]) for i in range(0, len(specs), k))
    return tasks


def train_stack_and_write(recipe: Recipe, specs: list[ModelSpec], round_uri: str,
                          device: str = "cpu") -> list[dict[str, Any]]:
    """A stack of models, end to end, in a worker (xray.zoo.stacked.train_stack): the trojaned
    models that miss the ASR floor are retrained together with new seeds, up to
    recipe.max_attempts, then written as failures."""
    dataset = recipe_dataset(recipe)
    outcomes: list[dict[str, Any]] = []
    todo = list(specs)
    spent: dict[str, list[float]] = {s.model_id: [0.0, 0.0] for s in specs}
    last: dict[str, TrainedModel] = {}
    for attempt in range(recipe.max_attempts):
        if not todo:
            break
        batch = todo if attempt == 0 else [
            dataclasses.replace(s, seed=model_seed(recipe.seed, s.index, attempt)) for s in todo]
        retry = []
        for spec, trained in zip(todo, train_stack(batch, dataset, device,
                                                          attack_cache_uri(round_uri))):
            spent[spec.model_id][0] += trained.seconds_optimising
            spent[spec.model_id][1] += trained.seconds_total
            if trained.asr is None or trained.asr >= recipe.asr_floor:
                config = round_writer.write_model_dir(round_uri, trained, dataset, recipe)
                outcomes.append({"model_id": spec.model_id, "ok": True,
                                 "clean_accuracy": trained.clean_accuracy, "asr": trained.asr,
                                 "attempts": attempt + 1, "attack": config["attack"],
                                 "seconds_optimising": spent[spec.model_id][0],
                                 "seconds": spent[spec.model_id][1]})
            else:
                last[spec.model_id] = trained
                retry.append(spec)
        todo = retry
    for spec in todo:
        trained = last[spec.model_id]
        reason = (f"attack success rate {trained.asr:.3f} below the floor {recipe.asr_floor} "
                  f"after {recipe.max_attempts} attempt(s)")
        failure = round_writer.write_failure(round_uri, trained, reason)
        outcomes.append({**failure, "ok": False, "attempts": recipe.max_attempts,
                         "seconds_optimising": spent[spec.model_id][0],
                         "seconds": spent[spec.model_id][1]})
    return outcomes


def _run_task(recipe: Recipe, stacked: bool, specs: list[ModelSpec], round_uri: str,
              device: str) -> list[dict[str, Any]]:
    if stacked:
        return train_stack_and_write(recipe, specs, round_uri, device)
    return [train_and_write(recipe, spec, round_uri, device) for spec in specs]


class RecipeChanged(ValueError):
    """The round folder holds models built from another version of the recipe."""


def check_same_recipe(recipe: Recipe, round_uri: str) -> None:
    """Refuse to add models of `recipe` to a round built from another version of it: resuming
    would keep the old models (and their recorded failures) beside new ones, silently."""
    other = {d: where for d, where in round_writer.built_from(round_uri).items()
             if d != recipe.digest}
    if other:
        digest, where = next(iter(other.items()))
        raise RecipeChanged(
            f"{round_uri} was built from another version of recipe {recipe.name!r} (digest "
            f"{digest}, says {where}; this one is {recipe.digest}): build into a new --out, "
            "or delete the folder to build it under this recipe")


class AttackChanged(RecipeChanged):
    """A model of the round was trained with another trigger than this code draws from the same
    recipe and seed: an attack's defaults changed since (a new parameter, another default)."""


def _trigger_changes(spec: ModelSpec, recorded: dict[str, Any], input_shape: Any,
                     num_classes: int) -> list[str]:
    """How the trigger recorded for `spec`'s model differs from the one drawn now from its
    recorded seed ("field: recorded -> drawn now"; empty: the same). Fields the draw leaves
    empty ("") are filled by the attack's preparation (the identity of a learned encoder or
    surrogate) and not compared."""
    drawn = drawn_trigger(spec, int(recorded["seed"]), tuple(input_shape), int(num_classes))
    trigger = recorded.get("trigger")
    if drawn is None or trigger is None:
        return [] if drawn == trigger else [f"trigger: {trigger} -> {drawn}"]
    return [f"{key}: {trigger.get(key, '(absent)')} -> {value}" for key, value in drawn.items()
            if value != "" and trigger.get(key, "(absent)") != value]


def check_same_attacks(specs: list[ModelSpec], round_uri: str) -> set[str]:
    """check_same_recipe's twin for the attacks' code: refuse a round holding a model written
    with another trigger than this code draws (AttackChanged: keeping it would mix two versions
    of an attack in one round). Returns the recorded failures drawn with another trigger: stale,
    to be trained again under the current defaults rather than skipped."""
    by_id = {s.model_id: s for s in specs}
    configs = [c for c in round_writer.recorded_triggers(round_uri) if c["model_id"] in by_id]
    for config in configs:
        changes = _trigger_changes(by_id[config["model_id"]], config, config["input_shape"],
                                   config["num_classes"])
        if changes:
            raise AttackChanged(
                f"{round_uri}/{config['model_id']} was trained with another {config.get('attack')} "
                f"trigger than this xray draws from the same recipe and seed (its defaults "
                f"changed; {', '.join(changes)}): build into a new --out, or delete the folder "
                "to build it under this version")
    if not configs:  # the data's shape is known from a written model only
        return set()
    shape, classes = configs[0]["input_shape"], configs[0]["num_classes"]
    stale = set()
    for model_id in round_writer.failed_model_ids(round_uri) & set(by_id):
        failure = json.loads(storage.read_text(
            storage.join(round_uri, "failed", f"{model_id}.json")))
        if _trigger_changes(by_id[model_id], failure, shape, classes):
            log.info("%s: its recorded failure was drawn under other %s defaults: trained again",
                     model_id, failure.get("attack"))
            stale.add(model_id)
    return stale


def check_attacks(recipe: Recipe) -> None:
    """Every group's attack exists and takes the parameters it is given: a ValueError naming
    the recipe and group before anything is written or trained (not halfway through a build)."""
    for i, group in enumerate(recipe.groups):
        if group.get("attack") is None:
            continue
        try:
            check_params(str(group["attack"]), dict(group.get("attack_params") or {}))
        except (KeyError, TypeError) as err:
            raise ValueError(f"recipe {recipe.name}: groups[{i}]: {err.args[0]}") from None


def build_round(recipe: Recipe, round_uri: str, workers: int | None = None,
                show_progress: bool = True, device: str = "cpu",
                stacking: str = "auto") -> BuildResult:
    """Train every model of `recipe` not yet in `round_uri`, `workers` processes at a time, on
    `device` ('cpu', 'cuda', 'cuda:N' or 'auto'; every worker shares that device); `stacking`
    see `use_stacks`. A round holding models of another version of the recipe, or trained with
    other attack defaults, is refused (RecipeChanged, AttackChanged) before anything is trained;
    recorded failures drawn under other attack defaults are deleted and trained again. Another
    build writing to `round_uri` (its lease, xray.results.lease) is refused with LeaseHeld
    before anything is read or trained."""
    stacked = use_stacks(stacking, resolve_training_device(device))  # bad input fails here
    check_attacks(recipe)
    storage.makedirs(round_uri)
    run_id = f"zoo-build-{recipe.name}-{uuid.uuid4().hex[:6]}"
    with OutputLease(round_uri, run_id, command="xray zoo build",
                     conflict="two builds would train the same models into the same folders"
                     ) as lease:
        return _build_holding_lease(lease, recipe, round_uri, workers, show_progress, device,
                                    stacked)


def _build_holding_lease(lease: OutputLease, recipe: Recipe, round_uri: str,
                         workers: int | None, show_progress: bool, device: str,
                         stacked: bool) -> BuildResult:
    check_same_recipe(recipe, round_uri)
    specs = recipe.model_specs()
    for model_id in check_same_attacks(specs, round_uri):  # trained again: kept or failed anew
        storage.remove(storage.join(round_uri, "failed", f"{model_id}.json"))
    skip = round_writer.completed_model_ids(round_uri) | round_writer.failed_model_ids(round_uri)
    pending = [s for s in specs if s.model_id not in skip]
    tasks = plan_tasks(recipe, pending, stacked)
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
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
            futures = {pool.submit(_run_task, recipe, stacked, t, round_uri, device): t
                       for stacked, t in tasks}
            not_done = set(futures)
            try:
                while not_done:
                    finished, not_done = wait(not_done, return_when=FIRST_COMPLETED)
                    lease.check()  # taken over: stop before writing beside the new holder
                    for future in finished:
                        # a crash in a worker is a bug: let it surface
                        for outcome in future.result():
                            optimising += outcome["seconds_optimising"]
                            in_workers += outcome["seconds"]
                            if not outcome["ok"]:
                                failed.append(outcome)
                            bar.update(ok=outcome["ok"])
            except BaseException:
                # the pool's exit would run every queued task first: the running ones end
                # whole (a model folder is complete or redone on resume), no new one starts
                pool.shutdown(cancel_futures=True)
                raise
    records = round_writer.write_round_index(round_uri, recipe)
    return BuildResult(round_uri=round_uri, records=records, trained=len(pending) - len(failed),
                       skipped=len(specs) - len(pending), failed=failed,
                       seconds_optimising=optimising, seconds_in_workers=in_workers)
