"""The one number formatter of the reducer's text and HTML outputs (summary table, report,
comparison).

    fmt(0.12345) == "0.123"; fmt(12345.6) == "1.23e+04"; fmt(None) == fmt(nan) == "-"

Missing (None, pd.NA, NaN) is "-", never a number; booleans and integers as they are; a float
with `digits` decimals, or `digits` significant digits from 1e4 up (so a large threshold or
runtime keeps its column narrow); anything else as str().
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from xray.textclip import MAX_ERROR_CHARS, clip_text

MISSING = "-"


def is_missing(value: Any) -> bool:
    """None, pandas' NA or a float NaN: a table cell without a value."""
    return (value is None or value is pd.NA
            or (isinstance(value, (float, np.floating)) and math.isnan(value)))


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or x is pd.NA or x is pd.NaT:
        return MISSING
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if math.isnan(x):
            return MISSING
        return f"{float(x):.{digits}g}" if abs(x) >= 1e4 else f"{float(x):.{digits}f}"
    return str(x)


def first_line(text: Any, limit: int = MAX_ERROR_CHARS) -> str:
    """What failed, from an error text: scanning.py writes "Type: message" then a traceback, so the
    first non-empty line: whole up to `limit` characters, beyond that cut at a sentence, clause or
    word end (xray.textclip.clip_text); "" when there is no text."""
    if not isinstance(text, str):
        return ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return clip_text(lines[0], limit) if lines else ""
