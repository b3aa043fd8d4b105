"""Train MNTD's meta-classifier on a shadow round and write its artifact (`xray mntd train`).

    result = train_meta_classifier("rounds/mntd_shadow")     # artifact in <shadow>/mntd_meta
    fit = fit_meta_classifier(nets, labels, is_val, input_shape, num_classes, ...)  # in memory

The shadow round (benign + jumbo models, manifests/recipes/mntd_shadow.yaml) is built with
`xray zoo build`; the `mntd` detector (xray.detectors.mntd) loads the artifact written here and
scores a model. Query tuning follows the reference code (run_meta.py /
utils_meta.epoch_meta_train); the paper, the reference and every deviation are listed in
xray.detectors.mntd's docstring.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from sklearn.metrics import roc_auc_score

from xray.detectors.base import DeadlinePassed, ScanContext
from xray.detectors.mntd_meta import (DEFAULT_DIR, MetaClassifier, in_mode, query_training_mode,
                                      save_artifact)
from xray.io import storage
from xray.io.examples import load_examples
from xray.io.manifest import read_manifest, read_round_dir
from xray.io.model_loading import load_model
from xray.progress import Progress
from xray.zoo.build import spec_groups
from xray.zoo.recipe import parse_recipe


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
    recipe_uri = storage.join(shadow_uri, "recipe.yaml")
    if storage.exists(recipe_uri):
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
        if len(idx) == 0:  # train_meta_classifier says what is missing
            continue
        n = int(round(val_fraction * len(idx)))
        is_val[rng.choice(idx, size=min(max(n, 1), len(idx) - 1), replace=False)] = True
    return is_val.tolist()


def _auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    if len(set(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _shadow_records(shadow_uri: str) -> list[Any]:
    manifest = storage.join(shadow_uri, "manifest.csv")
    return read_manifest(manifest) if storage.exists(manifest) else read_round_dir(shadow_uri)


def measure_query_init(records: list[Any]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the clean example images of all shadow records (each
    examples folder read once: shadow models usually share one)."""
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
    labels = [int(v) for v in labels]
    train_idx = [i for i, v in enumerate(is_val) if not v]
    val_idx = [i for i, v in enumerate(is_val) if v]
    if len({labels[i] for i in train_idx}) < 2 or len({labels[i] for i in val_idx}) < 2:
        raise ValueError(f"the training and validation shadow sets each need clean and trojaned "
                         f"models ({len(train_idx)} / {len(val_idx)} models)")
    dev = torch.device(device)
    modes = [query_training_mode(n, query_mode) for n in nets]
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
                    with in_mode(nets[i], modes[i]):
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
                        with in_mode(nets[i], modes[i]):
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
    for part, name in ((False, "training"), (True, "validation")):
        in_part = [y for y, v in zip(labels, is_val) if v == part]
        if set(in_part) != {0, 1}:
            raise ValueError(
                f"{shadow_uri}: MNTD's {name} shadow models must hold benign and trojaned ones; "
                f"they hold {in_part.count(0)} benign and {in_part.count(1)} trojaned (of "
                f"{labels.count(0)} benign and {labels.count(1)} trojaned in the round): build a "
                "shadow set with both, as recipe mntd_shadow does")
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
