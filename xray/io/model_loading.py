"""Load a model file safely and hand it back taking pixel-space [0, 1] input.

    net = load_model(record)                     # Normalized(net) in eval mode on `device`
    save_model(trained, "out/m0.safetensors", "safetensors")

Formats (record.format):
  safetensors  tensors only (safetensors.torch); the architecture comes from the record
  state_dict   torch.load(weights_only=True): a bare state dict, a DataParallel `module.`
               prefix, or a checkpoint dict holding it under 'state_dict' / 'model_state_dict' /
               'model'
  torchscript  torch.jit.load (no Python code runs)
  pickle       a whole-module torch.save: unpickling runs arbitrary code, so it is opened only
               with allow_pickle=True (the CLI's --allow-pickle) and never otherwise read at all
Every read goes through fsspec (xray.io.storage), so s3:// URIs work like local paths.

A corpus may be hostile: before a byte is read (to load or to fingerprint), the file must be a
non-empty regular file (not a device such as /dev/zero, a FIFO or a directory; local symlinks
are followed) of at most MAX_MODEL_BYTES (4 GiB), a cap the environment variable
XRAY_MAX_MODEL_BYTES overrides (a whole number of bytes); anything else is a ModelLoadError
naming the file and why (`check_model_file`).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import stat
import warnings
from typing import Any, Mapping, Sequence

import safetensors.torch
import torch
import torch.nn as nn

from xray import models
from xray.models.normalize import Normalized
from xray.io import storage
from xray.io.records import MODEL_FORMATS, ModelRecord
from xray.textclip import clip_text

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
DATAPARALLEL_PREFIX = "module."
MAX_MODEL_BYTES = 4 * 1024**3  # the largest TrojAI / torchvision classifiers are well under 1 GiB
MAX_MODEL_BYTES_ENV = "XRAY_MAX_MODEL_BYTES"


@contextlib.contextmanager
def _quiet_torchscript():
    """TorchScript is one of the formats we read; torch's deprecation notice is not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


class ModelLoadError(ValueError):
    """A model file that cannot be turned into the record's network."""


class PickleNotAllowedError(ModelLoadError):
    """A whole-module pickle was asked for without the allow_pickle opt-in."""


def _pickle_refused(uri: str) -> PickleNotAllowedError:
    return PickleNotAllowedError(
        f"{uri} is a whole-module pickle: loading it runs arbitrary code from the file. "
        "It is loaded only with allow_pickle=True (command line: --allow-pickle), "
        "for a corpus you trust.")


def _check_format(fmt: str) -> None:
    if fmt not in MODEL_FORMATS:
        raise ModelLoadError(f"unknown model format {fmt!r}; expected one of "
                             f"{', '.join(MODEL_FORMATS)}")


def max_model_bytes() -> int:
    """The model size cap: XRAY_MAX_MODEL_BYTES when set (read on every call, so a worker sees
    its own environment), else MAX_MODEL_BYTES."""
    raw = os.environ.get(MAX_MODEL_BYTES_ENV, "").strip()
    if not raw:
        return MAX_MODEL_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_MODEL_BYTES_ENV}={raw!r}: expected a positive whole number of "
                         f"bytes (default {MAX_MODEL_BYTES})")
    return value


def _size_text(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _too_large(uri: str, what: str, limit: int) -> ModelLoadError:
    return ModelLoadError(f"{uri}: {what} is over the {_size_text(limit)} model size cap "
                          f"({MAX_MODEL_BYTES_ENV}); refused")


_FILE_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
               (stat.S_ISSOCK, "socket"))


def check_model_file(uri: str) -> int | None:
    """The size in bytes of the model file at `uri` (None where the store does not say), after
    checking that it may be read: a non-empty regular file (reading /dev/zero or a FIFO never
    ends) of at most `max_model_bytes()` (the bytes are held in memory whole). Reads metadata
    only. Raises ModelLoadError naming the file and the reason; FileNotFoundError when there is
    none."""
    limit = max_model_bytes()
    fs, path = storage.filesystem(uri)
    if storage.is_local(uri):
        mode = os.stat(path)  # follows symlinks, as the read would
        if not stat.S_ISREG(mode.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode.st_mode)), "special file")
            raise ModelLoadError(f"{uri}: not a regular file ({kind}); refused")
        size = mode.st_size
    else:
        info = storage.with_retries(lambda: fs.info(path))
        if info.get("type") != "file":
            raise ModelLoadError(f"{uri}: not a regular file ({info.get('type')}); refused")
        if info.get("size") is None:
            return None  # the bounded read in read_model_bytes still holds
        size = int(info["size"])
    if size == 0:  # never a model; and /proc files say 0 bytes whatever they hold
        raise ModelLoadError(f"{uri}: an empty file (0 bytes); refused")
    if size > limit:
        raise _too_large(uri, _size_text(size), limit)
    return size


def read_model_bytes(uri: str) -> bytes:
    """The bytes of a model file, after `check_model_file`. At most the size the check saw (+1)
    is read, so a file that grows in between is refused rather than read without bound."""
    size = check_model_file(uri)
    limit = max_model_bytes()
    fs, path = storage.filesystem(uri)
    expected = limit if size is None else size
    data = storage.with_retries(lambda: fs.cat_file(path, start=0, end=expected + 1))
    if len(data) > limit:
        raise _too_large(uri, "the file", limit)
    if len(data) > expected:
        raise ModelLoadError(f"{uri}: holds more than the {expected} bytes its metadata gave "
                             "(changed while read, or not a plain file); refused")
    return data


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, uri: str = "<model>") -> dict[str, torch.Tensor]:
    """The tensors of a state dict or of a checkpoint dict holding one; `module.` removed."""
    if not _is_state_dict(obj):
        inner = next((obj[k] for k in CHECKPOINT_KEYS
                      if isinstance(obj, Mapping) and _is_state_dict(obj.get(k))), None)
        if inner is None:
            found = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping)
                     else f"a {type(obj).__name__}")
            raise ModelLoadError(f"{uri}: expected a state dict (parameter name -> tensor) or a "
                                 f"checkpoint dict holding one under {', '.join(CHECKPOINT_KEYS)}; "
                                 f"found {found}")
        obj = inner
    state = dict(obj)
    if all(k.startswith(DATAPARALLEL_PREFIX) for k in state):
        state = {k[len(DATAPARALLEL_PREFIX):]: v for k, v in state.items()}
    return state


def _brief(keys: Sequence[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _build(record: ModelRecord, state: dict[str, torch.Tensor]) -> nn.Module:
    net = models.create(record.architecture, record.num_classes, record.input_shape)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
               if k in state and state[k].shape != v.shape]
    if missing or unexpected or resized:
        problems = [f"{name}: {_brief(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected),
                     ("wrong shape (file vs model)", resized)) if keys]
        raise ModelLoadError(f"{record.uri}: weights do not fit {record.architecture} with "
                             f"{record.num_classes} classes and input {tuple(record.input_shape)}; "
                             + "; ".join(problems))
    net.load_state_dict(state)
    return net


def _load_refusal_reason(err: BaseException) -> str:
    """Why torch.load refused a file, in one whole sentence. torch's text opens with generic
    advice (to rerun with weights_only=False: not for a corpus we do not trust) and names the
    actual problem after "WeightsUnpickler error:"; other errors are kept whole, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch bolds words with terminal escapes
    _, marker, reason = text.partition("WeightsUnpickler error:")
    if marker:
        reason = reason.strip().split("\n\n")[0]  # the paragraph after it is a docs link
        first = re.match(r".*?[.!?](?=\s|$)", " ".join(reason.split()))
        reason = first.group(0) if first else reason  # then comes advice to allowlist it
    return clip_text(" ".join((reason if marker else text).split()))


def _read_network(record: ModelRecord, data: bytes) -> nn.Module:
    fmt, uri = record.format, record.uri
    if fmt == "safetensors":
        try:
            state = safetensors.torch.load(data)
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise ModelLoadError(f"{uri}: not a readable safetensors file ({e})") from None
        return _build(record, extract_state_dict(state, uri))
    if fmt == "state_dict":
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # an UnpicklingError names the forbidden global
            raise ModelLoadError(
                f"{uri}: not a plain state dict; torch.load(weights_only=True) refused it "
                f"({_load_refusal_reason(e)}). If it is a whole-module pickle, give it "
                "format 'pickle' and load it with --allow-pickle.") from None
        return _build(record, extract_state_dict(obj, uri))
    if fmt == "torchscript":
        try:
            with _quiet_torchscript():
                return torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as e:
            raise ModelLoadError(f"{uri}: not a readable TorchScript file ({e})") from None
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{uri}: expected a pickled torch.nn.Module, found a "
                             f"{type(obj).__name__}")
    return obj


def load_model(record: ModelRecord, *, allow_pickle: bool = False,
               device: str | torch.device = "cpu") -> Normalized:
    """The record's network as `Normalized(net, record.mean, record.std)`, in eval mode."""
    _check_format(record.format)
    if record.format == "pickle" and not allow_pickle:
        raise _pickle_refused(record.uri)  # before a single byte of the file is read
    net = _read_network(record, read_model_bytes(record.uri))
    return Normalized(net, record.mean, record.std).to(device).eval()


def _serialise(net: nn.Module, fmt: str, example_input: torch.Tensor | None) -> bytes:
    buf = io.BytesIO()
    if fmt == "safetensors":
        # Clone so that tied / shared tensors become separate buffers safetensors accepts.
        state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        return safetensors.torch.save(state)
    if fmt == "state_dict":
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buf)
    elif fmt == "torchscript":
        with _quiet_torchscript():
            scripted = (torch.jit.trace(net, example_input) if example_input is not None
                        else torch.jit.script(net))
            torch.jit.save(scripted, buf)
    else:
        torch.save(net, buf)
    return buf.getvalue()


def save_model(net: nn.Module, uri: str, format: str, *, allow_pickle: bool = False,
               example_input: torch.Tensor | None = None) -> str:
    """Write `net` (a `Normalized` is unwrapped) atomically; returns `model_digest` of the file.

    torchscript: scripted, or traced when `example_input` is given. pickle: only with
    allow_pickle=True, since reading it back runs code.
    """
    _check_format(format)
    if format == "pickle" and not allow_pickle:
        raise _pickle_refused(uri)
    if isinstance(net, Normalized):
        net = net.net
    was_training = net.training
    net.eval()
    try:
        data = _serialise(net, format, example_input)
    finally:
        net.train(was_training)
    storage.atomic_write_bytes(uri, data)
    return _digest(data)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def model_digest(uri: str, chunk_size: int = 1 << 22) -> str:
    """First 16 hex digits of the sha256 of the file's bytes (read in chunks), after
    `check_model_file`: a device or an oversized file is refused, not hashed forever."""
    check_model_file(uri)
    limit = max_model_bytes()
    fs, path = storage.filesystem(uri)

    def digest() -> str:
        h, seen = hashlib.sha256(), 0
        with fs.open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                seen += len(chunk)
                if seen > limit:  # it grew after the check
                    raise _too_large(uri, "the file", limit)
                h.update(chunk)
        return h.hexdigest()[:16]

    return storage.with_retries(digest)

