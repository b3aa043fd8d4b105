"""The attack base class, the registry by name, and drawing / rebuilding an attack:
`sample_attack`, `attack_from_config` (see xray.zoo.attacks for the whole picture).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np

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


@dataclass(frozen=True, kw_only=True)
class Attack:
    """Base of all attacks: target, victims and the shared verbs. Subclasses define `_apply`."""

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False
    adds_copies: ClassVar[bool] = False  # MNTD: triggered copies are added, not substituted

    target: int
    victims: tuple[int, ...] | None = None  # None: all-to-one

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _plain(getattr(self, f.name)))
        if self.target < 0:
            raise ValueError(f"{self.name}: target must be >= 0, got {self.target}")
        if self.victims is not None and not self.victims:
            raise ValueError(f"{self.name}: victims must be None (all-to-one) or name classes")
        if self.victims is not None and self.target in self.victims:
            raise ValueError(f"{self.name}: target {self.target} cannot be a victim class")

    @property
    def default_rate(self) -> float:
        return 0.1

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
            config[key] = list(value) if isinstance(value, tuple) else value
        return config


def sample_attack(name: str, rng: np.random.Generator | int, input_shape: tuple[int, int, int],
                  num_classes: int, **overrides: Any) -> Attack:
    """Draw attack `name`'s random parameters for images of `input_shape` (C, H, W)."""
    cls = ATTACKS.get(name)
    _check_keys(cls, overrides)
    rng = np.random.default_rng(rng)
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    values = {"target": int(rng.integers(num_classes))}
    values.update(cls.sample(rng, input_shape, int(num_classes)))  # type: ignore[arg-type]
    values.update(overrides)
    attack = cls(**values)
    if attack.target >= num_classes or any(v >= num_classes for v in attack.victims or ()):
        raise ValueError(f"{name}: target / victims must lie in 0..{num_classes - 1}")
    return attack


def attack_from_config(config: dict[str, Any]) -> Attack:
    """Rebuild an attack from `Attack.to_config()` (or its JSON round trip)."""
    config = dict(config)
    if "name" not in config:
        raise KeyError(f"attack config has no 'name': {sorted(config)}")
    cls = ATTACKS.get(config.pop("name"))
    _check_keys(cls, config)
    return cls(**config)


def _check_keys(cls: type[Attack], values: dict[str, Any]) -> None:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise TypeError(f"attack {cls.name!r} has no parameter {', '.join(unknown)}; "
                        f"valid: {', '.join(valid)}")
