"""ABS (Artificial Brain Stimulation): stimulated candidate neurons, then triggers driving them.

Paper: Liu et al., "ABS: Scanning Neural Networks for Back-doors by Artificial Brain
Stimulation", ACM CCS 2019, https://doi.org/10.1145/3319535.3363216. Reference code (ref): the
TrojAI-round-3 ABS used by EX-RAY, PurduePAML/Exray abs_pytorch1_both_batch_inner_both_with_prune.py
at commit 847e0ce1cbea303e27cef502c28faa0729b67b45 (patch and filter triggers, one inner layer);
original: naiyeleo/ABS abs.py (TensorFlow). Spec: docs/algorithms/inversion.md "ABS"; where the
spec and the ref disagree the ref wins (noted "(ref, not spec)"). Layer:
docs/algorithms/exray.md "Layer" via xray.models.layers.split_model (h = input -> layer incl.
normalisation, g = the rest).
docs/fidelity/abs.md lists what each fidelity fix changed.

1. Stimulation at the layer (`layer`, default the second-to-last block): M_y = the max of the
   layer's output over ALL example images of label y (ref check_values(test_xs, ...)); then on
   `stim_images` images per label, per image and channel the whole map is set to v * M_y, v in
   `stim_levels` (0, 0.5, 1); elev_l = max_{v>0} logit_l - logit_l(v=0); the neuron's label =
   argmax elev, its score = top - second elevation (ref read_all_ps).
2. Candidates per victim V (ref find_min_max): channels where every stimulated V image gives the
   same label T != V; value = min score over those images; the best channel per T; sorted by
   value, with T among V's `runner_up` runner-up labels first; `per_victim` kept per V. Runner-up
   labels (ref check_values): the labels of logit ranks 2-4 over all V example images, counted,
   the `runner_up` most frequent by np.argsort(np.bincount(.))[-3:] (ties: the higher label). The
   ref's `label_acc > 0.8` filter on them always passes (it counts within the 3-label list).
3. Schedule (ref re_mask / test_task_modes / reverse_engineer): per candidate (a task) the images
   of V (up to `images_per_victim`); minibatches of `batch_size` rows (ref re_batch_size 60, 15 for
   ResNet / DenseNet / VGG: `batch_size=None`), a step per minibatch, no shuffling. Mode trial:
   `trial_epochs` epochs as a patch and as a filter, from a fresh start each, updating from the
   first minibatch of epoch 0; a task becomes a filter iff its filter trial's mean target logit
   (last epoch, target = its use_label) is larger. Then every task restarts its winning mode from
   a fresh start for `epochs` epochs, epoch 0 forward only (ref `if e > 0`).
   Layout (`layout`): "block" (preset "reference") is the ref: tasks in groups of `tasks_per_run`,
   a group's rows are its tasks' image sets concatenated in task order (ovar_to_data maps a row to
   its task), cut into minibatches of `batch_size` rows that mix tasks; the neuron terms are
   divided by the minibatch's row count, every task of the group steps at every minibatch (Adam
   moves a task without rows in it on momentum, and its mask penalty). (The brief said
   "shuffled"; the ref's np.random.permutation in test_task_modes is computed and unused, and
   reverse_engineer has none: the block is in task order.) "task" (default) gives each task
   minibatches of its own images, `batch_size // tasks_per_run` each (its share of a ref
   minibatch: 12 of 60, so 20 images -> 12 + 8, 2 steps per epoch like the ref), neuron terms
   divided by that count times `tasks_per_run` (the ref's row count when the group is full). The
   default is "task" because a task's trigger then does not depend on which other candidates share
   its group or on their order, and a task without images in a minibatch does not move; both
   layouts take the same number of steps per epoch when the victims have equal image counts.
4. Patch: x' = (1-m) x~ + m d, x~ = clamp(x + U(-0.05, 0.05), 0, 1) (fresh noise per minibatch);
   d = tanh(theta_d)/2+0.5 (C x 1 x 1, theta_d ~ U(-1, 1)); m = tanh(theta_m)/2+0.5 with theta_m =
   2 on a square of side int(sqrt(S) * 0.8) whose top-left corner is pixel (ceil(H/2), ceil(W/2)),
   -4 elsewhere; Adam lr 0.3 on both. loss = -a_c - relu(a)_c + 1e-4 (a_o + relu(a)_o) + P(m) -
   100 sum_rows logit_u, with a_c = the candidate channel's map summed over H x W and over the
   minibatch rows, divided by the row count (see 3), a_o the same over the other channels divided
   also by (F - 1); a = the layer's PRE-ReLU output where the ref reads it: torchvision ResNet
   blocks (last block's last BN output + identity, as the ref's hooks), else the output split_model
   returns (VGG / DenseNet: a BatchNorm, already pre-ReLU; MNTD CNNs: ends in ReLU + pool, so
   relu(a) = a). P = 0 if nnz(m > 0.01) <= S, 100 sum m if <= 1.2 S, else 200 sum m. u (use_label):
   after every epoch, from that epoch's predictions on the task's images: optz_label = the most
   frequent prediction; if it is V: the candidate's label when every prediction is V, else the
   second most frequent (np.argsort(bincount)[-2]); facc = share predicted optz_label; u =
   optz_label if facc > 0.2 (patch only), else u is reset to the candidate's label (ref). S = 1600
   px at 224 x 224, scaled with the image area.
5. Filter: x' = clamp([x, maxpool(x), -maxpool(x), avgpool(x)] . K, 0, 1), pools of side
   core.filter_pool_size (111 at 224) stride 1 padding side // 2, the avg-pool counting the zero
   padding (ref F.avg_pool2d defaults: count_include_pad=True; `count_include_pad`), each pool
   computed as a column then a row pass (core.filter_features: the ref's maxima exactly, its
   averages to ~1e-6; 34x faster at 224, 2.5x at 32); K =
   tanh(theta)/2+0.5 (4C x C), theta = +2 on the identity, -2 elsewhere; loss = the neuron / logit
   terms - sum_rows (10 s if s > 0.8 else 1e5 s), s = MS-SSIM(x~, x') per image as the ref's
   `msssim` computes it (`ssim="reference"`, reference_ms_ssim: valid convolution, window
   min(11, side) re-made per level, 5 levels, output prod_l<4 (cs_l^w_l * ssim_4^w_4), the
   pytorch-msssim formula the ref copied; `ssim="standard"`: core.ms_ssim); Adam lr 0.1 on K; u
   stays the candidate's label.
6. Keep a trigger if its facc (last epoch, in-loop predictions on the noised images) >= `keep_flip`
   (ref reasr_bound - 0.2 = 0.6). Its target is optz_label, the class the trigger actually flips
   to (ref returns optz_labels; also for filters, whose u never changes). REASR on all example
   images (mask binarised at m > 0.1, ref m * m > 0.01): per label != target the share predicted
   target; reported as the max over labels. Model score = best REASR of the kept triggers (0 when
   none is kept); target = that trigger's target.

Deadline: ctx.require_time before anything; the loops ask ctx.expired() before every minibatch
step and stop there (stats stopped_early). stats["steps"] = optimiser updates taken, summed over
tasks (trial + final). A task whose final run took no update reports its trial state for its mode;
with no update at all DeadlinePassed / DetectorDidNoWork is raised (require_steps). No candidate
neuron at all: score 0.0, steps 0, stats["candidates"] = 0 (ref: re_mask gets no task and the
log line reads REASR 0; its read_all_ps stops earlier with an unpacking error when some label has
no candidate -- an accident of the code, not a design, so a label without candidates here just
contributes none).

Deviations, each on purpose:
  - Tasks of all groups (and, in the trial, both modes' tasks in turn) are optimised in batched
    forwards; each keeps its own Adam state, so a task's trajectory is the one it would have alone
    (per-row BatchedAdam) up to float rounding and the noise stream.
  - No pruning: the ref's test() prunes a trigger with per-label REASR > 0.99 by
    mask_prune_by_neuron_mask / filter_prune_by_neuron_mask (a 400-epoch neuron-mask
    optimisation); here that step is EX-RAY's job ("abs+exray", xray/detectors/exray.py), so "abs"
    alone is the ref without pruning. The ref logs both REASR over all images (`score`) and the
    per-label max; the score here is the per-label max (stats max_reasr_all keeps the other view
    per candidate as reasr_all).
  - Images are the scan's pixel-space examples; the model folds normalisation in (ref: 224
    centre crop, min-max scaled per image, TrojAI's preprocessing). Stimulation images are drawn
    with ctx.generator("abs/stimulation") (ref: the first 2 per label of a randomly shuffled file
    list, unseeded Python random), optimisation images with ctx.generator("abs/images") (ref: the
    first 20 per label of that list).
  - Pre-ReLU features only for torchvision ResNets (BasicBlock / Bottleneck) besides the layers
    that are pre-ReLU by construction; the ref's Inception / GoogLeNet / ShuffleNet / SqueezeNet
    branch-BN concatenations are not rebuilt (a = the block output there; inferred to matter
    little: relu(a) = a only loses the negative part of the -a_c term).
  - Small images: S and the square side scale with the area (`max_size_224` * H W / 224^2); the
    pool window with the side (core.filter_pool_size, odd); the ref's msssim pools once more
    after its 5th level and so fails below 32 px: that unused pool is skipped (5 levels from
    16 px; smaller images use the levels that fit). Negative cs /
    ssim values (NaN in the ref's fractional power) are clamped at 1e-6 before the power.
  - Unequal image counts per victim: each task owns exactly its images (the ref's ovar_to_data
    assumes every task has n_re_imgs_per_label = len(optz_xs) // num_classes rows and misassigns
    rows otherwise). A victim with fewer than `stim_images` examples uses what it has.
  - Noise U(-0.05, 0.05) and theta_d come from ctx.generator("abs/<mode>") (trial) and
    ("abs/<mode>/final") (restart); the salts are recorded in stats.
  - Default budget `epochs` 20 (ref 30, paper 60; preset "reference" has 30 and layout "block").
Published cost: 337 s and 8.5 triggers per model on an RTX 2080Ti (paper).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from xray.detectors import register
from xray.detectors.base import (DetectorResult, NoUsableExamples, ScanContext, ScanData,
                                 eval_mode, require_steps)
from xray.detectors.inversion.core import (MS_SSIM_WEIGHTS, BatchedAdam, TriggerCandidate,
                                           apply_filter, filter_pool_size,
                                           identity_kernel_logits, mask_size, measure_reasr,
                                           ms_ssim)
from xray.models import imported_torchvision_models, layers

REFERENCE_AREA = 224 * 224
REF_BATCH = 60  # ref config['re_batch_size']; // 4 for ResNet, DenseNet, VGG


def _split(model: torch.nn.Module, position: str):
    return layers.split_model(model, position)  # through the module: tests may swap it


def reference_batch_size(model: torch.nn.Module) -> int:
    """The ref's re_batch_size: 60, or 60 // 4 for ResNet / DenseNet / VGG (by class name)."""
    net = getattr(model, "net", model)
    tvm = imported_torchvision_models()  # None: net is no torchvision class
    deep = tvm is not None and isinstance(net, (tvm.ResNet, tvm.DenseNet, tvm.VGG))
    return REF_BATCH // 4 if deep else REF_BATCH


# ----------------------------------------------------------------------------- filter / SSIM


def _ref_window(size: int, channels: int, device, dtype, sigma: float = 1.5) -> torch.Tensor:
    """The ref's create_window: a Gaussian centred at size // 2 (off-centre for even sizes)."""
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(device=device, dtype=dtype)
    return (g[:, None] @ g[None, :]).expand(channels, 1, size, size).contiguous()


def reference_ms_ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Per-image MS-SSIM as the ref's `msssim(img1, img2)` (called per image): data range 1
    (inputs in [0, 1]), valid convolution with a window of min(11, H, W) re-made per level, cs and
    ssim averaged over (C, H, W), 2 x 2 average pooling between levels, output
    prod_{l<L-1}(cs_l^w_l * ssim_{L-1}^w_{L-1}) (the pytorch-msssim formula the ref copied).
    Returns (N,). 5 levels need a side >= 16 (the ref, pooling once more after the last level,
    fails below 32 px); smaller images use the levels that fit."""
    c = a.shape[1]
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    levels = len(MS_SSIM_WEIGHTS)
    while levels > 1 and min(a.shape[-2:]) // (2 ** (levels - 1)) < 1:
        levels -= 1
    weights = torch.tensor(MS_SSIM_WEIGHTS[:levels], dtype=a.dtype, device=a.device)
    ssims, mcs = [], []
    for level in range(levels):
        size = min(window, a.shape[-2], a.shape[-1])
        win = _ref_window(size, c, a.device, a.dtype)
        mu1, mu2 = F.conv2d(a, win, groups=c), F.conv2d(b, win, groups=c)
        s11 = F.conv2d(a * a, win, groups=c) - mu1 ** 2
        s22 = F.conv2d(b * b, win, groups=c) - mu2 ** 2
        s12 = F.conv2d(a * b, win, groups=c) - mu1 * mu2
        v1, v2 = 2.0 * s12 + c2, s11 + s22 + c2
        mcs.append((v1 / v2).flatten(1).mean(1))
        ssims.append((((2 * mu1 * mu2 + c1) * v1) / ((mu1 ** 2 + mu2 ** 2 + c1) * v2))
                     .flatten(1).mean(1))
        if level < levels - 1:  # the ref also pools after the last level (unused; it fails
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)  # there below 32 px)
    mcs_t = torch.stack(mcs, 1).clamp_min(1e-6)  # (N, L)
    ssim_t = torch.stack(ssims, 1).clamp_min(1e-6)
    pow1, pow2 = mcs_t ** weights, ssim_t ** weights
    if levels == 1:
        return pow2[:, 0]
    return torch.prod(pow1[:, :-1] * pow2[:, -1:], dim=1)


# ----------------------------------------------------------------------------- stimulation


@torch.no_grad()
def label_maxima(h: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int = 256) -> dict[int, float]:
    """M_y: per label, the max of h's output (every channel and position) over all its images
    (ref check_values on test_xs)."""
    maxima = torch.cat([h(x[i:i + batch_size]).flatten(1).amax(1)
                        for i in range(0, len(x), batch_size)])
    return {int(lbl): float(maxima[y == lbl].max()) for lbl in torch.unique(y).tolist()}


@torch.no_grad()
def stimulate(h: torch.nn.Module, g: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              levels: tuple[float, ...], batch_size: int = 512,
              m_y: dict[int, float] | None = None) -> dict[str, torch.Tensor]:
    """Stimulation analysis. x (N, C, H, W) pixels, y (N,) labels.

    Returns label (N, F) and score (N, F): per image and channel, the label whose logit rises
    most when the channel's whole map is set to v * M_y, and top - second elevation; also
    max_per_label (M_y of the labels in y, sorted). m_y: M_y per label (label_maxima over all
    example images, as the ref); None: computed from x alone. All N * F * len(levels) stimulated
    maps go through g in batches.
    """
    feats = h(x)  # (N, F, ...)
    n, f = feats.shape[:2]
    if m_y is None:
        per_image_max = feats.reshape(n, -1).amax(1)
        m_y = {int(lbl): float(per_image_max[y == lbl].max())
               for lbl in torch.unique(y).tolist()}
    scale = torch.tensor([m_y[int(v)] for v in y.tolist()], device=x.device, dtype=feats.dtype)
    levels_t = torch.tensor(levels, device=x.device, dtype=feats.dtype)
    jobs = [(i, c, l) for i in range(n) for c in range(f) for l in range(len(levels))]
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        ii = torch.tensor([j[0] for j in chunk], device=x.device)
        cc = torch.tensor([j[1] for j in chunk], device=x.device)
        ll = torch.tensor([j[2] for j in chunk], device=x.device)
        stim = feats[ii].clone()
        rows = torch.arange(len(chunk), device=x.device)
        fill = (levels_t[ll] * scale[ii]).view(-1, *([1] * (feats.dim() - 2)))
        stim[rows, cc] = fill.expand_as(stim[rows, cc])
        out.append(g(stim))
    logits = torch.cat(out).reshape(n, f, len(levels), -1)
    zero = [i for i, v in enumerate(levels) if v == 0]
    base = logits[:, :, zero[0]] if zero else g(feats)[:, None].expand(-1, f, -1)
    positive = [i for i, v in enumerate(levels) if v > 0]
    elev = logits[:, :, positive].amax(2) - base  # (N, F, K)
    top2 = elev.topk(2, dim=-1)
    return {"label": top2.indices[..., 0], "score": top2.values[..., 0] - top2.values[..., 1],
            "elevation": elev,
            "max_per_label": torch.tensor([m_y[k] for k in sorted(set(int(v) for v in
                                                                      y.tolist()))])}


def runner_up_labels(logits: torch.Tensor, y: torch.Tensor, k: int = 3) -> dict[int, list[int]]:
    """Per label V, the ref's top_check_labels: ranks 2..k+1 of the logits of every V image,
    counted, the k most frequent as np.argsort(np.bincount(.))[-k:] (stable sort: among equal
    counts the higher label wins), most frequent last as in the ref."""
    order = np.argsort(logits.detach().cpu().numpy(), axis=1)[:, -k - 1:-1]
    y_np = y.cpu().numpy()
    out: dict[int, list[int]] = {}
    for v in sorted(set(y_np.tolist())):
        labels = order[y_np == v].reshape(-1)
        out[int(v)] = [int(t) for t in np.argsort(np.bincount(labels), kind="stable")[-k:]]
    return out


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


def optz_label(preds: np.ndarray, victim: int, samp_label: int) -> tuple[int, float]:
    """(optz_label, facc) from one epoch's predictions on a task's images (ref, see doc 4)."""
    counts = np.bincount(preds)
    lbl = int(np.argmax(counts))
    if lbl == victim:
        lbl = samp_label
        if np.sum(preds == victim) < len(preds):
            lbl = int(np.argsort(counts, kind="stable")[-2])
    return lbl, float(np.mean(preds == lbl))


def next_use_label(optz: int, facc: float, samp_label: int, mode: str,
                   share: float = 0.2) -> int:
    """The label the next epoch's logit term pushes (ref): optz_label when a patch's facc exceeds
    `share`, otherwise the candidate's own label again (reset every epoch; filters never
    switch)."""
    return int(optz) if mode == "patch" and facc > share else int(samp_label)


# ----------------------------------------------------------------------------- features


def inner_features(model: torch.nn.Module, h: torch.nn.Module, g: torch.nn.Module,
                   layer_name: str, pre_relu: bool = True
                   ) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], str]:
    """(fn, kind): fn(x) -> (a, logits) with a the layer's output the ABS loss reads.

    kind "resnet_pre_relu": the layer is a torchvision ResNet stage; a = its last block's last
    BatchNorm output + the identity (downsample output or block input), the block's pre-ReLU sum,
    read with forward hooks as the ref does. kind "output": a = h(x)."""
    block = bn = None
    tvm = imported_torchvision_models()  # None: no torchvision block in the model
    if pre_relu and tvm is not None:
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            layer = None
        if isinstance(layer, torch.nn.Sequential) and len(layer) and isinstance(
                layer[-1], (tvm.resnet.BasicBlock, tvm.resnet.Bottleneck)):
            block = layer[-1]
            bn = block.bn3 if isinstance(block, tvm.resnet.Bottleneck) else block.bn2
    if block is None:
        def plain(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = h(x)
            return a, g(a)
        return plain, "output"

    captured: dict[str, torch.Tensor] = {}

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        handles = [bn.register_forward_hook(
            lambda m, i, o: captured.__setitem__("bn", o.clone()))]
        if block.downsample is not None:
            handles.append(block.downsample.register_forward_hook(
                lambda m, i, o: captured.__setitem__("iden", o.clone())))
        else:
            handles.append(block.register_forward_pre_hook(
                lambda m, i: captured.__setitem__("iden", i[0].clone())))
        try:
            logits = g(h(x))
        finally:
            for hd in handles:
                hd.remove()
        return captured.pop("bn") + captured.pop("iden"), logits
    return fn, "resnet_pre_relu"


# ----------------------------------------------------------------------------- detector


@dataclass
class _Stage:
    """One optimisation run (a mode, a set of tasks): parameters, Adam, labels, outcomes."""

    mode: str
    rows: list[int]  # task indices
    params: list[torch.Tensor]
    adam: BatchedAdam
    use: np.ndarray  # use_label per row
    optz: np.ndarray
    facc: np.ndarray
    mode_logit: np.ndarray
    epochs_done: int = 0
    stopped: bool = False
    losses: list[np.ndarray] | None = None
    ssim_mean: np.ndarray | None = None

    @property
    def steps(self) -> np.ndarray:
        return self.adam.steps.cpu().numpy().astype(np.int64)


@register("abs")
class ABS:
    name: ClassVar[str] = "abs"
    version: ClassVar[str] = "2"

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
        batch_size: int | None = None  # None: ref re_batch_size (60; 15 ResNet/DenseNet/VGG)
        tasks_per_run: int = 5
        layout: str = "task"  # task | block (ref, preset "reference"); see module doc 3
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
        ssim: str = "reference"  # reference (the ref's msssim) | standard (core.ms_ssim)
        ssim_levels: int = 5  # for ssim="standard"
        count_include_pad: bool = True  # the filter's avg-pool (ref True)
        pre_relu: bool = True  # ResNet: the block's pre-ReLU sum (ref)
        keep_flip: float = 0.6
        binarize: float = 0.1

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {},
        "reference": {"epochs": 30, "trial_epochs": 4, "layout": "block"},
    }

    def __init__(self, params: "ABS.Params | None" = None) -> None:
        self.params = params or self.Params()
        p = self.params
        if p.layout not in ("task", "block") or p.ssim not in ("reference", "standard"):
            raise ValueError(f"abs: layout {p.layout!r} (task | block), ssim {p.ssim!r} "
                             "(reference | standard)")
        if not set(p.modes) <= {"patch", "filter"} or not p.modes:
            raise ValueError(f"abs: modes {p.modes!r}; expected patch and / or filter")

    # ------------------------------------------------------------------ schedule
    def _plan(self, rows: list[int], sets: list[torch.Tensor], batch: int
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per step of an epoch: (pair rows (P,) local, pair images (P,), divisor per local row
        (R,), stepping local rows (R,) bool). See module doc 3."""
        p = self.params
        r = len(rows)
        plan = []
        if p.layout == "task":
            bt = max(1, batch // max(p.tasks_per_run, 1))
            n_steps = max(math.ceil(len(sets[j]) / bt) for j in rows)
            for k in range(n_steps):
                pr, pi = [], []
                div, step = torch.ones(r), torch.zeros(r, dtype=torch.bool)
                for lj, j in enumerate(rows):
                    chunk = sets[j][k * bt:(k + 1) * bt]
                    if len(chunk):
                        pr += [lj] * len(chunk)
                        pi += chunk.tolist()
                        div[lj] = len(chunk) * p.tasks_per_run
                        step[lj] = True
                plan.append((torch.tensor(pr), torch.tensor(pi), div, step))
            return plan
        groups = [list(range(s, min(s + p.tasks_per_run, r))) for s in range(0, r, p.tasks_per_run)]
        blocks = []
        for grp in groups:
            owner = torch.cat([torch.full((len(sets[rows[lj]]),), lj) for lj in grp])
            imgs = torch.cat([sets[rows[lj]] for lj in grp])
            blocks.append((grp, owner, imgs, min(batch, len(imgs))))
        n_steps = max(math.ceil(len(b[2]) / b[3]) for b in blocks)
        for k in range(n_steps):
            pr, pi = [], []
            div, step = torch.ones(r), torch.zeros(r, dtype=torch.bool)
            for grp, owner, imgs, bsz in blocks:
                sl = slice(k * bsz, (k + 1) * bsz)
                if len(imgs[sl]) == 0:
                    continue
                pr += owner[sl].tolist()
                pi += imgs[sl].tolist()
                div[grp] = float(len(imgs[sl]))
                step[grp] = True
            plan.append((torch.tensor(pr), torch.tensor(pi), div, step))
        return plan

    def _init(self, mode: str, r: int, gen: torch.Generator, hw: tuple[int, int], c_in: int,
              dev) -> tuple[list[torch.Tensor], BatchedAdam]:
        p = self.params
        H, W = hw
        if mode == "patch":
            area_s = p.max_size_224 * H * W / REFERENCE_AREA
            side = max(1, int(math.sqrt(area_s) * 0.8))
            theta_m = torch.full((r, H, W), p.mask_off, device=dev)
            r0, c0 = math.ceil(H / 2), math.ceil(W / 2)
            theta_m[:, r0:r0 + side, c0:c0 + side] = p.mask_on
            theta_d = (torch.rand(r, c_in, 1, 1, generator=gen) * 2 - 1).to(dev)
            params = [theta_m, theta_d]
            return params, BatchedAdam(params, lr=p.patch_lr)
        params = [identity_kernel_logits(c_in).to(dev).expand(r, -1, -1).clone()]
        return params, BatchedAdam(params, lr=p.filter_lr)

    def _ssim(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.params.ssim == "reference":
            return reference_ms_ssim(a, b)
        return ms_ssim(a, b, levels=self.params.ssim_levels)

    def _run(self, mode: str, rows: list[int], tasks: dict[str, Any], epochs: int,
             update_from: int, gen: torch.Generator, ctx: ScanContext) -> _Stage:
        """`epochs` epochs of `mode` for the tasks `rows` from a fresh start (module doc 3-5);
        updates from epoch `update_from` (trial 0, final 1); stops at ctx.expired()."""
        p = self.params
        x, feats_fn = tasks["x"], tasks["features"]
        dev = x.device
        c_in, H, W = x.shape[1:]
        r = len(rows)
        area_s = p.max_size_224 * H * W / REFERENCE_AREA
        pool = filter_pool_size(W)
        params, adam = self._init(mode, r, gen, (H, W), c_in, dev)
        samp = np.array([tasks["targets"][j] for j in rows])
        victims = np.array([tasks["victims"][j] for j in rows])
        channels = torch.tensor([tasks["channels"][j] for j in rows], device=dev)
        st = _Stage(mode, rows, params, adam, use=samp.copy(), optz=samp.copy(),
                    facc=np.zeros(r), mode_logit=np.full(r, -np.inf), losses=[],
                    ssim_mean=np.full(r, np.nan))
        plan = self._plan(rows, tasks["sets"], tasks["batch"])
        for e in range(epochs):
            epoch_logits: dict[tuple[int, int], torch.Tensor] = {}
            epoch_ssim: list[list[float]] = [[] for _ in range(r)]
            loss_rows = np.zeros(r)
            complete = True
            for pr, pi, div, step in plan:
                update = e >= update_from
                if update and ctx.expired():
                    st.stopped, complete = True, False
                    break
                pr_d, pi_d = pr.to(dev), pi.to(dev)
                noise = (torch.rand((len(pi), c_in, H, W), generator=gen) * 2 - 1) * p.noise
                xt = (x[pi_d] + noise.to(dev)).clamp(0, 1)
                leaves = [q.detach().requires_grad_(update) for q in params]
                with torch.set_grad_enabled(update):
                    if mode == "patch":
                        m = torch.tanh(leaves[0]) / 2 + 0.5  # (R, H, W)
                        d = torch.tanh(leaves[1]) / 2 + 0.5  # (R, C, 1, 1)
                        mp = m[pr_d][:, None]
                        x_adv = (1 - mp) * xt + mp * d[pr_d]
                    else:
                        kern = torch.tanh(leaves[0]) / 2 + 0.5
                        x_adv = apply_filter(xt, kern[pr_d], pool, p.count_include_pad)
                    a, logits = feats_fn(x_adv)
                    a = a.flatten(2)
                    s_pre, s_relu = a.sum(-1), F.relu(a).sum(-1)  # (P, F)
                    own = (s_pre.gather(1, channels[pr_d][:, None])[:, 0]
                           + s_relu.gather(1, channels[pr_d][:, None])[:, 0])
                    other = (s_pre.sum(1) + s_relu.sum(1) - own) / max(a.shape[1] - 1, 1)
                    den = div.to(dev)[pr_d]
                    use_t = torch.as_tensor(st.use, device=dev)[pr_d]
                    lu = logits.gather(1, use_t[:, None])[:, 0]
                    pair = -own / den + p.other_weight * other / den - p.logit_weight * lu
                    if mode == "filter":
                        ss = self._ssim(xt, x_adv)
                        pair = pair - torch.where(ss > p.ssim_bound, p.ssim_weights[0] * ss,
                                                  p.ssim_weights[1] * ss)
                        for lj, v in zip(pr.tolist(), ss.detach().cpu().tolist()):
                            epoch_ssim[lj].append(v)
                    row_loss = torch.zeros(r, device=dev, dtype=pair.dtype).index_add(
                        0, pr_d, pair)
                    if mode == "patch":
                        nnz = (m > 0.01).flatten(1).sum(1).to(m.dtype)
                        msum = m.flatten(1).sum(1)
                        pen = torch.where(nnz <= area_s, torch.zeros_like(msum),
                                          torch.where(nnz <= p.size_margin * area_s,
                                                      p.size_weights[0] * msum,
                                                      p.size_weights[1] * msum))
                        row_loss = row_loss + pen * step.to(dev)
                loss_rows += row_loss.detach().cpu().numpy()
                if update:
                    grads = torch.autograd.grad(row_loss.sum(), leaves)
                    adam.step(grads, step.to(dev))
                for lj, img, lg in zip(pr.tolist(), pi.tolist(), logits.detach()):
                    epoch_logits[(lj, img)] = lg
            if not complete:
                break
            st.losses.append(loss_rows)
            for lj, j in enumerate(rows):
                lg = torch.stack([epoch_logits[(lj, int(i))] for i in tasks["sets"][j]])
                preds = lg.argmax(1).cpu().numpy()
                st.optz[lj], st.facc[lj] = optz_label(preds, int(victims[lj]), int(samp[lj]))
                st.use[lj] = next_use_label(st.optz[lj], st.facc[lj], samp[lj], mode,
                                            p.switch_share)
                st.mode_logit[lj] = float(lg[:, int(st.use[lj])].mean())
                if epoch_ssim[lj]:
                    st.ssim_mean[lj] = float(np.mean(epoch_ssim[lj]))
            st.epochs_done += 1
        st.pool = pool
        return st

    # ------------------------------------------------------------------ score
    def score(self, model: torch.nn.Module, data: ScanData, ctx: ScanContext) -> DetectorResult:
        p = self.params
        ctx.require_time(self.name)
        started = time.perf_counter()
        x, y = data.x.to(ctx.device), data.y.to(ctx.device)
        if len(x) == 0:
            raise NoUsableExamples("abs: no example images")
        c_in, H, W = x.shape[1:]
        sel_gen = ctx.generator("abs/stimulation")
        with eval_mode(model):
            h, g, layer_name = _split(model, p.layer)
            # 1. M_y over all example images, stimulation on stim_images per label
            stim_idx = []
            for lbl in sorted(set(y.tolist())):
                idx = torch.nonzero(y.cpu() == lbl).flatten()
                idx = idx[torch.randperm(len(idx), generator=sel_gen)][:p.stim_images]
                stim_idx.append(idx)
            stim_idx = torch.cat(stim_idx).to(ctx.device)
            with torch.no_grad():
                m_y = label_maxima(h, x, y)
                st = stimulate(h, g, x[stim_idx], y[stim_idx], p.stim_levels, m_y=m_y)
            logits = data.clean_logits(model).to(x.device)  # shared with K-Arm's pre-screen
            runner_ups = runner_up_labels(logits, y, p.runner_up)
            cands = select_candidates(st["label"].cpu(), st["score"].cpu(), y[stim_idx].cpu(),
                                      runner_ups, p.per_victim)
            base_stats = {"layer": layer_name, "m_y": {int(k): v for k, v in m_y.items()},
                          "seed": ctx.seed, "steps": 0, "stopped_early": False}
            if not cands:  # ref: no task -> REASR 0 (module doc)
                return DetectorResult(
                    score=0.0, target=None,
                    stats={**base_stats, "candidates": 0, "kept": 0, "best_reasr": 0.0,
                           "no_candidates": True},
                    triggers=[], artifacts={"candidates": []})
            # 2. image sets: up to images_per_victim images of each candidate's victim
            img_gen = ctx.generator("abs/images")
            per_victim = {}
            for v in sorted({c[0] for c in cands}):
                idx = torch.nonzero(y.cpu() == v).flatten()
                per_victim[v] = idx[torch.randperm(len(idx), generator=img_gen)
                                    ][:p.images_per_victim]
            feats_fn, feature_kind = inner_features(model, h, g, layer_name, p.pre_relu)
            tasks = {"x": x, "features": feats_fn, "sets": [per_victim[c[0]] for c in cands],
                     "victims": [c[0] for c in cands], "targets": [c[1] for c in cands],
                     "channels": [c[2] for c in cands],
                     "batch": p.batch_size or reference_batch_size(model)}
            all_rows = list(range(len(cands)))
            # 3. mode trial (each mode from a fresh start, updating from epoch 0)
            trials: dict[str, _Stage] = {}
            for mode in p.modes:
                trials[mode] = self._run(mode, all_rows, tasks, p.trial_epochs, 0,
                                         ctx.generator(f"abs/{mode}"), ctx)
                if trials[mode].stopped:
                    break
            tried = [m for m in p.modes if m in trials and trials[m].epochs_done > 0] or \
                [m for m in p.modes if m in trials and trials[m].steps.sum() > 0]
            if not tried:
                require_steps(self.name, 0, ctx)
            if len(tried) == 1:
                choice = [tried[0]] * len(cands)
            else:  # filter iff its trial logit is larger (ref task_modes)
                choice = ["filter" if trials["filter"].mode_logit[j] > trials["patch"].mode_logit[j]
                          else "patch" for j in all_rows]
            stopped = any(t.stopped for t in trials.values())
            # restart of the winning mode for the full epochs (epoch 0 forward only)
            finals: dict[str, _Stage] = {}
            for mode in p.modes:
                rows = [j for j in all_rows if choice[j] == mode]
                if rows and not stopped:
                    finals[mode] = self._run(mode, rows, tasks, p.epochs, 1,
                                             ctx.generator(f"abs/{mode}/final"), ctx)
                    stopped = stopped or finals[mode].stopped
            trial_steps = int(sum(int(t.steps.sum()) for t in trials.values()))
            final_steps = int(sum(int(t.steps.sum()) for t in finals.values()))
            steps = require_steps(self.name, trial_steps + final_steps, ctx)
            candidates = [self._finish(j, choice[j], trials, finals, tasks, model, x, y, cands,
                                       layer_name) for j in all_rows]
        seconds = time.perf_counter() - started
        for c in candidates:
            c.stats["seconds"] = seconds / max(len(candidates), 1)
            c.stats["seed"] = ctx.seed
        kept = [c for c in candidates if c.stats["kept"]]
        best = max(kept, key=lambda c: c.reasr, default=None)
        modes = {m: choice.count(m) for m in p.modes}
        stats = {**base_stats, "candidates": len(candidates), "kept": len(kept),
                 "best_reasr": 0.0 if best is None else best.reasr,
                 "best_kind": None if best is None else best.kind,
                 "best_victim": None if best is None else best.victim,
                 "modes": modes, "steps": steps, "steps_trial": trial_steps,
                 "steps_final": final_steps, "stopped_early": bool(stopped),
                 "features": feature_kind, "layout": p.layout, "batch_size": tasks["batch"],
                 "seed_salts": ["abs/stimulation", "abs/images"]
                 + [f"abs/{m}" for m in p.modes] + [f"abs/{m}/final" for m in p.modes],
                 "max_reasr_all": max((c.reasr for c in candidates), default=0.0),
                 "elapsed_s": seconds}
        return DetectorResult(score=0.0 if best is None else float(best.reasr),
                              target=None if best is None else best.target, stats=stats,
                              triggers=[c.to_row() for c in candidates],
                              artifacts={"candidates": candidates})

    @torch.no_grad()
    def _finish(self, j: int, mode: str, trials: dict[str, _Stage], finals: dict[str, _Stage],
                tasks: dict[str, Any], model, x, y, cands, layer_name: str) -> TriggerCandidate:
        """The trigger of task j: its final run's state, or its trial state when the deadline
        left the final run without an update."""
        p = self.params
        final = finals.get(mode)
        if final is not None and j in final.rows and final.steps[final.rows.index(j)] > 0:
            stage, source = final, "final"
        else:
            stage, source = trials[mode], "trial"
        lj = stage.rows.index(j)
        victim, samp, channel, value = cands[j]
        target = int(stage.optz[lj])
        if mode == "patch":
            mask = (torch.tanh(stage.params[0][lj]) / 2 + 0.5).cpu()
            pattern = (torch.tanh(stage.params[1][lj]) / 2 + 0.5).cpu()
            cand = TriggerCandidate(victim=int(victim), target=target, kind="patch", mask=mask,
                                    pattern=pattern, size=mask_size(mask), binarize=p.binarize)
        else:
            kernel = (torch.tanh(stage.params[0][lj]) / 2 + 0.5).cpu()
            cand = TriggerCandidate(victim=int(victim), target=target, kind="filter",
                                    kernel=kernel, pool=stage.pool,
                                    count_include_pad=p.count_include_pad)
            xv = x[tasks["sets"][j].to(x.device)]
            cand.size = float(self._ssim(xv, cand.apply(xv)).mean())
        cand.reasr, cand.reasr_per_label = measure_reasr(model, cand, x, y)
        # the ref's `score`: share of ALL example images (target class included) -> target
        reasr_all = float(torch.cat([model(cand.apply(x[i:i + 256])).argmax(1)
                                     for i in range(0, len(x), 256)]).eq(target).float().mean())
        losses = np.array([l[lj] for l in stage.losses]) if stage.losses else np.array([np.nan])
        trial_logits = {m: float(t.mode_logit[t.rows.index(j)]) for m, t in trials.items()}
        cand.stats.update({
            "flip_rate": float(stage.facc[lj]), "kept": bool(stage.facc[lj] >= p.keep_flip),
            "optz_label": target, "use_label": int(stage.use[lj]), "neuron_label": int(samp),
            "channel": int(channel), "layer": layer_name, "stim_value": float(value),
            "epochs": stage.epochs_done, "steps": int(stage.steps[lj]), "source": source,
            "mode_logits": trial_logits, "reasr_all": reasr_all,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
            "loss_min": float(np.nanmin(losses)) if np.isfinite(losses).any() else float("nan"),
            "ssim_train": float(stage.ssim_mean[lj])})
        return cand
