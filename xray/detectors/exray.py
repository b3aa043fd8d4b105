"""EX-RAY: tell natural triggers from injected backdoors by symmetric feature differencing.

Paper: Liu, Shen, Tao, Wang, Ma, Zhang, "Complex Backdoor Detection by Symmetric Feature
Differencing", CVPR 2022 (and its appendix), https://arxiv.org/abs/2203.13211.
Reference code (ref): PurduePAML/Exray abs_pytorch1_both_batch_inner_both_with_prune.py
(mask_prune_by_neuron_mask, filter_prune_by_neuron_mask); round-3 variant (r3):
naiyeleo/ABS TrojAI_competition/round3/abs_pytorch1_color_simple_filter4_10_5_determinism.py
(prune_by_neuron_mask). Spec: docs/algorithms/exray.md.

An upstream scanner (NC / ABS / K-Arm, composed.py) gives a trigger t flipping victim V to
target T. At an inner layer (xray.models.layers.split_model: h = input -> layer, g = the rest)
EX-RAY learns two channel masks, m = tanh(theta)/2 + 0.5 per channel, theta init 4, on the
features relu(h(x)) (ref: F.relu on the inner outputs of V, V+t and T; it matters where the split
output can be negative: PreActResNet layer3, VGG-BN, DenseNet, MobileNetV2):

    m1 on (A = V, B = T)       the channels that carry "T rather than V" in natural images
    m2 on (A = V, B = V+t)     the channels the trigger changes

    mix(a, b; m) = m a + (1 - m) b
    z_f = g(mix(h(B), h(A); m))  -> want T      z_b = g(mix(h(A), h(B); m)) -> want V
    L = sum(m) + w_f (-sum_i (z_f[i,T] - z_f[i,V])) + w_b (-sum_i (z_b[i,V] - z_b[i,T]))
    w_f = 0 if #(argmax z_f = T) >= base_f * n_batch else `alpha` (same for w_b)

Adam lr 5e-2, batch 10, 400 epochs (ref); epoch 0 is forward only and sets base_f / base_b to
the flip accuracies of its last minibatch (base = 1 before). At each epoch end the last
minibatch's pre-step mask becomes the best if its sum is smaller than the best so far and both
batch accuracies reach base. s1 = sum(min(m1, m2)) / sum(m1), s2 = ... / sum(m2), and four
cross-validation accuracies (masks swapped between the pairs, all images):

    acc1_1 = P[g(mix(h(T), h(V); m2)) = T]      acc1_2 = P[g(mix(h(V), h(T); m2)) = V]
    acc2_1 = P[g(mix(h(V+t), h(V); m1)) = T]    acc2_2 = P[g(mix(h(V), h(V+t); m1)) = V]

`is_natural` is the decision (ref, patch and filter; r3 patch rule as `rule="r3"`).

Data (ref): all clean examples with their true labels, no filtering by prediction. V = the
label with the highest per-label REASR of t (the candidate's own victim when it has no
per-label REASR); V+t = t applied to V's images (patch mask binarised, `candidate.apply`);
T = the majority prediction on V+t (ties: the smallest label, np.argmax of the bincount as the
ref), the second of the bincount's argsort if that is V (the candidate's target when V+t is
never flipped (inferred)).

Batching: the 2 masks of every candidate of a model are rows of one optimisation; each
minibatch stacks every row's mixed feature maps (forward and backward mixes) into ONE pass
through g, and `core.BatchedAdam` keeps Adam's state per row, so a row follows exactly the
trajectory it would follow alone (up to float rounding of the batched forward).

Deviations, each on purpose:
  - |T| != |V|: the ref assumes equal counts per class (TrojAI); both sets are truncated to the
    smaller count, in file order (inferred), for optimisation and cross-validation.
  - The best-mask check starts at epoch 1: at the end of epoch 0 the untouched mask (m ~ 1)
    meets base by construction and would make every trigger look natural (s ~ 1) (inferred:
    the ref's abort when no mask qualifies can only happen this way).
  - No mask qualifies (the ref aborts): the trigger is kept unpruned, verdict "no_mask", logged.
  - The model's deadline (ctx.expired, asked before each epoch) ends the epochs early: the masks
    are the best so far (stats stopped_early, steps); none yet -> kept unpruned, verdict
    "deadline" (the ref has no time limit).
  - alpha: the ref's fixed logit weight w = 10; the paper's alpha (0.1) weights a cross-entropy
    that the ref does not use. `alpha` is the ref's w; the r3 schedule doubles it when the best
    has not improved for `weight_patience` epochs (at most every `weight_patience` epochs).
  - Cross-validation off (`cross_validation=False`): only the clauses without accuracies are
    kept (patch: s1 > beta or s2 > beta; filter: s1 > 0.9, s2 > 0.88, s1 > 0.6 and s2 > 0.6)
    (inferred; the paper's Table 10 ablation does not spell the rule out).
  - Permutations come from ctx.generator("exray/perm/<kind>/<V>/<T>/<m1|m2>"), one stream per
    mask (the ref uses numpy's global state), so batching does not change any result.
Published cost: ~12 s per trigger, ~95 s per model (paper, RTX 2080Ti).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from xray.detectors.base import ScanContext, ScanData
from xray.detectors.inversion.core import BatchedAdam, TriggerCandidate, eval_mode
from xray.models import layers

ACC_NAMES = ("acc1_1", "acc1_2", "acc2_1", "acc2_2")


# ----------------------------------------------------------------------------- the decision


def is_natural(kind: str, s1: float, s2: float, accs: Sequence[float] | dict[str, float],
               params: Any) -> tuple[bool, str]:
    """(natural?, the clause that decided) for one trigger (spec "Decision").

    accs: (acc1_1, acc1_2, acc2_1, acc2_2) or a dict with those keys. params: ExRay.Params (or
    anything with its decision fields). The clause is "injected" when none holds.
    """
    if isinstance(accs, dict):
        accs = [accs[k] for k in ACC_NAMES]
    a11, a12, a21, a22 = (float(a) for a in accs)
    cv = params.cross_validation
    if kind == "patch" and params.rule == "r3":
        b, g1, g2 = params.r3_s, params.r3_acc1, params.r3_acc2
        clauses = [("s1>r3_s", s1 > b),
                   ("s1>s2&acc2_both", cv and s1 > s2 and a21 >= g2 and a22 >= g2),
                   ("s2>r3_s", s2 > b),
                   ("s2>s1&acc1_both", cv and s2 > s1 and a11 >= g1 and a12 >= g1)]
    elif kind == "patch":
        b, g = params.beta, params.gamma
        clauses = [("s1>beta", s1 > b),
                   ("s1>s2&acc2", cv and s1 > s2 and (a21 >= g or a22 >= g)),
                   ("s2>beta", s2 > b),
                   ("s2>s1&acc1", cv and s2 > s1 and (a11 >= g or a12 >= g)),
                   ("3accs>=gamma", cv and sum(a >= g for a in (a11, a12, a21, a22)) >= 3),
                   ("4accs>=low", cv and all(a >= params.patch_low_acc
                                             for a in (a11, a12, a21, a22)))]
    elif kind == "filter":
        fa = params.filter_acc
        clauses = [("s1>filter_s1", s1 > params.filter_s1),
                   ("s1>s2&acc2", cv and s1 > s2 and (a21 >= fa or a22 >= fa)),
                   ("s2>filter_s2", s2 > params.filter_s2),
                   ("s2>s1&acc1", cv and s2 > s1 and (a11 >= fa or a12 >= fa)),
                   ("3accs>=filter_count_acc&s2", cv and s2 > params.filter_count_s2 and sum(
                       a >= params.filter_count_acc for a in (a11, a12, a21, a22)) >= 3),
                   ("s1&s2>filter_pair", s1 > params.filter_pair and s2 > params.filter_pair)]
    else:
        raise ValueError(f"trigger kind {kind!r}; expected 'patch' or 'filter'")
    for name, holds in clauses:
        if holds:
            return True, name
    return False, "injected"


# ----------------------------------------------------------------------------- the masks


@dataclass
class MaskResult:
    """Per row: best mask (C,) or None, its sum, base accuracies, epochs to the best."""

    masks: list[torch.Tensor | None]
    sums: list[float]
    base_f: list[float]
    base_b: list[float]
    best_epoch: list[int]
    weights: list[float]
    forwards: int = 0
    steps: list[int] = field(default_factory=list)  # Adam steps per row (proof of work)
    stopped_early: bool = False  # the model's deadline ended the epochs


def optimise_masks(g: torch.nn.Module, a_feats: Sequence[torch.Tensor],
                   b_feats: Sequence[torch.Tensor], a_labels: Sequence[int],
                   b_labels: Sequence[int], params: Any,
                   generators: Sequence[torch.Generator],
                   expired: Callable[[], bool] | None = None) -> MaskResult:
    """Optimise one channel mask per row r on the pairs (A_r[i], B_r[i]) (spec "Masks").

    a_feats[r], b_feats[r]: (n_r, C, ...) features h(A), h(B) of equal length n_r; a_labels[r]
    (V) and b_labels[r] (T); generators[r] draws row r's permutation each epoch. All rows step
    together: one g forward per minibatch index; a row's trajectory does not depend on the
    other rows. `expired()` (the model's deadline) is asked before each epoch: the masks are
    then the best found so far (stopped_early).
    """
    p = params
    rows = len(a_feats)
    dev = a_feats[0].device
    shape = a_feats[0].shape[1:]
    c = shape[0]
    ns = [len(a) for a in a_feats]
    nmax = max(ns)
    # rows padded to nmax; padding is never drawn (per-row permutations of range(n_r)).
    pad_a = torch.zeros(rows, nmax, *shape, device=dev, dtype=a_feats[0].dtype)
    pad_b = torch.zeros_like(pad_a)
    for r in range(rows):
        pad_a[r, :ns[r]] = a_feats[r]
        pad_b[r, :ns[r]] = b_feats[r]
    la = torch.as_tensor(list(a_labels), device=dev)
    lb = torch.as_tensor(list(b_labels), device=dev)
    spatial = (1,) * (len(shape) - 1)
    theta = torch.full((rows, c, *spatial), float(p.init), device=dev)
    adam = BatchedAdam([theta], lr=p.lr)
    bs = int(p.batch_size)
    n_mb = [math.ceil(n / bs) for n in ns]
    base_f = torch.ones(rows, device=dev)
    base_b = torch.ones(rows, device=dev)
    best_sum = torch.full((rows,), math.inf, device=dev)
    best_mask = torch.full((rows, c), math.nan, device=dev)
    best_epoch = [-1] * rows
    weight = torch.full((rows,), float(p.alpha), device=dev)
    last_improve = [0] * rows
    last_double = [0] * rows
    forwards = 0
    steps = torch.zeros(rows, dtype=torch.long, device=dev)
    stopped_early = False
    ridx = torch.arange(rows, device=dev)
    for epoch in range(int(p.epochs)):
        if expired is not None and expired():
            stopped_early = True
            break
        perms = [torch.randperm(n, generator=gen).to(dev) for n, gen in zip(ns, generators)]
        last_f = torch.zeros(rows, device=dev)
        last_b = torch.zeros(rows, device=dev)
        last_sum = torch.full((rows,), math.inf, device=dev)
        last_mask = torch.zeros(rows, c, device=dev)
        for j in range(max(n_mb)):
            live = torch.tensor([j < k for k in n_mb], device=dev)
            idx = torch.zeros(rows, bs, dtype=torch.long, device=dev)
            wts = torch.zeros(rows, bs, device=dev)
            for r in range(rows):
                chunk = perms[r][j * bs:(j + 1) * bs]
                idx[r, :len(chunk)] = chunk
                wts[r, :len(chunk)] = 1
            a = pad_a[ridx[:, None], idx]  # (R, bs, C, ...)
            b = pad_b[ridx[:, None], idx]
            leaf = theta.detach().requires_grad_(epoch > 0)
            m = (torch.tanh(leaf) / 2 + 0.5)[:, None]  # (R, 1, C, 1, ...)
            mixed = torch.stack([m * b + (1 - m) * a, m * a + (1 - m) * b])  # f, b
            z = g(mixed.reshape(2 * rows * bs, *shape)).reshape(2, rows, bs, -1)
            forwards += 1
            zf, zb = z[0], z[1]
            pick = lambda t, lbl: t.gather(2, lbl[:, None, None].expand(-1, bs, 1))[..., 0]
            dif_f = ((pick(zf, lb) - pick(zf, la)) * wts).sum(1)
            dif_b = ((pick(zb, la) - pick(zb, lb)) * wts).sum(1)
            with torch.no_grad():
                nb = wts.sum(1)
                cnt_f = ((zf.argmax(-1) == lb[:, None]).float() * wts).sum(1)
                cnt_b = ((zb.argmax(-1) == la[:, None]).float() * wts).sum(1)
                ok_f = cnt_f >= base_f * nb
                ok_b = cnt_b >= base_b * nb
            msum = m.flatten(1).sum(1)
            # r3: L = sum over sides: 0.5 sum(m) if the side meets base, else w * logit
            if p.loss == "r3":
                loss = (torch.where(ok_f, 0.5 * msum, -weight * dif_f)
                        + torch.where(ok_b, 0.5 * msum, -weight * dif_b))
            else:
                loss = (msum + torch.where(ok_f, 0.0, weight) * -dif_f
                        + torch.where(ok_b, 0.0, weight) * -dif_b)
            with torch.no_grad():
                acc_f, acc_b = cnt_f / nb.clamp_min(1), cnt_b / nb.clamp_min(1)
                pre = m.detach().reshape(rows, c)
                ends = live & torch.tensor([j == k - 1 for k in n_mb], device=dev)
                if p.best_check == "minibatch" and epoch > 0:
                    _take_best(live, msum.detach(), acc_f, acc_b, base_f, base_b, best_sum,
                               best_mask, pre, best_epoch, last_improve, epoch)
                last_f = torch.where(ends, acc_f, last_f)
                last_b = torch.where(ends, acc_b, last_b)
                last_sum = torch.where(ends, msum.detach(), last_sum)
                last_mask = torch.where(ends[:, None], pre, last_mask)
            if epoch > 0:  # epoch 0: forward only (ref)
                (grad,) = torch.autograd.grad((loss * live).sum(), [leaf])
                adam.step([grad], live)
                steps += live.long()
        with torch.no_grad():
            if epoch == 0:
                base_f, base_b = last_f.clone(), last_b.clone()
            elif p.best_check == "epoch":
                _take_best(torch.ones(rows, dtype=torch.bool, device=dev), last_sum, last_f,
                           last_b, base_f, base_b, best_sum, best_mask, last_mask, best_epoch,
                           last_improve, epoch)
            if p.weight_patience:
                for r in range(rows):
                    if (epoch - last_improve[r] > p.weight_patience
                            and epoch - last_double[r] > p.weight_patience):
                        weight[r] *= 2
                        last_double[r] = epoch
    masks = [None if best_epoch[r] < 0 else best_mask[r].clone() for r in range(rows)]
    return MaskResult(masks=masks, sums=[float(s) for s in best_sum.tolist()],
                      base_f=base_f.tolist(), base_b=base_b.tolist(), best_epoch=best_epoch,
                      weights=weight.tolist(), forwards=forwards, steps=steps.tolist(),
                      stopped_early=stopped_early)


def _take_best(rows, sums, acc_f, acc_b, base_f, base_b, best_sum, best_mask, masks,
               best_epoch, last_improve, epoch) -> None:
    better = rows & (sums < best_sum) & (acc_f >= base_f) & (acc_b >= base_b)
    best_sum[better] = sums[better]
    best_mask[better] = masks[better]
    for r in better.nonzero().flatten().tolist():
        best_epoch[r] = epoch
        last_improve[r] = epoch


# ----------------------------------------------------------------------------- per trigger


@dataclass
class Pairing:
    """The images EX-RAY compares for one trigger: V, V+t and T (equal counts, file order)."""

    victim: int
    target: int
    x_v: torch.Tensor
    x_vt: torch.Tensor
    x_t: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def pairing(model: torch.nn.Module, candidate: TriggerCandidate, x: torch.Tensor,
            y: torch.Tensor, batch_size: int = 256) -> Pairing | None:
    """V, V+t, T per the spec's "Data" (None when V or T has no image)."""
    per_label = {int(k): float(v) for k, v in candidate.reasr_per_label.items()
                 if int(k) != candidate.target}
    if per_label:
        victim = max(sorted(per_label), key=lambda k: per_label[k])
    elif candidate.victim is not None:
        victim = int(candidate.victim)
    else:
        return None
    x_v = x[y == victim]
    if len(x_v) == 0:
        return None
    x_vt = torch.cat([candidate.apply(x_v[i:i + batch_size])
                      for i in range(0, len(x_v), batch_size)])
    preds = torch.cat([model(x_vt[i:i + batch_size]).argmax(1)
                       for i in range(0, len(x_vt), batch_size)])
    # ref: np.argmax(np.bincount(preds)) (ties -> the smallest label), the victim -> the
    # second of np.argsort(bincount); never flipped off V -> the candidate's target (inferred)
    counts = np.bincount(preds.cpu().numpy())
    majority = int(np.argmax(counts))
    if majority != victim:
        target = majority
    elif (counts > 0).sum() > 1:
        target = int(np.argsort(counts)[-2])
    else:
        target = int(candidate.target)
    x_t = x[y == target]
    n = min(len(x_v), len(x_t))
    if n == 0:
        return None
    return Pairing(victim, target, x_v[:n], x_vt[:n], x_t[:n],
                   {"n_pairs": n, "victim_reasr": per_label.get(victim, float("nan")),
                    "flip_v": float((preds == target).float().mean()),
                    "majority_is_victim": majority == victim})


def _mix(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = m.view(1, -1, *([1] * (a.dim() - 2)))
    return m * a + (1 - m) * b


@torch.no_grad()
def cross_validate(g: torch.nn.Module, bb: torch.Tensor, tb: torch.Tensor, bo: torch.Tensor,
                   m1: torch.Tensor, m2: torch.Tensor, victim: int, target: int
                   ) -> dict[str, float]:
    """The four accuracies (spec "Similarity and cross-validation"), denominators |V|."""
    def acc(feats: torch.Tensor, label: int) -> float:
        return float((g(feats).argmax(1) == label).float().mean())

    return {"acc1_1": acc(_mix(m2, bo, bb), target), "acc1_2": acc(_mix(m2, bb, bo), victim),
            "acc2_1": acc(_mix(m1, tb, bb), target), "acc2_2": acc(_mix(m1, bb, tb), victim)}


@dataclass
class Verdict:
    """EX-RAY's finding for one trigger; `row()` is what goes to the triggers table."""

    natural: bool
    clause: str
    victim: int | None = None
    target: int | None = None
    s1: float = math.nan
    s2: float = math.nan
    accs: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"exray_natural": self.natural, "exray_clause": self.clause,
                "exray_victim": self.victim, "exray_target": self.target,
                "exray_s1": self.s1, "exray_s2": self.s2,
                **{f"exray_{k}": v for k, v in self.accs.items()},
                **{f"exray_{k}": v for k, v in self.stats.items()}}


class ExRay:
    """EX-RAY as a pruner: `examine(model, data, candidates, ctx) -> [Verdict]` (one per
    candidate, in order). Not a registered detector on its own: composed.py puts it behind an
    upstream scanner ("nc+exray", "abs+exray", "karm+exray")."""

    name: ClassVar[str] = "exray"
    version: ClassVar[str] = "1"

    @dataclass(frozen=True)
    class Params:
        layer: str = "second_last"  # middle | second_last | last (split_model positions)
        epochs: int = 200  # ref 400
        batch_size: int = 10  # r3 20
        lr: float = 5e-2
        init: float = 4.0  # theta init: m = tanh(4)/2 + 0.5 ~ 0.9997
        alpha: float = 10.0  # the logit-term weight w (ref fixed 10; see module docstring)
        loss: str = "ref"  # ref | r3
        best_check: str = "epoch"  # epoch (ref) | minibatch (r3)
        weight_patience: int = 0  # r3: 30 (double w after that many epochs without a new best)
        cross_validation: bool = True
        rule: str = "ref"  # ref | r3 (patch rule; filters always use the ref rule)
        beta: float = 0.8
        gamma: float = 0.8
        patch_low_acc: float = 0.4  # natural if all four accs reach it (patch)
        filter_s1: float = 0.9
        filter_s2: float = 0.88
        filter_acc: float = 0.99
        filter_count_acc: float = 0.9
        filter_count_s2: float = 0.85
        filter_pair: float = 0.6
        r3_s: float = 0.9
        r3_acc1: float = 0.99
        r3_acc2: float = 0.95

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {},
        "reference": {"epochs": 400},
        "r3": {"epochs": 400, "batch_size": 20, "loss": "r3", "best_check": "minibatch",
               "weight_patience": 30, "rule": "r3"},
    }

    def __init__(self, params: "ExRay.Params | None" = None) -> None:
        self.params = params or self.Params()
        if self.params.loss not in ("ref", "r3") or self.params.best_check not in (
                "epoch", "minibatch") or self.params.rule not in ("ref", "r3"):
            raise ValueError(f"exray: loss / best_check / rule out of range: {self.params}")

    def examine(self, model: torch.nn.Module, data: ScanData,
                candidates: Sequence[TriggerCandidate], ctx: ScanContext) -> list[Verdict]:
        """One Verdict per candidate; the masks of all candidates are optimised together."""
        p = self.params
        started = time.perf_counter()
        x, y = data.x.to(ctx.device), data.y.to(ctx.device)
        out: list[Verdict | None] = [None] * len(candidates)
        with eval_mode(model):
            h, g, layer_name = layers.split_model(model, p.layer)
            jobs = []
            for i, cand in enumerate(candidates):
                pair = pairing(model, cand, x, y)
                if pair is None:
                    out[i] = Verdict(False, "no_images", stats={"layer": layer_name})
                    continue
                with torch.no_grad():  # relu as the ref: split outputs may be pre-activation
                    bb, tb, bo = (F.relu(h(pair.x_v)), F.relu(h(pair.x_vt)), F.relu(h(pair.x_t)))
                jobs.append((i, cand, pair, bb, tb, bo))
            if jobs:
                # rows 2k: m1 (A = V, B = T); rows 2k + 1: m2 (A = V, B = V+t)
                a_feats = [f for _, _, _, bb, _, _ in jobs for f in (bb, bb)]
                b_feats = [f for _, _, _, _, tb, bo in jobs for f in (bo, tb)]
                a_lab = [pair.victim for _, _, pair, *_ in jobs for _ in range(2)]
                b_lab = [pair.target for _, _, pair, *_ in jobs for _ in range(2)]
                # one permutation stream per mask, named by the trigger: a candidate gets the
                # same masks examined alone or with others
                gens = [ctx.generator(f"exray/perm/{cand.kind}/{pair.victim}/{pair.target}/{m}")
                        for _, cand, pair, *_ in jobs for m in ("m1", "m2")]
                res = optimise_masks(g, a_feats, b_feats, a_lab, b_lab, p, gens, ctx.expired)
                seconds = (time.perf_counter() - started) / len(jobs)
                for k, (i, cand, pair, bb, tb, bo) in enumerate(jobs):
                    out[i] = self._verdict(g, cand, pair, bb, tb, bo, res, 2 * k, layer_name,
                                           seconds, ctx)
        return [v for v in out if v is not None]

    def _verdict(self, g, cand, pair, bb, tb, bo, res: MaskResult, r: int, layer_name: str,
                 seconds: float, ctx: ScanContext) -> Verdict:
        p = self.params
        m1, m2 = res.masks[r], res.masks[r + 1]
        stats = {"layer": layer_name, "seconds": seconds, **pair.stats,
                 "m1_sum": res.sums[r], "m2_sum": res.sums[r + 1],
                 "m1_best_epoch": res.best_epoch[r], "m2_best_epoch": res.best_epoch[r + 1],
                 "base_m1": [res.base_f[r], res.base_b[r]],
                 "base_m2": [res.base_f[r + 1], res.base_b[r + 1]],
                 "channels": int(bb.shape[1]), "steps": res.steps[r] + res.steps[r + 1],
                 "stopped_early": res.stopped_early}
        if (m1 is None or m2 is None) and res.stopped_early:
            ctx.logger.info("exray: the deadline came before a mask met base for trigger %s -> "
                            "%s; kept unpruned", pair.victim, pair.target)
            return Verdict(False, "deadline", pair.victim, pair.target, stats=stats)
        if m1 is None or m2 is None:
            ctx.logger.info("exray: no mask met base for trigger %s -> %s (m1 %s, m2 %s); "
                            "kept unpruned", pair.victim, pair.target, m1 is not None,
                            m2 is not None)
            return Verdict(False, "no_mask", pair.victim, pair.target, stats=stats)
        inter = torch.minimum(m1, m2).sum()
        s1, s2 = float(inter / m1.sum()), float(inter / m2.sum())
        accs = cross_validate(g, bb, tb, bo, m1, m2, pair.victim, pair.target)
        natural, clause = is_natural(cand.kind, s1, s2, accs, p)
        return Verdict(natural, clause, pair.victim, pair.target, s1, s2, accs, stats)
