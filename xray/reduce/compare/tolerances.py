"""How much worse B may be than A: `Tolerances` (the defaults), per-detector overrides
(`ToleranceSet`) and the tolerances file (YAML / JSON)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from xray.io import storage


class CompareUsageError(ValueError):
    """A side that cannot be read or a malformed tolerances file (the CLI's exit 2)."""


@dataclass(frozen=True)
class Tolerances:
    """How much worse B may be than A before it is a regression (see the module docstring)."""

    roc_auc: float = 0.05            # max drop
    accuracy: float = 0.05           # max drop
    tpr_at_fpr: float = 0.10         # max drop
    ce: float = 0.10                 # max rise
    runtime_ratio: float = 1.5       # max p50(B) / p50(A)
    runtime_min_seconds: float = 1.0  # p50 rises below this are never a regression
    flipped_to_wrong: int = 0        # labelled models: right in A, wrong in B
    new_failures: int = 0            # ok score in A, none in B
    missing_models: int = 0          # models of A absent from B

    def for_detector(self, overrides: Mapping[str, Mapping[str, Any]], detector: str
                     ) -> "Tolerances":
        return dataclasses.replace(self, **dict(overrides.get(detector, {})))


@dataclass(frozen=True)
class ToleranceSet:
    default: Tolerances = Tolerances()
    detectors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def get(self, detector: str) -> Tolerances:
        return self.default.for_detector(self.detectors, detector)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.default),
                "detectors": {k: dict(v) for k, v in self.detectors.items()}}


def _check_keys(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    valid = {f.name: f.type for f in dataclasses.fields(Tolerances)}
    out = {}
    for key, value in values.items():
        if key not in valid:
            raise CompareUsageError(f"{where}: unknown tolerance {key!r}; valid: "
                                    f"{', '.join(sorted(valid))}")
        try:
            out[key] = int(value) if valid[key] == "int" else float(value)
        except (TypeError, ValueError):
            raise CompareUsageError(f"{where}: tolerance {key!r} must be a number, got "
                                    f"{value!r}") from None
    return out


def parse_tolerances(raw: Mapping[str, Any] | None, source: str = "<tolerances>") -> ToleranceSet:
    raw = dict(raw or {})
    per_detector = raw.pop("detectors", None) or {}
    if not isinstance(per_detector, Mapping):
        raise CompareUsageError(f"{source}: 'detectors' must map detector names to tolerances")
    default = Tolerances(**_check_keys(raw, source))
    detectors = {str(name): _check_keys(values or {}, f"{source}: detectors.{name}")
                 for name, values in per_detector.items()}
    return ToleranceSet(default, detectors)


def load_tolerances(uri: str | None) -> ToleranceSet:
    """Tolerances from a YAML / JSON file (None: the defaults)."""
    if not uri:
        return ToleranceSet()
    try:
        raw = yaml.safe_load(storage.read_text(uri))
    except FileNotFoundError:
        raise CompareUsageError(f"tolerances file {uri}: not found") from None
    except yaml.YAMLError as err:
        raise CompareUsageError(f"tolerances file {uri}: not YAML / JSON: {err}") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise CompareUsageError(f"tolerances file {uri}: expected a mapping of tolerances")
    return parse_tolerances(raw, source=uri)
