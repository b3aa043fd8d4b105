"""Poisoning a training set with an attack, and the triggered held-out set for its success rate."""
from __future__ import annotations

import numpy as np

from xray.zoo.attacks.base import Attack


def poison(x: np.ndarray, y: np.ndarray, attack: Attack, rate: float | None = None,
           rng: np.random.Generator | int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poison a training set: (x_out, y_out, indices of the poisoned samples in x_out).

    Which and how many samples (rate defaults to `attack.default_rate`):
    - all-to-one: round(rate * N) samples whose label is not the target, triggered and relabelled
      (rate is a fraction of the whole set; an error if there are not that many);
    - all-to-all: round(rate * N) samples of any class, triggered and relabelled c -> c + 1 mod K;
    - victims set (label-specific): round(rate * n_victim) of the victim classes' samples, as
      TrojAI's trigger fraction of the source classes;
    - clean label (SIG, clean_label, hidden_trigger, reflection): min(round(rate * N), n_target)
      target-class samples, poisoned and not relabelled (BackdoorBench's convention: the rate is
      of the whole set, capped by the class);
    - MNTD attacks (adds_copies): int(rate * N) samples of any class, drawn without replacement,
      are *appended* as triggered copies labelled target (docs/algorithms/baselines.md); x_out
      is longer than x.
    WaNet also replaces round(cross_ratio * n) other samples by noise-mode warps, labels kept
    (they are not in the returned indices).
    """
    x, y = np.asarray(x), np.asarray(y)
    rng = np.random.default_rng(rng)
    rate = attack.default_rate if rate is None else float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poisoning rate must lie in [0, 1], got {rate}")
    n_total = len(y)
    if attack.adds_copies:
        idx = np.sort(rng.choice(n_total, size=int(rate * n_total), replace=False))
        x_out = np.concatenate([x, attack.apply(x[idx])])
        y_out = np.concatenate([y, np.full(len(idx), attack.target, dtype=y.dtype)])
        return x_out, y_out, np.arange(n_total, n_total + len(idx))
    if attack.clean_label:
        pool = np.flatnonzero(y == attack.target)
        n = min(int(round(rate * n_total)), len(pool))
    elif attack.victims is not None:
        pool = np.flatnonzero(np.isin(y, attack.victims))
        n = int(round(rate * len(pool)))
    else:
        pool = np.flatnonzero(attack.source_mask(y))
        n = int(round(rate * n_total))
        if n > len(pool):
            raise ValueError(f"rate {rate} asks for {n} samples but only {len(pool)} are not of "
                             f"the target class {attack.target}")
    idx = np.sort(rng.choice(pool, size=n, replace=False))
    x_out, y_out = x.copy(), y.copy()
    if n:
        x_out[idx] = attack.poisoned_images(x[idx], rng)
    if not attack.clean_label:
        y_out[idx] = attack.target_of(y[idx])
    cross_ratio = getattr(attack, "cross_ratio", 0.0)
    if cross_ratio > 0 and n > 0:
        rest = np.setdiff1d(np.arange(n_total), idx)
        cross = np.sort(rng.choice(rest, size=min(int(round(cross_ratio * n)), len(rest)),
                                   replace=False))
        x_out[cross] = attack.apply_noise(x[cross], rng)  # type: ignore[attr-defined]
    return x_out, y_out, idx


def trigger_test_set(x: np.ndarray, y: np.ndarray, attack: Attack
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out images for the attack success rate: (triggered x, target labels, source indices).

    The sources are `attack.source_mask(y)`: the victim classes' images, every image (all-to-all)
    or every image not of the target class.
    """
    y = np.asarray(y)
    idx = np.flatnonzero(attack.source_mask(y))
    return attack.apply(np.asarray(x)[idx]), attack.target_of(y[idx]), idx
