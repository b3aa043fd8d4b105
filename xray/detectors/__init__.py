"""Detectors: a registry by name (`available`, `get`, `build`) over one-file-per-algorithm modules."""
from __future__ import annotations

import dataclasses
from typing import Any

from xray._registry import Registry
from xray.detectors.base import DetectorResult, ScanContext, ScanData, params_hash  # noqa: F401

DETECTORS: Registry[type] = Registry("detector")
register = DETECTORS.register
get = DETECTORS.get
available = DETECTORS.available


def build(name: str, params: dict[str, Any] | None = None, preset: str | None = None) -> Any:
    """An instance of detector `name`; `preset` picks named defaults (e.g. "reference", "small"),
    `params` overrides fields. An unknown key fails naming detector, key and valid keys."""
    cls = get(name)
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    base = cls.Params()
    if preset:
        presets = getattr(cls, "presets", {})
        if preset not in presets:
            raise KeyError(f"detector {name!r} has no preset {preset!r}; presets: "
                           f"{', '.join(sorted(presets)) or 'none'}")
        base = dataclasses.replace(base, **presets[preset])
    params = dict(params or {})
    unknown = sorted(set(params) - fields)
    if unknown:
        raise KeyError(f"detector {name!r} has no parameter {unknown[0]!r}; "
                       f"valid: {', '.join(sorted(fields))}")
    return cls(dataclasses.replace(base, **params))


def _load_builtin() -> None:
    # Import side effect: each module registers its detector. Listed here, one line each.
    from xray.detectors import modelxray  # noqa: F401
    from xray.detectors import mmbd, mntd  # noqa: F401
    from xray.detectors.inversion import nc  # noqa: F401
    from xray.detectors.inversion import abs  # noqa: F401
    from xray.detectors.inversion import karm  # noqa: F401
    from xray.detectors import composed  # noqa: F401  (after the scanners it composes)


_load_builtin()
