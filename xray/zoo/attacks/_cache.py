"""Learned trigger parts that one round computes once (an encoder, an optimised pattern): cached
as safetensors under `AttackKit.cache_uri`, and the digests that record their identity."""
from __future__ import annotations

import hashlib
from typing import Callable, Mapping

import safetensors.torch
import torch

from xray.io import storage


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short digest of named tensors (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def cached_tensors(cache_uri: str | None, name: str,
                   compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`compute()` once per cache folder (None: every time), under its own RNG fork so that
    computing or reading from the cache leaves the caller's global RNG stream alike."""
    uri = storage.join(cache_uri, name) if cache_uri else None
    if uri and storage.exists(uri):
        return safetensors.torch.load(storage.read_bytes(uri))
    with torch.random.fork_rng(devices=[]):
        tensors = compute()
    if uri:
        storage.atomic_write_bytes(uri, safetensors.torch.save(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    return tensors
