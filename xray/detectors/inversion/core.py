"""The shared trigger-inversion core: parameterisation, batched Adam, cost schedule, REASR.

Spec: docs/algorithms/inversion.md. Neural Cleanse (nc.py), ABS (abs.py) and K-Arm (karm.py)
are built from these functions; they differ in which (victim, target) pairs they optimise and how
they score, not in the optimisation machinery.

Batching. K triggers (one per target label for NC, one per (victim, target) arm for K-Arm, one
per candidate neuron for ABS) are optimised together: their parameters are stacked along a
leading K axis, every minibatch gathers B images per trigger into one (K*B, C, H, W) tensor and
the model sees them in ONE forward / backward. Triggers are independent (the summed loss has a
block-diagonal gradient), and `BatchedAdam` keeps Adam's moments and step count per row, so a
row's trajectory is exactly that of a lone trigger with its own torch.optim.Adam (up to float
rounding of the batched forward), including when rows stop early or are paused (K-Arm's bandit
pulls one arm at a time through the same object).

Pixel space. Models take [0, 1] pixels (normalisation folded in), so patterns live in [0, 1]
where NC's reference uses 0..255 raw pixels before its preprocessing: the same trigger.

    m = tanh(theta_m) / (2 - eps) + 0.5          (H, W) shared over channels
    p = tanh(theta_p) / (2 - eps) + 0.5          (C, H, W) or (C, 1, 1)
    x' = (1 - m) x + m p

NC and K-Arm use eps = 1e-7 (ref), ABS eps = 0.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from xray.detectors.base import eval_mode  # noqa: F401  (re-exported for the scanners)

KINDS = ("patch", "filter")
TANH_EPS = 1e-7  # NC / K-Arm: tanh(.) / (2 - 1e-7) + 0.5 keeps values strictly inside (0, 1)


# ----------------------------------------------------------------------------- parameterisation


def tanh01(theta: torch.Tensor, eps: float = TANH_EPS) -> torch.Tensor:
    """tanh(theta) / (2 - eps) + 0.5: unconstrained -> (0, 1)."""
    return torch.tanh(theta) / (2.0 - eps) + 0.5


def atanh01(value: torch.Tensor, eps: float = TANH_EPS) -> torch.Tensor:
    """Inverse of tanh01 (values clamped just inside (0, 1))."""
    inner = ((value - 0.5) * (2.0 - eps)).clamp(-1 + 1e-6, 1 - 1e-6)
    return torch.atanh(inner)


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) x + m p. x (..., C, H, W); mask broadcastable (..., 1, H, W) or (H, W)."""
    if mask.dim() == 2:
        mask = mask[None]
    return (1 - mask) * x + mask * pattern


def filter_pool_size(side: int, reference_pool: int = 111, reference_side: int = 224) -> int:
    """ABS's pool window scaled to the image side, odd (111 at 224; 11 at 24) (inferred)."""
    k = int(2 * math.floor(reference_pool * side / reference_side / 2) + 1)
    return max(1, k)


def filter_features(x: torch.Tensor, pool: int, count_include_pad: bool = True
                    ) -> torch.Tensor:
    """[x, maxpool(x), -maxpool(x), avgpool(x)] stacked on channels: (N, 4C, H, W).

    ABS (ref filter_preprocess): the third term is -maxpool(x), not a min-pool; stride 1 and
    padding pool // 2 so the maps keep their size; the avg-pool counts the zero padding at the
    border (torch's default count_include_pad=True, which the ref keeps). False counts only real
    pixels (what rows written before this option was stored used).

    Both pools are computed as a column pass then a row pass (a k x k window is a k x 1 window
    of 1 x k windows; the pixel count of a window, padding left out, is the product of the two
    passes' counts): 2k reads per pixel instead of k^2, the same maxima exactly, averages to
    ~1e-6 (another summation order). The ref's window is 111 px at 224: there the 2-D pools took
    ~17 s per 8 images on one core, the separable ones 0.4 s; at 32 px (15 px) 2-3x faster.
    """
    pad = pool // 2
    mx = F.max_pool2d(F.max_pool2d(x, (pool, 1), stride=1, padding=(pad, 0)),
                      (1, pool), stride=1, padding=(0, pad))
    av = F.avg_pool2d(F.avg_pool2d(x, (pool, 1), stride=1, padding=(pad, 0),
                                   count_include_pad=count_include_pad),
                      (1, pool), stride=1, padding=(0, pad), count_include_pad=count_include_pad)
    return torch.cat([x, mx, -mx, av], dim=1)


def apply_filter(x: torch.Tensor, kernel: torch.Tensor, pool: int | None = None,
                 count_include_pad: bool = True) -> torch.Tensor:
    """ABS filter trigger: clamp(features(x) . K, 0, 1) with K of shape (4C, C) (12 x 3 for RGB).

    x: (N, C, H, W) pixels. A kernel with a leading axis applies several kernels at once: with x
    of shape (K, N, C, H, W) and kernel (K, 4C, C) one kernel per leading row; with x (N, C, H, W)
    and kernel (N, 4C, C) one kernel per image (ABS's minibatches mix tasks).
    """
    if pool is None:
        pool = filter_pool_size(x.shape[-1])
    if kernel.dim() == 3 and x.dim() == 5:  # one kernel per leading row
        k, n = x.shape[:2]
        feats = filter_features(x.reshape(k * n, *x.shape[2:]), pool, count_include_pad)
        out = torch.einsum("knfhw,kfc->knchw", feats.reshape(k, n, -1, *x.shape[-2:]), kernel)
        return out.clamp(0, 1)
    feats = filter_features(x, pool, count_include_pad)
    if kernel.dim() == 3:  # one kernel per image
        return torch.einsum("nfhw,nfc->nchw", feats, kernel).clamp(0, 1)
    return torch.einsum("nfhw,fc->nchw", feats, kernel).clamp(0, 1)


def identity_kernel_logits(channels: int, on: float = 2.0, off: float = -2.0) -> torch.Tensor:
    """theta for K = tanh(theta)/2 + 0.5: `on` on the identity (the x term), `off` elsewhere."""
    theta = torch.full((4 * channels, channels), off)
    theta[torch.arange(channels), torch.arange(channels)] = on
    return theta


# ----------------------------------------------------------------------------- SSIM


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_terms(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (mean SSIM map, mean contrast-structure map), data range 1, K1 0.01, K2 0.03."""
    c = a.shape[1]
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a = F.conv2d(a, window, groups=c)
    mu_b = F.conv2d(b, window, groups=c)
    saa = F.conv2d(a * a, window, groups=c) - mu_a ** 2
    sbb = F.conv2d(b * b, window, groups=c) - mu_b ** 2
    sab = F.conv2d(a * b, window, groups=c) - mu_a * mu_b
    cs = (2 * sab + c2) / (saa + sbb + c2)
    ssim = ((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, levels: int = 5, window: int = 11,
            sigma: float = 1.5) -> torch.Tensor:
    """Multi-scale SSIM per image (N,), differentiable; pixels in [0, 1].

    Wang et al. 2003 (5 levels, weights MS_SSIM_WEIGHTS, Gaussian 11 / 1.5). Small images cannot
    hold 5 levels: the window shrinks to the image side and the levels stop where the image gets
    smaller than the window, weights renormalised over the levels used (inferred; at 224 px this
    is the standard 5-level MS-SSIM). Negative cs / ssim values are clamped at 0 before the power.
    """
    side = min(a.shape[-2:])
    window = min(window, side if side % 2 else side - 1)
    levels_fit = 1
    while levels_fit < levels and side // (2 ** levels_fit) >= window:
        levels_fit += 1
    weights = torch.tensor(MS_SSIM_WEIGHTS[:levels_fit], dtype=a.dtype, device=a.device)
    weights = weights / weights.sum()
    win = _gaussian_window(window, sigma, a.shape[1], a.device, a.dtype)
    values = []
    for level in range(levels_fit):
        ssim, cs = _ssim_terms(a, b, win)
        values.append(ssim if level == levels_fit - 1 else cs)
        if level < levels_fit - 1:
            a = F.avg_pool2d(a, 2)
            b = F.avg_pool2d(b, 2)
    stacked = torch.stack(values, dim=1).clamp_min(1e-6)
    return torch.prod(stacked ** weights, dim=1)


# ----------------------------------------------------------------------------- candidates


@dataclass
class TriggerCandidate:
    """One inverted trigger. mask (H, W) in [0, 1] + pattern (C, H, W) or (C, 1, 1) in pixel
    space for a patch; kernel (4C, C) (12 x 3 for RGB) for a filter. victim None = all labels.
    size: mask pixels > 0.01 for a patch, mean SSIM(x, x') for a filter. reasr: max over
    labels i != target of the share of class-i images predicted target when stamped
    (reasr_per_label). stats: loss summary, steps, seconds, seeds, scanner-specific numbers.

    binarize: the mask threshold `.apply` uses (m > binarize -> 1, else 0), the spec's stamping
    for REASR and EX-RAY (m > 0.1); None stamps the continuous mask. pool: the filter's pool
    window (None: scaled from the image side, filter_pool_size); count_include_pad: its avg-pool
    counts the zero padding (ABS's reference; rows stored without the key were made with False).
    """

    victim: int | None
    target: int
    kind: str
    mask: torch.Tensor | None = None
    pattern: torch.Tensor | None = None
    kernel: torch.Tensor | None = None
    size: float = float("nan")
    reasr: float = float("nan")
    reasr_per_label: dict[int, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    binarize: float | None = 0.1
    pool: int | None = None
    count_include_pad: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"trigger kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "patch" and (self.mask is None or self.pattern is None):
            raise ValueError("a patch trigger needs a mask and a pattern")
        if self.kind == "filter" and self.kernel is None:
            raise ValueError("a filter trigger needs a kernel")

    def stamp_mask(self) -> torch.Tensor:
        """The (H, W) mask `.apply` uses: binarised at `binarize`, or continuous."""
        assert self.mask is not None
        if self.binarize is None:
            return self.mask
        return (self.mask > self.binarize).to(self.mask.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) pixels -> stamped / filtered x' (same shape, same device)."""
        if self.kind == "patch":
            m = self.stamp_mask().to(x.device, x.dtype)
            p = self.pattern.to(x.device, x.dtype)
            return stamp(x, m[None, None], p[None])
        return apply_filter(x, self.kernel.to(x.device, x.dtype), self.pool,
                            self.count_include_pad)

    def to_row(self) -> dict[str, Any]:
        """The dict xray.scanning.trigger_rows reads: victim, target, kind, size, reasr, mask,
        pattern, kernel as columns; every other key lands in stats_json."""
        row: dict[str, Any] = {
            "victim": None if self.victim is None else int(self.victim),
            "target": int(self.target), "kind": self.kind, "size": float(self.size),
            "reasr": float(self.reasr),
            "mask": None if self.mask is None else self.mask.detach().cpu().float().numpy(),
            "pattern": None if self.pattern is None
            else self.pattern.detach().cpu().float().numpy(),
            "kernel": None if self.kernel is None else self.kernel.detach().cpu().float().numpy(),
            "reasr_per_label": {str(k): float(v) for k, v in self.reasr_per_label.items()},
            "binarize": self.binarize,
        }
        if self.pool is not None:
            row["pool"] = int(self.pool)
        if self.kind == "filter":
            row["count_include_pad"] = bool(self.count_include_pad)
        for key, value in self.stats.items():
            row.setdefault(key, value)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TriggerCandidate":
        """Rebuild from a `triggers` table row (mask / pattern / kernel as arrays or np.save
        bytes, stats_json as text) or a `to_row` dict, so a stored trigger can be re-applied and
        drawn."""
        def arr(value: Any) -> torch.Tensor | None:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return None
            if isinstance(value, (bytes, bytearray)):
                value = np.load(io.BytesIO(value))
            return torch.as_tensor(np.asarray(value), dtype=torch.float32)

        stats = dict(row.get("stats") or {})
        if isinstance(row.get("stats_json"), str):
            stats.update(json.loads(row["stats_json"]))

        def setting(key: str, default: Any) -> Any:  # in stats_json (a table row) or top level
            return stats.pop(key) if key in stats else row.get(key, default)

        per_label = {int(k): float(v) for k, v in (setting("reasr_per_label", {}) or {}).items()}
        binarize = setting("binarize", 0.1)
        pool = setting("pool", None)
        count_include_pad = bool(setting("count_include_pad", False))
        victim = row.get("victim")
        victim = None if victim is None or (isinstance(victim, float) and math.isnan(victim)) \
            else int(victim)
        return cls(victim=victim, target=int(row["target"]), kind=str(row["kind"]),
                   mask=arr(row.get("mask")), pattern=arr(row.get("pattern")),
                   kernel=arr(row.get("kernel")), size=float(row.get("size", float("nan"))),
                   reasr=float(row.get("reasr", float("nan"))), reasr_per_label=per_label,
                   stats=stats, binarize=binarize, pool=None if pool is None else int(pool),
                   count_include_pad=count_include_pad)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Argmax labels of x, in batches."""
    out = [model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


@torch.no_grad()
def measure_reasr(model: torch.nn.Module, candidate: TriggerCandidate, x: torch.Tensor,
                  y: torch.Tensor, batch_size: int = 256) -> tuple[float, dict[int, float]]:
    """REASR of a candidate on images x (pixels) with true labels y.

    per_label[i] = share of class-i images (i != target) predicted `target` once stamped with
    `candidate.apply`; reasr = max over i (ABS, ref). 0.0 with {} when x holds no other class.
    """
    preds = torch.cat([predict(model, candidate.apply(x[i:i + batch_size]), batch_size)
                       for i in range(0, len(x), batch_size)]) if len(x) else y
    per_label: dict[int, float] = {}
    for label in sorted(set(int(v) for v in y.tolist())):
        if label == candidate.target:
            continue
        sel = y == label
        per_label[label] = float((preds[sel] == candidate.target).float().mean())
    return (max(per_label.values()) if per_label else 0.0), per_label


def mask_size(mask: torch.Tensor, threshold: float = 0.01) -> float:
    """Spec size of a patch: number of mask pixels above 0.01."""
    return float((mask > threshold).sum())


# ----------------------------------------------------------------------------- batched Adam


class BatchedAdam:
    """Adam over parameters stacked on a leading row axis, with a step count per row.

    `step(grads, rows)` updates only `rows` (a bool mask or index tensor): their moments and step
    counts advance, all other rows stay exactly as they are. Same update as torch.optim.Adam
    (no weight decay, no amsgrad) applied to each row alone.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        k = self.params[0].shape[0]
        if any(p.shape[0] != k for p in self.params):
            raise ValueError("BatchedAdam: every parameter needs the same leading row count")
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(k, dtype=torch.float64, device=self.params[0].device)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], rows: torch.Tensor) -> None:
        rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
        if rows.numel() == 0:
            return
        b1, b2 = self.betas
        self.steps[rows] += 1
        t = self.steps[rows]
        c1 = (1 - b1 ** t).to(self.params[0].dtype)
        c2 = (1 - b2 ** t).to(self.params[0].dtype)
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = g[rows] if g.shape[0] == p.shape[0] else g
            m_r = m[rows].mul_(b1).add_(g, alpha=1 - b1)
            v_r = v[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
            m[rows], v[rows] = m_r, v_r
            denom = (v_r / c2.view(shape)).sqrt().add_(self.eps)
            p[rows] = p[rows] - self.lr * (m_r / c1.view(shape)) / denom

    def reset(self, rows: torch.Tensor) -> None:
        """Forget the moments and step counts of `rows` (NC resets its optimiser per label)."""
        rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m[rows] = 0
            v[rows] = 0
        self.steps[rows] = 0


# ----------------------------------------------------------------------------- cost schedule


@dataclass(frozen=True)
class CostSchedule:
    """Neural Cleanse's adaptive weight of the mask-L1 term (K-Arm uses the same logic).

    Starts at 0; after `init_patience` consecutive steps with acc >= threshold it becomes
    `init_cost` (counters and flags reset). Then `patience` consecutive successes -> x `up`,
    `patience` consecutive failures -> / `down`. NC (example script): 1e-3, 5, 5, 2, 2**1.5;
    K-Arm: 1e-3, 2, 5, 1.5, 1.5.

    fixed: the weight is `init_cost` from the first step on and never changes (TrojanZoo's
    ModelInspection, which TABOR builds on: a constant `cost`); the other fields are then unused.
    """

    init_cost: float = 1e-3
    init_patience: int = 5
    patience: int = 5
    up: float = 2.0
    down: float = 2.0 ** 1.5
    threshold: float = 0.99
    fixed: bool = False


@dataclass
class ScheduleState:
    """Per-row state of CostSchedule (numpy arrays of length K)."""

    cost: np.ndarray
    set_counter: np.ndarray
    up_counter: np.ndarray
    down_counter: np.ndarray
    up_flag: np.ndarray
    down_flag: np.ndarray

    @classmethod
    def zeros(cls, k: int) -> "ScheduleState":
        return cls(np.zeros(k), np.zeros(k, int), np.zeros(k, int), np.zeros(k, int),
                   np.zeros(k, bool), np.zeros(k, bool))

    def update(self, schedule: CostSchedule, acc: np.ndarray, rows: np.ndarray) -> None:
        """One step's update for `rows` (indices) given their step-mean attack accuracy."""
        if schedule.fixed:
            return
        for r, a in zip(rows, acc):
            ok = a >= schedule.threshold
            if self.cost[r] == 0 and ok:
                self.set_counter[r] += 1
                if self.set_counter[r] >= schedule.init_patience:
                    self.cost[r] = schedule.init_cost
                    self.up_counter[r] = self.down_counter[r] = 0
                    self.up_flag[r] = self.down_flag[r] = False
            else:
                self.set_counter[r] = 0
            if ok:
                self.up_counter[r] += 1
                self.down_counter[r] = 0
            else:
                self.up_counter[r] = 0
                self.down_counter[r] += 1
            if self.up_counter[r] >= schedule.patience:
                self.up_counter[r] = 0
                self.cost[r] *= schedule.up
                self.up_flag[r] = True
            elif self.down_counter[r] >= schedule.patience:
                self.down_counter[r] = 0
                self.cost[r] /= schedule.down
                self.down_flag[r] = True


# ----------------------------------------------------------------------------- model helpers


def seeds_from(generator: torch.Generator) -> int:
    """A recorded integer seed drawn from a generator (for stats)."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator).item())


# ------------------------------------------------------------------ the batched patch optimiser


@dataclass
class StepResult:
    """Per active row of one step: mean attack accuracy, mean mask L1, mean loss, and whether the
    step improved the row's best (acc >= threshold and L1 < best)."""

    rows: np.ndarray
    acc: np.ndarray
    l1: np.ndarray
    loss: np.ndarray
    improved: np.ndarray


class PatchOptimizer:
    """K mask / pattern triggers optimised together: CE(f(x'), t_k) + cost_k * sum|m_k|.

    theta_m (K, H, W), theta_p (K, C, h, w) (h = w = 1 for a single colour), targets (K,),
    pools: K index tensors into x (the images each trigger is trained on). A step = `mini_batches`
    minibatches of `batch_size` images per row (None: one pass over the row's pool, K-Arm's pull);
    images come from a per-row shuffled cycle over its pool (reshuffled when used up); with
    `ordered` (K-Arm: DataLoader shuffle=False, drop_last=False) a step is instead one pass over the
    pool in its stored order, minibatches pool[i:i + batch_size], the last one partial. All active
    rows' minibatches go through the model in one forward.

    Rows keep: the cost schedule, the best mask / pattern (acc >= threshold and smaller L1; none
    yet -> the last one, NC ref), and NC's early-stop counter. `step(rows)` runs one step for the
    given rows only; `run(max_steps)` steps every live row until its budget or early stop.

    Extensions for scanners whose loss or selection differs from NC's (TABOR):
    `regularizer(mask, pattern, images, index, targets, weight)` returns extra loss terms, one per
    row (R,), added to each row's minibatch loss: mask (R, H, W), pattern (R, C, h, w), images
    (R, B, C, H, W) the clean minibatch, index (R, B) their positions in x, targets (R,), weight
    (R, B) 1 for real images, 0 for padding. `select_final`: a step is judged by the L1 of the
    mask as it stands after the step (TrojanZoo) instead of the step's mean L1 (NC ref).
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, theta_m: torch.Tensor,
                 theta_p: torch.Tensor, targets: Sequence[int], pools: Sequence[torch.Tensor], *,
                 generator: torch.Generator, schedule: CostSchedule = CostSchedule(),
                 lr: float = 0.1, betas: tuple[float, float] = (0.5, 0.9),
                 batch_size: int = 32, mini_batches: int | None = None,
                 tanh_eps: float = TANH_EPS, early_stop_patience: int | None = 25,
                 early_stop_threshold: float = 1.0, ordered: bool = False,
                 regularizer: Callable[..., torch.Tensor] | None = None,
                 select_final: bool = False) -> None:
        self.model, self.x = model, x
        self.regularizer, self.select_final = regularizer, bool(select_final)
        self.ordered = bool(ordered)
        device = x.device
        self.theta_m = theta_m.detach().clone().to(device)
        self.theta_p = theta_p.detach().clone().to(device)
        self.k = self.theta_m.shape[0]
        self.targets = torch.as_tensor(list(targets), dtype=torch.long, device=device)
        self.pools = [torch.as_tensor(p, dtype=torch.long).cpu() for p in pools]
        if len(self.pools) != self.k or len(self.targets) != self.k:
            raise ValueError("PatchOptimizer: one target and one pool per trigger row")
        if any(len(p) == 0 for p in self.pools):
            raise ValueError("PatchOptimizer: a trigger row has no images")
        self.generator = generator
        self.schedule = schedule
        self.batch_size, self.mini_batches = int(batch_size), mini_batches
        self.eps = tanh_eps
        self.adam = BatchedAdam([self.theta_m, self.theta_p], lr=lr, betas=betas)
        self.state = ScheduleState.zeros(self.k)
        if schedule.fixed:
            self.state.cost[:] = schedule.init_cost
        self.best_l1 = np.full(self.k, np.inf)
        self.best_mask = tanh01(self.theta_m, self.eps).detach().clone()
        self.best_pattern = tanh01(self.theta_p, self.eps).detach().clone()
        self.last_l1 = np.full(self.k, np.inf)
        self.last_acc = np.zeros(self.k)
        self.max_acc = np.zeros(self.k)
        self.steps = np.zeros(self.k, int)
        self.improvements = np.zeros(self.k, int)
        self.stopped = np.zeros(self.k, bool)
        self.early_stop_patience = early_stop_patience
        self.early_stop_threshold = early_stop_threshold
        self.early_counter = np.zeros(self.k, int)
        self.early_best = np.full(self.k, np.inf)
        self.loss_first = np.full(self.k, np.nan)
        self.forwards = 0
        self._perm = [torch.zeros(0, dtype=torch.long)] * self.k
        self._cursor = [0] * self.k

    # -- data
    def _next(self, row: int, n: int) -> torch.Tensor:
        pool = self.pools[row]
        out = []
        while n > 0:
            if self._cursor[row] >= len(self._perm[row]):
                self._perm[row] = pool[torch.randperm(len(pool), generator=self.generator)]
                self._cursor[row] = 0
            take = min(n, len(self._perm[row]) - self._cursor[row])
            out.append(self._perm[row][self._cursor[row]:self._cursor[row] + take])
            self._cursor[row] += take
            n -= take
        return torch.cat(out)

    def masks(self) -> torch.Tensor:
        return tanh01(self.theta_m, self.eps)

    def patterns(self) -> torch.Tensor:
        return tanh01(self.theta_p, self.eps)

    # -- one step
    def step(self, rows: Sequence[int] | np.ndarray | None = None) -> StepResult:
        rows = np.flatnonzero(~self.stopped) if rows is None else np.asarray(rows, dtype=int)
        if len(rows) == 0:
            return StepResult(rows, *(np.zeros(0),) * 3, np.zeros(0, bool))
        sizes = [min(self.batch_size, len(self.pools[r])) for r in rows]
        b = max(sizes)
        n_mb = [self.mini_batches or math.ceil(len(self.pools[r]) / s) for r, s in zip(rows, sizes)]
        acc_sum, l1_sum, loss_sum = np.zeros(len(rows)), np.zeros(len(rows)), np.zeros(len(rows))
        rows_t = torch.as_tensor(rows, device=self.x.device)
        weight = torch.zeros(len(rows), b, device=self.x.device)
        for j, s in enumerate(sizes):
            weight[j, :s] = 1
        c, h, w = self.x.shape[1:]
        costs = torch.as_tensor(self.state.cost[rows], dtype=self.x.dtype, device=self.x.device)
        for mb in range(max(n_mb)):
            live = np.array([mb < n for n in n_mb])
            if self.ordered:  # one pass in stored order, the last minibatch partial (K-Arm)
                chunks = [self.pools[r][mb * s:(mb + 1) * s] if live[j] else self.pools[r][:0]
                          for j, (r, s) in enumerate(zip(rows, sizes))]
                idx = torch.stack([F.pad(ch, (0, b - len(ch))) for ch in chunks]).to(self.x.device)
                wl = torch.stack([(torch.arange(b) < len(ch)).float()
                                  for ch in chunks]).to(self.x.device)
            else:
                idx = torch.stack([self._next(r, b) if live[j] else torch.zeros(b, dtype=torch.long)
                                   for j, r in enumerate(rows)]).to(self.x.device)
                wl = weight * torch.as_tensor(live, device=self.x.device)[:, None]
            theta_m = self.theta_m[rows_t].detach().requires_grad_(True)
            theta_p = self.theta_p[rows_t].detach().requires_grad_(True)
            m = tanh01(theta_m, self.eps)[:, None, None]  # (R, 1, 1, H, W)
            p = tanh01(theta_p, self.eps)[:, None]  # (R, 1, C, h, w)
            xb = self.x[idx]  # (R, B, C, H, W)
            x_adv = (1 - m) * xb + m * p
            logits = self.model(x_adv.reshape(-1, c, h, w)).reshape(len(rows), b, -1)
            self.forwards += 1
            target = self.targets[rows_t][:, None].expand(-1, b)
            ce = F.cross_entropy(logits.reshape(len(rows) * b, -1), target.reshape(-1),
                                 reduction="none").reshape(len(rows), b)
            ce_mean = (ce * wl).sum(1) / wl.sum(1).clamp_min(1)
            l1 = m.flatten(1).abs().sum(1)
            loss = ce_mean + costs * l1
            if self.regularizer is not None:
                loss = loss + self.regularizer(m[:, 0, 0], p[:, 0], xb, idx,
                                               self.targets[rows_t], wl)
            live_t = torch.as_tensor(live, device=self.x.device)
            g_m, g_p = torch.autograd.grad((loss * live_t).sum(), [theta_m, theta_p])
            with torch.no_grad():
                hit = ((logits.argmax(-1) == target).float() * wl).sum(1) / wl.sum(1).clamp_min(1)
            step_rows = rows_t[live_t]
            full_m = torch.zeros_like(self.theta_m)
            full_p = torch.zeros_like(self.theta_p)
            full_m[rows_t] = g_m
            full_p[rows_t] = g_p
            self.adam.step([full_m, full_p], step_rows)
            lv = live
            acc_sum[lv] += hit.detach().cpu().numpy()[lv]
            l1_sum[lv] += l1.detach().cpu().numpy()[lv]
            loss_sum[lv] += loss.detach().cpu().numpy()[lv]
        n = np.asarray(n_mb, dtype=float)
        acc, l1v, lossv = acc_sum / n, l1_sum / n, loss_sum / n
        return self._after_step(rows, acc, l1v, lossv)

    def _after_step(self, rows: np.ndarray, acc: np.ndarray, l1: np.ndarray,
                    loss: np.ndarray) -> StepResult:
        with torch.no_grad():
            masks, patterns = self.masks(), self.patterns()
            if self.select_final:  # the mask as it stands now (TrojanZoo), not the step mean
                l1 = masks[torch.as_tensor(rows, device=masks.device)].flatten(1).sum(1)
                l1 = l1.cpu().numpy().astype(float)
            improved = (acc >= self.schedule.threshold) & (l1 < self.best_l1[rows])
            for j, r in enumerate(rows):
                if improved[j]:
                    self.best_l1[r] = l1[j]
                    self.best_mask[r] = masks[r]
                    self.best_pattern[r] = patterns[r]
                elif not np.isfinite(self.best_l1[r]):  # none valid yet: keep the last (NC ref)
                    self.best_mask[r] = masks[r]
                    self.best_pattern[r] = patterns[r]
        self.steps[rows] += 1
        self.improvements[rows] += improved
        self.last_l1[rows], self.last_acc[rows] = l1, acc
        self.max_acc[rows] = np.maximum(self.max_acc[rows], acc)
        first = np.isnan(self.loss_first[rows])
        self.loss_first[rows[first]] = loss[first]
        # NC early stop: counted once a valid mask exists; stop when the cost went both ways.
        if self.early_stop_patience is not None:
            for r in rows:
                if np.isfinite(self.best_l1[r]):
                    if self.best_l1[r] >= self.early_stop_threshold * self.early_best[r]:
                        self.early_counter[r] += 1
                    else:
                        self.early_counter[r] = 0
                self.early_best[r] = min(self.best_l1[r], self.early_best[r])
                if (self.state.up_flag[r] and self.state.down_flag[r]
                        and self.early_counter[r] >= self.early_stop_patience):
                    self.stopped[r] = True
        # NC ref (visualizer.py): the early stop breaks out before that step's cost change
        going = ~self.stopped[rows]
        self.state.update(self.schedule, acc[going], rows[going])
        return StepResult(rows, acc, l1, loss, improved)

    def run(self, max_steps: int, expired: Callable[[], bool] | None = None) -> bool:
        """Step every live row until it stopped early or took `max_steps` steps, or until
        `expired()` (the model's deadline, ScanContext.expired) says time is up. Returns True
        when it stopped for the deadline with rows still live."""
        while True:
            live = np.flatnonzero(~self.stopped & (self.steps < max_steps))
            if len(live) == 0:
                return False
            if expired is not None and expired():
                return True
            self.step(live)

    @property
    def total_steps(self) -> int:
        """Optimisation steps taken, summed over rows (the proof-of-work figure)."""
        return int(self.steps.sum())

    def row_stats(self, r: int) -> dict[str, Any]:
        return {"steps": int(self.steps[r]), "l1_best": float(self.best_l1[r]),
                "l1_last": float(self.last_l1[r]), "acc_last": float(self.last_acc[r]),
                "acc_max": float(self.max_acc[r]), "cost_final": float(self.state.cost[r]),
                "improvements": int(self.improvements[r]), "early_stopped": bool(self.stopped[r]),
                "loss_first": float(self.loss_first[r]), "cost_up": bool(self.state.up_flag[r]),
                "cost_down": bool(self.state.down_flag[r])}


def init_theta(values: torch.Tensor, eps: float = TANH_EPS) -> torch.Tensor:
    """theta with tanh01(theta) == values (for U(0, 1) initial masks / patterns)."""
    return atanh01(values, eps)


def candidate_from_row(opt: PatchOptimizer, r: int, victim: int | None, *,
                       binarize: float | None = 0.1, stats: dict[str, Any] | None = None
                       ) -> TriggerCandidate:
    """A TriggerCandidate from row r's best mask / pattern (size = pixels > 0.01)."""
    mask = opt.best_mask[r].detach().cpu().clone()
    pattern = opt.best_pattern[r].detach().cpu().clone()
    row_stats = opt.row_stats(r)
    row_stats.update(stats or {})
    return TriggerCandidate(victim=victim, target=int(opt.targets[r]), kind="patch", mask=mask,
                            pattern=pattern, size=mask_size(mask), stats=row_stats,
                            binarize=binarize)


def replace_stats(candidate: TriggerCandidate, **stats: Any) -> TriggerCandidate:
    return dataclasses.replace(candidate, stats={**candidate.stats, **stats})
