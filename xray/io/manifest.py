"""Manifests: the models a run scans, one `ModelRecord` per row; the readers and writers.

    records = read_manifest("s3://bucket/round7/manifest.parquet")   # or .csv .jsonl .yaml
    records = read_manifest("/data/round4-train")                    # a TrojAI round directory
    write_manifest(records, "out/manifest.csv", relative=True)

The format follows the extension (.csv, .jsonl/.ndjson, .parquet/.pq, .yaml/.yml). A directory
is read as a round: its `manifest.*` if it has one, else the id-*/ model folders (directly or
under models/) through `read_round_dir`. Relative URIs inside a manifest resolve against the
manifest's own folder. Every problem raises `ManifestError` naming file, row (1-based data row:
the CSV header, blank JSONL lines and the YAML `models:` key are not counted) and field; the
row rules themselves are xray.io.rows (`record_from_row`), shared with the TrojAI round reader
(xray.io.trojai). The schema is documented in manifests/README.md.

A corpus may be hostile, so a manifest with no rows (0 bytes, a CSV header alone, an empty
list), a file that is not what its extension says (binary bytes in a .csv, anything but Parquet
in a .parquet) and a round directory without a complete model folder are errors naming the file;
`read_manifest(uri, root=...)` also confines every model and examples URI to one folder
(`check_manifest_root`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from xray.io import storage
from xray.io import trojai as _trojai
from xray.io.records import ModelRecord
from xray.io.rows import (FIELDS, TAG_PREFIX, ManifestError, has_scheme, record_from_row,
                          records_from_rows, unknown_field)
from xray.io.trojai import zoo_row_from_config as row_from_config

# Importable from here as before: the row rules (xray.io.rows) and the zoo dialect
# (xray.io.trojai.zoo_row_from_config, once this module's row_from_config) live beside it.
__all__ = ["FIELDS", "TAG_PREFIX", "ManifestError", "record_from_row", "read_manifest",
           "read_round_dir", "row_from_config", "write_manifest", "check_manifest_uris",
           "check_manifest_root", "manifest_digest"]

log = logging.getLogger(__name__)

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


def _parent(uri: str) -> str:
    """The folder holding `uri`; a local path is made absolute so workers elsewhere agree."""
    uri = str(uri).rstrip("/")
    if has_scheme(uri) and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.dirname(os.path.abspath(uri))


def _relativise(uri: str | None, base: str) -> str | None:
    if uri is None:
        return None
    sep = "/" if has_scheme(base) else os.sep
    prefix = base.rstrip(sep) + sep
    if uri.startswith(prefix):
        rel = uri[len(prefix):]
        return rel if sep == "/" else rel.replace(os.sep, "/")
    return uri


# ---------------------------------------------------------------------------------------------
# Formats

def _kind(uri: str) -> str | None:
    name = posixpath.basename(str(uri).rstrip("/")).lower()
    for ext, kind in EXTENSIONS.items():
        if name.endswith(ext):
            return kind
    return None


def _empty(file: str, what: str = "the manifest is empty (no rows)") -> ManifestError:
    # An empty manifest is a mistake (a failed export, the wrong file), never "scan nothing".
    return ManifestError(file, None, None, what)


def _text(data: bytes, file: str, kind: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # a binary file under a text name: say what was expected
        raise ManifestError(file, None, None, f"not a UTF-8 text {kind} file (byte "
                            f"0x{data[e.start]:02x} at offset {e.start}); expected a manifest "
                            f"in {kind}") from None


def _rows_csv(data: bytes, file: str) -> list[tuple[int, dict[str, Any]]]:
    text = _text(data, file, "CSV")
    if not text.strip():
        raise _empty(file)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        for column in reader.fieldnames or []:
            if column not in FIELDS and not column.startswith(TAG_PREFIX):
                raise ManifestError(file, None, column, unknown_field("column"))
        for row in reader:
            rows.append((len(rows) + 1, row))
    except csv.Error as e:  # e.g. a cell over the csv module's field size limit
        row_number = len(rows) + 1 if reader.line_num > 1 else None  # None: the header
        raise ManifestError(file, row_number, None, f"invalid CSV: {e}") from None
    if not rows:
        raise _empty(file, "the manifest has a header but no rows")
    return rows


def _rows_jsonl(data: bytes, file: str) -> list[tuple[int, Any]]:
    rows = []
    lines = [line for line in _text(data, file, "JSONL").splitlines() if line.strip()]
    for i, line in enumerate(lines, start=1):
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ManifestError(file, i, None, f"invalid JSON: {e.msg}") from None
        except RecursionError:  # "[[[[..." a million deep
            raise ManifestError(file, i, None, "invalid JSON: nested too deeply") from None
    if not rows:
        raise _empty(file)
    return rows


PARQUET_MAGIC = b"PAR1"  # a Parquet file starts and ends with it


def _rows_parquet(data: bytes, file: str) -> list[tuple[int, Any]]:
    if not data:
        raise _empty(file)
    if not (data.startswith(PARQUET_MAGIC) and data.endswith(PARQUET_MAGIC)):
        raise ManifestError(file, None, None, "not a Parquet file (it does not start and end "
                            "with the Parquet magic bytes PAR1); expected a manifest in Parquet")
    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(file, None, None, f"not a readable Parquet file: {e}") from None
    if not rows:
        raise _empty(file, "the manifest has columns but no rows")
    return list(enumerate(rows, start=1))


def _rows_yaml(data: bytes, file: str) -> list[tuple[int, Any]]:
    text = _text(data, file, "YAML")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError(file, None, None, f"invalid YAML: {e}") from None
    except RecursionError:
        raise ManifestError(file, None, None, "invalid YAML: nested too deeply") from None
    if doc is None:  # nothing but blanks and comments
        raise _empty(file)
    if isinstance(doc, dict):
        extra = set(doc) - {"models"}
        if "models" not in doc or extra:
            raise ManifestError(file, None, None, "expected a list of rows or a mapping "
                                f"{{models: [rows]}}; found keys {sorted(map(str, doc))}")
        doc = doc["models"]
    if doc is None or doc == []:
        raise _empty(file, "the manifest has no rows (an empty list)")
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

def read_manifest(uri: str, *, check_uris: bool = False,
                  root: str | os.PathLike[str] | None = None) -> list[ModelRecord]:
    """The records of a manifest file or a round directory, checked (see module docstring).

    check_uris: also verify that every model file (field 'uri') and examples folder
    ('examples_uri') exists.
    root: a folder (local path or URI) every model file and examples folder must lie inside,
    `..` and (local) symlinks resolved; checked before anything is probed (`check_manifest_root`).
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
            return read_manifest(storage.join(uri, preferred[0]), check_uris=check_uris,
                                 root=root)
        records = read_round_dir(uri)
        if not records:  # id-*/ folders, none complete (or all round-1 errata)
            raise ManifestError(uri, None, None, "the round directory has no complete model "
                                "folder (an id-*/ folder with config.json, or model.pt in a "
                                "round-1 layout); nothing to scan")
    else:
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise ManifestError(uri, None, None, "file not found") from None
        except IsADirectoryError:
            raise ManifestError(uri, None, None, "a directory, not a manifest file") from None
        records = records_from_rows(_READERS[kind](data, uri), uri, _parent(uri))
    if root is not None:
        check_manifest_root(records, root, uri)
    if check_uris:
        check_manifest_uris(records, uri)
    return records


def check_manifest_root(records: list[ModelRecord], root: str | os.PathLike[str],
                        file: str = "<manifest>") -> None:
    """Raise ManifestError for the first record whose model file ('uri') or examples folder
    ('examples_uri') is not inside `root`: a hostile manifest may name ../../etc/passwd or
    /etc/shadow, which a worker would otherwise read. Local paths are compared after
    os.path.realpath (`..` and symlinks resolved, so a link inside root pointing out is caught
    too); URIs (s3://, memory://) after normalising `..`, and only within the root's own scheme.
    """
    def normal(target: str) -> tuple[str, str]:  # (scheme, normalised path)
        if storage.is_local(target):
            path = target[len("file://"):] if target.startswith("file://") else target
            return "", os.path.realpath(path)
        scheme, rest = target.split("://", 1)
        return scheme.lower(), posixpath.normpath("/" + rest)

    root = str(root)
    root_scheme, root_path = normal(root)
    inside = root_path.rstrip("/" + os.sep) + (os.sep if root_scheme == "" else "/")
    for number, record in enumerate(records, start=1):
        for field in ("uri", "examples_uri"):
            target = getattr(record, field)
            if target is None:
                continue
            scheme, path = normal(target)
            if scheme != root_scheme or not (path == root_path or path.startswith(inside)):
                raise ManifestError(file, number, field,
                                    f"{target} is outside the allowed root {root}")


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
# Round directories: the walker and every config.json dialect (the zoo's, TrojAI's) live in
# xray.io.trojai.

def read_round_dir(uri: str, *, exclude_errata: bool = True,
                   split: str | None = None) -> list[ModelRecord]:
    """Records for the complete id-*/ folders of a round (those holding config.json; in a
    TrojAI round-1 directory, which has none, those holding model.pt): `xray.io.trojai.read_round`
    (the zoo's own config.json keys, TrojAI rounds 1-4: METADATA.csv, r2 upper-case, r3, r4
    lower-case keys, the round-1 errata). Always json.load.
    """
    return _trojai.read_round(uri, exclude_errata=exclude_errata, split=split)
