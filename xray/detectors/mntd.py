"""MNTD: a meta-classifier with tuned queries, trained on shadow models, scores a model in one pass.

Paper: Xu, Wang, Li, Borisov, Gunter, Li, "Detecting AI Trojans Using Meta Neural Analysis",
IEEE S&P 2021, https://arxiv.org/abs/1910.03137. Reference code:
AI-secure/Meta-Nerual-Trojan-Detection (`meta_classifier.py`, `run_meta.py`, `utils_meta.py`).
Spec: shared/specs/baselines.md.

Two parts:
  1. `train_meta_classifier(shadow_uri, out_uri)` (command line: `xray mntd train`): reads a
     shadow round (benign + jumbo models, manifests/recipes/mntd_shadow.yaml, built with
     `xray zoo build`), trains the meta-classifier with query tuning and writes the artifact.
     The training itself is `fit_meta_classifier(nets, labels, is_val, ...)` on in-memory models.
  2. The `mntd` detector loads that artifact (Params.artifact) and scores a model: sigmoid of
     the meta-classifier's output on the model's logits for the tuned queries.

Meta-classifier (ref meta_classifier.py): Q = 10 trainable queries of the input shape,
initialised N(0, 1) * std + mean and never clamped; feature = the Q raw logit vectors flattened
(Q C values); FC(Q C -> 20) - ReLU - FC(20 -> 1); BCE with logits, label 1 = trojaned.
Query tuning (ref run_meta.py / utils_meta.epoch_meta_train): one Adam(lr 1e-3) over the queries
and both FC layers (query_tuning=False: FC only); each epoch visits the training shadow models
in a fresh random order, one step per model; after each epoch the ROC-AUC on the validation
shadow models is computed and the best epoch is kept (`select`, below).

Artifact (one directory, beside the shadow round by default: <shadow>/mntd_meta/):
  meta.safetensors   queries, fc.weight, fc.bias, output.weight, output.bias
  meta.json          format, key {input_shape, num_classes, mean, std}, query init, training
                     settings, best epoch, validation AUC per epoch, the shadow round's identity
It is keyed by (input shape, class count, normalisation): scanning a model with another input
shape or class count fails with a clear error; a different normalisation is only recorded
(stats["normalisation_matches"]): queries live in pixel space [0, 1]-ish, which every model
takes here (normalisation is folded into the loaded model), so they still apply.

Storage rule: detectors do not read storage in score(). This one reads its artifact once, in
__init__ (the runner builds each detector once per worker, and the run config builds it once
up front, so a missing or broken artifact fails before any model is scanned) -- the documented
exception to "a detector never reads storage": the artifact is part of the detector's
parameters, not of the scanned model. score() reads only its arguments and the loaded tensors.
The config hash covers the artifact path, not its content: write a new artifact to a new path
(stats["artifact_digest"] records which content scored each model).

Deviations from the reference code, each on purpose:
  - Query initialisation mean / std: per channel, measured on the clean example images of every
    shadow record (each examples folder once; it used to be the first record's alone) (inferred;
    the reference hard-codes MNIST 0.1307 / 0.3081 and CIFAR-10's stats, the statistics of its
    whole training data, which these measurements approximate). Overridable (query_mean /
    query_std).
  - Meta-training time limit (`time_limit_s`, `xray mntd train --time-limit`): asked before each
    epoch; training then keeps the best epoch so far and the artifact records stopped_early (the
    reference has none). Scoring is one forward of the queries: no loop, no deadline.
  - Query mode: the reference queries shadow and target models in train() mode (dropout active
    on its CIFAR CNN). query_mode="reference" does that for models without BatchNorm and uses
    eval() for models with BatchNorm (inferred, spec); "train" / "eval" force one. Dropout draws
    are seeded (training: the seed; scanning: ctx.generator("mntd/dropout")).
  - repeats: the reference trains 5 fresh meta-classifiers and reports the mean test AUC; we
    train `repeats` (default 1) and keep the one with the best validation AUC (inferred: one
    artifact must be chosen). All validation AUCs are recorded.
  - Validation split: models of recipe groups marked `split: validation`; when the round has
    none, a seeded, class-stratified 1/9 of the models (256 of 2,304 per kind in the paper).
  - Output: sigmoid(meta output) as the score (spec: inferred); the reference reports AUC and
    accuracy at the median score only. No target label is predicted (MNTD has none).
  - Epoch selection: the reference keeps the first epoch of strictly higher validation AUC
    (select="auc"). Default select="auc_loss" (inferred) breaks AUC ties by the lower validation
    BCE: with tens of validation models the AUC often reaches 1.0 within an epoch or two, and the
    reference rule then keeps a barely trained meta-classifier. Measured on a 16 + 16 MNIST
    shadow set: "auc" chose epochs 0-4 and scored a separate target round at ROC-AUC 0.60-1.0
    over three seeds; "auc_loss" chose epoch 9 and scored it at 0.93-1.0. With the paper's 512
    validation models ties are rare and the two rules agree.
  - Shadow models are loaded once and kept in memory (about 2 MB each for the MNIST CNN).
  - threads (training only): torch's intra-op threads can be set for the loop. Each step is one
    small forward of the queries, and on a busy 2-core machine 2 threads measured 50x slower
    than 1 (19 s vs 0.4 s per epoch of 64 MNIST CNNs).

Measured (bench/mntd.py, tests/test_mntd.py): trained on MNIST shadow models at a CPU budget
(8 epochs, not 100), the meta-classifier separates clean from BadNets / MNTD-M target models
built from another MNIST subsample with other seeds (test: 12 + 12 training shadow models,
ROC-AUC >= 0.75 asserted). On 5-class 24 x 24 `signs` the jumbo triggers do not take at small
budgets (median shadow ASR 0.07), and a meta-classifier trained on those models is useless
(ROC-AUC 0.33).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from xray.detectors import register
from xray.detectors.base import DeadlinePassed, DetectorResult, ScanContext, ScanData

log = logging.getLogger(__name__)

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
        m = torch.tensor(_per_channel(mean, c)).view(1, c, 1, 1)
        s = torch.tensor(_per_channel(std, c)).view(1, c, 1, 1)
        with torch.no_grad():
            self.queries.copy_(torch.randn(self.queries.shape, generator=generator) * s + m)

    def forward(self, model: nn.Module) -> torch.Tensor:
        """The meta output (a logit) for `model`, which takes pixel-space input."""
        logits = model(self.queries)
        return self.output(F.relu(self.fc(logits.reshape(-1)))).reshape(())


def _per_channel(values: Sequence[float], c: int) -> list[float]:
    values = [float(v) for v in values]
    return values * c if len(values) == 1 else values


# ------------------------------------------------------------------------------- query mode

def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


def _query_training_mode(model: nn.Module, query_mode: str) -> bool:
    if query_mode == "train":
        return True
    if query_mode == "eval":
        return False
    if query_mode == "reference":
        return not _has_batchnorm(model)
    raise ValueError(f"unknown query_mode {query_mode!r} (reference | train | eval)")


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


# --------------------------------------------------------------------------------- artifact

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
    import safetensors.torch

    from xray.io import storage

    out_uri = _artifact_dir(out_uri)
    state = {k: v.detach().cpu().contiguous() for k, v in meta.state_dict().items()}
    data = safetensors.torch.save(state)
    info = {**info, "format": META_FORMAT, "weights_digest": hashlib.sha256(data).hexdigest()[:16]}
    storage.atomic_write_bytes(storage.join(out_uri, WEIGHTS_FILE), data)
    storage.write_text(storage.join(out_uri, META_FILE), json.dumps(info, indent=2))
    return out_uri


def load_artifact(uri: str) -> Artifact:
    """The meta-classifier at `uri` (its directory, or its meta.json)."""
    import safetensors.torch

    from xray.io import storage

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


# -------------------------------------------------------------------------- meta-training

@dataclass
class MetaTrainResult:
    artifact_uri: str
    best_epoch: int
    best_val_auc: float
    val_auc: list[list[float]]  # per repeat, per epoch
    n_train: int
    n_val: int
    info: dict[str, Any] = field(default_factory=dict)


def _split(shadow_uri: str, records: list[Any], val_fraction: float, seed: int) -> list[bool]:
    """True = validation. From the round's recipe groups (`split: validation`), else seeded."""
    from xray.io import storage

    recipe_uri = storage.join(shadow_uri, "recipe.yaml")
    if storage.exists(recipe_uri):
        import yaml

        from xray.zoo.build import spec_groups
        from xray.zoo.recipe import parse_recipe

        recipe = parse_recipe(yaml.safe_load(storage.read_text(recipe_uri)), source=recipe_uri)
        split = {s.model_id: str(g.get("split", "train"))
                 for s, g in zip(recipe.model_specs(), spec_groups(recipe))}
        if any(v == "validation" for v in split.values()):
            return [split.get(r.model_id, "train") == "validation" for r in records]
    rng = np.random.default_rng(seed)
    labels = np.array([bool(r.poisoned) for r in records])
    is_val = np.zeros(len(records), dtype=bool)
    for value in (False, True):
        idx = np.flatnonzero(labels == value)
        n = int(round(val_fraction * len(idx)))
        is_val[rng.choice(idx, size=min(max(n, 1), len(idx) - 1), replace=False)] = True
    return is_val.tolist()


def _auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    if len(set(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _shadow_records(shadow_uri: str) -> list[Any]:
    from xray.io import storage
    from xray.io.manifest import read_manifest, read_round_dir

    manifest = storage.join(shadow_uri, "manifest.csv")
    return read_manifest(manifest) if storage.exists(manifest) else read_round_dir(shadow_uri)


def measure_query_init(records: list[Any]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the clean example images of all shadow records (each
    examples folder read once: shadow models usually share one)."""
    from xray.io.examples import load_examples

    by_folder = {r.examples_uri: r for r in records}
    x = torch.cat([load_examples(r)[0] for r in by_folder.values()])
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """Run with `threads` torch intra-op threads (None: leave torch's setting), then restore."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class MetaFit:
    """What fit_meta_classifier returns: the best meta-classifier and how it was chosen."""
    meta: MetaClassifier
    best_val_auc: float
    best_repeat: int
    best_epoch: int
    val_auc: list[list[float]]  # per repeat, per epoch
    val_loss: list[list[float]] = field(default_factory=list)  # per repeat, per epoch
    stopped_early: bool = False  # time_limit_s ended the training before its epochs


def fit_meta_classifier(nets: Sequence[nn.Module], labels: Sequence[int], is_val: Sequence[bool],
                        input_shape: Sequence[int], num_classes: int, *,
                        query_mean: Sequence[float], query_std: Sequence[float],
                        epochs: int = 10, lr: float = 1e-3, n_queries: int = 10, hidden: int = 20,
                        query_tuning: bool = True, query_mode: str = "reference",
                        repeats: int = 1, seed: int = 0, select: str = "auc_loss",
                        device: str = "cpu", show_progress: bool = False,
                        time_limit_s: float | None = None) -> MetaFit:
    """Query tuning on in-memory shadow models (ref run_meta.py / utils_meta.epoch_meta_train).

    `nets` take pixel-space input on `device`; labels 1 = trojaned; is_val marks the validation
    shadow models that choose the best epoch. select="auc" (ref run_meta.py): strictly higher
    ROC-AUC, the first epoch on ties; "auc_loss" (inferred): ties broken by a lower validation
    BCE loss -- with a few validation models the AUC reaches 1.0 within an epoch or two, and
    "auc" then keeps a barely trained meta-classifier; "last": the last epoch.

    time_limit_s: asked before each epoch; once passed, training stops with the best epoch so far
    (MetaFit.stopped_early). No epoch at all in time -> DeadlinePassed."""
    if select not in ("auc", "auc_loss", "last"):
        raise ValueError(f"unknown select {select!r} (auc | auc_loss | last)")
    from xray.progress import Progress

    labels = [int(v) for v in labels]
    train_idx = [i for i, v in enumerate(is_val) if not v]
    val_idx = [i for i, v in enumerate(is_val) if v]
    if len({labels[i] for i in train_idx}) < 2 or len({labels[i] for i in val_idx}) < 2:
        raise ValueError(f"the training and validation shadow sets each need clean and trojaned "
                         f"models ({len(train_idx)} / {len(val_idx)} models)")
    dev = torch.device(device)
    modes = [_query_training_mode(n, query_mode) for n in nets]
    best: tuple[float, float, int, int, dict[str, torch.Tensor]] | None = None
    history: list[list[float]] = []
    losses: list[list[float]] = []
    clock = ScanContext(deadline=time_limit_s)
    stopped_early = False
    for repeat in range(repeats):
        if clock.expired():
            stopped_early = True
            break
        gen = torch.Generator().manual_seed(seed * 1000 + repeat)
        torch.manual_seed(seed * 1000 + repeat)  # FC initialisation and dropout draws
        meta = MetaClassifier(input_shape, num_classes, n_queries, hidden)
        meta.init_queries(query_mean, query_std, gen)
        meta.to(dev)
        params = list(meta.parameters()) if query_tuning else \
            list(meta.fc.parameters()) + list(meta.output.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        order_rng = np.random.default_rng(seed * 1000 + repeat)
        aucs, val_losses = [], []
        with Progress(epochs, f"mntd meta-train (repeat {repeat + 1}/{repeats})",
                      disable=not show_progress) as bar:
            for epoch in range(epochs):
                if clock.expired():
                    stopped_early = True
                    break
                meta.train()
                for i in order_rng.permutation(train_idx):
                    with _mode(nets[i], modes[i]):
                        out = meta(nets[i])
                    loss = F.binary_cross_entropy_with_logits(
                        out, torch.tensor(float(labels[i]), device=dev))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                meta.eval()
                with torch.no_grad():
                    scores = []
                    for i in val_idx:
                        with _mode(nets[i], modes[i]):
                            scores.append(float(meta(nets[i])))
                val_labels = [labels[i] for i in val_idx]
                auc = _auc(val_labels, scores)
                val_loss = float(F.binary_cross_entropy_with_logits(
                    torch.tensor(scores), torch.tensor(val_labels, dtype=torch.float32)))
                aucs.append(auc)
                val_losses.append(val_loss)
                if _better(select, auc, val_loss, best):
                    best = (auc, val_loss, repeat, epoch,
                            {k: v.detach().cpu().clone() for k, v in meta.state_dict().items()})
                bar.update(ok=True)
        history.append(aucs)
        losses.append(val_losses)
    if best is None:
        raise DeadlinePassed(f"mntd meta-training: the time limit of {time_limit_s:g} s ran out "
                             "before the first epoch")
    meta = MetaClassifier(input_shape, num_classes, n_queries, hidden)
    meta.load_state_dict(best[4])
    return MetaFit(meta, best[0], best[2], best[3], history, losses, stopped_early)


def _better(select: str, auc: float, loss: float, best: tuple | None) -> bool:
    if best is None or select == "last":
        return True
    if not math.isfinite(auc):
        return False
    return auc > best[0] or (select == "auc_loss" and auc == best[0] and loss < best[1])


def train_meta_classifier(shadow_uri: str, out_uri: str | None = None, *, epochs: int = 10,
                          lr: float = 1e-3, n_queries: int = 10, hidden: int = 20,
                          query_tuning: bool = True, query_mode: str = "reference",
                          repeats: int = 1, seed: int = 0, val_fraction: float = 1 / 9,
                          query_mean: Sequence[float] | None = None,
                          query_std: Sequence[float] | None = None, select: str = "auc_loss",
                          device: str = "cpu", threads: int | None = None,
                          show_progress: bool = True,
                          time_limit_s: float | None = None) -> MetaTrainResult:
    """Train MNTD's meta-classifier on the shadow round at `shadow_uri` and write the artifact to
    `out_uri` (default <shadow_uri>/mntd_meta). Labels: the records' ground truth (poisoned).

    threads: torch intra-op threads while training (None: torch's setting). Each step is one
    small forward of the queries, so one thread is fastest for the small CNNs, and on a busy
    machine several threads can be tens of times slower (measured: 19 s vs 0.4 s per epoch of 64
    MNIST CNNs at load 6 on 2 cores)."""
    from xray.io import storage
    from xray.io.model_loading import load_model
    from xray.progress import Progress

    records = [r for r in _shadow_records(shadow_uri) if r.poisoned is not None]
    if not records:
        raise ValueError(f"{shadow_uri}: no shadow models with ground truth")
    keys = {(tuple(r.input_shape), r.num_classes, tuple(r.mean), tuple(r.std)) for r in records}
    if len(keys) != 1:
        raise ValueError(f"{shadow_uri}: shadow models differ in (input shape, classes, "
                         f"normalisation): {sorted(keys)[:3]}; one meta-classifier per key")
    input_shape, num_classes, mean, std = keys.pop()
    is_val = _split(shadow_uri, records, val_fraction, seed)
    labels = [int(bool(r.poisoned)) for r in records]
    n_val = sum(is_val)
    if query_mean is None or query_std is None:
        measured = measure_query_init(records)
        query_mean = query_mean if query_mean is not None else measured[0]
        query_std = query_std if query_std is not None else measured[1]
    with _torch_threads(threads):
        nets = []
        with Progress(len(records), "mntd load shadow models", disable=not show_progress) as bar:
            for r in records:
                net = load_model(r, device=device)
                net.requires_grad_(False)
                nets.append(net)
                bar.update(ok=True)
        try:
            fit = fit_meta_classifier(
                nets, labels, is_val, input_shape, num_classes, query_mean=query_mean,
                query_std=query_std, epochs=epochs, lr=lr, n_queries=n_queries, hidden=hidden,
                query_tuning=query_tuning, query_mode=query_mode, repeats=repeats, seed=seed,
                select=select, device=device, show_progress=show_progress,
                time_limit_s=time_limit_s)
        except ValueError as e:
            raise ValueError(f"{shadow_uri}: {e}") from None
    shadow_digest = None
    round_json = storage.join(shadow_uri, "round.json")
    if storage.exists(round_json):
        shadow_digest = json.loads(storage.read_text(round_json)).get("recipe_digest")
    info = {
        "key": {"input_shape": list(input_shape), "num_classes": int(num_classes),
                "mean": list(mean), "std": list(std)},
        "n_queries": n_queries, "hidden": hidden, "query_tuning": query_tuning,
        "query_mode": query_mode, "query_init": {"mean": list(query_mean),
                                                 "std": list(query_std)},
        "training": {"epochs": epochs, "lr": lr, "optimizer": "adam", "repeats": repeats,
                     "seed": seed, "val_fraction": val_fraction, "select": select,
                     "time_limit_s": time_limit_s, "stopped_early": fit.stopped_early,
                     "epochs_done": [len(a) for a in fit.val_auc]},
        "best": {"repeat": fit.best_repeat, "epoch": fit.best_epoch, "val_auc": fit.best_val_auc},
        "val_auc": fit.val_auc,
        "val_loss": fit.val_loss,
        "shadow": {"uri": shadow_uri, "recipe_digest": shadow_digest,
                   "n_train": len(records) - n_val, "n_val": n_val,
                   "n_trojaned": int(sum(labels))},
    }
    out_uri = save_artifact(fit.meta, info, out_uri or storage.join(shadow_uri, DEFAULT_DIR))
    return MetaTrainResult(out_uri, fit.best_epoch, fit.best_val_auc, fit.val_auc,
                           len(records) - n_val, n_val, info)


# --------------------------------------------------------------------------------- detector

@dataclass(frozen=True)
class Params:
    artifact: str = ""  # URI of the meta-classifier (directory or its meta.json); required
    query_mode: str = "artifact"  # artifact (as trained) | reference | train | eval


@register("mntd")
class MNTD:
    name = "mntd"
    version = "1"
    Params = Params
    # Budgets live in the artifact (shadow-set size, epochs); presets only choose the query mode.
    presets = {"small": {}, "reference": {"query_mode": "reference"}}

    def __init__(self, params: Params | None = None) -> None:
        self.params = params or Params()
        # The one storage read of this detector, once, here (see the module docstring).
        self.artifact = load_artifact(self.params.artifact) if self.params.artifact else None

    def score(self, model: torch.nn.Module, data: ScanData, ctx: ScanContext) -> DetectorResult:
        if self.artifact is None:
            raise ValueError("mntd needs params.artifact: a meta-classifier built with "
                             "`xray mntd train --shadow ROUND --out DIR`")
        key = self.artifact.key
        shape = [int(s) for s in data.x.shape[1:]]
        if shape != list(key["input_shape"]) or int(data.num_classes) != key["num_classes"]:
            raise ValueError(
                f"mntd artifact {self.params.artifact!r} was trained for input shape "
                f"{tuple(key['input_shape'])} and {key['num_classes']} classes; this model has "
                f"input shape {tuple(shape)} and {data.num_classes} classes: train a "
                f"meta-classifier on a shadow set of that shape and class count")
        mode = self.params.query_mode
        if mode == "artifact":
            mode = self.artifact.info.get("query_mode", "reference")
        meta = self.artifact.meta.to(ctx.device)
        seed = int(ctx.generator("mntd/dropout").initial_seed())
        cuda = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
        with torch.no_grad(), _mode(model, _query_training_mode(model, mode)), \
                torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            logit = float(meta(model))
        c = len(data.x[0])
        matches = (_per_channel(data.mean, c) == _per_channel(key["mean"], c)
                   and _per_channel(data.std, c) == _per_channel(key["std"], c))
        probability = 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0
        return DetectorResult(score=probability, stats={
            "logit": logit, "probability": probability, "artifact_digest": self.artifact.digest,
            "normalisation_matches": bool(matches), "query_mode": mode,
            "val_auc": self.artifact.info.get("best", {}).get("val_auc")})
