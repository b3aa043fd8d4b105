"""fsspec-based storage: local paths, file://, memory:// and s3:// are all just URIs.

Every write that a reader could observe goes through `atomic_write_bytes` (write to a temporary
name beside the target, then rename / copy once complete), so a reader never sees half a file.
S3 endpoint and credentials come from the usual environment (AWS_* variables, ~/.aws) or from
`XRAY_S3_ENDPOINT_URL`, which tests point at a loopback server.
"""
from __future__ import annotations

import os
import posixpath
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")


def _storage_options(uri: str) -> dict[str, Any]:
    if uri.startswith("s3://"):
        endpoint = os.environ.get("XRAY_S3_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any URI fsspec understands."""
    return url_to_fs(str(uri), **_storage_options(str(uri)))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without disturbing its scheme."""
    uri = str(uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def is_local(uri: str) -> bool:
    uri = str(uri)
    return "://" not in uri or uri.startswith("file://")


def with_retries(fn: Callable[[], T], *, attempts: int = 4, first_delay: float = 0.2) -> T:
    """Retry transient storage errors (OSError / connection errors) with exponential backoff."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except (OSError, ConnectionError, TimeoutError):
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.exists(path))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Write `data` so that `uri` appears whole or not at all.

    Local / memory filesystems: write a hidden temporary file beside the target and rename it.
    Object stores: a single PUT is already atomic (S3 never shows a partial object).
    """
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if not is_local(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if uri.startswith("s3://"):
        with_retries(lambda: fs.pipe_file(path, data))
        return
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def write_text(uri: str, text: str) -> None:
    atomic_write_bytes(uri, text.encode("utf-8"))


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def listdir(uri: str) -> list[str]:
    """Base names of the entries directly under `uri` (empty when it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
