"""Benchmark: batched trigger inversion, and seconds per model per scanner on the demo round.

    .venv/bin/python bench/inversion.py [--round DIR] [--models N] [--threads 1] [--device cpu|cuda]
    # writes bench/results/inversion.json

Round: /tmp/demo1/round if it exists (the demo recipe: 16 mntd_mnist_cnn, 10 classes, 32 x 32
signs, 10 clean examples per class), else built with `xray zoo build --recipe demo --out
/tmp/demo-bench/round`.

speedup_batched: on the first trojaned model, every (victim, target) pair of labels (90 arms for
10 classes) is optimised as a K-Arm pair arm (mask + one colour on the victim's images, CE +
cost L1, Adam 0.1 / (0.5, 0.9)) for STEPS steps: once as ONE core.PatchOptimizer with 90 rows
(one forward per minibatch for all pairs), once as 90 optimisers run one after the other (one
pair at a time, the reference codes' way). Same arms, same initial triggers, same budget per
pair; ratio of wall-clock seconds (best of REPEATS).

speedup_batched_free_model: the same two paths with a free model (logits = 10 input pixels):
what each costs besides the forward. On this CPU the MNTD forward / backward is compute-bound
(~2 ms per 32 x 32 image, 1 thread: 90 calls of 10 images cost what one call of 900 costs), so
batching cannot win much here; on an accelerator the forward is ~us per image and the overhead
ratio is what the speedup approaches. (No accelerator was lent to this task: not measured.)

seconds_per_model_{nc,abs,karm}: each scanner's small preset (the defaults) on `--models`
models of the round (evenly spaced, clean and trojaned), mean wall-clock seconds of
`score(model, data, ctx)` per model.

filter_pool_speedup_{32,224}: ABS's filter features (x, max-pool, -max-pool, avg-pool, window
filter_pool_size(side): 15 px at 32, 111 at 224, stride 1) as core.filter_features computes them
(each pool a column pass then a row pass) against torch's 2-D pools of the same window on the
same images (the computation before 2026-12-07), best of REPEATS; 200 images at 32 px, 8 at 224.

Threads: 1 by default: the box is shared (2 cores, other engineers' jobs); one thread gives
steadier figures. The 1-minute load average before and after is recorded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_round, record, sync  # noqa: E402

STEPS = 10
REPEATS = 2


def _load(rec, device: torch.device):
    from xray.detectors.base import ScanData
    from xray.io.examples import load_examples
    from xray.io.model_loading import load_model

    model = load_model(rec, device=str(device)).eval()
    x, y = load_examples(rec)
    return model, ScanData(x=x.to(device), y=y.to(device), num_classes=rec.num_classes)



def speedup(model, data) -> dict[str, float]:
    from xray.detectors.inversion.core import CostSchedule, PatchOptimizer, init_theta

    k = data.num_classes
    pairs = [(v, t) for v in range(k) for t in range(k) if v != t]
    pools = [torch.nonzero(data.y == v).flatten() for v, _ in pairs]
    device = data.x.device
    g = torch.Generator().manual_seed(0)
    c, h, w = data.x.shape[1:]
    m0 = 0.001 * torch.rand(len(pairs), h, w, generator=g)
    side = max(1, round(50 * h / 224))
    m0[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side] = 0.99
    theta_m, theta_p = init_theta(m0), init_theta(torch.rand(len(pairs), c, 1, 1, generator=g))
    kw = dict(schedule=CostSchedule(1e-3, 2, 5, 1.5, 1.5), lr=0.1, betas=(0.5, 0.9),
              batch_size=32, mini_batches=None, early_stop_patience=None)

    def batched() -> PatchOptimizer:
        opt = PatchOptimizer(model, data.x, theta_m, theta_p, [t for _, t in pairs], pools,
                             generator=torch.Generator().manual_seed(1), **kw)
        opt.run(STEPS)
        return opt

    def one_at_a_time() -> list[PatchOptimizer]:
        out = []
        for r, (_, t) in enumerate(pairs):
            opt = PatchOptimizer(model, data.x, theta_m[r:r + 1], theta_p[r:r + 1], [t],
                                 [pools[r]], generator=torch.Generator().manual_seed(1), **kw)
            opt.run(STEPS)
            out.append(opt)
        return out

    t_b, t_s = [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        b = batched()
        sync(device)
        t_b.append(time.perf_counter() - start)
        start = time.perf_counter()
        s = one_at_a_time()
        sync(device)
        t_s.append(time.perf_counter() - start)
    # same budget, same work: every pair took STEPS steps either way
    assert all(int(o.steps[0]) == STEPS for o in s) and (b.steps == STEPS).all()
    return {"speedup_batched": min(t_s) / min(t_b), "batched_seconds": min(t_b),
            "one_pair_at_a_time_seconds": min(t_s), "pairs": len(pairs), "steps": STEPS}


class _FreeModel(torch.nn.Module):
    """logits = 10 input pixels: a model that costs (almost) nothing."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :self.classes] * 10


def filter_pool_speedup(side: int, images: int) -> float:
    """Seconds of the 2-D pools over those of core.filter_features (see the docstring)."""
    import torch.nn.functional as F

    from xray.detectors.inversion.core import filter_features, filter_pool_size

    pool = filter_pool_size(side)
    pad = pool // 2
    x = torch.rand(images, 3, side, side, generator=torch.Generator().manual_seed(side))

    def two_d() -> torch.Tensor:
        mx = F.max_pool2d(x, pool, stride=1, padding=pad)
        return torch.cat([x, mx, -mx, F.avg_pool2d(x, pool, stride=1, padding=pad)], dim=1)

    def best(fn) -> float:
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    torch.testing.assert_close(filter_features(x, pool), two_d(), rtol=0, atol=1e-5)
    return best(two_d) / best(lambda: filter_features(x, pool))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--round", default=None)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]

    from xray import detectors
    from xray.detectors.base import ScanContext
    from xray.io.manifest import read_manifest

    round_dir = Path(args.round) if args.round else demo_round()
    manifest = round_dir / "manifest.csv"
    records = read_manifest(str(manifest if manifest.exists() else round_dir / "METADATA.csv"))
    trojaned = next(r for r in records if r.poisoned)
    model, data = _load(trojaned, device)
    figures = speedup(model, data)
    free = speedup(_FreeModel(data.num_classes), data)
    figures["speedup_batched_free_model"] = free["speedup_batched"]
    figures["filter_pool_speedup_32"] = filter_pool_speedup(32, 200)
    figures["filter_pool_speedup_224"] = filter_pool_speedup(224, 8)
    step = max(1, len(records) // args.models)
    chosen = records[::step][:args.models]
    for name in ("nc", "abs", "karm"):
        det = detectors.build(name, preset="small")
        seconds = []
        for rec in chosen:
            model, data = _load(rec, device)
            start = time.perf_counter()
            det.score(model, data, ScanContext(device=device, seed=0))
            sync(device)
            seconds.append(time.perf_counter() - start)
        figures[f"seconds_per_model_{name}"] = sum(seconds) / len(seconds)
    figures["models_timed"] = len(chosen)
    figures["load_average_before"] = load_before
    figures["load_average_after"] = os.getloadavg()[0]
    figures["threads"] = args.threads
    cmd = "python bench/inversion.py " + " ".join(sys.argv[1:])
    path = record("inversion", cmd.strip(), figures, notes={"round": str(round_dir)})
    print(path.read_text())


if __name__ == "__main__":
    main()
