"""Where a run's stored URIs point: written absolute, read back against where the output folder
is now. The one place that turns a `runs` row into the files it names.

    row = {..., **manifest_columns(manifest_uri, out_uri)}   # the runner, writing a run
    uri = resolve_manifest(run, out_uri)                     # the manifest, as readable here
    records = run_manifest(run, out_uri)                     # report, explain: its records

A run records its manifest twice: `manifest_uri`, absolute (a local path made absolute, any
other URL as given), and `manifest_relative`, the same manifest relative to the output folder
(None when they are on different filesystems). Read back, the first of these that exists is used:

1. `manifest_relative` against the output folder's current location, when the manifest lies
   inside it (a copied output folder reads its own copy of the round, not the original);
2. `manifest_uri` (for a run written before this module: as typed, relative to the directory
   the scan ran in);
3. `manifest_relative` against the current location when it climbs out of the output folder
   (`../round/manifest.csv`: the round and the output moved together, under one parent);
4. a relative `manifest_uri` of an older run against the output folder and each of its parents
   (the scan ran in one of them, as `xray scan --manifest demo-out/round ... --out demo-out/scan`).

When none exists, `manifest_uri` is returned and reading it fails naming it. A manifest found
through `manifest_relative` at a new place brings its models along: model and examples URIs
under the folder that moved (the output folder, or the parent that `..` reaches) are moved
with it (`rebase`), so a manifest of absolute paths still finds the copied models.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple

import pandas as pd

from xray.io import storage


def manifest_columns(manifest_uri: str, out_uri: str) -> dict[str, str | None]:
    """The `runs` columns naming a run's manifest: manifest_uri (absolute) and
    manifest_relative (relative to the output folder, or None)."""
    return {"manifest_uri": storage.absolute(manifest_uri),
            "manifest_relative": storage.relative(manifest_uri, out_uri)}


class ManifestLocation(NamedTuple):
    """Where a run's manifest is read from; moved: (old folder, new folder) of what moved with
    it, or None when it was found where the run recorded it."""

    uri: str
    moved: tuple[str, str] | None = None


def _get(run: Mapping[str, Any], key: str) -> str | None:
    value = run.get(key)
    return None if value is None or pd.isna(value) else str(value)


def _is_absolute(uri: str) -> bool:
    return "://" in uri or os.path.isabs(uri)


def _strip_tail(uri: str, tail: list[str]) -> str | None:
    """`uri` without its last path components when they are `tail` (else None)."""
    path = uri.replace(os.sep, "/").rstrip("/")
    suffix = "/" + "/".join(tail)
    if not tail:
        return path
    if not path.endswith(suffix):
        return None
    return path[:-len(suffix)] or "/"


def candidates(run: Mapping[str, Any], out_uri: str) -> list[ManifestLocation]:
    """Where the run's manifest may be now, in the order tried (module docstring)."""
    stored = _get(run, "manifest_uri") or ""
    rel = _get(run, "manifest_relative")
    out = storage.absolute(str(out_uri)).rstrip("/")
    found: list[ManifestLocation] = []
    inside, outside = [], []
    if rel:
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        ups = 0
        while ups < len(parts) and parts[ups] == "..":
            ups += 1
        new_anchor = storage.join_normalised(out, "/".join([".."] * ups) or ".")
        old_anchor = _strip_tail(stored, parts[ups:]) if _is_absolute(stored) else None
        here = ManifestLocation(storage.join_normalised(out, rel),
                                (old_anchor, new_anchor) if old_anchor else None)
        (outside if ups else inside).append(here)
    found += inside
    if stored:
        found.append(ManifestLocation(stored))
    found += outside
    if stored and not _is_absolute(stored) and storage.is_local(out):
        folder = out
        while True:
            found.append(ManifestLocation(os.path.normpath(os.path.join(folder, stored))))
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
    unique: dict[str, ManifestLocation] = {}
    for location in found:
        unique.setdefault(location.uri, location)
    return list(unique.values())


def locate_manifest(run: Mapping[str, Any], out_uri: str) -> ManifestLocation:
    """The first of `candidates` that exists; else the stored manifest_uri (reading it then
    fails naming it)."""
    options = candidates(run, out_uri)
    for location in options:
        try:
            if storage.exists(location.uri):
                return location
        except Exception as err:  # a store refusing or unreachable: try the next place
            if not (isinstance(err, OSError) or storage.is_transient(err)):
                raise
    return ManifestLocation(_get(run, "manifest_uri") or "")


def resolve_manifest(run: Mapping[str, Any], out_uri: str) -> str:
    """The URI the run's manifest reads from here (`locate_manifest`)."""
    return locate_manifest(run, out_uri).uri


def _moved(uri: str | None, old: str, new: str) -> str | None:
    if uri is None:
        return None
    for sep in ("/", os.sep):
        prefix = old.rstrip(sep) + sep
        if uri.startswith(prefix):
            return storage.join_normalised(new, uri[len(prefix):].replace(os.sep, "/"))
    return uri


def rebase(records: list[Any], moved: tuple[str, str] | None) -> list[Any]:
    """Records whose model / examples URIs under moved[0] now point under moved[1]."""
    if moved is None or moved[0] == moved[1]:
        return records
    old, new = moved
    return [dataclasses.replace(r, uri=_moved(r.uri, old, new),
                                examples_uri=_moved(r.examples_uri, old, new)) for r in records]


def read_located(location: ManifestLocation) -> list[Any]:
    """The ModelRecords of the manifest at `location`, their URIs moved with it (`rebase`).
    Raises what read_manifest raises."""
    # local: xray.io.manifest imports torch (through xray.io.examples); tables need neither
    from xray.io.manifest import read_manifest

    return rebase(read_manifest(location.uri), location.moved)


def run_manifest(run: Mapping[str, Any], out_uri: str) -> list[Any]:
    """The ModelRecords of a run's manifest, read from where it is now (`locate_manifest`)."""
    return read_located(locate_manifest(run, out_uri))
