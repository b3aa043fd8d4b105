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
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from typing import Any, Mapping, Sequence

import safetensors.torch
import torch
import torch.nn as nn

from xray import models
from xray.models.normalize import Normalized
from xray.io import storage
from xray.io.records import MODEL_FORMATS, ModelRecord

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
DATAPARALLEL_PREFIX = "module."


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
                f"({str(e).splitlines()[0][:300]}). If it is a whole-module pickle, give it "
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
    net = _read_network(record, storage.read_bytes(record.uri))
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
    """First 16 hex digits of the sha256 of the file's bytes (read in chunks)."""
    fs, path = storage.filesystem(uri)

    def digest() -> str:
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
        return h.hexdigest()[:16]

    return storage.with_retries(digest)

