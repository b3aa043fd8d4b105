"""ABS: Artificial Brain Stimulation — candidate neurons from stimulation, then triggers driving them.

Paper: Liu et al., "ABS: Scanning Neural Networks for Back-doors by Artificial Brain
Stimulation", ACM CCS 2019, https://doi.org/10.1145/3319535.3363216. Reference code: the
TrojAI-round-3 ABS used by EX-RAY, PurduePAML/Exray abs_pytorch1_both_batch_inner_both_with_prune.py
(patch and filter triggers, one inner layer); original: naiyeleo/ABS abs.py (TensorFlow).
Spec: shared/specs/inversion.md "ABS"; layer: shared/specs/exray.md "Layer" via
xray.models.layers.split_model (h = input -> layer incl. normalisation, g = the rest).

1. Stimulation at the layer (`layer`, default the second-to-last block): `stim_images` images per
   label; M_y = the max activation of the layer over all label-y images. Per image and channel the
   whole map is set to v * M_y, v in `stim_levels` (0, 0.5, 1); elev_l = max_{v>0} logit_l -
   logit_l(v=0); the neuron's label = argmax elev, its score = top - second elevation.
2. Candidates per victim V: channels where every stimulated V image gives the same label T != V;
   value = min score over those images; the best channel per T; sorted by value, with T among V's
   `runner_up` most frequent runner-up labels (logit ranks 2-4 on V's images) first; `per_victim`
   kept per V.
3. Mode: `trial_epochs` epochs as a patch and as a filter; the mode with the larger mean target
   logit wins; then `epochs` epochs in total. Images: up to `images_per_victim` images of V, all
   candidates batched; epoch 0 forward only.
4. Patch: x' = (1-m) x~ + m d, x~ = clamp(x + U(-0.05, 0.05), 0, 1); d = tanh(theta_d)/2+0.5
   (C x 1 x 1, theta_d ~ U(-1, 1)); m = tanh(theta_m)/2+0.5 with theta_m = 2 on a square of side
   int(0.8 sqrt(S)) whose top-left corner is the image centre, -4 elsewhere; Adam lr 0.3.
   loss = -a_c - relu(a)_c + 1e-4 (a_o + relu(a)_o) + P(m) - 100 sum_batch logit_u, with a_c the
   candidate channel's map summed over H x W (mean over images), a_o the same averaged over the
   other channels, P = 0 if nnz(m > 0.01) <= S, 100 sum m if <= 1.2 S, else 200 sum m; u = the
   neuron's label, switched after an epoch to the majority non-V label of the stamped images when
   its share exceeds 0.2. S = 1600 px at 224 x 224, scaled with the image area.
5. Filter: x' = clamp([x, maxpool(x), -maxpool(x), avgpool(x)] . K, 0, 1), pools scaled from
   111 x 111 at 224 px, stride 1; K = tanh(theta)/2+0.5 (4C x C), theta = +2 on the identity,
   -2 elsewhere; loss = the neuron / logit terms - sum_i (10 SSIM_i if SSIM_i > 0.8 else
   1e5 SSIM_i) with MS-SSIM; Adam lr 0.1; u fixed.
6. Keep a trigger if its training flip rate (share of the V images predicted u at the end) is
   >= `keep_flip`; REASR on all example images (mask binarised at m > 0.1): per label the share
   predicted T, reported as the max over labels != T. Model score = best REASR of the kept
   triggers (0 when none is kept); target = that trigger's T.

Deviations, each on purpose:
  - Every candidate (all victims x `per_victim`) is optimised in one batch, in both modes during
    the trial; the reference batches 5 candidates at a time.
  - After the trial the winning mode continues from its trial state (the trial epochs count
    toward `epochs`) (inferred; the trial is part of the budget).
  - Images are the scan's pixel-space examples; the model folds normalisation in (ref: 224
    centre crop, min-max scaled per image, TrojAI's preprocessing). a is the output of the layer
    split_model returns; for the MNTD CNNs that block ends with its ReLU and pool, so
    relu(a) = a there (the reference reads the pre-ReLU block output of ResNets / DenseNets).
  - Small images: S and the square side scale with the area (`max_size_224` * H W / 224^2);
    the pool window with the side (core.filter_pool_size, odd); MS-SSIM uses as many levels and as
    large a window as the image holds (core.ms_ssim; 5 levels, 11 px at 224).
  - Noise U(-0.05, 0.05) and theta_d are drawn from ctx.generator("abs/noise"), ("abs/init");
    the seeds are recorded in stats.
  - A victim with fewer than `stim_images` examples uses what it has; candidates need at least
    one image.
Published cost: 337 s and 8.5 triggers per model on an RTX 2080Ti (paper).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from xray.detectors import register
from xray.detectors.base import DetectorResult, ScanContext, ScanData
from xray.detectors.inversion.core import (BatchedAdam, TriggerCandidate, apply_filter,
                                           eval_mode, filter_pool_size, identity_kernel_logits,
                                           mask_size, measure_reasr, ms_ssim)

REFERENCE_AREA = 224 * 224


def _split(model: torch.nn.Module, position: str):
    from xray.models.layers import split_model

    return split_model(model, position)


@torch.no_grad()
def stimulate(h: torch.nn.Module, g: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              levels: tuple[float, ...], batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Stimulation analysis. x (N, C, H, W) pixels, y (N,) labels.

    Returns label (N, F) and score (N, F): per image and channel, the label whose logit rises
    most when the channel's whole map is set to v * M_y, and top - second elevation; also
    max_per_label (M_y). All N * F * len(levels) stimulated maps go through g in batches.
    """
    feats = h(x)  # (N, F, ...)
    n, f = feats.shape[:2]
    flat = feats.reshape(n, f, -1)
    per_image_max = flat.amax(dim=(1, 2))
    m_y = {int(lbl): float(per_image_max[y == lbl].max()) for lbl in torch.unique(y).tolist()}
    scale = torch.tensor([m_y[int(v)] for v in y.tolist()], device=x.device)
    levels_t = torch.tensor(levels, device=x.device, dtype=feats.dtype)
    # (N, F, L) stimulated copies: channel c of image i filled with levels[l] * M_{y_i}
    jobs = [(i, c, l) for i in range(n) for c in range(f) for l in range(len(levels))]
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        ii = torch.tensor([j[0] for j in chunk], device=x.device)
        cc = torch.tensor([j[1] for j in chunk], device=x.device)
        ll = torch.tensor([j[2] for j in chunk], device=x.device)
        stim = feats[ii].clone()
        fill = (levels_t[ll] * scale[ii]).view(-1, *([1] * (feats.dim() - 2)))
        stim[torch.arange(len(chunk), device=x.device), cc] = fill.expand_as(
            stim[torch.arange(len(chunk), device=x.device), cc])
        out.append(g(stim))
    logits = torch.cat(out).reshape(n, f, len(levels), -1)
    zero = [i for i, v in enumerate(levels) if v == 0]
    base = logits[:, :, zero[0]] if zero else g(feats)[:, None].expand(-1, f, -1)
    positive = [i for i, v in enumerate(levels) if v > 0]
    elev = logits[:, :, positive].amax(2) - base  # (N, F, K)
    top2 = elev.topk(2, dim=-1)
    return {"label": top2.indices[..., 0], "score": top2.values[..., 0] - top2.values[..., 1],
            "max_per_label": torch.tensor([m_y[k] for k in sorted(m_y)])}


def select_candidates(label: torch.Tensor, score: torch.Tensor, y: torch.Tensor,
                      runner_ups: dict[int, list[int]], per_victim: int
                      ) -> list[tuple[int, int, int, float]]:
    """(victim, target, channel, value) candidates per ABS step 2 (see module docstring)."""
    out = []
    for v in sorted(set(y.tolist())):
        rows = torch.nonzero(y == v).flatten()
        if len(rows) == 0:
            continue
        lab, sc = label[rows], score[rows]  # (n_v, F)
        same = (lab == lab[0:1]).all(0) & (lab[0] != v)
        best: dict[int, tuple[float, int]] = {}
        for c in torch.nonzero(same).flatten().tolist():
            t, value = int(lab[0, c]), float(sc[:, c].min())
            if t not in best or value > best[t][0]:
                best[t] = (value, c)
        preferred = set(runner_ups.get(v, []))
        ranked = sorted(best.items(), key=lambda kv: (kv[0] not in preferred, -kv[1][0]))
        for t, (value, c) in ranked[:per_victim]:
            out.append((v, t, c, value))
    return out


@register("abs")
class ABS:
    name: ClassVar[str] = "abs"
    version: ClassVar[str] = "1"

    @dataclass(frozen=True)
    class Params:
        layer: str = "second_last"  # middle | second_last | last (split_model positions)
        stim_images: int = 2  # per label
        stim_levels: tuple[float, ...] = (0.0, 0.5, 1.0)
        per_victim: int = 3
        runner_up: int = 3
        modes: tuple[str, ...] = ("patch", "filter")
        trial_epochs: int = 4
        epochs: int = 20  # ref 30 (paper 60)
        images_per_victim: int = 20
        noise: float = 0.05
        max_size_224: float = 1600.0  # S at 224 x 224, scaled with the area
        size_margin: float = 1.2
        size_weights: tuple[float, float] = (100.0, 200.0)
        mask_on: float = 2.0
        mask_off: float = -4.0
        patch_lr: float = 0.3
        filter_lr: float = 0.1
        other_weight: float = 1e-4
        logit_weight: float = 100.0
        switch_share: float = 0.2
        ssim_bound: float = 0.8
        ssim_weights: tuple[float, float] = (10.0, 1e5)
        ssim_levels: int = 5
        keep_flip: float = 0.6
        binarize: float = 0.1

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {},
        "reference": {"epochs": 30, "trial_epochs": 4},
    }

    def __init__(self, params: "ABS.Params | None" = None) -> None:
        self.params = params or self.Params()

    # ------------------------------------------------------------------ optimisation
    def _optimise(self, mode: str, h, g, x_sets, weights, channels, targets, victims,
                  epochs: int, gen: torch.Generator, state: dict | None, hw: tuple[int, int],
                  c_in: int) -> dict:
        """Run `epochs` epochs of one mode for all candidates at once (continuing `state`)."""
        p = self.params
        r, b = weights.shape
        dev = x_sets.device
        H, W = hw
        area_s = p.max_size_224 * H * W / REFERENCE_AREA
        pool = filter_pool_size(W)
        if state is None:
            if mode == "patch":
                side = max(1, int(0.8 * math.sqrt(area_s)))
                theta_m = torch.full((r, H, W), p.mask_off, device=dev)
                theta_m[:, H // 2:H // 2 + side, W // 2:W // 2 + side] = p.mask_on
                theta_d = (torch.rand(r, c_in, 1, 1, generator=gen) * 2 - 1).to(dev)
                params = [theta_m, theta_d]
                lr = p.patch_lr
            else:
                params = [identity_kernel_logits(c_in).to(dev).expand(r, -1, -1).clone()]
                lr = p.filter_lr
            state = {"params": params, "adam": BatchedAdam(params, lr=lr),
                     "u": targets.clone(), "epochs": 0, "loss": [], "target_logit": 0.0}
        params, adam, u = state["params"], state["adam"], state["u"]
        all_rows = torch.arange(r, device=dev)
        wsum = weights.sum(1).clamp_min(1)
        for _ in range(epochs):
            noise = (torch.rand(x_sets.shape, generator=gen) * 2 - 1).to(dev) * p.noise
            xt = (x_sets + noise).clamp(0, 1)
            leaves = [q.detach().requires_grad_(True) for q in params]
            if mode == "patch":
                m = torch.tanh(leaves[0]) / 2 + 0.5  # (R, H, W)
                d = torch.tanh(leaves[1]) / 2 + 0.5  # (R, C, 1, 1)
                x_adv = (1 - m[:, None, None]) * xt + m[:, None, None] * d[:, None]
            else:
                kern = torch.tanh(leaves[0]) / 2 + 0.5
                x_adv = apply_filter(xt, kern, pool)
            flat = x_adv.reshape(r * b, *x_adv.shape[2:])
            a = h(flat)
            logits = g(a).reshape(r, b, -1)
            a = a.reshape(r, b, a.shape[1], -1)
            s_lin = a.sum(-1)  # (R, B, F)
            s_relu = F.relu(a).sum(-1)
            sel = channels[:, None, None].expand(-1, b, 1)
            ac = ((s_lin.gather(2, sel)[..., 0] + s_relu.gather(2, sel)[..., 0]) * weights
                  ).sum(1) / wsum
            tot = ((s_lin.sum(2) + s_relu.sum(2)) * weights).sum(1) / wsum
            ao = (tot - ac) / max(a.shape[2] - 1, 1)
            lu = (logits.gather(2, u[:, None, None].expand(-1, b, 1))[..., 0] * weights).sum(1)
            loss = -ac + p.other_weight * ao - p.logit_weight * lu
            if mode == "patch":
                nnz = (m > 0.01).flatten(1).sum(1).float()
                msum = m.flatten(1).sum(1)
                pen = torch.where(nnz <= area_s, torch.zeros_like(msum),
                                  torch.where(nnz <= p.size_margin * area_s,
                                              p.size_weights[0] * msum, p.size_weights[1] * msum))
                loss = loss + pen
            else:
                ss = ms_ssim(x_adv.reshape(r * b, *x_adv.shape[2:]),
                             xt.reshape(r * b, *xt.shape[2:]), levels=p.ssim_levels
                             ).reshape(r, b)
                term = torch.where(ss > p.ssim_bound, p.ssim_weights[0] * ss,
                                   p.ssim_weights[1] * ss)
                loss = loss - (term * weights).sum(1)
            state["target_logit"] = float(((logits.detach().gather(
                2, u[:, None, None].expand(-1, b, 1))[..., 0] * weights).sum(1) / wsum).mean())
            state["target_logit_rows"] = ((logits.gather(2, u[:, None, None].expand(-1, b, 1))
                                           [..., 0] * weights).sum(1) / wsum).detach()
            state["loss"].append(loss.detach().cpu())
            if state["epochs"] > 0:  # epoch 0: forward only (ref)
                grads = torch.autograd.grad(loss.sum(), leaves)
                adam.step(grads, all_rows)
            with torch.no_grad():
                preds = logits.argmax(-1)
                if mode == "patch":  # u follows the majority non-victim label (> switch_share)
                    for j in range(r):
                        valid = preds[j][weights[j] > 0]
                        others = valid[valid != victims[j]]
                        if len(others):
                            lbl, cnt = Counter(others.tolist()).most_common(1)[0]
                            if cnt / len(valid) > p.switch_share:
                                u[j] = lbl
            state["epochs"] += 1
        state["pool"] = pool
        return state

    @torch.no_grad()
    def _finish(self, mode: str, state: dict, x_sets, weights, model, x, y, victims,
                started: float, extra: list[dict]) -> list[TriggerCandidate]:
        p = self.params
        r = weights.shape[0]
        out = []
        params = state["params"]
        for j in range(r):
            if mode == "patch":
                mask = (torch.tanh(params[0][j]) / 2 + 0.5).cpu()
                pattern = (torch.tanh(params[1][j]) / 2 + 0.5).cpu()
                cand = TriggerCandidate(victim=int(victims[j]), target=int(state["u"][j]),
                                        kind="patch", mask=mask, pattern=pattern,
                                        size=mask_size(mask), binarize=p.binarize)
            else:
                kernel = (torch.tanh(params[0][j]) / 2 + 0.5).cpu()
                cand = TriggerCandidate(victim=int(victims[j]), target=int(state["u"][j]),
                                        kind="filter", kernel=kernel, pool=state["pool"])
                xv = x_sets[j][weights[j] > 0]
                cand.size = float(ms_ssim(cand.apply(xv), xv, levels=p.ssim_levels).mean())
            xv = x_sets[j][weights[j] > 0]
            flip = float((model(cand.apply(xv)).argmax(1) == cand.target).float().mean())
            cand.reasr, cand.reasr_per_label = measure_reasr(model, cand, x, y)
            losses = torch.stack(state["loss"])[:, j]
            cand.stats.update({"flip_rate": flip, "kept": flip >= p.keep_flip,
                               "epochs": state["epochs"], "loss_first": float(losses[0]),
                               "loss_last": float(losses[-1]), "loss_min": float(losses.min()),
                               **extra[j]})
            out.append(cand)
        return out

    # ------------------------------------------------------------------ score
    def score(self, model: torch.nn.Module, data: ScanData, ctx: ScanContext) -> DetectorResult:
        p = self.params
        started = time.perf_counter()
        x, y = data.x.to(ctx.device), data.y.to(ctx.device)
        c_in, H, W = x.shape[1:]
        sel_gen = ctx.generator("abs/stimulation")
        with eval_mode(model):
            h, g, layer_name = _split(model, p.layer)
            # 1. stimulation on stim_images per label (seeded choice)
            stim_idx = []
            for lbl in sorted(set(y.tolist())):
                idx = torch.nonzero(y.cpu() == lbl).flatten()
                idx = idx[torch.randperm(len(idx), generator=sel_gen)][:p.stim_images]
                stim_idx.append(idx)
            stim_idx = torch.cat(stim_idx).to(ctx.device)
            with torch.no_grad():
                st = stimulate(h, g, x[stim_idx], y[stim_idx], p.stim_levels)
                logits = model(x)
            # runner-up labels (logit ranks 2..4) per victim
            ranks = logits.argsort(1, descending=True)[:, 1:4]
            runner_ups = {}
            for v in sorted(set(y.tolist())):
                cnt = Counter(ranks[y == v].flatten().tolist())
                runner_ups[v] = [lbl for lbl, _ in cnt.most_common(p.runner_up)]
            cands = select_candidates(st["label"].cpu(), st["score"].cpu(), y[stim_idx].cpu(),
                                      runner_ups, p.per_victim)
            if not cands:
                return DetectorResult(
                    score=0.0, target=None,
                    stats={"layer": layer_name, "candidates": 0, "best_reasr": 0.0,
                           "seed": ctx.seed, "kept": 0},
                    triggers=[], artifacts={"candidates": []})
            # 2. image sets: up to images_per_victim images of each candidate's victim
            img_gen = ctx.generator("abs/images")
            sets = {}
            for v in sorted({c[0] for c in cands}):
                idx = torch.nonzero(y.cpu() == v).flatten()
                sets[v] = idx[torch.randperm(len(idx), generator=img_gen)][:p.images_per_victim]
            b = max(len(s) for s in sets.values())
            x_sets = torch.zeros(len(cands), b, c_in, H, W, device=ctx.device)
            weights = torch.zeros(len(cands), b, device=ctx.device)
            for j, (v, _, _, _) in enumerate(cands):
                n = len(sets[v])
                x_sets[j, :n] = x[sets[v].to(ctx.device)]
                weights[j, :n] = 1
            victims = torch.tensor([c[0] for c in cands], device=ctx.device)
            targets = torch.tensor([c[1] for c in cands], device=ctx.device)
            channels = torch.tensor([c[2] for c in cands], device=ctx.device)
            extra = [{"channel": c[2], "layer": layer_name, "stim_value": c[3],
                      "neuron_label": c[1]} for c in cands]
            # 3. trial of each mode, winner per candidate
            gens = {m: ctx.generator(f"abs/{m}") for m in p.modes}
            states = {m: self._optimise(m, h, g, x_sets, weights, channels, targets, victims,
                                        min(p.trial_epochs, p.epochs), gens[m], None, (H, W),
                                        c_in) for m in p.modes}
            trial_logit = {m: states[m]["target_logit_rows"] for m in p.modes}
            if len(p.modes) == 1:
                choice = [p.modes[0]] * len(cands)
            else:
                stacked = torch.stack([trial_logit[m] for m in p.modes])  # (modes, R)
                choice = [p.modes[int(i)] for i in stacked.argmax(0).tolist()]
            candidates: list[TriggerCandidate | None] = [None] * len(cands)
            rest = max(p.epochs - min(p.trial_epochs, p.epochs), 0)
            for mode in p.modes:
                rows = [j for j, c in enumerate(choice) if c == mode]
                if not rows:
                    continue
                # continue only the rows that chose this mode (other rows are frozen: sliced)
                st_m = states[mode]
                sub = self._subset(st_m, rows)
                rows_t = torch.tensor(rows, device=ctx.device)
                sub = self._optimise(mode, h, g, x_sets[rows_t], weights[rows_t],
                                     channels[rows_t], targets[rows_t], victims[rows_t], rest,
                                     gens[mode], sub, (H, W), c_in)
                for jj, cand in zip(rows, self._finish(
                        mode, sub, x_sets[rows_t], weights[rows_t], model, x, y,
                        victims[rows_t], started, [
                            {**extra[j], "mode_logits": {m: float(trial_logit[m][j])
                                                         for m in p.modes}} for j in rows])):
                    candidates[jj] = cand
        cand_list = [c for c in candidates if c is not None]
        seconds = time.perf_counter() - started
        for c in cand_list:
            c.stats["seconds"] = seconds / max(len(cand_list), 1)
            c.stats["seed"] = ctx.seed
        kept = [c for c in cand_list if c.stats["kept"]]
        best = max(kept, key=lambda c: c.reasr, default=None)
        stats = {"layer": layer_name, "candidates": len(cand_list), "kept": len(kept),
                 "best_reasr": 0.0 if best is None else best.reasr,
                 "best_kind": None if best is None else best.kind,
                 "best_victim": None if best is None else best.victim,
                 "modes": Counter(choice), "seed": ctx.seed,
                 "seed_salts": ["abs/stimulation", "abs/images"] + [f"abs/{m}" for m in p.modes],
                 "max_reasr_all": max((c.reasr for c in cand_list), default=0.0)}
        stats["modes"] = dict(stats["modes"])
        return DetectorResult(score=0.0 if best is None else float(best.reasr),
                              target=None if best is None else best.target, stats=stats,
                              triggers=[c.to_row() for c in cand_list],
                              artifacts={"candidates": cand_list})

    @staticmethod
    def _subset(state: dict, rows: list[int]) -> dict:
        """The rows of an optimisation state (parameters, Adam moments, u) as a new state."""
        idx = torch.tensor(rows, device=state["u"].device)
        params = [q[idx].clone() for q in state["params"]]
        old = state["adam"]
        adam = BatchedAdam(params, lr=old.lr, betas=old.betas, eps=old.eps)
        adam.exp_avg = [m[idx].clone() for m in old.exp_avg]
        adam.exp_avg_sq = [v[idx].clone() for v in old.exp_avg_sq]
        adam.steps = old.steps[idx].clone()
        return {"params": params, "adam": adam, "u": state["u"][idx].clone(),
                "epochs": state["epochs"], "loss": [l[idx] for l in state["loss"]],
                "target_logit": state["target_logit"]}
