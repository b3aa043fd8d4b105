"""Zoo recipes: what to train, as data (YAML). One recipe = one round.

    name: demo
    seed: 1
    dataset: {name: signs, params: {num_classes: 10, image_size: 32, ...}}
    architecture: mntd_cifar_cnn
    training: {preset: small, epochs: 6}           # any TrainingRecipe field overrides the preset
    asr_floor: 0.8                                 # trojaned models below it are recorded failed
    max_attempts: 2                                # retries (new seed) before a model is failed
    examples_per_class: 10                         # clean example PNGs per class and model
    poisoned_examples_per_class: 5
    weights_format: safetensors
    groups:
      - {count: 8}                                 # clean
      - {count: 4, attack: badnets, poison_rate: 0.1, attack_params: {...}}
      - {count: 4, attack: polygon, architecture: nin}   # per-group overrides

Each model's seed is derived from (recipe seed, model index), so a recipe always makes the
same round and a model's id never changes when later groups are added.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xray.io import storage


# Named recipes live beside the manifests in a source checkout (the README's way to run xray).
RECIPES_DIR = Path(__file__).resolve().parents[2] / "manifests" / "recipes"


@dataclass(frozen=True)
class TrainingRecipe:
    """Optimiser and schedule. `reference` = the seeds' recipe (Model X-ray supplement Table 2):
    SGD momentum 0.9, lr 0.01, cosine annealing, weight decay 5e-4, batch 128, 50 epochs."""

    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: int = 50
    schedule: str = "cosine"  # cosine | constant

    def __post_init__(self) -> None:
        checks = [("optimizer", self.optimizer in ("sgd", "adam"), "'sgd' or 'adam'"),
                  ("schedule", self.schedule in ("cosine", "constant"), "'cosine' or 'constant'"),
                  ("lr", _number(self.lr) and self.lr > 0, "a number > 0"),
                  ("momentum", _number(self.momentum) and 0 <= self.momentum < 1, "in [0, 1)"),
                  ("weight_decay", _number(self.weight_decay) and self.weight_decay >= 0,
                   "a number >= 0"),
                  ("batch_size", _whole(self.batch_size) and self.batch_size >= 1,
                   "a whole number >= 1"),
                  ("epochs", _whole(self.epochs) and self.epochs >= 1, "a whole number >= 1")]
        for name, ok, expected in checks:
            if not ok:
                value = getattr(self, name)
                hint = (" (YAML reads a number without a dot, such as 2e-3, as text: write "
                        "2.0e-3)" if isinstance(value, str) and _parses_as_number(value) else "")
                raise ValueError(f"training: {name} {value!r}; expected {expected}{hint}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "reference": {},
    # Short small-model default: Adam converges in a few epochs on 32 x 32 inputs.
    "small": {"optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "batch_size": 64, "epochs": 8},
    # MNTD shadow models (docs/algorithms/baselines.md): Adam lr 1e-3, batch 100, constant.
    "mntd": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 100,
             "epochs": 100, "schedule": "constant"},
}


def training_recipe(spec: dict[str, Any] | None) -> TrainingRecipe:
    spec = dict(spec or {})
    preset = spec.pop("preset", "reference")
    if preset not in TRAINING_PRESETS:
        raise ValueError(f"unknown training preset {preset!r}; presets: {sorted(TRAINING_PRESETS)}")
    _check_training_keys(spec, "training")
    return dataclasses.replace(TrainingRecipe(), **{**TRAINING_PRESETS[preset], **spec})


def _check_training_keys(spec: dict[str, Any], where: str) -> None:
    valid = {f.name for f in dataclasses.fields(TrainingRecipe)}
    unknown = sorted(set(spec) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid: {sorted(valid)}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to train one model of a round, reproducibly."""

    model_id: str
    index: int
    seed: int
    architecture: str
    attack: str | None
    attack_params: dict[str, Any]
    poison_rate: float | None  # None = the attack's own default (MNTD's sampled inject_p)
    training: TrainingRecipe


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int
    dataset: str
    dataset_params: dict[str, Any]
    architecture: str
    training: TrainingRecipe
    groups: tuple[dict[str, Any], ...]
    asr_floor: float = 0.8
    max_attempts: int = 2
    examples_per_class: int = 10
    poisoned_examples_per_class: int = 5
    weights_format: str = "safetensors"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def digest(self) -> str:
        """Hash of the recipe's content: a changed recipe means a new round."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]

    def model_specs(self) -> list[ModelSpec]:
        specs = []
        index = 0
        for group in self.groups:
            for _ in range(int(group.get("count", 1))):
                training = self.training
                if "training" in group:
                    training = dataclasses.replace(training, **group["training"])
                specs.append(ModelSpec(
                    model_id=f"id-{index:08d}",
                    index=index,
                    seed=model_seed(self.seed, index),
                    architecture=group.get("architecture", self.architecture),
                    attack=group.get("attack"),
                    attack_params=dict(group.get("attack_params", {})),
                    poison_rate=(None if group.get("poison_rate") is None
                                 else float(group["poison_rate"])),
                    training=training,
                ))
                index += 1
        return specs


def model_seed(recipe_seed: int, index: int, attempt: int = 0) -> int:
    digest = hashlib.sha256(f"{recipe_seed}:{index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


_RECIPE_KEYS = {"name", "seed", "dataset", "architecture", "training", "groups", "asr_floor",
                "max_attempts", "examples_per_class", "poisoned_examples_per_class",
                "weights_format"}


_GROUP_KEYS = {"count", "attack", "attack_params", "poison_rate", "training", "architecture",
               "split", "stack"}


def _check_group(group: Any, training: TrainingRecipe, where: str) -> None:
    """A group's keys and values, training overrides and split (a typo such as `atack:` would
    otherwise train clean models); its attack and attack parameters are checked by the build
    (xray.zoo.build.check_attacks: the attack modules depend on this one)."""
    if not isinstance(group, dict):
        raise ValueError(f"{where}: expected a mapping such as {{count: 4, attack: badnets}}, "
                         f"got {group!r}")
    unknown = sorted(set(group) - _GROUP_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid: {sorted(_GROUP_KEYS)}")
    if group.get("attack_params") and group.get("attack") is None:
        raise ValueError(f"{where}: attack_params without an attack")
    count = group.get("count", 1)
    if not _whole(count) or count < 0:
        raise ValueError(f"{where}: count {count!r}; expected a whole number >= 0")
    rate = group.get("poison_rate")
    if rate is not None and not (_number(rate) and 0 < rate <= 1):
        raise ValueError(f"{where}: poison_rate {rate!r}; expected a number in (0, 1]")
    _check_training_keys(group.get("training") or {}, f"{where}.training")
    try:
        dataclasses.replace(training, **(group.get("training") or {}))
    except ValueError as err:
        raise ValueError(f"{where}.{err.args[0]}") from None
    if group.get("split", "train") not in ("train", "validation"):
        raise ValueError(f"{where}: split {group['split']!r}; expected 'train' or 'validation'")


def parse_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    unknown = sorted(set(raw) - _RECIPE_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}; valid: {sorted(_RECIPE_KEYS)}")
    for key in ("name", "dataset", "architecture", "groups"):
        if key not in raw:
            raise ValueError(f"{source}: missing key {key!r}")
    try:
        training = training_recipe(raw.get("training"))
    except ValueError as err:
        raise ValueError(f"{source}: {err.args[0]}") from None
    if not isinstance(raw["groups"], list) or not raw["groups"]:
        raise ValueError(f"{source}: groups: expected a list of groups such as "
                         f"[{{count: 4}}, {{count: 4, attack: badnets}}], got {raw['groups']!r}")
    for i, group in enumerate(raw["groups"]):
        _check_group(group, training, f"{source}: groups[{i}]")
    for key, low, high in (("asr_floor", 0, 1), ("max_attempts", 1, None),
                           ("examples_per_class", 1, None),
                           ("poisoned_examples_per_class", 0, None)):
        value = raw.get(key)
        whole = key != "asr_floor"
        if value is not None and not ((_whole(value) if whole else _number(value))
                                      and value >= low and (high is None or value <= high)):
            expected = f"a whole number >= {low}" if whole else f"a number in [{low}, {high}]"
            raise ValueError(f"{source}: {key} {value!r}; expected {expected}")
    dataset = raw["dataset"]
    if isinstance(dataset, str):
        dataset = {"name": dataset}
    return Recipe(
        name=str(raw["name"]),
        seed=int(raw.get("seed", 0)),
        dataset=str(dataset["name"]),
        dataset_params=dict(dataset.get("params", {})),
        architecture=str(raw["architecture"]),
        training=training,
        groups=tuple(dict(g) for g in raw["groups"]),
        asr_floor=float(raw.get("asr_floor", 0.8)),
        max_attempts=int(raw.get("max_attempts", 2)),
        examples_per_class=int(raw.get("examples_per_class", 10)),
        poisoned_examples_per_class=int(raw.get("poisoned_examples_per_class", 5)),
        weights_format=str(raw.get("weights_format", "safetensors")),
        raw=raw,
    )


def load_recipe(uri: str) -> Recipe:
    """A recipe from a YAML file, or one of manifests/recipes/ by name (`demo`, `reference`)."""
    if not storage.exists(uri):
        named = RECIPES_DIR / f"{uri}.yaml"
        if not named.is_file():
            known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"recipe {uri!r}: no such file, and no recipe of that name "
                                    f"in {RECIPES_DIR} (known: {', '.join(known)})")
        uri = str(named)
    return parse_recipe(yaml.safe_load(storage.read_text(uri)), source=uri)
