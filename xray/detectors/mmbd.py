"""MM-BD: data-free backdoor detection by maximum margin statistics and a gamma null.

Paper: Wang, Mahmood, Zhang, Wang, Miller, Kesidis, "MM-BD: Post-Training Detection of Backdoor
Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024,
https://arxiv.org/abs/2205.06900. Reference code: wanghangpsu/MM-BD, `univ_bd.py`.
Spec: docs/algorithms/baselines.md "MM-BD".

Algorithm (per model, K classes, no clean data needed):
  1. For each class t: S random starts x ~ U[0,1]^(C, H, W). Gradient ascent on the margin
     m_t(x) = z_t(clamp(x, 0, 1)) - max_{j != t} z_j(clamp(x, 0, 1)) (z = logits): the class
     loss L_t = -sum over its starts of m_t, one SGD step of lr on x (momentum 0.2 in the
     reference, but its optimiser is re-created every step, so momentum never acts: a plain
     gradient step). x itself is never clamped: coordinates outside [0, 1] get zero gradient.
  2. Stopping, per class: after each step stop if |L_prev - L| / |L_prev| < tol (L = that step's
     pre-update loss, L_prev starts at 1000), or after max_steps steps.
  3. r_t = max over starts of the margin from the class's last forward pass.
  4. t* = argmax r; r_null = the other K - 1 values; (shape, loc, scale) =
     scipy.stats.gamma.fit(r_null) (3-parameter MLE); p = 1 - GammaCDF(r_t*)^K (exponent
     len(r_null) + 1). Attack iff p <= alpha (0.05), target t*.

Output: score = 1 - p (higher = more likely trojaned; a probability-like number in [0, 1], not a
calibrated probability: the gamma fit on K - 1 points is unstable, see below); target = t*
always (stats["attack"] says whether p <= alpha); stats keep the raw margins r, the fit, p and the
per-class step counts so the reducer can calibrate on clean models.

Batching: all K classes x S starts are optimised together (K S inputs, in forward chunks of at
most `batch_size`); each class's stopping rule is tracked separately, and a stopped class's
starts leave the batch. The result equals running the classes one after another (up to float
rounding) because the starts' gradients are independent.

Deviations from the reference code, each on purpose:
  - Starts are drawn from a seeded generator (ctx.generator("mmbd/starts")); the reference
    uses unseeded torch.rand. All starts of all classes are drawn at once (class-major).
  - K = the model's class count (reference: 10 hard-coded); inputs in the model's pixel space
    [0, 1]^(C, H, W) (the reference's CIFAR-10 ResNet takes [0, 1] without normalisation; our
    models fold their normalisation in, so the same space).
  - Batched over classes with per-class stopping, as above (reference: one class at a time).
  - A gamma fit that raises, returns non-finite parameters, or has fewer than 3 null points
    gives p = 1 with the reason in stats["fit_error"] (the reference would crash or print nan).
  - The model's deadline (ctx.deadline, seconds left) ends the ascent early: the margins of the
    last step are used and stats["stopped_early"] says so; no step at all -> DeadlinePassed.
    stats["steps"] is the total step count over classes (per class in steps_per_class).
  - The "small" preset (CPU tests) uses fewer starts and steps and a larger step (lr 0.1);
    "reference" is the published budget (30 starts, 300 steps, lr 0.01).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xray.detectors._registry import register
from xray.detectors.base import (DetectorResult, ScanContext, ScanData, eval_mode,
                                 require_steps)


@dataclass(frozen=True)
class Params:
    starts: int = 30  # random starts per class (ref 30)
    max_steps: int = 300  # ref NSTEP 300
    lr: float = 0.01  # ref SGD lr (momentum 0.2 never acts: the optimiser is re-created)
    tol: float = 1e-5  # relative change of the class loss that stops it (ref 1e-5)
    alpha: float = 0.05  # detection level on p (ref 0.05)
    batch_size: int = 1024  # most inputs per forward pass (memory only; results unchanged)


@register("mmbd")
class MMBD:
    name = "mmbd"
    version = "1"
    Params = Params
    presets = {
        "small": {"starts": 8, "max_steps": 80, "lr": 0.1},
        "reference": {"starts": 30, "max_steps": 300, "lr": 0.01, "tol": 1e-5, "alpha": 0.05},
    }

    def __init__(self, params: Params | None = None) -> None:
        self.params = params or Params()

    def score(self, model: torch.nn.Module, data: ScanData, ctx: ScanContext) -> DetectorResult:
        p = self.params
        k = int(data.num_classes)
        shape = tuple(int(s) for s in data.x.shape[1:])
        ctx.require_time(self.name)
        with eval_mode(model):
            margins, steps, stopped_early = maximise_margins(model, k, shape, p, ctx)
        stats = null_test(margins, p.alpha)
        stats["steps"] = require_steps(self.name, sum(steps), ctx)
        stats["steps_per_class"] = steps
        stats["stopped_early"] = stopped_early
        stats["starts"] = p.starts
        return DetectorResult(score=1.0 - stats["p_value"], target=stats["target"], stats=stats)


def maximise_margins(model: torch.nn.Module, k: int, shape: tuple[int, ...], p: Params,
                     ctx: ScanContext) -> tuple[list[float], list[int], bool]:
    """r_t for every class t (max margin over its starts), each class's step count, and whether
    the model's deadline (ctx.expired, asked before each step) stopped the ascent early. Every
    step moves every active class, so one step taken means every class has a margin."""
    device = ctx.device
    s = p.starts
    x = torch.rand((k * s,) + shape, generator=ctx.generator("mmbd/starts")).to(device)
    label = torch.arange(k, device=device).repeat_interleave(s)  # class-major
    onehot = torch.nn.functional.one_hot(label, k).to(x.dtype)
    last_loss = torch.full((k,), 1000.0, dtype=torch.float64)
    active = torch.ones(k, dtype=torch.bool)
    steps = [0] * k
    margin_last = torch.zeros(k * s, dtype=torch.float64)

    def margins_and_grad(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Margins of x[rows] and d(-margin)/dx, in chunks of batch_size."""
        out_m, out_g = [], []
        for start in range(0, len(rows), p.batch_size):
            r = rows[start:start + p.batch_size]
            xr = x[r].detach().requires_grad_(True)
            z = model(xr.clamp(0, 1))
            oh = onehot[r]
            # the reference's margin: z_t - max_j[(1 - onehot) z - 1000 onehot]
            m = (z * oh).sum(1) - ((1 - oh) * z - 1000 * oh).max(1).values
            (g,) = torch.autograd.grad(-m.sum(), xr)
            out_m.append(m.detach())
            out_g.append(g)
        return torch.cat(out_m), torch.cat(out_g)

    stopped_early = False
    for _ in range(p.max_steps):
        classes = torch.nonzero(active).flatten()
        if len(classes) == 0:
            break
        if ctx.expired():
            stopped_early = True
            break
        rows = (classes.view(-1, 1) * s + torch.arange(s).view(1, -1)).flatten().to(device)
        m, g = margins_and_grad(rows)
        with torch.no_grad():
            x[rows] -= p.lr * g  # SGD step on L = -sum m (momentum never acts, see docstring)
        m_cpu = m.double().cpu()
        margin_last[rows.cpu()] = m_cpu
        loss = -m_cpu.view(len(classes), s).sum(1)
        for i, t in enumerate(classes.tolist()):
            steps[t] += 1
            if abs(last_loss[t] - loss[i]) / abs(last_loss[t]) < p.tol:
                active[t] = False
            last_loss[t] = loss[i]
    r = margin_last.view(k, s).max(1).values
    return [float(v) for v in r], steps, stopped_early


def null_test(r: list[float], alpha: float = 0.05) -> dict[str, Any]:
    """t* = argmax r, gamma fit (scipy, 3 parameters) on the other values, p = 1 - CDF(r_t*)^K.

    A failed fit gives p = 1 and the reason in "fit_error"."""
    values = np.asarray(r, dtype=np.float64)
    target = int(np.argmax(values))
    null = np.delete(values, target)
    out: dict[str, Any] = {"margins": values.tolist(), "target": target,
                           "max_margin": float(values[target]), "fit_error": None,
                           "gamma_shape": None, "gamma_loc": None, "gamma_scale": None}
    p_value = 1.0
    from scipy import stats as sps  # here: scipy.stats costs every scan actor ~0.5 s to import

    try:
        if len(null) < 3:
            raise ValueError(f"{len(null)} null statistics; a 3-parameter gamma fit needs >= 3")
        if not np.all(np.isfinite(values)):
            raise ValueError("non-finite margin statistics")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shape, loc, scale = sps.gamma.fit(null)
            if not all(math.isfinite(v) for v in (shape, loc, scale)) or scale <= 0 or shape <= 0:
                raise ValueError(f"degenerate gamma fit (shape {shape}, loc {loc}, "
                                 f"scale {scale})")
            cdf = float(sps.gamma.cdf(values[target], a=shape, loc=loc, scale=scale))
        p_value = 1.0 - cdf ** (len(null) + 1)
        if not math.isfinite(p_value):
            raise ValueError(f"non-finite p-value from cdf {cdf}")
        out.update(gamma_shape=float(shape), gamma_loc=float(loc), gamma_scale=float(scale))
    except Exception as err:  # noqa: BLE001 -- any fit failure: p = 1 with the reason recorded
        out["fit_error"] = f"{type(err).__name__}: {err}"
        p_value = 1.0
    out["p_value"] = float(min(max(p_value, 0.0), 1.0))
    out["attack"] = bool(out["p_value"] <= alpha)
    return out
