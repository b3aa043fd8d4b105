"""Manifests: the models a run scans, one `ModelRecord` per row.

    records = read_manifest("s3://bucket/round7/manifest.parquet")   # or .csv .jsonl .yaml
    records = read_manifest("/data/round4-train")                    # a TrojAI round directory
    write_manifest(records, "out/manifest.csv", relative=True)

The format follows the extension (.csv, .jsonl/.ndjson, .parquet/.pq, .yaml/.yml). A directory
is read as a round: its `manifest.*` if it has one, else the id-*/ model folders (directly or
under models/) through `read_round_dir`. Relative URIs inside a manifest resolve against the
manifest's own folder. Every problem raises `ManifestError` naming file, row (1-based data row:
the CSV header, blank JSONL lines and the YAML `models:` key are not counted) and field.
The schema is documented in manifests/README.md.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from xray import models
from xray.io import storage
from xray.io.examples import check_preprocessing
from xray.io.records import MODEL_FORMATS, ModelRecord

log = logging.getLogger(__name__)

FIELDS = tuple(f.name for f in dataclasses.fields(ModelRecord))
REQUIRED = ("model_id", "uri", "format", "architecture", "num_classes", "input_shape")
TAG_PREFIX = "tag."
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
              ".pq": "parquet", ".yaml": "yaml", ".yml": "yaml"}
# When a round directory holds several manifest.* files, the first of these wins.
MANIFEST_PREFERENCE = ("parquet", "jsonl", "csv", "yaml")

PARQUET_SCHEMA = pa.schema([
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("format", pa.string(), nullable=False),
    pa.field("architecture", pa.string(), nullable=False),
    pa.field("num_classes", pa.int64(), nullable=False),
    pa.field("input_shape", pa.list_(pa.int64()), nullable=False),
    pa.field("mean", pa.list_(pa.float64())),
    pa.field("std", pa.list_(pa.float64())),
    pa.field("examples_uri", pa.string()),
    pa.field("poisoned", pa.bool_()),
    pa.field("target", pa.int64()),
    pa.field("attack", pa.string()),
    pa.field("tags", pa.map_(pa.string(), pa.string())),
    pa.field("preprocessing", pa.string()),  # JSON object: its values mix strings and integers
])


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


class _Bad(Exception):
    """A field value problem; the caller adds file, row and field."""


# ---------------------------------------------------------------------------------------------
# Field parsers: accept native values (JSON / YAML / Parquet) and CSV strings alike.

def _is_missing(value: Any) -> bool:
    return (value is None or (isinstance(value, str) and not value.strip())
            or (isinstance(value, float) and math.isnan(value)))


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {value!r}")
    return value.strip()


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Bad(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value.strip())
    raise _Bad(f"expected an integer, got {value!r}")


def _as_bool(value: Any) -> bool:
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
    raise _Bad(f"expected true or false, got {value!r}")


def _json_or(value: Any) -> Any:
    """A string that holds JSON ('[1, 2]', '{"a": 1}') decoded; anything else unchanged."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise _Bad(f"invalid JSON {value!r}: {e.msg}") from None
    return value


def _as_shape(value: Any) -> tuple[int, int, int]:
    hint = "expected C x H x W of positive integers (e.g. '3x32x32' or [3, 32, 32])"
    parsed = _json_or(value)
    if isinstance(parsed, str):
        parsed = parsed.strip().lower().split("x")
    if not isinstance(parsed, (list, tuple)) or len(parsed) != 3:
        raise _Bad(f"{hint}, got {value!r}")
    try:
        shape = tuple(_as_int(v) for v in parsed)
    except _Bad:
        raise _Bad(f"{hint}, got {value!r}") from None
    if any(s <= 0 for s in shape):
        raise _Bad(f"{hint}, got {value!r}")
    return shape  # type: ignore[return-value]


def _as_floats(value: Any) -> tuple[float, ...]:
    hint = "expected a number or a list of numbers (e.g. [0.5, 0.5, 0.5] or '0.5;0.5;0.5')"
    parsed = _json_or(value)
    if isinstance(parsed, str):
        parsed = parsed.split(";")
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        parsed = [parsed]
    if not isinstance(parsed, (list, tuple)) or not parsed:
        raise _Bad(f"{hint}, got {value!r}")
    out = []
    for v in parsed:
        if isinstance(v, bool):
            raise _Bad(f"{hint}, got {value!r}")
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise _Bad(f"{hint}, got {value!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise _Bad(f"{hint}, got {value!r}")
    return tuple(out)


def _as_dict(value: Any) -> dict[str, Any]:
    parsed = _json_or(value)
    if isinstance(parsed, list) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                        for p in parsed):
        parsed = dict(parsed)  # a Parquet map column reads back as (key, value) pairs
    if not isinstance(parsed, dict):
        raise _Bad(f"expected an object (e.g. {{\"round\": \"7\"}}), got {value!r}")
    return parsed


def _as_tags(value: Any) -> dict[str, str]:
    tags = _as_dict(value)
    for k, v in tags.items():
        if isinstance(v, (dict, list)):
            raise _Bad(f"tag {k!r}: expected a plain value, got {v!r}")
    return {str(k): str(v) for k, v in tags.items() if v is not None}


def _as_preprocessing(value: Any) -> dict[str, Any]:
    try:
        return check_preprocessing(_as_dict(value))
    except ValueError as e:
        raise _Bad(str(e)) from None


# ---------------------------------------------------------------------------------------------
# URIs relative to the manifest

def _has_scheme(uri: str) -> bool:
    return "://" in uri


def _parent(uri: str) -> str:
    """The folder holding `uri`; a local path is made absolute so workers elsewhere agree."""
    uri = str(uri).rstrip("/")
    if _has_scheme(uri) and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.dirname(os.path.abspath(uri))


def _resolve(uri: str, base: str | None) -> str:
    if base is None or _has_scheme(uri) or os.path.isabs(uri):
        return uri
    if _has_scheme(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(posixpath.join(rest, uri))
    return os.path.normpath(os.path.join(base, uri))


def _relativise(uri: str | None, base: str) -> str | None:
    if uri is None:
        return None
    sep = "/" if _has_scheme(base) else os.sep
    prefix = base.rstrip(sep) + sep
    if uri.startswith(prefix):
        rel = uri[len(prefix):]
        return rel if sep == "/" else rel.replace(os.sep, "/")
    return uri


# ---------------------------------------------------------------------------------------------
# Rows -> records

_PARSERS = {
    "model_id": _as_str, "uri": _as_str, "format": _as_str, "architecture": _as_str,
    "num_classes": _as_int, "input_shape": _as_shape, "mean": _as_floats, "std": _as_floats,
    "examples_uri": _as_str, "poisoned": _as_bool, "target": _as_int, "attack": _as_str,
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
            raise fail(str(key), _unknown_field("field"))
    values: dict[str, Any] = {}
    for name in FIELDS:
        raw = row.get(name)
        if _is_missing(raw) or (name in ("tags", "preprocessing") and raw in ({}, [])):
            if name in REQUIRED:
                raise fail(name, "missing required field")
            continue
        try:
            values[name] = _PARSERS[name](raw)
        except _Bad as e:
            raise fail(name, str(e)) from None
    tags = dict(values.get("tags", {}))
    for key, raw in row.items():
        if str(key).startswith(TAG_PREFIX) and not _is_missing(raw):
            tags[key[len(TAG_PREFIX):]] = str(raw).strip() if isinstance(raw, str) else str(raw)
    values["tags"] = tags

    if not values["model_id"]:
        raise fail("model_id", "missing required field")
    if values["format"] not in MODEL_FORMATS:
        raise fail("format", f"unknown format {values['format']!r}; expected one of "
                             f"{', '.join(MODEL_FORMATS)}")
    if not _known_architecture(values["architecture"]):
        raise fail("architecture", f"unknown architecture {values['architecture']!r}; see "
                                   "xray.models.available() (in-project nets or torchvision)")
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
            values[name] = _resolve(values[name], base)
    return ModelRecord(**values)


def _unknown_field(what: str) -> str:
    return f"unknown {what}; known: {', '.join(FIELDS)} and {TAG_PREFIX}<name>"


_KNOWN: dict[str, bool] = {}


def _known_architecture(name: str) -> bool:
    if name not in _KNOWN:
        _KNOWN[name] = models.is_known(name)
    return _KNOWN[name]


def _records(rows: Iterable[tuple[int, Mapping[str, Any]]], file: str,
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


# ---------------------------------------------------------------------------------------------
# Formats

def _kind(uri: str) -> str | None:
    name = posixpath.basename(str(uri).rstrip("/")).lower()
    for ext, kind in EXTENSIONS.items():
        if name.endswith(ext):
            return kind
    return None


def _text(data: bytes) -> str:
    return data.decode("utf-8-sig")


def _rows_csv(data: bytes, file: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(_text(data), newline=""))
    for column in reader.fieldnames or []:
        if column not in FIELDS and not column.startswith(TAG_PREFIX):
            raise ManifestError(file, None, column, _unknown_field("column"))
    return [(i, row) for i, row in enumerate(reader, start=1)]


def _rows_jsonl(data: bytes, file: str) -> list[tuple[int, Any]]:
    rows = []
    lines = [line for line in _text(data).splitlines() if line.strip()]
    for i, line in enumerate(lines, start=1):
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ManifestError(file, i, None, f"invalid JSON: {e.msg}") from None
    return rows


def _rows_parquet(data: bytes, file: str) -> list[tuple[int, Any]]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(file, None, None, f"not a readable Parquet file: {e}") from None
    return list(enumerate(table.to_pylist(), start=1))


def _rows_yaml(data: bytes, file: str) -> list[tuple[int, Any]]:
    try:
        doc = yaml.safe_load(_text(data))
    except yaml.YAMLError as e:
        raise ManifestError(file, None, None, f"invalid YAML: {e}") from None
    if isinstance(doc, dict):
        extra = sorted(set(doc) - {"models"})
        if "models" not in doc or extra:
            raise ManifestError(file, None, None, "expected a list of rows or a mapping "
                                f"{{models: [rows]}}; found keys {sorted(doc)}")
        doc = doc["models"]
    if not isinstance(doc, list):
        raise ManifestError(file, None, None,
                            "expected a list of rows or a mapping {models: [rows]}")
    return list(enumerate(doc, start=1))


_READERS = {"csv": _rows_csv, "jsonl": _rows_jsonl, "parquet": _rows_parquet, "yaml": _rows_yaml}


def _csv_cell(name: str, value: Any) -> str:
    if value is None or value == {}:
        return ""
    if name == "input_shape":
        return "x".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _write_csv(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(k, v) for k, v in row.items()})
    return buf.getvalue().encode("utf-8")


def _write_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def _write_parquet(rows: list[dict[str, Any]]) -> bytes:
    rows = [{**row, "preprocessing": json.dumps(row["preprocessing"], sort_keys=True)
             if row["preprocessing"] else None} for row in rows]
    table = pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_yaml(rows: list[dict[str, Any]]) -> bytes:
    text = yaml.safe_dump({"models": rows}, sort_keys=False, default_flow_style=None)
    return text.encode("utf-8")


_WRITERS = {"csv": _write_csv, "jsonl": _write_jsonl, "parquet": _write_parquet,
            "yaml": _write_yaml}


# ---------------------------------------------------------------------------------------------
# Public API

def read_manifest(uri: str, *, check_uris: bool = False) -> list[ModelRecord]:
    """The records of a manifest file or a round directory, checked (see module docstring).

    check_uris: also verify that every model file (field 'uri') and examples folder
    ('examples_uri') exists.
    """
    uri = str(uri)
    kind = _kind(uri)
    if kind is None:
        if not _isdir(uri):
            raise ManifestError(uri, None, None, "unknown manifest type; expected a file ending "
                                f"in {', '.join(EXTENSIONS)} or a round directory")
        names = storage.listdir(uri)
        found = {_kind(n): n for n in names if n.lower().startswith("manifest.") and _kind(n)}
        preferred = [found[k] for k in MANIFEST_PREFERENCE if k in found]
        if preferred:
            return read_manifest(storage.join(uri, preferred[0]), check_uris=check_uris)
        records = read_round_dir(uri)
    else:
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise ManifestError(uri, None, None, "file not found") from None
        records = _records(_READERS[kind](data, uri), uri, _parent(uri))
    if check_uris:
        check_manifest_uris(records, uri)
    return records


def check_manifest_uris(records: list[ModelRecord], file: str = "<manifest>") -> None:
    """Raise ManifestError for the first record whose model file or examples folder is absent."""
    for number, record in enumerate(records, start=1):
        for field in ("uri", "examples_uri"):
            target = getattr(record, field)
            if target is None:
                continue
            try:
                ok = storage.exists(target)
                problem = "does not exist"
            except Exception as e:  # any storage failure is reported against the row
                ok, problem = False, f"cannot be read ({type(e).__name__}: {e})"
            if not ok:
                raise ManifestError(file, number, field, f"{target} {problem}")


def write_manifest(records: Iterable[ModelRecord], uri: str, *, relative: bool = False) -> None:
    """Write records in the format of `uri`'s extension; reading it back gives equal records.

    relative: write URIs below the manifest's folder relative to it, so the folder can be moved
    or copied to object storage as it is.
    """
    uri = str(uri)
    kind = _kind(uri)
    if kind is None:
        raise ManifestError(uri, None, None,
                            f"unknown manifest type; expected one of {', '.join(EXTENSIONS)}")
    rows = []
    base = _parent(uri)
    for record in records:
        row = record.to_row()
        if relative:
            row["uri"] = _relativise(row["uri"], base)
            row["examples_uri"] = _relativise(row["examples_uri"], base)
        rows.append(row)
    storage.atomic_write_bytes(uri, _WRITERS[kind](rows))


def manifest_digest(records: Iterable[ModelRecord]) -> str:
    """sha256 of the canonical rows (sorted by model_id, keys sorted): order-independent."""
    rows = sorted((r.to_row() for r in records), key=lambda row: row["model_id"])
    canonical = json.dumps(rows, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _isdir(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return storage.with_retries(lambda: fs.isdir(path))


# ---------------------------------------------------------------------------------------------
# Round directories: the walker and the TrojAI dialects live in xray.io.trojai; the zoo's own
# config.json keys are read here.

from xray.io.trojai import (  # noqa: E402  (re-exported: the names this module always had)
    CONFIG_FILE, EXAMPLE_DIRS, GROUND_TRUTH_FILE, INPUT_SHAPE as TROJAI_INPUT_SHAPE,
    TROJAI_ARCHITECTURES)
from xray.io import trojai as _trojai  # noqa: E402

TROJAI_PREPROCESSING = _trojai.PREPROCESSING["r2"]
WEIGHT_FORMATS = {".safetensors": "safetensors", ".torchscript.pt": "torchscript",
                  ".ts": "torchscript"}


def read_round_dir(uri: str, *, exclude_errata: bool = True,
                   split: str | None = None) -> list[ModelRecord]:
    """Records for the complete id-*/ folders of a round (those holding config.json; in a
    TrojAI round-1 directory, which has none, those holding model.pt).

    Zoo config.json keys are read here; TrojAI rounds 1-4 (METADATA.csv, r2 upper-case, r3,
    r4 lower-case keys, the round-1 errata) by `xray.io.trojai.read_round`. Always json.load.
    """
    def zoo_row(config, folder, names, truth, file, number):
        return row_from_config(config, folder, names, truth, file=file, number=number)

    return _trojai.read_round(uri, exclude_errata=exclude_errata, split=split, zoo_row=zoo_row)


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in config:
            return config[key]
    return None


def row_from_config(config: Mapping[str, Any], folder: str, names: set[str],
                    ground_truth: bool | None = None, *, file: str = CONFIG_FILE,
                    number: int | None = None) -> dict[str, Any]:
    """A manifest row from a model folder's config.json (zoo, TrojAI r4 or r2 keys).

    Relative paths in the row (weights, examples) are relative to the model folder.
    """
    trojai = "architecture" not in config
    if trojai:  # TrojAI dialects: xray.io.trojai
        try:
            return _trojai.row_from_config(config, folder, names, ground_truth)
        except ValueError as e:
            field, _, message = str(e).partition(": ")
            raise ManifestError(file, number, field if field == "poisoned" else None,
                                message if field == "poisoned" else str(e)) from None
    weights = config.get("weights") or "model.pt"
    fmt = config.get("format") or next(
        (f for ext, f in WEIGHT_FORMATS.items() if weights.endswith(ext)), "pickle")
    architecture = _first(config, "architecture", "model_architecture", "MODEL_ARCHITECTURE")
    if isinstance(architecture, str):
        architecture = TROJAI_ARCHITECTURES.get(architecture.lower(), architecture)
    examples = config.get("examples") or next((d for d in EXAMPLE_DIRS if d in names), None)

    poisoned = _first(config, "poisoned", "POISONED")
    if ground_truth is not None:
        if not _is_missing(poisoned):
            try:
                agrees = _as_bool(poisoned) == ground_truth
            except _Bad:
                agrees = True  # reported as a type error when the row is checked
            if not agrees:
                raise ManifestError(file, number, "poisoned", f"config.json says {poisoned!r} "
                                    f"but {GROUND_TRUTH_FILE} says {int(ground_truth)}")
        poisoned = ground_truth

    target = _first(config, "target", "TRIGGER_TARGET_CLASS")
    attack = _first(config, "attack") if not trojai else _first(config, "TRIGGER_TYPE")
    triggers = config.get("triggers")
    if isinstance(triggers, list) and triggers:
        dicts = [t for t in triggers if isinstance(t, dict)]
        if target is None and dicts:
            target = dicts[0].get("target_class")
        if attack is None:
            kinds = sorted({str(t.get("type") or t.get("trigger_type")) for t in dicts})
            attack = "+".join(kinds) or None
    if trojai and poisoned is False:
        target = attack = None

    return {
        "model_id": config.get("model_id") or folder,
        "uri": weights,
        "format": fmt,
        "architecture": architecture,
        "num_classes": _first(config, "num_classes", "number_classes", "NUMBER_CLASSES"),
        "input_shape": config.get("input_shape") or (TROJAI_INPUT_SHAPE if trojai else None),
        "mean": config.get("mean"),
        "std": config.get("std"),
        "examples_uri": examples,
        "poisoned": poisoned,
        "target": target,
        "attack": attack,
        "tags": config.get("tags") or {},
        "preprocessing": config.get("preprocessing") or (TROJAI_PREPROCESSING if trojai else {}),
    }
