"""Manifest rows -> checked `ModelRecord`s: the field parsers and the row rules.

    record = record_from_row({"model_id": "m0", "uri": "m0.safetensors", ...},
                             file="manifest.csv", row_number=1, base="/data/round7")

Rows come from any reader (xray.io.manifest: CSV, JSONL, Parquet, YAML; xray.io.trojai: round
directories) as native values or CSV strings alike. Every problem raises `ManifestError` naming
file, row (1-based data row) and field. The schema is documented in manifests/README.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import re
from typing import Any, Iterable, Mapping

from xray import models
from xray.io.examples import check_preprocessing
from xray.io.records import MODEL_FORMATS, ModelRecord

FIELDS = tuple(f.name for f in dataclasses.fields(ModelRecord))
REQUIRED = ("model_id", "uri", "format", "architecture", "num_classes", "input_shape")
TAG_PREFIX = "tag."


class ManifestError(ValueError):
    """A manifest problem located by file, 1-based data row and field (row/field may be None)."""

    def __init__(self, file: str, row: int | None, field: str | None, message: str) -> None:
        super().__init__(file, row, field, message)
        self.file, self.row, self.field, self.message = file, row, field, message

    def __str__(self) -> str:
        where = str(self.file)
        if self.row is not None:
            where += f" row {self.row}"
        if self.field is not None:
            where += f" field {self.field!r}"
        return f"{where}: {self.message}"


class BadValue(Exception):
    """A field value problem; the caller adds file, row and field."""


# ---------------------------------------------------------------------------------------------
# Field parsers: accept native values (JSON / YAML / Parquet) and CSV strings alike.

def is_missing(value: Any) -> bool:
    return (value is None or (isinstance(value, str) and not value.strip())
            or (isinstance(value, float) and math.isnan(value)))


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise BadValue(f"expected a string, got {value!r}")
    return value.strip()


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise BadValue(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value.strip())
    raise BadValue(f"expected an integer, got {value!r}")


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
    raise BadValue(f"expected true or false, got {value!r}")


def _json_or(value: Any) -> Any:
    """A string that holds JSON ('[1, 2]', '{"a": 1}') decoded; anything else unchanged."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadValue(f"invalid JSON {value!r}: {e.msg}") from None
    return value


def _as_shape(value: Any) -> tuple[int, int, int]:
    hint = "expected C x H x W of positive integers (e.g. '3x32x32' or [3, 32, 32])"
    parsed = _json_or(value)
    if isinstance(parsed, str):
        parsed = parsed.strip().lower().split("x")
    if not isinstance(parsed, (list, tuple)) or len(parsed) != 3:
        raise BadValue(f"{hint}, got {value!r}")
    try:
        shape = tuple(_as_int(v) for v in parsed)
    except BadValue:
        raise BadValue(f"{hint}, got {value!r}") from None
    if any(s <= 0 for s in shape):
        raise BadValue(f"{hint}, got {value!r}")
    return shape  # type: ignore[return-value]


def _as_floats(value: Any) -> tuple[float, ...]:
    hint = "expected a number or a list of numbers (e.g. [0.5, 0.5, 0.5] or '0.5;0.5;0.5')"
    parsed = _json_or(value)
    if isinstance(parsed, str):
        parsed = parsed.split(";")
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        parsed = [parsed]
    if not isinstance(parsed, (list, tuple)) or not parsed:
        raise BadValue(f"{hint}, got {value!r}")
    out = []
    for v in parsed:
        if isinstance(v, bool):
            raise BadValue(f"{hint}, got {value!r}")
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise BadValue(f"{hint}, got {value!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise BadValue(f"{hint}, got {value!r}")
    return tuple(out)


def _as_dict(value: Any) -> dict[str, Any]:
    parsed = _json_or(value)
    if isinstance(parsed, list) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                        for p in parsed):
        parsed = dict(parsed)  # a Parquet map column reads back as (key, value) pairs
    if not isinstance(parsed, dict):
        raise BadValue(f"expected an object (e.g. {{\"round\": \"7\"}}), got {value!r}")
    return parsed


def _as_tags(value: Any) -> dict[str, str]:
    tags = _as_dict(value)
    for k, v in tags.items():
        if isinstance(v, (dict, list)):
            raise BadValue(f"tag {k!r}: expected a plain value, got {v!r}")
    return {str(k): str(v) for k, v in tags.items() if v is not None}


def _as_preprocessing(value: Any) -> dict[str, Any]:
    try:
        return check_preprocessing(_as_dict(value))
    except ValueError as e:
        raise BadValue(str(e)) from None


# ---------------------------------------------------------------------------------------------
# URIs relative to the manifest

def has_scheme(uri: str) -> bool:
    return "://" in uri


def resolve_uri(uri: str, base: str | None) -> str:
    if base is None or has_scheme(uri) or os.path.isabs(uri):
        return uri
    if has_scheme(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(posixpath.join(rest, uri))
    return os.path.normpath(os.path.join(base, uri))


# ---------------------------------------------------------------------------------------------
# Rows -> records

_PARSERS = {
    "model_id": _as_str, "uri": _as_str, "format": _as_str, "architecture": _as_str,
    "num_classes": _as_int, "input_shape": _as_shape, "mean": _as_floats, "std": _as_floats,
    "examples_uri": _as_str, "poisoned": as_bool, "target": _as_int, "attack": _as_str,
    "tags": _as_tags, "preprocessing": _as_preprocessing,
}


def record_from_row(row: Mapping[str, Any], *, file: str, row_number: int | None,
                    base: str | None = None) -> ModelRecord:
    """One manifest row (native values or CSV strings) as a checked `ModelRecord`.

    `base` is the folder that relative `uri` / `examples_uri` values resolve against.
    """
    def fail(field: str | None, message: str) -> ManifestError:
        return ManifestError(file, row_number, field, message)

    for key in row:
        if key is None:
            raise fail(None, "the row has more cells than the header has columns")
        if key not in FIELDS and not str(key).startswith(TAG_PREFIX):
            raise fail(str(key), unknown_field("field"))
    values: dict[str, Any] = {}
    for name in FIELDS:
        raw = row.get(name)
        if is_missing(raw) or (name in ("tags", "preprocessing") and raw in ({}, [])):
            if name in REQUIRED:
                raise fail(name, "missing required field")
            continue
        try:
            values[name] = _PARSERS[name](raw)
        except BadValue as e:
            raise fail(name, str(e)) from None
    tags = dict(values.get("tags", {}))
    for key, raw in row.items():
        if str(key).startswith(TAG_PREFIX) and not is_missing(raw):
            tags[key[len(TAG_PREFIX):]] = str(raw).strip() if isinstance(raw, str) else str(raw)
    values["tags"] = tags

    if not values["model_id"]:
        raise fail("model_id", "missing required field")
    if values["format"] not in MODEL_FORMATS:
        raise fail("format", f"unknown format {values['format']!r}; expected one of "
                             f"{', '.join(MODEL_FORMATS)}")
    problem = _architecture_problem(values["architecture"])
    if problem:
        raise fail("architecture", f"{problem}; see xray.models.available()")
    if values["num_classes"] <= 0:
        raise fail("num_classes", f"expected a positive class count, got {values['num_classes']}")
    channels = values["input_shape"][0]
    for name in ("mean", "std"):
        if name in values and len(values[name]) not in (1, channels):
            raise fail(name, f"expected 1 or {channels} values (one per channel), "
                             f"got {len(values[name])}")
    if "std" in values and any(s <= 0 for s in values["std"]):
        raise fail("std", f"expected positive values, got {list(values['std'])}")
    target = values.get("target")
    if target is not None and not 0 <= target < values["num_classes"]:
        raise fail("target", f"expected a class in [0, {values['num_classes']}), got {target}")
    for name in ("uri", "examples_uri"):
        if name in values:
            values[name] = resolve_uri(values[name], base)
    return ModelRecord(**values)


def unknown_field(what: str) -> str:
    return f"unknown {what}; known: {', '.join(FIELDS)} and {TAG_PREFIX}<name>"


_ARCHITECTURE_PROBLEMS: dict[str, str | None] = {}


def _architecture_problem(name: str) -> str | None:
    """Why `name` is no architecture (unknown; a timm: name without timm), or None; cached."""
    if name not in _ARCHITECTURE_PROBLEMS:
        _ARCHITECTURE_PROBLEMS[name] = models.unknown_reason(name)
    return _ARCHITECTURE_PROBLEMS[name]


def records_from_rows(rows: Iterable[tuple[int, Mapping[str, Any]]], file: str,
             base: str | None) -> list[ModelRecord]:
    records: list[ModelRecord] = []
    first_row: dict[str, int] = {}
    for number, row in rows:
        if not isinstance(row, Mapping):
            raise ManifestError(file, number, None, f"expected an object, got {row!r}")
        record = record_from_row(row, file=file, row_number=number, base=base)
        if record.model_id in first_row:
            raise ManifestError(file, number, "model_id",
                                f"duplicate model_id {record.model_id!r} (also in row "
                                f"{first_row[record.model_id]})")
        first_row[record.model_id] = number
        records.append(record)
    return records
