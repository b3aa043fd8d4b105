"""MNTD's meta-classifier and its artifact on storage, shared by the `mntd` detector
(xray.detectors.mntd: loads the artifact, scores) and the meta-trainer (xray.zoo.mntd: fits it
on shadow models, writes the artifact). The paper, the reference code and every deviation are in
xray.detectors.mntd's docstring.

Artifact (one directory, beside the shadow round by default: <shadow>/mntd_meta/):
  meta.safetensors   queries, fc.weight, fc.bias, output.weight, output.bias
  meta.json          format, key {input_shape, num_classes, mean, std}, query init, training
                     settings, best epoch, validation AUC per epoch, the shadow round's identity
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from xray.io import storage

META_FORMAT = "xray-mntd-meta/1"
WEIGHTS_FILE = "meta.safetensors"
META_FILE = "meta.json"
DEFAULT_DIR = "mntd_meta"


class MetaClassifier(nn.Module):
    """Queries + FC(Q C -> hidden) - ReLU - FC(hidden -> 1) (ref meta_classifier.MetaClassifier)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, n_queries: int = 10,
                 hidden: int = 20) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.queries = nn.Parameter(torch.zeros(n_queries, *self.input_shape))
        self.fc = nn.Linear(n_queries * self.num_classes, hidden)
        self.output = nn.Linear(hidden, 1)

    def init_queries(self, mean: Sequence[float], std: Sequence[float],
                     generator: torch.Generator) -> None:
        c = self.input_shape[0]
        m = torch.tensor(per_channel(mean, c)).view(1, c, 1, 1)
        s = torch.tensor(per_channel(std, c)).view(1, c, 1, 1)
        with torch.no_grad():
            self.queries.copy_(torch.randn(self.queries.shape, generator=generator) * s + m)

    def forward(self, model: nn.Module) -> torch.Tensor:
        """The meta output (a logit) for `model`, which takes pixel-space input."""
        logits = model(self.queries)
        return self.output(F.relu(self.fc(logits.reshape(-1)))).reshape(())


def per_channel(values: Sequence[float], c: int) -> list[float]:
    """`c` values: one per channel, a single value repeated."""
    values = [float(v) for v in values]
    return values * c if len(values) == 1 else values


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


def query_training_mode(model: nn.Module, query_mode: str) -> bool:
    """Whether `model` answers the queries in train() mode under `query_mode` (reference: the
    reference code's train() mode, but eval() for models with BatchNorm)."""
    if query_mode == "train":
        return True
    if query_mode == "eval":
        return False
    if query_mode == "reference":
        return not _has_batchnorm(model)
    raise ValueError(f"unknown query_mode {query_mode!r} (reference | train | eval)")


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """`model` (every submodule) in train or eval mode for the queries; modes restored after."""
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


@dataclass
class Artifact:
    meta: MetaClassifier
    info: dict[str, Any]
    digest: str

    @property
    def key(self) -> dict[str, Any]:
        return self.info["key"]


def _artifact_dir(uri: str) -> str:
    return uri[:-len(META_FILE) - 1] if uri.rstrip("/").endswith(META_FILE) else uri


def save_artifact(meta: MetaClassifier, info: dict[str, Any], out_uri: str) -> str:
    """Write meta.safetensors and meta.json (last) under the directory `out_uri`."""
    out_uri = _artifact_dir(out_uri)
    state = {k: v.detach().cpu().contiguous() for k, v in meta.state_dict().items()}
    data = safetensors.torch.save(state)
    info = {**info, "format": META_FORMAT, "weights_digest": hashlib.sha256(data).hexdigest()[:16]}
    storage.atomic_write_bytes(storage.join(out_uri, WEIGHTS_FILE), data)
    storage.write_text(storage.join(out_uri, META_FILE), json.dumps(info, indent=2))
    return out_uri


def load_artifact(uri: str) -> Artifact:
    """The meta-classifier at `uri` (its directory, or its meta.json)."""
    root = _artifact_dir(uri)
    meta_uri = storage.join(root, META_FILE)
    if not storage.exists(meta_uri):
        raise FileNotFoundError(f"no MNTD meta-classifier at {uri!r} ({META_FILE} missing); "
                                f"build one with `xray mntd train --shadow ROUND --out DIR`")
    info = json.loads(storage.read_text(meta_uri))
    if info.get("format") != META_FORMAT:
        raise ValueError(f"{meta_uri}: format {info.get('format')!r}, expected {META_FORMAT!r}")
    data = storage.read_bytes(storage.join(root, WEIGHTS_FILE))
    key = info["key"]
    meta = MetaClassifier(key["input_shape"], key["num_classes"], info["n_queries"],
                          info["hidden"])
    meta.load_state_dict(safetensors.torch.load(data))
    meta.requires_grad_(False).eval()
    return Artifact(meta, info, hashlib.sha256(data).hexdigest()[:16])
