"""xray: scan corpora of trained image classifiers for backdoors.

The Python API (xray/api.py), loaded on first use so that `import xray` stays light (no torch,
no Ray):

    summary = xray.scan("demo-out/round", "out", detectors=["mmbd"], preset="small")
    scores = xray.read_scores("out")                         # one row per model x detector
    rows = xray.score(net, (x, y), detectors=["mmbd"])       # one model in memory, no Ray
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "read_scores", "scan", "score"]

_API = ("read_scores", "scan", "score")  # functions of xray.api


def __getattr__(name: str) -> Any:
    if name in _API:
        from xray import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
