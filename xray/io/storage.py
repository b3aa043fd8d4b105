"""fsspec-based storage: local paths, file://, memory:// and s3:// are all just URIs.

Every write that a reader could observe goes through `atomic_write_bytes` (write to a temporary
name beside the target, then rename / copy once complete), so a reader never sees half a file.
S3 endpoint and credentials come from the usual environment (AWS_* variables, ~/.aws) or from
`XRAY_S3_ENDPOINT_URL`, which tests point at a loopback server.
"""
from __future__ import annotations

import errno
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


def absolute(uri: str) -> str:
    """`uri` as it reads from any working directory: a local path made absolute (normalised,
    `~` left alone); a URL (`file://`, `s3://`, `memory://`, ...) as it is."""
    uri = str(uri)
    return uri if "://" in uri else os.path.abspath(uri)


def _split(uri: str) -> tuple[str, str]:
    """(scheme, path): scheme "" for a local path or a file:// URL (its path)."""
    if uri.startswith("file://"):
        return "", uri[len("file://"):]
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme, rest
    return "", uri


def relative(uri: str, base: str) -> str | None:
    """`uri` relative to the folder `base` (POSIX separators, `..` where it lies outside), or
    None when they are not on one filesystem (different schemes, or S3 buckets)."""
    (scheme, path), (base_scheme, base_path) = _split(absolute(uri)), _split(absolute(base))
    if scheme != base_scheme:
        return None
    if not scheme:
        try:
            rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base_path))
        except ValueError:  # another drive (Windows)
            return None
        return rel.replace(os.sep, "/")
    path, base_path = path.strip("/"), base_path.strip("/")
    if path.split("/", 1)[0] != base_path.split("/", 1)[0]:  # another bucket
        return None
    return posixpath.relpath(path, base_path)


def join_normalised(base: str, rel: str) -> str:
    """`rel` (POSIX separators, may hold `..`) resolved against the folder `base`."""
    base = str(base)
    if "://" in base:
        scheme, rest = base.split("://", 1)
        lead = "/" if rest.startswith("/") else ""
        return f"{scheme}://{lead}" + posixpath.normpath(posixpath.join(rest, rel)).lstrip("/")
    return os.path.normpath(os.path.join(base, *rel.split("/")))


# Errors that say the answer will not change on a retry.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                    FileExistsError)
# botocore / aiohttp failures of the connection itself (their classes are not all OSErrors):
# matched by name so this module needs neither library.
TRANSIENT_ERROR_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                         "ConnectionClosedError", "ClientConnectorError",
                         "ServerDisconnectedError", "ClientOSError", "ProxyConnectionError"}


# OSError numbers of a failure that may pass: the network, and what s3fs raises for 5xx and
# throttling answers (EBUSY for SlowDown / ServiceUnavailable, EREMOTEIO or EIO for 500s).
TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE,
                    errno.EAGAIN, errno.EBUSY, errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO)}


def is_transient(err: BaseException) -> bool:
    """Whether `err` is a storage failure that may pass (connection refused or reset, timeouts,
    5xx / throttling answers), not an answer about the file. An OSError without such a number
    (PIL's "cannot identify image file", a corrupt archive) is an answer: not transient."""
    if isinstance(err, PERMANENT_ERRORS):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS:
        return True
    return any(cls.__name__ in TRANSIENT_ERROR_NAMES for cls in type(err).__mro__)


ATTEMPTS_ENV = "XRAY_STORAGE_ATTEMPTS"


def with_retries(fn: Callable[[], T], *, attempts: int | None = None,
                 first_delay: float = 0.5) -> T:
    """Retry transient storage errors (`is_transient`) with exponential backoff: 5 attempts over
    about 7.5 s by default (XRAY_STORAGE_ATTEMPTS overrides the count), on top of the S3
    client's own retries; then the last error is raised."""
    attempts = attempts or int(os.environ.get(ATTEMPTS_ENV, "5"))
    delay = first_delay
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err) or attempt == attempts - 1:
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
        with_retries(lambda: fs.makedirs(parent, exist_ok=True))
    if uri.startswith("s3://"):
        with_retries(lambda: fs.pipe_file(path, data))
        return
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with_retries(lambda: fs.pipe_file(tmp, data))
    with_retries(lambda: fs.mv(tmp, path))


def write_text(uri: str, text: str) -> None:
    atomic_write_bytes(uri, text.encode("utf-8"))


def remove(uri: str) -> None:
    """Delete the file at `uri`; nothing to do when it does not exist."""
    fs, path = filesystem(uri)
    if with_retries(lambda: fs.exists(path)):
        with_retries(lambda: fs.rm_file(path))


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    with_retries(lambda: fs.makedirs(path, exist_ok=True))


def listdir(uri: str) -> list[str]:
    """Base names of the entries directly under `uri` (empty when it does not exist), as the
    store holds them now: other processes write there too (zoo build workers, other drivers),
    so a listing this process cached earlier (s3fs keeps one per prefix) is dropped first."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    if not with_retries(lambda: fs.exists(path)):
        return []
    return sorted(posixpath.basename(p.rstrip("/"))
                  for p in with_retries(lambda: fs.ls(path, detail=False)))
