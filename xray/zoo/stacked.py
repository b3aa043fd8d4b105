"""Stacked training: K models of one architecture trained in one vectorised pass.

    trained = train_stack(specs, dataset)     # list[TrainedModel], same order as specs

Each model keeps everything it has when trained one by one (xray.zoo.train.train_model): its
seed, its own attack and poisoned training set (train.training_set with
np.random.default_rng(spec.seed)), the same initial weights (torch.manual_seed(spec.seed) right
before models.create), the same data order (torch.randperm per epoch from a generator seeded
spec.seed), its own step count (a jumbo model with added triggered copies takes more steps per
epoch than a clean one) and its own learning-rate schedule. Only the arithmetic is shared:

  - parameters of the K networks are stacked (torch.func.stack_module_state) and one
    vmap(grad(loss)) over functional_call gives all K gradients in one pass (convolutions become
    grouped convolutions, linear layers batched matmuls);
  - the optimiser (SGD with momentum / Adam, L2 weight decay, cosine / constant schedule) is a
    functional re-implementation of torch.optim's update rules on the stacked tensors with a
    per-model learning rate, step counter and `active` mask: a model whose epochs are done stops
    updating (no moment decay, no step) while the others finish;
  - a model's last batch of an epoch can be shorter than the batch size: the batch is padded and
    the padded samples get weight 0, so the loss is still the mean over its real samples.
  - the training sets are held once: the shared clean images plus each model's changed or added
    rows, gathered by index per step.

Differences from one by one (measured by tests/test_stacked.py: the clean-accuracy and ASR
distributions match; weights agree closely but not bit for bit): float summation order in the
batched kernels; dropout masks come from vmap's randomness="different" stream rather than the
global torch generator. Networks with BatchNorm (running statistics updated in place) are not
stacked: `stack_problem` says why and the zoo trains them one by one.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap

from xray import models
from xray.zoo.attacks import ATTACKS
from xray.zoo.data import Dataset
from xray.zoo.recipe import ModelSpec, TrainingRecipe
from xray.zoo.train import TrainedModel, measure, resolve_training_device, training_set


def stack_problem(net: nn.Module) -> str | None:
    """Why `net` cannot be trained stacked (None when it can)."""
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            return f"{type(module).__name__} {name!r} updates running statistics in place"
    if any(True for _ in net.buffers()):
        return "the network has buffers (state updated outside the optimiser)"
    return None


@dataclass
class _Member:
    """One model of the stack: its net, attack, rows in the shared pool and its batch stream."""

    spec: ModelSpec
    net: nn.Module
    attack: Any | None
    poisoned_count: int
    rows: torch.Tensor  # (n,) indices into the shared image pool
    labels: torch.Tensor  # (n,) its training labels
    generator: torch.Generator
    steps_per_epoch: int
    order: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.rows)

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Positions (into rows / labels) of this model's batch number `step`."""
        within = step % self.steps_per_epoch
        if within == 0:  # a new epoch: a fresh permutation, as torch.randperm in train._optimise
            self.order = torch.randperm(self.n, generator=self.generator)
        return self.order[within * batch_size:(within + 1) * batch_size]


def _pool(members_data: list[tuple[np.ndarray, np.ndarray]], base: np.ndarray
          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One image pool: the clean images, then each model's changed or appended rows; and per
    model the pool index of each of its training rows."""
    n_base = len(base)
    chunks, rows, offset = [base], [], n_base
    for x, _ in members_data:
        head = x[:n_base]
        changed = np.flatnonzero((head != base).reshape(n_base, -1).any(1)) if len(head) else \
            np.zeros(0, np.int64)
        index = np.arange(len(x), dtype=np.int64)
        extra = np.concatenate([changed, np.arange(n_base, len(x))])
        index[extra] = offset + np.arange(len(extra))
        chunks.append(x[extra])
        offset += len(extra)
        rows.append(torch.from_numpy(index))
    pool = torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32))
    return pool, rows


class _StackedOptimizer:
    """torch.optim.SGD / Adam update rules (L2 weight decay added to the gradient, as torch does)
    on stacked (K, ...) tensors, with per-model learning rates and an `active` mask."""

    def __init__(self, params: dict[str, torch.Tensor], recipe: TrainingRecipe, k: int) -> None:
        if recipe.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {recipe.optimizer!r} (sgd | adam)")
        if recipe.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {recipe.schedule!r} (cosine | constant)")
        self.recipe = recipe
        self.steps = torch.zeros(k)
        self.state = {name: [torch.zeros_like(p) for _ in range(2 if recipe.optimizer == "adam"
                                                               else 1)]
                      for name, p in params.items()}

    def lr(self, total_steps: torch.Tensor) -> torch.Tensor:
        """Per-model lr for the coming step (CosineAnnealingLR's closed form, eta_min 0)."""
        if self.recipe.schedule == "constant":
            return torch.full_like(self.steps, self.recipe.lr)
        t_max = total_steps.clamp_min(1)
        return self.recipe.lr * (1 + torch.cos(math.pi * self.steps / t_max)) / 2

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
             active: torch.Tensor, lr: torch.Tensor) -> None:
        r = self.recipe
        self.steps += active.float()
        device = next(iter(params.values())).device
        active, lr, steps_done = active.to(device), lr.to(device), self.steps.to(device)
        for name, p in params.items():
            shape = (-1,) + (1,) * (p.dim() - 1)
            on, lr_k = active.view(shape), lr.view(shape)
            g = grads[name]
            if r.weight_decay:
                g = g + r.weight_decay * p
            if r.optimizer == "sgd":
                (buf,) = self.state[name]
                # torch: the first step's buffer is the gradient itself; 0 * momentum + g is that.
                new_buf = buf * r.momentum + g if r.momentum else g
                buf.copy_(torch.where(on, new_buf, buf))
                p.sub_(torch.where(on, lr_k * buf, torch.zeros_like(p)))
            else:
                m, v = self.state[name]
                b1, b2, eps = 0.9, 0.999, 1e-8
                m.copy_(torch.where(on, m * b1 + g * (1 - b1), m))
                v.copy_(torch.where(on, v * b2 + g * g * (1 - b2), v))
                steps = steps_done.clamp_min(1).view(shape)
                bc1, bc2 = 1 - b1 ** steps, 1 - b2 ** steps
                denom = v.sqrt() / bc2.sqrt() + eps
                p.sub_(torch.where(on, (lr_k / bc1) * m / denom, torch.zeros_like(p)))


def train_stack(specs: list[ModelSpec], dataset: Dataset, device: str | None = "cpu",
                cache_uri: str | None = None) -> list[TrainedModel]:
    """Train the models `specs` describe (one architecture, one training recipe) in one stacked,
    vectorised pass on `device` (xray.zoo.train.resolve_training_device); returns one
    TrainedModel per spec, in order (nets on the CPU). `cache_uri`: see train.training_set."""
    if not specs:
        return []
    started = time.perf_counter()
    archs = {s.architecture for s in specs}
    recipes = {s.training for s in specs}
    if len(archs) != 1 or len(recipes) != 1:
        raise ValueError(f"a stack needs one architecture and one training recipe, got "
                         f"{sorted(archs)} and {len(recipes)} recipe(s)")
    trains_itself = sorted({s.attack for s in specs
                            if s.attack and ATTACKS.get(s.attack).trains_model})
    if trains_itself:
        raise ValueError(f"attack(s) {', '.join(trains_itself)} train the model themselves: "
                         "they cannot train in a stack")
    recipe = specs[0].training
    data, nets, attacks, counts = [], [], [], []
    for spec in specs:
        rng = np.random.default_rng(spec.seed)
        torch.manual_seed(spec.seed)  # as train_model: the same initial weights
        x, y, attack, count = training_set(spec, dataset, rng, cache_uri)
        nets.append(models.create(spec.architecture, dataset.num_classes, dataset.input_shape))
        data.append((x, y))
        attacks.append(attack)
        counts.append(count)
    problem = stack_problem(nets[0])
    if problem:
        raise ValueError(f"{specs[0].architecture} cannot be trained stacked: {problem}")
    pool, rows = _pool(data, dataset.x_train)
    members = [
        _Member(spec, net, attack, count, r, torch.as_tensor(np.ascontiguousarray(y),
                                                             dtype=torch.int64),
                torch.Generator().manual_seed(spec.seed),
                math.ceil(len(r) / recipe.batch_size))
        for spec, net, attack, count, r, (_, y) in zip(specs, nets, attacks, counts, rows, data)]

    dev = resolve_training_device(device)
    t0 = time.perf_counter()
    params = _optimise_stack(members, pool.to(dev), recipe)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    optimising = time.perf_counter() - t0

    out = []
    k = len(members)
    for i, m in enumerate(members):
        m.net.load_state_dict({name: p[i].detach().clone() for name, p in params.items()})
        m.net.eval()
        clean_acc, asr = measure(m.net, m.attack, dataset)
        out.append(TrainedModel(spec=m.spec, net=m.net, clean_accuracy=clean_acc, asr=asr,
                                attack=m.attack, poisoned_count=m.poisoned_count,
                                seconds_total=0.0, seconds_optimising=optimising / k,
                                extra={"stacked": k}))
    total = time.perf_counter() - started
    for t in out:
        t.seconds_total = total / k
    return out


def _optimise_stack(members: list[_Member], pool: torch.Tensor, recipe: TrainingRecipe
                    ) -> dict[str, torch.Tensor]:
    k, bs = len(members), recipe.batch_size
    for m in members:
        m.net.train()
    params, _ = stack_module_state([m.net for m in members])
    params = {name: p.detach().clone().to(pool.device) for name, p in params.items()}
    template = copy.deepcopy(members[0].net).to("meta")

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
             ) -> torch.Tensor:
        ce = F.cross_entropy(functional_call(template, p, (x,)), y, reduction="none")
        return (ce * w).sum() / w.sum().clamp_min(1.0)

    grads_of = vmap(grad(loss), randomness="different")
    total = torch.tensor([m.steps_per_epoch * recipe.epochs for m in members], dtype=torch.float32)
    optimizer = _StackedOptimizer(params, recipe, k)
    labels = [m.labels for m in members]
    for step in range(int(total.max().item())):
        active = step < total
        idx = torch.zeros(k, bs, dtype=torch.int64)
        lab = torch.zeros(k, bs, dtype=torch.int64)
        weight = torch.zeros(k, bs)
        for i, m in enumerate(members):
            if not active[i]:
                continue
            pos = m.batch(step, bs)
            idx[i, :len(pos)] = m.rows[pos]
            lab[i, :len(pos)] = labels[i][pos]
            weight[i, :len(pos)] = 1.0
        x = pool[idx.to(pool.device)]  # (K, B, C, H, W)
        lr = optimizer.lr(total)
        grads = grads_of(params, x, lab.to(pool.device), weight.to(pool.device))
        optimizer.step(params, grads, active, lr)
    return params
