"""The zoo's optimiser, schedule and minibatch order: one definition shared by the standard
training loop (xray.zoo.train) and the attacks that train the model themselves (LIRA, input-aware,
Blind, adaptive: their `train` hook), so every zoo model follows the recipe's optimiser alike.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from xray.zoo.recipe import TrainingRecipe


def make_optimizer(net: nn.Module, recipe: TrainingRecipe, steps_total: int,
                   params=None):
    """(optimiser, per-step scheduler) for `recipe`; `params` defaults to the net's parameters
    (attacks pass the generator's too)."""
    params = list(net.parameters()) if params is None else list(params)
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                              weight_decay=recipe.weight_decay)
    elif recipe.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r} (sgd | adam)")
    if recipe.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps_total))
    elif recipe.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise ValueError(f"unknown schedule {recipe.schedule!r} (cosine | constant)")
    return opt, sched


def steps_total(n: int, recipe: TrainingRecipe) -> int:
    return math.ceil(n / recipe.batch_size) * recipe.epochs


def minibatches(n: int, recipe: TrainingRecipe, generator: torch.Generator
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, indices) for every step: a fresh permutation of range(n) per epoch, cut into
    batches of recipe.batch_size (the last one shorter)."""
    for epoch in range(recipe.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, recipe.batch_size):
            yield epoch, order[start:start + recipe.batch_size]


def standard_training(net: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: TrainingRecipe,
                      generator: torch.Generator) -> None:
    """Cross-entropy on (x, y) with the recipe's optimiser and schedule; the net ends in eval."""
    opt, sched = make_optimizer(net, recipe, steps_total(len(x), recipe))
    net.train()
    for _, idx in minibatches(len(x), recipe, generator):
        idx = idx.to(x.device)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
