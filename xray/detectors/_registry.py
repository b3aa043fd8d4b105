"""The detector registry (the timm pattern): each detector module files its class by name.

    @register("nc")
    class NeuralCleanse: ...

    available("*+exray"); get("nc"); build("nc", {"steps": 50}, preset="small")
"""
from __future__ import annotations

import dataclasses
from typing import Any

from xray._registry import Registry

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
