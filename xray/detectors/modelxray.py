"""Model X-ray: detect an all-to-one backdoor from the decision boundary on planes of clean data.

Paper: Su et al., "Model X-ray: Detecting Backdoored Models via Decision Boundary", ACM MM 2024,
https://arxiv.org/abs/2402.17465 (and its supplement). Reference code: SuYanghao/Model_X-ray,
`modelxray.py` (first public version: N 20, R 100, seed 333) and
`BackdoorBench-v2-merge/analysis/modelxray.py` (current: R 200, one demo plot, seed 42); plane
code from somepago/dbViz. Spec: docs/algorithms/modelxray.md.

Algorithm (per model):
  1. N planes. Each: a triplet of clean examples with three different ground-truth labels
     (uniform random index, rejected while its label is already in the triplet); in the model's
     normalised input space z = data.normalize(x): origin x1, a = (x2-x1)/|x2-x1|,
     u = Gram-Schmidt of (x3-x1) against a; in-plane coordinates (0,0), (|x2-x1|,0), (a.b, u.b).
  2. Grid: c1 = linspace(min_x - eta*Lx, max_x + eta*Lx, R), c2 likewise; point (i, j) =
     x1 + c1[i]*a + c2[j]*u (meshgrid 'ij'), not clipped; P[i, j] = argmax of the logits.
  3. Per plane: RE = 1/(1-alpha) log2 sum_c p_c^alpha (alpha 10); ATS = sum_k A_k [A_k < T]
     where A_k = area share of the 8-connected {P == y_k} component holding sample k's nearest
     grid cell (0 if that cell predicts another label), T = 0.5.
  4. Model: re = mean RE, ats = mean ATS over planes; lower = more suspicious (paper), so the
     DetectorResult score is -re (or -ats with score_stat="ats"). Target = the label predicted on
     most grid points over all planes; dominated_planes = planes where it is the top label.

Shapes: data.x (n, C, H, W) pixel space; a plane's grid is R x R (R^2 model inputs); all
N * R^2 points go through the model in batches of `batch_size`, each batch built on ctx.device
by one matmul per plane it spans, (n, 2) coefficients @ (2, D) basis: no per-point Python.
stats["forwards"] = model input points evaluated (N * R^2 with the full grid).

Adaptive grid (Params.grid = "adaptive", opt-in; xray's own (inferred), not in the authors'
code; the full grid is the default and the reference). A label map is piecewise constant, so
labels are needed only near its boundaries. Per plane, coarse to fine: evaluate the lattice of
step s (the largest power of two <= (R-1)/4; indices 0, s, 2s, ..., always R-1) and the three
samples' nearest cells (Plane.cells, so ATS starts from a true label). Then at each step, a cell
(the closed square between four neighbouring lattice points) whose four corners and any sample
cell in it carry one label is filled with it, without forwards; the other cells get the lattice
of step s/2 inside them (edges included) evaluated and are examined again at that step, down to
step 1. A finer fill overrides a coarser one on a shared edge; an evaluated label is never
overridden. Each step's points, over all planes, go through the model in batches as the full
grid's do (`point_batches`), under inference mode. Blind spot: a region smaller than the coarse
step that lies wholly inside a cell whose corners agree (and holds no sample) is missed, and so
is a boundary that leaves a cell through the edge it entered by between two corners; RE and ATS
then differ from the full grid's. stats: forwards (points evaluated) and grid "adaptive".
`score_stack` scores models one by one with `score` when grid is "adaptive" (no vmapped path).

Deviations from the reference code, each on purpose:
  - The model takes pixel space (normalisation folded in), so the plane is built in the
    normalised space (data.normalize) and its points are mapped back to pixels before the
    forward (no clipping); the reference feeds normalised points to a model without the
    normalisation layer. Same function of the plane. The map back is data.mean / data.std folded
    into the basis (see Batching), the same affine map as data.denormalize.
  - Triplets are drawn from the clean examples the scan has (not BackdoorBench's clean test
    split), with a seeded torch generator from ctx (salt "modelxray/triplets") instead of
    Python's `random` seeded 333/42; indices and labels are recorded in stats.
  - A collinear triplet (|x2 - x1| = 0, or the Gram-Schmidt residual below 1e-6 of |x3 - x1|)
    is redrawn (the reference does not guard; it would divide by zero).
  - Argmax of the logits, not of their softmax (identical except for float ties).
  - Nearest grid cell: vectorised argmin of the squared distance (first flat index wins ties,
    like the reference's strict `<` loop); the reference loops over R^2 points in Python.
  - The reference stops at the per-plane RE / ATS lists; the means, the target label and the
    dominated-plane count are our (inferred) model-level read-out, per the spec.
  - Batching: all planes together in large batches instead of one DataLoader per plane with
    batch 128; a batch is one matmul per plane it spans, with the (affine) denormalisation
    folded into the basis: x1*std + mean + c1*(a*std) + c2*(u*std) instead of
    denormalize(x1 + c1*a + c2*u); equal up to float rounding (ulps). On CPU the batch is laid
    out channels_last (oneDNN's fast convolution path, ~2x on the MNTD CNNs); logits then differ
    from a contiguous batch in the last bits only.
  - batch_size None = 4096 on an accelerator, 128 on CPU (a big batch's activations fall out of
    cache there, measured ~2x slower per point). Results do not depend on it beyond float
    rounding of the forward.
  - The model is put in eval mode for the scan and each submodule's mode is restored after.
  - ctx.deadline is not used: a partial set of planes would be another statistic.

Published thresholds (paper; eta 5, R 100, alpha 10, T 0.5; a model is flagged when its RE / ATS
is BELOW the threshold, i.e. when score = -re is above -threshold): PUBLISHED_RE_THRESHOLDS,
PUBLISHED_ATS_THRESHOLDS. They depend on class count and settings; calibrate on known-clean
models where possible.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from skimage.measure import label as connected_components
from torch.func import functional_call, stack_module_state, vmap

from xray.detectors._registry import register
from xray.detectors.base import (HASHED_ONLY_IF_SET, DetectorResult, ScanContext, ScanData,
                                 eval_mode)

# Paper thresholds (Su et al. 2024; eta 5, R 100, alpha 10, T 0.5). Lower RE / ATS = suspicious.
PUBLISHED_RE_THRESHOLDS = {"cifar10": 0.873, "gtsrb": 2.040, "cifar100": 1.194}
PUBLISHED_ATS_THRESHOLDS = {"cifar10": 0.184, "gtsrb": 0.134, "cifar100": 0.040}

_COLLINEAR_RTOL = 1e-6
_MAX_REDRAWS = 100


# ---------------------------------------------------------------------------------------------
# Per-plane statistics: pure numpy, pinned by tests.


def renyi_entropy(pred_grid: np.ndarray, num_classes: int, alpha: float) -> float:
    """Renyi entropy (log base 2) of the label shares of a prediction grid.

    pred_grid: integer array (any shape) of predicted labels; p_c = count_c / size. alpha = 1 is
    the Shannon limit, alpha = inf the min-entropy. 0 when one label covers the grid; log2(k)
    for k equal shares, for every alpha.
    """
    labels = np.asarray(pred_grid).ravel()
    if labels.size == 0:
        raise ValueError("renyi_entropy of an empty prediction grid is undefined")
    counts = np.bincount(labels.astype(np.int64), minlength=int(num_classes))
    p = counts[counts > 0] / labels.size
    if alpha == 1:
        return float(-(p * np.log2(p)).sum()) + 0.0
    if math.isinf(alpha):
        return float(-np.log2(p.max())) + 0.0
    return float(np.log2(np.sum(p ** alpha)) / (1.0 - alpha)) + 0.0  # + 0.0: no -0.0


def sample_areas(pred_grid: np.ndarray, sample_cells: np.ndarray,
                 sample_labels: Sequence[int]) -> np.ndarray:
    """A_k per sample: the share of the grid taken by the 8-connected component of
    {pred_grid == y_k} containing sample k's cell (row, col); 0 if that cell predicts another
    label."""
    grid = np.asarray(pred_grid)
    areas = np.zeros(len(sample_labels), dtype=np.float64)
    for k, (cell, y) in enumerate(zip(np.asarray(sample_cells, dtype=np.int64), sample_labels)):
        row, col = int(cell[0]), int(cell[1])
        if grid[row, col] != y:
            continue
        components = connected_components(grid == y, background=0, connectivity=2)
        areas[k] = np.count_nonzero(components == components[row, col]) / grid.size
    return areas


def areas_of_triple_samples(pred_grid: np.ndarray, sample_cells: np.ndarray,
                            sample_labels: Sequence[int], threshold: float) -> float:
    """ATS = sum_k A_k * [A_k < threshold] (see sample_areas); in [0, 3 * threshold)."""
    areas = sample_areas(pred_grid, sample_cells, sample_labels)
    return float(areas[areas < threshold].sum())


# ---------------------------------------------------------------------------------------------
# Planes.


@dataclass(frozen=True)
class Plane:
    """One plane in the model's normalised input space. origin, a, u: flattened float32 (D,);
    coords: (3, 2) in-plane coordinates of the samples; c1, c2: (R,) grid axes; cells: (3, 2)
    (row, col) of the grid cell nearest each sample."""

    origin: torch.Tensor
    a: torch.Tensor
    u: torch.Tensor
    coords: np.ndarray
    c1: torch.Tensor
    c2: torch.Tensor
    cells: np.ndarray
    labels: tuple[int, int, int]
    indices: tuple[int, int, int]


def draw_triplet(y: torch.Tensor, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Indices and labels of three examples with three different labels: uniform random index,
    rejected while its label is already taken (reference get_random_images)."""
    if len(torch.unique(y)) < 3:
        raise ValueError(f"Model X-ray needs clean examples of at least 3 labels; got labels "
                         f"{sorted(set(y.tolist()))}")
    indices: list[int] = []
    labels: list[int] = []
    while len(indices) < 3:
        idx = int(torch.randint(len(y), (1,), generator=generator).item())
        label = int(y[idx])
        if label not in labels:
            indices.append(idx)
            labels.append(label)
    return indices, labels


def nearest_cell(c1: np.ndarray, c2: np.ndarray, point: Sequence[float]) -> tuple[int, int]:
    """(i, j) of the grid point (c1[i], c2[j]) nearest `point`; first flat index i*R+j wins ties."""
    d2 = (np.asarray(c1, np.float64)[:, None] - float(point[0])) ** 2 \
        + (np.asarray(c2, np.float64)[None, :] - float(point[1])) ** 2
    flat = int(np.argmin(d2))
    return flat // d2.shape[1], flat % d2.shape[1]


def make_plane(z1: torch.Tensor, z2: torch.Tensor, z3: torch.Tensor, resolution: int,
               eta: float) -> Plane | None:
    """The plane through three (normalised) images, or None when they are collinear.
    float32 Gram-Schmidt as the reference's get_plane / plane_dataset."""
    x1, v2, v3 = (t.reshape(-1).to(torch.float32) for t in (z1, z2, z3))
    a = v2 - x1
    b = v3 - x1
    a_norm = torch.dot(a, a).sqrt()
    if not torch.isfinite(a_norm) or a_norm <= 0:
        return None
    a = a / a_norm
    first = torch.dot(a, b)
    u = b - first * a
    u_norm = torch.dot(u, u).sqrt()
    b_norm = torch.dot(b, b).sqrt()
    if not torch.isfinite(u_norm) or u_norm <= _COLLINEAR_RTOL * b_norm:
        return None
    u = u / u_norm
    second = torch.dot(b, u)
    xs = torch.stack([torch.zeros(()), a_norm, first])
    ys = torch.stack([torch.zeros(()), torch.zeros(()), second])
    len1 = xs.max() - xs.min()
    len2 = ys.max() - ys.min()
    c1 = torch.linspace(float(xs.min() - eta * len1), float(xs.max() + eta * len1), int(resolution))
    c2 = torch.linspace(float(ys.min() - eta * len2), float(ys.max() + eta * len2), int(resolution))
    coords = torch.stack([xs, ys], dim=1).numpy().astype(np.float64)
    cells = np.array([nearest_cell(c1.numpy(), c2.numpy(), p) for p in coords], dtype=np.int64)
    return Plane(origin=x1, a=a, u=u, coords=coords, c1=c1, c2=c2, cells=cells,
                 labels=(0, 0, 0), indices=(0, 0, 0))


def draw_planes(data: ScanData, num_planes: int, resolution: int, eta: float,
                generator: torch.Generator) -> list[Plane]:
    """N planes, each from an independently drawn triplet; a collinear triplet is redrawn."""
    x = data.x.detach().to("cpu", torch.float32)
    y = data.y.detach().to("cpu")
    planes: list[Plane] = []
    for _ in range(int(num_planes)):
        for _attempt in range(_MAX_REDRAWS):
            indices, labels = draw_triplet(y, generator)
            z = data.normalize(x[indices])
            plane = make_plane(z[0], z[1], z[2], resolution, eta)
            if plane is not None:
                break
        else:
            raise ValueError(f"Model X-ray: {_MAX_REDRAWS} triplets in a row were collinear "
                             "(duplicate or degenerate examples?)")
        planes.append(dataclasses.replace(plane, labels=tuple(labels), indices=tuple(indices)))
    return planes


def _default_batch_size(device: torch.device) -> int:
    return 128 if torch.device(device).type == "cpu" else 4096


def _channel_stats(data: ScanData, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation's mean and std as float32 (C,) tensors (one value = every channel)."""
    mean = torch.tensor(data.mean, dtype=torch.float32)
    std = torch.tensor(data.std, dtype=torch.float32)
    return mean.expand(channels).clone(), std.expand(channels).clone()


@torch.inference_mode()
def predict_planes(model: torch.nn.Module, data: ScanData, planes: Sequence[Plane],
                   batch_size: int | None, device: torch.device | str) -> np.ndarray:
    """P for every plane: int64 (N, R, R) (see `point_batches` for how points are built)."""
    if not planes:
        return np.zeros((0, 0, 0), dtype=np.int64)
    r = len(planes[0].c1)
    preds = torch.empty(len(planes) * r * r, dtype=torch.int64)
    for start, stop, batch in plane_batches(data, planes, batch_size, device):
        preds[start:stop] = model(batch).argmax(dim=1).cpu()
    return preds.view(len(planes), r, r).numpy()


@torch.inference_mode()
def predict_planes_stacked(models: Sequence[torch.nn.Module], datas: Sequence[ScanData],
                           planes: Sequence[Sequence[Plane]], batch_size: int | None,
                           device: torch.device | str) -> list[np.ndarray]:
    """`predict_planes` for K models of one architecture at once: their weights stacked
    (torch.func.stack_module_state) and one vmapped forward per batch over K models' points.
    Each model keeps its own planes; every model must have the same N and R."""
    params, buffers = stack_module_state(list(models))
    skeleton = copy.deepcopy(models[0]).to("meta")

    def forward(p, b, x):
        return functional_call(skeleton, (p, b), (x,))

    stacked = vmap(forward)
    r = len(planes[0][0].c1)
    total = len(planes[0]) * r * r
    preds = torch.empty(len(models), total, dtype=torch.int64)
    streams = [plane_batches(d, pl, batch_size, device) for d, pl in zip(datas, planes)]
    for chunks in zip(*streams):
        start, stop = chunks[0][0], chunks[0][1]
        batch = torch.stack([c[2] for c in chunks])
        preds[:, start:stop] = stacked(params, buffers, batch).argmax(dim=-1).cpu()
    return [p.view(len(planes[0]), r, r).numpy() for p in preds]


def full_grid_points(num_planes: int, resolution: int) -> torch.Tensor:
    """int64 (N * R^2, 3): every (p, i, j) of N R x R grids, plane-major, i before j (meshgrid
    'ij'), the order of the flat index of an (N, R, R) array."""
    p, i, j = torch.meshgrid(torch.arange(num_planes), torch.arange(resolution),
                             torch.arange(resolution), indexing="ij")
    return torch.stack([p.reshape(-1), i.reshape(-1), j.reshape(-1)], dim=1)


def plane_batches(data: ScanData, planes: Sequence[Plane], batch_size: int | None,
                  device: torch.device | str):
    """Every grid point of every plane (`point_batches` over `full_grid_points`): all N * R^2
    points in batches. Yields (start, stop, batch) over the flat point index of all planes."""
    yield from point_batches(data, planes, full_grid_points(len(planes), len(planes[0].c1)),
                             batch_size, device)


def point_batches(data: ScanData, planes: Sequence[Plane], points: torch.Tensor,
                  batch_size: int | None, device: torch.device | str):
    """The given grid points, in batches: `points` int64 (M, 3) rows (p, i, j), point =
    denormalize(x1 + c1[i] a + c2[j] u) of plane p. The M points go through in batches of
    batch_size (None: see the module docstring); each batch is one matmul per run of
    consecutive rows of one plane (sort `points` by plane to keep the runs long) on `device`:
    [c1[i], c2[j]] @ [a * std; u * std] + (x1 * std + mean), i.e. the affine denormalisation
    folded into the plane basis (equal to denormalising the normalised point up to float
    rounding). On CPU the basis is stored channel-last, so the batch comes out channels_last.
    Yields (start, stop, batch) over the row index of `points`."""
    device = torch.device(device)
    batch_size = int(batch_size or _default_batch_size(device))
    shape = tuple(int(s) for s in data.x.shape[1:])
    channels_last = device.type == "cpu" and len(shape) == 3
    if len(shape) == 3:
        mean, std = _channel_stats(data, shape[0])
        mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
    else:  # not an image: denormalize is elementwise with one mean / std
        mean, std = _channel_stats(data, 1)

    def pixel_layout(t: torch.Tensor) -> torch.Tensor:  # (N, D) in the batch's memory order
        t = t.view(len(planes), *shape)
        return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(len(planes), -1)

    origins = torch.stack([p.origin for p in planes])
    origin = pixel_layout(origins.view(len(planes), *shape) * std + mean).to(device)
    basis = torch.stack([pixel_layout(torch.stack([p.a for p in planes]).view(-1, *shape) * std),
                         pixel_layout(torch.stack([p.u for p in planes]).view(-1, *shape) * std)],
                        dim=1).to(device)                                  # (N, 2, D)
    points = torch.as_tensor(points, dtype=torch.int64).reshape(-1, 3)
    c1 = torch.stack([p.c1 for p in planes])
    c2 = torch.stack([p.c2 for p in planes])
    coefs = torch.stack([c1[points[:, 0], points[:, 1]], c2[points[:, 0], points[:, 2]]],
                        dim=-1).to(device)                                 # (M, 2)
    plane_of = points[:, 0]
    total = len(points)
    # runs of consecutive rows on one plane: [run_starts[k], run_starts[k + 1])
    change = (torch.nonzero(plane_of[1:] != plane_of[:-1]).reshape(-1) + 1).tolist()
    run_starts = [0, *change, total]
    dim = origin.shape[1]
    run = 0
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        batch = torch.empty(stop - start, dim, device=device)
        while run_starts[run + 1] <= start:
            run += 1
        k = run
        while k + 1 < len(run_starts) and run_starts[k] < stop:
            lo, hi = max(start, run_starts[k]), min(stop, run_starts[k + 1])
            p = int(plane_of[lo])
            torch.addmm(origin[p], coefs[lo:hi], basis[p], out=batch[lo - start:hi - start])
            k += 1
        if channels_last:
            h, w, c = shape[1], shape[2], shape[0]
            batch = batch.view(-1, h, w, c).permute(0, 3, 1, 2)
        else:
            batch = batch.view(-1, *shape)
        yield start, stop, batch


# ---------------------------------------------------------------------------------------------
# Adaptive grid (opt-in, grid="adaptive"): xray's own, see the module docstring.


def coarse_step(resolution: int) -> int:
    """The adaptive grid's first lattice step: the largest power of two s <= (R - 1) / 4
    (1 when R < 9: the lattice is then the full grid)."""
    step = 1
    while step * 2 <= (int(resolution) - 1) / 4:
        step *= 2
    return step


def lattice(resolution: int, step: int) -> np.ndarray:
    """Indices 0, step, 2 step, ... below R, and R - 1 (the lattice of one level)."""
    idx = np.arange(0, int(resolution), int(step))
    return idx if idx[-1] == resolution - 1 else np.append(idx, resolution - 1)


def _label_points(model: torch.nn.Module, data: ScanData, planes: Sequence[Plane],
                  points: np.ndarray, batch_size: int | None,
                  device: torch.device | str) -> np.ndarray:
    """argmax labels (int64 (M,)) of the given (p, i, j) rows (sorted by plane by the caller)."""
    out = torch.empty(len(points), dtype=torch.int64)
    for start, stop, batch in point_batches(data, planes, torch.from_numpy(points), batch_size,
                                            device):
        out[start:stop] = model(batch).argmax(dim=1).cpu()
    return out.numpy()


@torch.inference_mode()
def predict_planes_adaptive(model: torch.nn.Module, data: ScanData, planes: Sequence[Plane],
                            batch_size: int | None,
                            device: torch.device | str) -> tuple[np.ndarray, int]:
    """(P int64 (N, R, R), forwards): the adaptive grid, coarse to fine.

    Level 0 evaluates the lattice of step s = coarse_step(R) (indices 0, s, 2s, ..., R-1 on both
    axes) and each sample's nearest cell (Plane.cells). At each level with step s, a cell (the
    closed square between four neighbouring lattice points) inside the region still being
    refined is uniform when its four corners and any sample cell inside it carry one label: its
    points not evaluated are filled with that label (a finer level's fill overrides a coarser
    one, an evaluated label is never overridden). A cell that is not uniform has the points of
    the lattice of step s / 2 inside it (edges included) evaluated, and its sub-cells form the
    next level's region. Stops after step 2 (the step-1 cells have no inner points). All points
    of one level, over all planes, go through the model together (`point_batches`)."""
    n = len(planes)
    if n == 0:
        return np.zeros((0, 0, 0), dtype=np.int64), 0
    r = len(planes[0].c1)
    labels = np.full((n, r, r), -1, dtype=np.int64)
    known = np.zeros((n, r, r), dtype=bool)
    step = coarse_step(r)
    idx = lattice(r, step)
    todo = np.zeros((n, r, r), dtype=bool)
    todo[:, idx[:, None], idx[None, :]] = True
    for p, plane in enumerate(planes):
        todo[p, plane.cells[:, 0], plane.cells[:, 1]] = True
    forwards = 0
    active = np.ones((n, len(idx) - 1, len(idx) - 1), dtype=bool)  # cells to examine
    while True:
        pts = np.argwhere(todo & ~known)          # sorted by plane, then i, then j
        if len(pts):
            labels[pts[:, 0], pts[:, 1], pts[:, 2]] = _label_points(model, data, planes, pts,
                                                                     batch_size, device)
            known[pts[:, 0], pts[:, 1], pts[:, 2]] = True
            forwards += len(pts)
        if step == 1:
            break
        # cell (a, b) spans rows idx[a]..idx[a+1], cols idx[b]..idx[b+1]
        corners = labels[:, idx[:, None], idx[None, :]]          # (N, K+1, K+1)
        top_left = corners[:, :-1, :-1]
        uniform = ((top_left == corners[:, 1:, :-1]) & (top_left == corners[:, :-1, 1:])
                   & (top_left == corners[:, 1:, 1:]))
        for p, plane in enumerate(planes):  # a sample cell of another label breaks uniformity
            for i, j in plane.cells:
                rows = _cells_holding(idx, int(i))
                cols = _cells_holding(idx, int(j))
                for a in rows:
                    for b in cols:
                        if labels[p, i, j] != top_left[p, a, b]:
                            uniform[p, a, b] = False
        fill = np.where(active & uniform, top_left, -1)           # (N, K, K)
        _fill_cells(labels, known, fill, idx)
        refine = active & ~uniform
        finer = lattice(r, step // 2)
        # the finer lattice's points inside refined cells (closed squares)
        on_fine = np.zeros(r, dtype=bool)
        on_fine[finer] = True
        row_cell_lo, row_cell_hi = _cell_maps(idx, r)
        todo = np.zeros((n, r, r), dtype=bool)
        for lo_i in (row_cell_lo, row_cell_hi):
            for lo_j in (row_cell_lo, row_cell_hi):
                todo |= refine[:, lo_i[:, None], lo_j[None, :]]
        todo &= on_fine[None, :, None] & on_fine[None, None, :]
        # the next level's region: sub-cells of refined cells
        sub_lo = np.searchsorted(idx, finer[:-1], side="right") - 1   # coarse cell per sub-cell
        active = refine[:, sub_lo[:, None], sub_lo[None, :]]
        step //= 2
        idx = finer
    if (labels < 0).any():  # cannot happen (every point is evaluated or in a uniform cell)
        raise RuntimeError("Model X-ray adaptive grid left points unlabelled")
    return labels, forwards


def _cells_holding(idx: np.ndarray, i: int) -> list[int]:
    """Cells (along one axis) of the lattice `idx` whose closed span holds index i."""
    a = int(np.searchsorted(idx, i, side="right")) - 1
    cells = [c for c in (a - 1, a) if 0 <= c < len(idx) - 1 and idx[c] <= i <= idx[c + 1]]
    return cells


def _cell_maps(idx: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """For each index 0..R-1: the lattice cell holding it, ties on a lattice line going to the
    lower cell (first) and to the upper cell (second); (R,) int arrays."""
    grid = np.arange(r)
    hi = np.clip(np.searchsorted(idx, grid, side="right") - 1, 0, len(idx) - 2)
    lo = np.clip(np.searchsorted(idx, grid, side="left") - 1, 0, len(idx) - 2)
    return lo, hi


def _fill_cells(labels: np.ndarray, known: np.ndarray, fill: np.ndarray,
                idx: np.ndarray) -> None:
    """labels[p, i, j] = fill[p, cell(i), cell(j)] where not evaluated and the fill is >= 0, for
    every cell whose closed square holds (i, j) (a point on a lattice line lies in two or four)."""
    lo, hi = _cell_maps(idx, labels.shape[1])
    for ci in (lo, hi):
        for cj in (lo, hi):
            values = fill[:, ci[:, None], cj[None, :]]
            mask = (values >= 0) & ~known
            labels[mask] = values[mask]


# ---------------------------------------------------------------------------------------------
# Read-out.


def summarise(pred_grids: np.ndarray, planes: Sequence[Plane], num_classes: int,
              params: "ModelXray.Params", seed: int,
              forwards: int | None = None) -> DetectorResult:
    """Per-plane RE / ATS, model-level means, target label and artifacts from the grids.
    forwards: model input points evaluated (None: every grid point, N * R^2); with
    params.grid == "adaptive" stats also say grid "adaptive"."""
    pred_grids = np.asarray(pred_grids)
    re_per_plane = [renyi_entropy(g, num_classes, params.alpha) for g in pred_grids]
    ats_per_plane = [areas_of_triple_samples(g, p.cells, p.labels, params.ats_threshold)
                     for g, p in zip(pred_grids, planes)]
    width = max(int(num_classes), int(pred_grids.max()) + 1 if pred_grids.size else 0)
    counts = np.stack([np.bincount(g.ravel(), minlength=width) for g in pred_grids])
    total = counts.sum(axis=0)
    target = int(np.argmax(total))
    top = counts.argmax(axis=1)
    re = float(np.mean(re_per_plane))
    ats = float(np.mean(ats_per_plane))
    score = -re if params.score_stat == "re" else -ats
    stats: dict[str, Any] = {
        "re": re, "ats": ats, "re_per_plane": re_per_plane, "ats_per_plane": ats_per_plane,
        "target_label": target, "target_share": float(total[target] / total.sum()),
        "dominated_planes": int(np.sum(top == target)), "seed": int(seed),
        "num_planes": len(planes), "resolution": int(pred_grids.shape[-1]),
        "triplet_indices": [list(p.indices) for p in planes],
        "triplet_labels": [list(p.labels) for p in planes],
        "forwards": int(pred_grids.size if forwards is None else forwards),
        "published_thresholds": {"re": dict(PUBLISHED_RE_THRESHOLDS),
                                 "ats": dict(PUBLISHED_ATS_THRESHOLDS)},
    }
    if params.grid == "adaptive":
        stats["grid"] = "adaptive"
    artifacts = {"planes": [
        {"pred": g.astype(np.int32), "c1": p.c1.numpy().copy(), "c2": p.c2.numpy().copy(),
         "sample_coords": p.coords.copy(), "sample_cells": p.cells.copy(),
         "sample_labels": list(p.labels), "sample_indices": list(p.indices),
         "dominating_label": int(top[n]), "dominating_share": float(counts[n].max() / g.size),
         "re": re_per_plane[n], "ats": ats_per_plane[n]}
        for n, (g, p) in enumerate(zip(pred_grids, planes))]}
    return DetectorResult(score=float(score), target=target, stats=stats, artifacts=artifacts)


@register("modelxray")
class ModelXray:
    """Model X-ray (Su et al., ACM MM 2024). score = -mean RE (or -mean ATS); higher = more
    suspicious."""

    name = "modelxray"
    version = "1"

    @dataclass(frozen=True)
    class Params:
        num_planes: int = 20          # N (first public version; current code: 1 demo plot)
        resolution: int = 100         # R (first public version; current code: 200)
        eta: float = 5.0              # expansion (range_l = range_r = 5)
        alpha: float = 10.0           # Renyi order
        ats_threshold: float = 0.5    # T
        score_stat: str = "re"        # "re" -> score -re; "ats" -> score -ats
        batch_size: int | None = None  # None: 4096 on an accelerator, 128 on CPU
        # "full" (reference) | "adaptive" (xray's, opt-in); added after results were stored:
        # hashed only when not "full", so earlier Model X-ray rows stay reused
        grid: str = dataclasses.field(default="full", metadata={HASHED_ONLY_IF_SET: True})

    presets = {
        "small": {"num_planes": 4, "resolution": 32},
        "reference": {},  # = the published defaults above
        # Current reference code: R 200. Its num_plot default of 1 is a demo picture, not a
        # detection setting, so N stays 20.
        "current": {"resolution": 200},
    }

    def __init__(self, params: "ModelXray.Params | None" = None) -> None:
        self.params = params if params is not None else self.Params()
        if self.params.score_stat not in ("re", "ats"):
            raise ValueError(f"modelxray: score_stat must be 're' or 'ats', "
                             f"got {self.params.score_stat!r}")
        if self.params.num_planes < 1 or self.params.resolution < 2:
            raise ValueError("modelxray: num_planes >= 1 and resolution >= 2 required")
        if self.params.grid not in ("full", "adaptive"):
            raise ValueError(f"modelxray: grid must be 'full' or 'adaptive', "
                             f"got {self.params.grid!r}")

    def score(self, model: torch.nn.Module, data: ScanData, ctx: ScanContext) -> DetectorResult:
        p = self.params
        planes = draw_planes(data, p.num_planes, p.resolution, p.eta,
                             ctx.generator("modelxray/triplets"))
        with eval_mode(model):
            if p.grid == "adaptive":
                grids, forwards = predict_planes_adaptive(model, data, planes, p.batch_size,
                                                          ctx.device)
            else:
                grids, forwards = predict_planes(model, data, planes, p.batch_size,
                                                 ctx.device), None
        return summarise(grids, planes, data.num_classes, p, ctx.seed, forwards)

    def score_stack(self, models: Sequence[torch.nn.Module], datas: Sequence[ScanData],
                    ctx: ScanContext) -> list[DetectorResult]:
        """Score K models of one architecture in one vmapped pass; each result equals `score`
        on that model alone (same seed, same planes). With grid "adaptive" the models are
        scored one by one with `score` (each model refines where its own boundaries are, so
        there is no common batch to vmap)."""
        p = self.params
        if p.grid == "adaptive":
            return [self.score(m, d, ctx) for m, d in zip(models, datas)]
        planes = [draw_planes(d, p.num_planes, p.resolution, p.eta,
                              ctx.generator("modelxray/triplets")) for d in datas]
        with eval_mode(*models):
            grids = predict_planes_stacked(models, datas, planes, p.batch_size, ctx.device)
        return [summarise(g, pl, d.num_classes, p, ctx.seed)
                for g, pl, d in zip(grids, planes, datas)]
