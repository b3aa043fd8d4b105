"""The one JSON cleaner: what stats, events and reports hold, made writable by `json.dumps`.

Imports nothing heavy (no numpy, no torch), so that the TrojAI driver can use it after a
timeout without paying for an import.
"""
from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """`value` with numpy / torch scalars and arrays as Python numbers and lists, tuples as
    lists, keys as strings, NaN as None and +-inf as "inf" / "-inf" (JSON has neither)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy scalar or array, torch tensor
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
