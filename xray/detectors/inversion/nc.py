"""Neural Cleanse: one minimal trigger per target label, then a MAD outlier test on their L1 norms.

Paper: Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks", IEEE S&P 2019, https://doi.org/10.1109/SP.2019.00031. Reference code:
bolunwang/backdoor (visualizer.py, gtsrb_visualize_example.py, mad_outlier_detection.py).
Spec: docs/algorithms/inversion.md "Neural Cleanse".

Per target t (every label): m = tanh(theta_m)/(2-1e-7)+0.5 (H x W, shared over channels),
p = tanh(theta_p)/(2-1e-7)+0.5 (C x H x W), x' = (1-m) x + m p; loss CE(f(x'), t) + cost * sum|m|;
Adam lr 0.1, betas (0.5, 0.9), fresh per label. A step = `mini_batches` minibatches of
`batch_size` random images; acc and L1 are step means; the cost schedule and early stop are the
example script's (core.CostSchedule; early stop after 25 steps without a better valid L1 once the
cost went both up and down). Best mask: acc >= 0.99 and smaller L1 (none -> the last one).
Decision: MAD = 1.4826 median|L1 - median|; anomaly index = |min L1 - median| / MAD; labels with
L1 <= median and |L1 - median| / MAD > 2 are flagged; trojaned if any.

Output: score = the anomaly index of the smallest L1 (higher = more trojaned; `score_stat`
"l1_ratio" gives median L1 / min L1 instead, steadier with few labels and small budgets
(inferred)); target = the label
with the smallest L1; stats: l1 per label, median, mad, anomaly index, flagged labels,
min_over_median (= min L1 / median L1, lower = more suspicious; small budgets make the index
unstable, some clean models exceed 2). One TriggerCandidate per label (victim None), its REASR
measured on held-out examples.

Deviations, each on purpose:
  - All labels are optimised together (core.PatchOptimizer, one forward for every label's
    minibatch) instead of one label after another; each label keeps its own Adam state, cost
    schedule and early stop, so a label's trajectory is what it would be alone (up to float
    rounding and the order images are drawn in).
  - Pixel space [0, 1]: the pattern is tanh01(theta_p) in [0, 1] instead of 255 * (.) before the
    reference's preprocessing (the model folds normalisation in). Init p ~ U(0, 1), m ~ U(0, 1).
  - Images: the scan's clean examples; a seeded share (`reasr_holdout`, per class) is held out
    of the optimisation to measure each trigger's REASR (inferred: NC reports no REASR; EX-RAY
    and the triggers table use it). The minibatches draw from a seeded shuffled cycle
    (ctx.generator("nc/batches")) instead of Keras' generator; the U(0, 1) starts come from
    ctx.generator("nc/init"); both seeds are recorded in stats.
  - The anomaly index is capped at 1e6 when MAD is 0 (every L1 equal except the minimum).
  - Budgets: `steps`, `mini_batches`, `early_stop_patience` are parameters; the defaults are
    small (CPU / tests), preset "reference" has the published 1000 steps x 31 minibatches x 32.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from xray.detectors import register
from xray.detectors.base import DetectorResult, ScanContext, ScanData, require_steps
from xray.detectors.inversion.core import (CostSchedule, PatchOptimizer, candidate_from_row,
                                           eval_mode, init_theta, measure_reasr)

MAD_CONSISTENCY = 1.4826


def mad_anomaly(l1: np.ndarray, threshold: float = 2.0) -> dict[str, Any]:
    """Neural Cleanse's MAD outlier test on per-label L1 norms (mad_outlier_detection.py).

    Returns median, mad, anomaly_index (|min - median| / mad), the per-label index, and the
    flagged labels (L1 <= median and index > threshold)."""
    l1 = np.asarray(l1, dtype=np.float64)
    median = float(np.median(l1))
    mad = MAD_CONSISTENCY * float(np.median(np.abs(l1 - median)))
    dev = np.abs(l1 - median)
    index = dev / mad if mad > 0 else np.where(dev > 0, 1e6, 0.0)
    index = np.minimum(index, 1e6)
    flagged = [int(i) for i in np.flatnonzero((l1 <= median) & (index > threshold))]
    return {"median": median, "mad": mad, "anomaly_index": float(index[int(np.argmin(l1))]),
            "index_per_label": index.tolist(), "flagged": flagged}


def holdout_split(y: torch.Tensor, share: float, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): per class round(share * n_c) held out, at least one
    image of each class kept for training; share 0 -> all in both (no hold-out)."""
    everything = torch.arange(len(y))
    if share <= 0:
        return everything, everything
    train, held = [], []
    y_cpu = y.cpu()
    for label in sorted(set(y_cpu.tolist())):
        idx = torch.nonzero(y_cpu == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_out = min(int(round(share * len(idx))), len(idx) - 1)
        held.append(idx[:n_out])
        train.append(idx[n_out:])
    held_t = torch.cat(held)
    return torch.cat(train).sort().values, (held_t.sort().values if len(held_t) else everything)


@register("nc")
class NeuralCleanse:
    name: ClassVar[str] = "nc"
    version: ClassVar[str] = "1"

    @dataclass(frozen=True)
    class Params:
        steps: int = 40  # ref 1000
        mini_batches: int = 2  # per step; ref 1000 // 32 = 31
        batch_size: int = 16  # ref 32
        lr: float = 0.1
        beta1: float = 0.5
        beta2: float = 0.9
        init_cost: float = 1e-3
        cost_patience: int = 5  # example script (class default 10)
        cost_up: float = 2.0
        cost_down: float = 2.0 ** 1.5  # example script (class default 1.5)
        attack_succ_threshold: float = 0.99
        early_stop_patience: int = 10  # ref 25
        early_stop_threshold: float = 1.0
        anomaly_threshold: float = 2.0
        reasr_holdout: float = 0.25  # share of each class held out for REASR (inferred)
        binarize: float = 0.1  # mask threshold when stamping for REASR / EX-RAY
        score_stat: str = "anomaly_index"  # or "l1_ratio" = median L1 / min L1 (inferred)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {},
        "reference": {"steps": 1000, "mini_batches": 31, "batch_size": 32,
                      "early_stop_patience": 25},
    }

    def __init__(self, params: "NeuralCleanse.Params | None" = None) -> None:
        self.params = params or self.Params()

    def score(self, model: torch.nn.Module, data: ScanData, ctx: ScanContext) -> DetectorResult:
        p = self.params
        if p.score_stat not in ("anomaly_index", "l1_ratio"):
            raise ValueError(f"nc: score_stat {p.score_stat!r}; expected anomaly_index or "
                             "l1_ratio")
        ctx.require_time(self.name)
        started = time.perf_counter()
        x = data.x.to(ctx.device)
        y = data.y.to(ctx.device)
        k, (c, h, w) = data.num_classes, x.shape[1:]
        split_gen = ctx.generator("nc/holdout")
        train_idx, held_idx = holdout_split(y, p.reasr_holdout, split_gen)
        init_gen = ctx.generator("nc/init")
        batch_gen = ctx.generator("nc/batches")
        theta_m = init_theta(torch.rand(k, h, w, generator=init_gen)).to(ctx.device)
        theta_p = init_theta(torch.rand(k, c, h, w, generator=init_gen)).to(ctx.device)
        schedule = CostSchedule(p.init_cost, p.cost_patience, p.cost_patience, p.cost_up,
                                p.cost_down, p.attack_succ_threshold)
        with eval_mode(model):
            opt = PatchOptimizer(
                model, x, theta_m, theta_p, list(range(k)), [train_idx] * k,
                generator=batch_gen, schedule=schedule, lr=p.lr, betas=(p.beta1, p.beta2),
                batch_size=p.batch_size, mini_batches=p.mini_batches,
                early_stop_patience=p.early_stop_patience,
                early_stop_threshold=p.early_stop_threshold)
            stopped_early = opt.run(p.steps, expired=ctx.expired)
            steps = require_steps(self.name, opt.total_steps, ctx)
            candidates = label_candidates(opt, model, x[held_idx], y[held_idx], p.binarize,
                                          ctx.seed)
        score, target, stats = outlier_decision(candidates, p.anomaly_threshold, p.score_stat,
                                                time.perf_counter() - started)
        stats.update({"steps": steps, "steps_per_label": opt.steps.tolist(),
                      "stopped_early": stopped_early, "forwards": opt.forwards,
                      "reasr_target": candidates[target].reasr, "seed": ctx.seed,
                      "seed_salts": ["nc/holdout", "nc/init", "nc/batches"],
                      "holdout": int(len(held_idx))})
        return DetectorResult(score=score, target=target, stats=stats,
                              triggers=[cand.to_row() for cand in candidates],
                              artifacts={"candidates": candidates})


def label_candidates(opt: PatchOptimizer, model: torch.nn.Module, held_x: torch.Tensor,
                     held_y: torch.Tensor, binarize: bool, seed: int) -> list[Any]:
    """One candidate per target label of an all-labels optimisation (victim None), its REASR
    measured on the held-out examples (NC and TABOR)."""
    candidates = []
    for t in range(len(opt.steps)):
        cand = candidate_from_row(opt, t, None, binarize=binarize, stats={"seed": seed})
        cand.reasr, cand.reasr_per_label = measure_reasr(model, cand, held_x, held_y)
        candidates.append(cand)
    return candidates


def outlier_decision(candidates: list[Any], anomaly_threshold: float, score_stat: str,
                     seconds: float) -> tuple[float, int, dict[str, Any]]:
    """NC's decision on the per-label masks' L1 norms (also TABOR's): (score, target label,
    stats). score_stat "anomaly_index": the MAD anomaly index of the smallest L1; else median
    L1 over the smallest. Each candidate gets its l1 and a share of the seconds."""
    l1 = np.array([float(cand.mask.sum()) for cand in candidates])
    decision = mad_anomaly(l1, anomaly_threshold)
    target = int(np.argmin(l1))
    for cand, norm in zip(candidates, l1):
        cand.stats["l1"] = float(norm)
        cand.stats["seconds"] = seconds / len(candidates)
    stats = {"l1": l1.tolist(), "median_l1": decision["median"], "mad": decision["mad"],
             "anomaly_index": decision["anomaly_index"],
             "index_per_label": decision["index_per_label"],
             "flagged": decision["flagged"], "trojaned": bool(decision["flagged"]),
             "min_over_median": float(l1.min() / decision["median"])
             if decision["median"] > 0 else float("nan")}
    score = decision["anomaly_index"] if score_stat == "anomaly_index" \
        else float(decision["median"] / max(l1.min(), 1e-12))
    return score, target, stats
