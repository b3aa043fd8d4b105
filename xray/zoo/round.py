"""Write trained models as a round in the TrojAI layout (docs/algorithms/trojai-format.md).

    <round>/
      id-00000000/
        model.safetensors | model.pt    weights (state dict; safe to load)
        ground_truth.csv                0 or 1
        clean_example_data/             class_<c>_example_<i>.png
        poisoned_example_data/          class_<c>_trigger_0_example_<i>.png (trojaned only)
        trigger.safetensors             learned trigger parts (generator, encoder), when any
        config.json                     written LAST: a directory without it is incomplete
      failed/<model_id>.json            trojaned models that missed the ASR floor
      METADATA.csv                      one row per complete model
      manifest.csv                      what `xray scan --manifest` reads
      recipe.yaml, round.json           the recipe and its digest
      _attack_cache/                    what learned-trigger attacks learn once per round

A build interrupted half-way leaves at most directories without config.json, which every reader
skips and the next build rewrites.
"""
from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import yaml

from xray.io import storage
from xray.io.examples import write_examples
from xray.io.manifest import write_manifest
from xray.io.model_loading import save_model
from xray.io.records import ModelRecord
from xray.zoo.attacks import Attack, attack_from_config
from xray.zoo.data import Dataset
from xray.zoo.recipe import Recipe
from xray.zoo.train import TrainedModel

WEIGHT_FILES = {"safetensors": "model.safetensors", "state_dict": "model.pt",
                "torchscript": "model.torchscript.pt", "pickle": "model.pt"}
CONFIG_FILE = "config.json"
TRIGGER_ARTIFACTS_FILE = "trigger.safetensors"


def _pick_examples(x: np.ndarray, y: np.ndarray, per_class: int, classes, rng) -> tuple:
    picked = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        picked.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    picked = np.array(sorted(picked), dtype=np.int64)
    return x[picked], y[picked]


def model_config(trained: TrainedModel, dataset: Dataset, recipe: Recipe) -> dict[str, Any]:
    spec, attack = trained.spec, trained.attack
    return {
        "model_id": spec.model_id,
        "architecture": spec.architecture,
        "num_classes": dataset.num_classes,
        "input_shape": list(dataset.input_shape),
        "mean": [0.0],
        "std": [1.0],
        "format": recipe.weights_format,
        "weights": WEIGHT_FILES[recipe.weights_format],
        "poisoned": attack is not None,
        # all-to-all has no single target: each class goes to the next one
        "target": int(attack.target) if attack is not None and not attack.all_to_all else None,
        "victims": (list(attack.victims)
                    if attack is not None and attack.victims is not None else None),
        "mapping": attack.mapping if attack is not None else None,
        "attack": spec.attack,
        "trigger": attack.to_config() if attack is not None else None,
        "trigger_artifacts": (TRIGGER_ARTIFACTS_FILE
                              if attack is not None and attack.learned else None),
        "poison_rate": (spec.poison_rate if spec.poison_rate is not None else attack.default_rate)
        if attack is not None else 0.0,
        "poisoned_count": trained.poisoned_count,
        "clean_accuracy": trained.clean_accuracy,
        "asr": trained.asr,
        "seed": spec.seed,
        "dataset": dataset.name,
        "training": dataclasses.asdict(spec.training),
        "recipe": recipe.name,
        "recipe_digest": recipe.digest,
        "seconds": round(trained.seconds_total, 3),
        "tags": {"dataset": dataset.name, "round": recipe.name},
    }


def write_model_dir(round_uri: str, trained: TrainedModel, dataset: Dataset, recipe: Recipe,
                    allow_pickle: bool = False) -> dict[str, Any]:
    """Write one model directory; config.json goes last so readers never see half of it."""
    spec = trained.spec
    model_uri = storage.join(round_uri, spec.model_id)
    rng = np.random.default_rng(spec.seed + 1)
    config = model_config(trained, dataset, recipe)

    save_model(trained.net, storage.join(model_uri, config["weights"]), recipe.weights_format,
               allow_pickle=allow_pickle)
    storage.write_text(storage.join(model_uri, "ground_truth.csv"), f"{int(config['poisoned'])}\n")
    x_clean, y_clean = _pick_examples(dataset.x_test, dataset.y_test, recipe.examples_per_class,
                                      range(dataset.num_classes), rng)
    write_examples(x_clean, y_clean, storage.join(model_uri, "clean_example_data"))
    if trained.attack is not None:
        attack = trained.attack
        if config["trigger_artifacts"]:
            storage.atomic_write_bytes(storage.join(model_uri, TRIGGER_ARTIFACTS_FILE),
                                safetensors.torch.save(
                                    {k: v.detach().cpu().contiguous()
                                     for k, v in attack.artifacts().items()}))
        classes = np.arange(dataset.num_classes)
        sources = classes[attack.source_mask(classes)]
        x_src, y_src = _pick_examples(dataset.x_test, dataset.y_test,
                                      recipe.poisoned_examples_per_class, sources, rng)
        write_examples(attack.apply(x_src), y_src, storage.join(model_uri, "poisoned_example_data"),
                       prefix="class_{c}_trigger_0_example_{i}.png")
    storage.write_text(storage.join(model_uri, CONFIG_FILE), json.dumps(config, indent=2))
    return config


def write_failure(round_uri: str, trained: TrainedModel, reason: str) -> dict[str, Any]:
    spec = trained.spec
    record = {"model_id": spec.model_id, "reason": reason, "attack": spec.attack,
              "seed": spec.seed, "clean_accuracy": trained.clean_accuracy, "asr": trained.asr,
              "trigger": trained.attack.to_config() if trained.attack is not None else None}
    storage.write_text(storage.join(round_uri, "failed", f"{spec.model_id}.json"),
                       json.dumps(record, indent=2))
    return record


def completed_model_ids(round_uri: str) -> set[str]:
    """Model directories that hold a config.json (complete)."""
    done = set()
    for name in storage.listdir(round_uri):
        if name.startswith("id-") and storage.exists(storage.join(round_uri, name, CONFIG_FILE)):
            done.add(name)
    return done


def model_configs(round_uri: str) -> list[dict[str, Any]]:
    """The config.json of every complete model directory of a round, in model-id order."""
    return [json.loads(storage.read_text(storage.join(round_uri, mid, CONFIG_FILE)))
            for mid in sorted(completed_model_ids(round_uri))]


def trigger_config(model_uri: str) -> dict[str, Any] | None:
    """The trigger recorded in the config.json beside a model file (a zoo round's ground truth,
    for pictures and reports; never for detectors), or None when there is none."""
    folder = model_uri.rsplit("/", 1)[0] if "/" in model_uri else "."
    config_uri = storage.join(folder, CONFIG_FILE)
    try:
        if not storage.exists(config_uri):
            return None
        trigger = json.loads(storage.read_text(config_uri)).get("trigger")
    except (OSError, ValueError, AttributeError):
        return None
    return trigger if isinstance(trigger, dict) and trigger.get("name") else None


def load_attack(model_dir_uri: str) -> Attack | None:
    """The attack a zoo model was trained with, ready to `apply`: its config.json's trigger plus
    the learned parts saved beside it (trigger.safetensors); None for a clean model."""
    config = json.loads(storage.read_text(storage.join(model_dir_uri, CONFIG_FILE)))
    if not config.get("trigger"):
        return None
    artifacts = None
    if config.get("trigger_artifacts"):
        artifacts = safetensors.torch.load(storage.read_bytes(
            storage.join(model_dir_uri, config["trigger_artifacts"])))
    return attack_from_config(config["trigger"], artifacts)


def built_from(round_uri: str) -> dict[str, str]:
    """The recipe digests the round's models were built from, as {digest: where it is said}:
    round.json's (written after every build: one read) when there is one, else those of the
    complete models' config.json (a first build that stopped before indexing the round)."""
    index = storage.join(round_uri, "round.json")
    if storage.exists(index):
        digest = json.loads(storage.read_text(index)).get("recipe_digest")
        return {digest: index} if digest else {}
    return {c["recipe_digest"]: storage.join(round_uri, c["model_id"], CONFIG_FILE)
            for c in model_configs(round_uri) if c.get("recipe_digest")}


TRIGGER_KEYS = ("model_id", "attack", "seed", "input_shape", "num_classes", "trigger")


def recorded_triggers(round_uri: str) -> list[dict[str, Any]]:
    """TRIGGER_KEYS of every complete model's config: from METADATA.csv (one read, however
    large the round or slow its store) for the models the last index holds, from config.json
    for those written after it (an interrupted build)."""
    done = completed_model_ids(round_uri)
    found: dict[str, dict[str, Any]] = {}
    index = storage.join(round_uri, "METADATA.csv")
    if storage.exists(index):
        table = pd.read_csv(io.StringIO(storage.read_text(index)), dtype=str,
                            keep_default_na=False)
        for row in table.to_dict("records"):
            if row["model_id"] in done:
                found[row["model_id"]] = {
                    "model_id": row["model_id"], "attack": row["attack"] or None,
                    "seed": int(row["seed"]), "input_shape": json.loads(row["input_shape"]),
                    "num_classes": int(row["num_classes"]),
                    "trigger": json.loads(row["trigger"]) if row["trigger"] else None}
    for model_id in sorted(done - set(found)):
        config = json.loads(storage.read_text(storage.join(round_uri, model_id, CONFIG_FILE)))
        found[model_id] = {k: config.get(k) for k in TRIGGER_KEYS}
    return [found[m] for m in sorted(found)]


def failed_model_ids(round_uri: str) -> set[str]:
    return {n[:-len(".json")] for n in storage.listdir(storage.join(round_uri, "failed"))
            if n.endswith(".json")}


def record_from_config(round_uri: str, config: dict[str, Any]) -> ModelRecord:
    """The manifest row of a model dir; round_uri "" gives URIs relative to the round (what
    manifest.csv holds, so a round can be moved or copied to object storage as it is)."""
    model_uri = storage.join(round_uri, config["model_id"]) if round_uri else config["model_id"]
    return ModelRecord(
        model_id=config["model_id"],
        uri=storage.join(model_uri, config["weights"]),
        format=config["format"],
        architecture=config["architecture"],
        num_classes=int(config["num_classes"]),
        input_shape=tuple(config["input_shape"]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        examples_uri=storage.join(model_uri, "clean_example_data"),
        poisoned=bool(config["poisoned"]),
        target=config["target"],
        attack=config["attack"],
        tags={k: str(v) for k, v in config.get("tags", {}).items()},
    )


def write_round_index(round_uri: str, recipe: Recipe) -> list[ModelRecord]:
    """METADATA.csv, manifest.csv, recipe.yaml and round.json from the complete model dirs."""
    configs = model_configs(round_uri)
    metadata = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                              for k, v in c.items()} for c in configs])
    buf = io.StringIO()
    metadata.to_csv(buf, index=False)
    storage.write_text(storage.join(round_uri, "METADATA.csv"), buf.getvalue())
    write_manifest([record_from_config("", c) for c in configs],
                   storage.join(round_uri, "manifest.csv"))
    storage.write_text(storage.join(round_uri, "recipe.yaml"), yaml.safe_dump(recipe.raw))
    storage.write_text(storage.join(round_uri, "round.json"), json.dumps(
        {"recipe": recipe.name, "recipe_digest": recipe.digest, "models": len(configs),
         "failed": sorted(failed_model_ids(round_uri))}, indent=2))
    return [record_from_config(round_uri, c) for c in configs]
