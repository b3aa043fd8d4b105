"""Train one clean or backdoored classifier from a ModelSpec, and measure it.

The loop is written as (prepare data) -> (optimise) -> (evaluate) with the optimisation step a
plain function of (net, optimiser, batch). A stack of same-architecture models trains in one
vectorised pass in xray.zoo.stacked (torch.func.stack_module_state + functional_call + vmap),
which reuses `training_set` and `measure` from here, so both paths poison and measure alike.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from xray import models
from xray.models.device import resolve_device
from xray.zoo import attacks as attack_lib
from xray.zoo.data import Dataset
from xray.zoo.recipe import ModelSpec, TrainingRecipe


@dataclass
class TrainedModel:
    spec: ModelSpec
    net: nn.Module
    clean_accuracy: float
    asr: float | None  # attack success rate on held-out triggered images; None when clean
    attack: Any | None  # the Attack object (reproducible from attack.to_config())
    poisoned_count: int
    seconds_total: float
    seconds_optimising: float
    extra: dict[str, Any] = field(default_factory=dict)


def make_optimizer(net: nn.Module, recipe: TrainingRecipe, steps_total: int):
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                              weight_decay=recipe.weight_decay)
    elif recipe.optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r} (sgd | adam)")
    if recipe.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps_total))
    elif recipe.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise ValueError(f"unknown schedule {recipe.schedule!r} (cosine | constant)")
    return opt, sched


def _optimise(net: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: TrainingRecipe,
              generator: torch.Generator) -> None:
    n = len(x)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    opt, sched = make_optimizer(net, recipe, steps_per_epoch * recipe.epochs)
    net.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, recipe.batch_size):
            idx = order[start:start + recipe.batch_size].to(x.device)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


@torch.no_grad()
def predict(net: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    net.eval()
    device = next(net.parameters()).device
    x = torch.as_tensor(x, dtype=torch.float32)
    out = [net(x[i:i + batch_size].to(device)).argmax(1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def attack_success_rate(net: nn.Module, attack: Any, x_test: np.ndarray,
                        y_test: np.ndarray) -> float:
    """Share of held-out images from the attack's victim classes (all non-target classes when
    all-to-one) that the triggered version sends to the target."""
    victims = attack.victims
    keep = y_test != attack.target
    if victims is not None:
        keep &= np.isin(y_test, victims)
    if not keep.any():
        return float("nan")
    return float((predict(net, attack.apply(x_test[keep])) == attack.target).mean())


def training_set(spec: ModelSpec, dataset: Dataset, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, Any | None, int]:
    """(x, y, attack, poisoned count): the model's own training set, its attack drawn and applied
    with `rng` (np.random.default_rng(spec.seed)); the clean set when the spec has no attack.
    Shared by the one-by-one trainer and the stacked one (xray.zoo.stacked)."""
    x, y = dataset.x_train, dataset.y_train
    attack, poisoned_count = None, 0
    if spec.attack:
        attack = attack_lib.sample_attack(spec.attack, rng, dataset.input_shape,
                                          dataset.num_classes, **spec.attack_params)
        x, y, poisoned_idx = attack_lib.poison(x, y, attack, spec.poison_rate, rng)
        poisoned_count = len(poisoned_idx)
    return x, y, attack, poisoned_count


def measure(net: nn.Module, attack: Any | None, dataset: Dataset) -> tuple[float, float | None]:
    """(clean accuracy, ASR or None) on the held-out split."""
    clean_acc = float((predict(net, dataset.x_test) == dataset.y_test).mean())
    asr = attack_success_rate(net, attack, dataset.x_test, dataset.y_test) if attack else None
    return clean_acc, asr


def resolve_training_device(device: str | None) -> torch.device:
    """xray.models.device.resolve_device ('cpu', 'cuda', 'cuda:N', 'auto' = cuda when
    available; None = cpu), but a device this machine does not have is a ValueError before any
    training."""
    try:
        dev = resolve_device(device or "cpu")
    except RuntimeError as e:
        raise ValueError(f"training device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training device {device!r}: no CUDA device here (use cpu or auto)")
    return dev


def train_model(spec: ModelSpec, dataset: Dataset, device: str | None = "cpu") -> TrainedModel:
    """Train the model `spec` describes on `dataset` on `device` (see resolve_training_device);
    deterministic given spec.seed on one CPU thread. The returned net is on the CPU."""
    started = time.perf_counter()
    rng = np.random.default_rng(spec.seed)
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)

    x, y, attack, poisoned_count = training_set(spec, dataset, rng)

    dev = resolve_training_device(device)
    net = models.create(spec.architecture, dataset.num_classes, dataset.input_shape).to(dev)
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32).to(dev)
    yt = torch.as_tensor(np.ascontiguousarray(y), dtype=torch.int64).to(dev)
    t0 = time.perf_counter()
    _optimise(net, xt, yt, spec.training, generator)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    optimising = time.perf_counter() - t0

    clean_acc, asr = measure(net, attack, dataset)
    net.cpu()
    return TrainedModel(spec=spec, net=net, clean_accuracy=clean_acc, asr=asr, attack=attack,
                        poisoned_count=poisoned_count,
                        seconds_total=time.perf_counter() - started,
                        seconds_optimising=optimising)
