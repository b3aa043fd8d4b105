"""Benchmark: batched Model X-ray against the reference code's way of running it.

    .venv/bin/python bench/modelxray.py [--threads 1] [--device cpu|cuda]
    # writes bench/results/modelxray.json

Models: three mntd_cifar_cnn (3x32x32, 10 classes), each trained for 80 Adam steps on a
synthetic 10-class image set (low-frequency class patterns + noise), the third with a BadNets-
style 4x4 white patch relabelled to class 0 on 10% of its batches; CIFAR-10 normalisation folded
into the model, as the scanner sees it. (The models only need non-trivial decision regions.)

Per model, with the same params and the same seed (so the same triplets):
  batched   ModelXray.score: every batch of grid points built by one matmul per plane it spans
            (batch size: the detector's default for the device).
  naive     the reference's execution, written out here (docs/algorithms/modelxray.md, "Cost"):
            one plane at a time, a torch Dataset building each grid point in __getitem__, a
            DataLoader with batch 128, logits appended one by one, then torch.stack + softmax +
            argmax, label counts in a Counter, the nearest grid cell found by a Python loop and
            component areas from skimage regionprops. num_workers = 0 (the reference uses 2): on
            this 2-core machine a worker process only competes with the forward for the cores.
The two must give the same RE / ATS per plane (asserted), so this also cross-checks the
detector's statistics against an independent, reference-style computation.

Size: the reference setting (N 20, R 100) is 200,000 forwards per model, minutes per model for
the naive path here; both paths are timed at N 10, R 32 (10,240 points per model) instead, and
the N 20 / R 100 seconds are extrapolated from the measured rates (marked "estimated").

Threads: 1 by default (--threads). This box is shared (2 cores, other engineers' jobs, load
average ~4): with 2 torch threads every parallel op waits for a descheduled OpenMP thread
(~20 ms per op measured, whatever its size), which measures the neighbours, not the code. One
thread gives stable per-core figures; both paths and the matmul reference use the same count.
The 1-minute load average before and after is recorded.

Figures:
  speedup_vs_per_plane       naive seconds / batched seconds, summed over the models (best of
                             REPEATS interleaved runs each).
  grid_points_per_second     of the batched path, end to end (planes, forward, statistics).
  matmul_share               grid_points_per_second * FLOPs of one forward (torch
                             FlopCounterMode, 2 per multiply-add) / FLOP/s of torch.mm on
                             2048 x 2048 float32 here (best of 5, same thread count).
  speedup_excluding_forward  the same two paths with a free model (logits = 10 input pixels):
                             what each costs besides the forward. On this CPU the forward is
                             ~0.5-1 ms per point and bounds both paths; on an accelerator it is
                             ~1 us and this ratio is what the speedup approaches.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import sync  # noqa: E402
from xray.detectors.base import ScanContext, ScanData  # noqa: E402
from xray.detectors.modelxray import ModelXray, draw_triplet  # noqa: E402
from xray.models import create  # noqa: E402

NUM_PLANES, RESOLUTION = 10, 32
REPEATS = 2
SEED = 42
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
OUT = ROOT / "bench" / "results" / "modelxray.json"


# ------------------------------------------------------------------------------------ models


class Normalized(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def synthetic_images(n_per_class: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    patterns = F.interpolate(torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0)),
                             size=32, mode="bilinear", align_corners=False)
    y = torch.arange(10).repeat_interleave(n_per_class)
    x = (patterns[y] + 0.25 * torch.randn(len(y), 3, 32, 32, generator=g)).clamp(0, 1)
    return x, y


def train(seed: int, backdoor: bool, steps: int = 80) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Normalized(create("mntd_cifar_cnn", 10, (3, 32, 32)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x, y = synthetic_images(4, g)
        if backdoor:
            k = len(x) // 10
            x[:k, :, -4:, -4:] = 1.0
            y[:k] = 0
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ------------------------------------------------------------------- the reference's execution


class PlaneGrid(torch.utils.data.Dataset):
    """Every grid point of one plane, built one at a time in __getitem__ (dbViz plane_dataset)."""

    def __init__(self, base, vec1, vec2, coords, resolution, eta):
        self.base, self.vec1, self.vec2 = base, vec1, vec2
        xs = torch.stack([c[0] for c in coords])
        ys = torch.stack([c[1] for c in coords])
        len1, len2 = xs.max() - xs.min(), ys.max() - ys.min()
        list1 = torch.linspace(float(xs.min() - eta * len1), float(xs.max() + eta * len1),
                               resolution)
        list2 = torch.linspace(float(ys.min() - eta * len2), float(ys.max() + eta * len2),
                               resolution)
        grid = torch.meshgrid([list1, list2], indexing="ij")
        self.coefs1, self.coefs2 = grid[0].flatten(), grid[1].flatten()
        points = list(zip(self.coefs1.numpy(), self.coefs2.numpy()))
        self.index_coords = [nearest_python(points, c) for c in coords]

    def __len__(self):
        return self.coefs1.shape[0]

    def __getitem__(self, idx):
        return self.base + self.coefs1[idx] * self.vec1 + self.coefs2[idx] * self.vec2


def nearest_python(points, target):
    best, best_i = float("inf"), None
    for i, (x, y) in enumerate(points):
        d = math.sqrt((float(x) - float(target[0])) ** 2 + (float(y) - float(target[1])) ** 2)
        if d < best:
            best, best_i = d, i
    return best_i


def plane_basis(img1, img2, img3):
    a = img2 - img1
    b = img3 - img1
    a_norm = torch.dot(a.flatten(), a.flatten()).sqrt()
    a = a / a_norm
    first = torch.dot(a.flatten(), b.flatten())
    u = b - first * a
    u = u / torch.dot(u.flatten(), u.flatten()).sqrt()
    second = torch.dot(b.flatten(), u.flatten())
    zero = torch.zeros(())
    return a, u, [(zero, zero), (a_norm, zero), (first, second)]


def components_area(class_pred, index_coords, labels, resolution, threshold):
    from skimage import measure

    img = np.zeros((resolution, resolution), dtype=np.int64)
    img[np.arange(resolution).repeat(resolution), np.tile(np.arange(resolution), resolution)] = \
        class_pred
    total = 0.0
    for k in range(3):
        labelled = measure.label((img == labels[k]).astype(np.uint8), background=0, connectivity=2)
        component = labelled[index_coords[k] // resolution, index_coords[k] % resolution]
        area = 0
        for prop in measure.regionprops(labelled):
            if prop.label == component:
                area = prop.area
        ratio = area / float(resolution * resolution)
        total += 0.0 if ratio >= threshold else ratio
    return total


def renyi_counter(counts: Counter, alpha: float) -> float:
    n = sum(counts.values())
    return 1 / (1 - alpha) * np.log2(sum((c / n) ** alpha for c in counts.values()))


def naive_scan(model, data: ScanData, params: ModelXray.Params, ctx: ScanContext):
    """Per-plane RE / ATS and the prediction grids, the reference's way."""
    g = ctx.generator("modelxray/triplets")  # the detector's triplet stream: the same planes
    x = data.x.cpu()
    re_list, ats_list, grids = [], [], []
    for _ in range(params.num_planes):
        idx, labels = draw_triplet(data.y.cpu(), g)
        images = [data.normalize(x[i:i + 1])[0] for i in idx]
        a, u, coords = plane_basis(*images)
        planeset = PlaneGrid(images[0], a, u, coords, params.resolution, params.eta)
        loader = torch.utils.data.DataLoader(planeset, batch_size=128, shuffle=False,
                                             num_workers=0)
        preds = []
        with torch.no_grad():
            for inputs in loader:
                outputs = model(data.denormalize(inputs.to(ctx.device)))
                for output in outputs:
                    preds.append(output)
        class_pred = torch.softmax(torch.stack(preds), dim=1).argmax(1).cpu().numpy()
        grids.append(class_pred.reshape(params.resolution, params.resolution))
        ats_list.append(components_area(class_pred, planeset.index_coords, labels,
                                        params.resolution, params.ats_threshold))
        re_list.append(renyi_counter(Counter(class_pred.tolist()), params.alpha))
    return re_list, ats_list, np.stack(grids)


# ------------------------------------------------------------------------------ measurements


def matmul_flops(n: int = 2048, reps: int = 5,
                 device: torch.device | str = "cpu") -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def forward_flops(model: nn.Module) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, 32, 32, device=device))
    return int(counter.get_total_flops())


class FreeModel(nn.Module):
    """Logits = 10 pixels of the first row: a forward that costs nothing (no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :10]


def main(threads: int = 1, device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    started = time.perf_counter()
    models = [train(0, False).to(dev), train(1, False).to(dev), train(2, True).to(dev)]
    mm_before = matmul_flops(device=dev)
    x, y = synthetic_images(10, torch.Generator().manual_seed(123))
    data = ScanData(x=x, y=y, num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD)
    ctx = ScanContext(device=dev, seed=SEED)
    params = ModelXray.Params(num_planes=NUM_PLANES, resolution=RESOLUTION)
    detector = ModelXray(params)
    points = NUM_PLANES * RESOLUTION ** 2

    t_batched, t_naive, mismatches, per_model = [], [], 0, []
    for model in models:
        best_b = best_n = float("inf")
        for _ in range(REPEATS):  # interleaved, best of REPEATS: the machine is shared
            t = time.perf_counter()
            result = detector.score(model, data, ctx)
            best_b = min(best_b, time.perf_counter() - t)
            t = time.perf_counter()
            re_list, ats_list, grids = naive_scan(model, data, params, ctx)
            best_n = min(best_n, time.perf_counter() - t)
        batched_grids = np.stack([p["pred"] for p in result.artifacts["planes"]])
        mismatches += int((batched_grids != grids).sum())
        np.testing.assert_allclose(result.stats["re_per_plane"], re_list, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(result.stats["ats_per_plane"], ats_list, rtol=1e-9, atol=1e-12)
        assert math.isclose(result.score, -float(np.mean(re_list)), rel_tol=1e-12), \
            (result.score, np.mean(re_list))  # same up to the order of the sums
        t_batched.append(best_b)
        t_naive.append(best_n)
        per_model.append({"re": result.stats["re"], "ats": result.stats["ats"],
                          "target": result.target, "batched_s": best_b, "naive_s": best_n})

    free_b = free_n = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        free_result = detector.score(FreeModel(), data, ctx)
        free_b = min(free_b, time.perf_counter() - t)
        t = time.perf_counter()
        free_re, _, _ = naive_scan(FreeModel(), data, params, ctx)
        free_n = min(free_n, time.perf_counter() - t)
    np.testing.assert_allclose(free_result.stats["re_per_plane"], free_re, rtol=1e-9, atol=1e-12)

    gps = len(models) * points / sum(t_batched)
    flops = forward_flops(models[0])
    mm = max(matmul_flops(device=dev), mm_before)
    report = {
        "command": f".venv/bin/python bench/modelxray.py --threads {threads} --device {device}",
        "date": dt.date.today().isoformat(),
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "cpu": cpu_name(),
                    "load_average_1min": [load_before, os.getloadavg()[0]]},
        "setting": {"models": "3 x mntd_cifar_cnn 3x32x32, 10 classes (2 clean, 1 patch "
                              "backdoor to 0), trained 80 steps on synthetic data",
                    "num_planes": NUM_PLANES, "resolution": RESOLUTION, "seed": SEED,
                    "repeats": REPEATS, "naive": "DataLoader batch 128, num_workers 0",
                    "batched_batch_size": "detector default (128 on CPU, channels_last; "
                                          "4096 on an accelerator)",
                    "per_model": per_model},
        "figures": {
            "speedup_vs_per_plane": sum(t_naive) / sum(t_batched),
            "grid_points_per_second": gps,
            "matmul_share": gps * flops / mm,
            "naive_grid_points_per_second": len(models) * points / sum(t_naive),
            "speedup_excluding_forward": free_n / free_b,
            "naive_non_forward_us_per_point": 1e6 * free_n / points,
            "batched_non_forward_us_per_point": 1e6 * free_b / points,
            "flops_per_forward": flops,
            "matmul_flops_per_second": mm,
            "grid_points_per_model": points,
            # N 20, R 100 = 200,000 points per model, at the measured rates (not timed):
            "batched_seconds_per_model_n20_r100_estimated": 200_000 / gps,
            "naive_seconds_per_model_n20_r100_estimated": 200_000 * sum(t_naive)
            / (len(models) * points),
            "grid_mismatches_vs_naive": mismatches,
            "bench_seconds": time.perf_counter() - started,
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = parser.parse_args()
    print(json.dumps(main(args.threads, args.device)["figures"], indent=2))
