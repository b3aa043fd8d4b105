"""Stacked vs one-by-one training of MNTD shadow models (MNIST CNN, the mntd_shadow recipe).

Trains the same K shadow specs (half benign, half jumbo; 1,200-image MNIST split, Adam lr 1e-3,
batch 100) for a few epochs twice: one by one (xray.zoo.train.train_model, in turn) and as one
stack (xray.zoo.stacked.train_stack), in this process with all cores' threads. Figures:

  speedup_vs_one_by_one      one-by-one optimisation seconds / stacked optimisation seconds
  projected_hours_2048       2,048 shadow models x 100 epochs with stacked training, from the
                             measured seconds per model-epoch (optimisation only)
  projected_hours_2048_one_by_one   the same for one-by-one training
  seconds_per_model_epoch_stacked / _one_by_one

    .venv/bin/python bench/stacked_training.py [--models 16] [--epochs 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import record  # noqa: E402

import torch  # noqa: E402

from xray.zoo.data import load_dataset  # noqa: E402
from xray.zoo.recipe import load_recipe  # noqa: E402
from xray.zoo.stacked import train_stack  # noqa: E402
from xray.zoo.train import train_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N] or auto")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe("mntd_shadow")
    dataset = load_dataset(recipe.dataset, **recipe.dataset_params)
    specs = recipe.model_specs()
    half = args.models // 2
    picked = specs[:half] + specs[2048:2048 + args.models - half]  # benign + jumbo
    picked = [dataclasses.replace(s, training=dataclasses.replace(s.training,
                                                                  epochs=args.epochs))
              for s in picked]
    train_stack(picked[:2], dataset, args.device)  # warm-up (allocator, kernels)

    t0 = time.perf_counter()
    one = [train_model(s, dataset, args.device) for s in picked]
    wall_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    stacked = train_stack(picked, dataset, args.device)
    wall_stacked = time.perf_counter() - t0
    opt_one = sum(t.seconds_optimising for t in one)
    opt_stacked = sum(t.seconds_optimising for t in stacked)
    per_me_one = opt_one / (args.models * args.epochs)
    per_me_stacked = opt_stacked / (args.models * args.epochs)
    full_epochs = recipe.training.epochs
    figures = {
        "speedup_vs_one_by_one": opt_one / opt_stacked,
        "projected_hours_2048": per_me_stacked * full_epochs * 2048 / 3600,
        "projected_hours_2048_one_by_one": per_me_one * full_epochs * 2048 / 3600,
        "seconds_per_model_epoch_stacked": per_me_stacked,
        "seconds_per_model_epoch_one_by_one": per_me_one,
        "wall_speedup": wall_one / wall_stacked,
        "models": args.models,
        "epochs": args.epochs,
        "mean_clean_accuracy_one_by_one": sum(t.clean_accuracy for t in one) / len(one),
        "mean_clean_accuracy_stacked": sum(t.clean_accuracy for t in stacked) / len(stacked),
    }
    path = record("stacked_training",
                  f".venv/bin/python bench/stacked_training.py --models {args.models} "
                  f"--epochs {args.epochs} --device {args.device}", figures,
                  notes={"threads": torch.get_num_threads(),
                         "load_average": os.getloadavg()})
    print(path.read_text())


if __name__ == "__main__":
    main()
