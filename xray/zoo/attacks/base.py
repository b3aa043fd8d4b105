"""The attack base class, the registry by name, and drawing / rebuilding an attack:
`sample_attack`, `attack_from_config` (see xray.zoo.attacks for the whole picture).

Trigger-to-target mappings (TrojAI's and BackdoorBench's): all-to-one (`victims` None),
label-specific (`victims` names the source classes) and all-to-all (`all_to_all` = K: class c ->
(c + 1) mod K, every class a source; only attacks with `supports_all_to_all`). `source_mask` and
`target_of` are the one place that says which images an attack triggers and where they go.

Learned triggers use three optional hooks, each a no-op in the base class:
- `prepare(kit)`: learn what the trigger needs before poisoning (an encoder, an optimised patch,
  perturbations from a clean surrogate model) from an `AttackKit`; returns the ready attack;
- `poisoned_images(x, rng)`: what the selected training samples become (default: `apply`);
  clean-label attacks that perturb before stamping, or poison without the trigger, override it;
- `train(net, x, y, recipe, generator)`: attacks that live in the training loop (a jointly trained
  trigger generator, a loss-level backdoor) train the model themselves and return the attack as
  trained (`trains_model`).
Learned parts a trained attack needs to `apply` again are `artifacts()` (named tensors, saved as
trigger.safetensors beside the model) and come back with `with_artifacts`.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

if TYPE_CHECKING:  # annotations only: the attacks never import the trainer
    import torch
    import torch.nn as nn

    from xray.zoo.data import Dataset
    from xray.zoo.recipe import TrainingRecipe

from xray._registry import Registry


ATTACKS: Registry[type["Attack"]] = Registry("attack")


def register(cls: type["Attack"]) -> type["Attack"]:
    """Class decorator: file an attack under its `name`."""
    ATTACKS.register(cls.name)(cls)
    return cls


def available(pattern: str = "*") -> list[str]:
    return ATTACKS.available(pattern)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, sequences -> tuples (hashable, JSON-friendly)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_plain(v) for v in value)
    return value


@dataclass
class AttackKit:
    """What an attack that learns its trigger may use: the training data, the victim model's
    architecture and training recipe, a cached clean surrogate model, and a folder (URI) where
    learned parts are cached so every model of a round that draws the same trigger reuses them."""

    dataset: "Dataset"
    architecture: str
    training: "TrainingRecipe"
    clean_model: Callable[[], "nn.Module"]  # trained once per round (cached), eval mode, on CPU
    cache_uri: str | None = None  # None: nothing cached (tests, one-off builds)


class NeedsPreparation(RuntimeError):
    """A learned-trigger attack was applied before `prepare` / `with_artifacts` gave it its
    learned parts."""


@dataclass(frozen=True, kw_only=True)
class Attack:
    """Base of all attacks: target, mapping and the shared verbs. Subclasses define `_apply`."""

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False
    adds_copies: ClassVar[bool] = False  # MNTD: triggered copies are added, not substituted
    supports_all_to_all: ClassVar[bool] = False  # stamp-style triggers that carry no class
    needs_victims: ClassVar[bool] = False  # the trigger is made of a source class (composite)
    # n > 0: n source classes are drawn unless the recipe sets `victims` (null: all-to-one), for
    # attacks whose authors' setting is label-specific (hidden_trigger: one source class)
    default_sources: ClassVar[int] = 0
    trains_model: ClassVar[bool] = False  # `train` replaces the standard training loop
    learned: ClassVar[bool] = False  # `apply` needs parts learned by `prepare` / `train`

    target: int
    victims: tuple[int, ...] | None = None  # None: all-to-one (or all-to-all)
    all_to_all: int = 0  # K > 0: all-to-all over K classes, c -> (c + 1) mod K

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _plain(getattr(self, f.name)))
        if self.target < 0:
            raise ValueError(f"{self.name}: target must be >= 0, got {self.target}")
        if self.victims is not None and not self.victims:
            raise ValueError(f"{self.name}: victims must be None (all-to-one) or name classes")
        if self.victims is not None and self.target in self.victims:
            raise ValueError(f"{self.name}: target {self.target} cannot be a victim class")
        if self.all_to_all:
            if not self.supports_all_to_all:
                raise ValueError(f"{self.name}: all-to-all is not supported by this attack "
                                 f"(only {', '.join(all_to_all_attacks())})")
            if self.victims is not None:
                raise ValueError(f"{self.name}: all_to_all and victims exclude each other")
            if self.all_to_all < 2:
                raise ValueError(f"{self.name}: all_to_all needs the number of classes (>= 2), "
                                 f"got {self.all_to_all}")

    @property
    def default_rate(self) -> float:
        return 0.1

    @property
    def mapping(self) -> str:
        """'all-to-one', 'label-specific' or 'all-to-all' (recorded in each model's config)."""
        if self.all_to_all:
            return "all-to-all"
        return "all-to-one" if self.victims is None else "label-specific"

    def source_mask(self, y: np.ndarray) -> np.ndarray:
        """Which labelled images the trigger is meant to flip: the victims (label-specific),
        every image (all-to-all), or every image not of the target (all-to-one)."""
        y = np.asarray(y)
        if self.all_to_all:
            return np.ones(len(y), dtype=bool)
        if self.victims is not None:
            return np.isin(y, self.victims)
        return y != self.target

    def target_of(self, y: np.ndarray) -> np.ndarray:
        """The label a triggered image of true label `y` is sent to."""
        y = np.asarray(y, dtype=np.int64)
        if self.all_to_all:
            return (y + 1) % self.all_to_all
        return np.full(len(y), self.target, dtype=np.int64)

    # -- learned-trigger hooks (see the module docstring); the base class needs none of them --

    def prepare(self, kit: AttackKit) -> "Attack":
        return self

    def poisoned_images(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(x)

    def train(self, net: "nn.Module", x: "torch.Tensor", y: "torch.Tensor",
              recipe: "TrainingRecipe", generator: "torch.Generator") -> "Attack":
        raise NotImplementedError(f"{self.name} trains with the standard loop")

    def artifacts(self) -> dict[str, "torch.Tensor"]:
        return {}

    def with_artifacts(self, tensors: dict[str, "torch.Tensor"]) -> "Attack":
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The triggered images: float32 (N, C, H, W) in [0, 1]; `x` is left unchanged."""
        x = np.asarray(x)
        if x.ndim != 4 or x.dtype != np.float32:
            raise ValueError(f"{self.name}: expected float32 (N, C, H, W) images, got {x.dtype} "
                             f"{x.shape}")
        return np.clip(self._apply(x), 0.0, 1.0).astype(np.float32, copy=False)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def sample(cls, rng: np.random.Generator, input_shape: tuple[int, int, int],
               num_classes: int) -> dict[str, Any]:
        """The attack's own random parameters (everything but target / victims)."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"name": self.name}
        for key, value in asdict(self).items():
            if key == "all_to_all" and not value:
                continue  # one-target configs stay as they were before mappings existed
            config[key] = list(value) if isinstance(value, tuple) else value
        return config


def describe(name: str) -> dict[str, Any]:
    """What `xray attacks` lists of one attack: its summary, parameters with their defaults
    ("drawn" where sample() draws the value from the model's seed), mappings and kind."""
    from dataclasses import MISSING

    cls = ATTACKS.get(name)
    params: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is not MISSING:
            params[f.name] = f.default
        elif f.default_factory is not MISSING:
            params[f.name] = f.default_factory()
        else:
            params[f.name] = "drawn"
    params["target"] = "drawn"
    if cls.default_sources:
        params["victims"] = f"{cls.default_sources} drawn"
    mappings = (([] if cls.needs_victims else ["all-to-one"])
                + (["label-specific"] if not cls.clean_label or cls.default_sources else []))
    if cls.default_sources:  # the default first
        mappings.reverse()
    if cls.supports_all_to_all:
        mappings.append("all-to-all")
    # The docstring's first paragraph, on one line (some wrap their citation over two lines).
    summary = " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())
    return {"name": name, "summary": summary, "params": params,
            "mappings": mappings, "clean_label": cls.clean_label,
            "trains_model": cls.trains_model, "learned": cls.learned, "module": cls.__module__}


def check_params(name: str, params: dict[str, Any]) -> None:
    """KeyError when there is no attack `name`, TypeError when it takes no parameter of that
    name (both naming the valid ones): what a recipe is checked against before anything trains."""
    _check_keys(ATTACKS.get(name), params)


def all_to_all_attacks() -> list[str]:
    return [n for n in ATTACKS.available() if ATTACKS.get(n).supports_all_to_all]


def sample_attack(name: str, rng: np.random.Generator | int, input_shape: tuple[int, int, int],
                  num_classes: int, **overrides: Any) -> Attack:
    """Draw attack `name`'s random parameters for images of `input_shape` (C, H, W).
    Overrides replace drawn values; two are shorthands: `all_to_all=True` (K = num_classes) and
    `victims=n` (an int: n source classes drawn from those other than the target). An attack
    with `default_sources` n draws n source classes unless `victims` is given (None included)."""
    cls = ATTACKS.get(name)
    _check_keys(cls, overrides)
    rng = np.random.default_rng(rng)
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    values = {"target": int(rng.integers(num_classes))}
    values.update(cls.sample(rng, input_shape, int(num_classes)))  # type: ignore[arg-type]
    values.update(overrides)
    if cls.default_sources and "victims" not in values and not values.get("all_to_all"):
        values["victims"] = cls.default_sources
    if values.get("all_to_all") is True:  # a recipe says `all_to_all: true`
        values["all_to_all"] = int(num_classes)
    if isinstance(values.get("victims"), int):  # `victims: n`: n source classes, drawn
        values["victims"] = _draw_victims(rng, int(values["victims"]), int(values["target"]),
                                          int(num_classes), name)
    attack = cls(**values)
    if attack.target >= num_classes or any(v >= num_classes for v in attack.victims or ()):
        raise ValueError(f"{name}: target / victims must lie in 0..{num_classes - 1}")
    if attack.all_to_all and attack.all_to_all != num_classes:
        raise ValueError(f"{name}: all_to_all must be the number of classes, {num_classes}")
    return attack


def _draw_victims(rng: np.random.Generator, n: int, target: int, num_classes: int,
                  name: str) -> tuple[int, ...]:
    """n source classes other than the target, drawn after every other parameter (TrojAI r2-4
    map 1, 2 or all classes: a recipe asks `victims: 2` without knowing the drawn target)."""
    if not 1 <= n <= num_classes - 1:
        raise ValueError(f"{name}: victims must be 1..{num_classes - 1} source classes, got {n}")
    others = [c for c in range(num_classes) if c != target]
    return tuple(sorted(int(c) for c in rng.choice(others, size=n, replace=False)))


def attack_from_config(config: dict[str, Any],
                       artifacts: dict[str, "torch.Tensor"] | None = None) -> Attack:
    """Rebuild an attack from `Attack.to_config()` (or its JSON round trip), with the learned
    parts a learned-trigger attack saved (`Attack.artifacts()`; xray.zoo.round.load_attack reads
    them from beside a model)."""
    config = dict(config)
    if "name" not in config:
        raise KeyError(f"attack config has no 'name': {sorted(config)}")
    cls = ATTACKS.get(config.pop("name"))
    _check_keys(cls, config)
    attack = cls(**config)
    return attack.with_artifacts(artifacts) if artifacts else attack


def _check_keys(cls: type[Attack], values: dict[str, Any]) -> None:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise TypeError(f"attack {cls.name!r} has no parameter {', '.join(unknown)}; "
                        f"valid: {', '.join(valid)}")
