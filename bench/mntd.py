"""MNTD on MNIST: a meta-classifier trained on a shadow set scores a separately built target round.

Shadow set (MNTD's own setting, docs/algorithms/baselines.md, at a CPU budget): MNTD's MNIST CNN on
the defender's 1,200-image MNIST split (2% of 60,000; data seed 0), `--per-kind` benign + the
same number of jumbo models for training and a quarter of that of each for validation, trained
one by one (faster than stacked on CPUs, bench/stacked_training.py). Budget: Adam lr 2e-3,
batch 50, 8 epochs (the reference: lr 1e-3, batch 100, 100 epochs) -- recorded, with the jumbo
models' median ASR.
Target round: another MNIST subsample (6,000 images, data seed 1), another recipe seed, 4 epochs
at the reference's Adam lr 1e-3 / batch 100 (the reference: 30,000 images, 4 epochs): clean
models and the spec's target attacks M (patch, alpha 1) and B (full-image blend), plus BadNets;
every model is kept (asr_floor 0, as the reference evaluates every target model).
Meta-classifier: `train_meta_classifier` (query tuning, 10 epochs, best epoch by validation AUC),
then the `mntd` detector scores every target model.

    .venv/bin/python bench/mntd.py [--per-kind 52] [--work /tmp/mntd-bench]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record  # noqa: E402


def shadow_recipe(per_kind: int) -> dict:
    val = max(2, per_kind // 4)
    return {
        "name": "mntd_shadow_bench", "seed": 2021,
        "dataset": {"name": "mnist", "params": {"n_train": 1200, "n_test": 1000, "seed": 0}},
        "architecture": "mntd_mnist_cnn",
        "training": {"preset": "mntd", "lr": 2e-3, "batch_size": 50, "epochs": 8},
        "asr_floor": 0.0, "max_attempts": 1, "examples_per_class": 1,
        "poisoned_examples_per_class": 1,
        "groups": [{"count": per_kind}, {"count": per_kind, "attack": "jumbo"},
                   {"count": val, "split": "validation"},
                   {"count": val, "attack": "jumbo", "split": "validation"}],
    }


def target_recipe(clean: int, per_attack: int) -> dict:
    return {
        "name": "mntd_target_bench", "seed": 8675309,
        "dataset": {"name": "mnist", "params": {"n_train": 6000, "n_test": 1000, "seed": 1}},
        "architecture": "mntd_mnist_cnn",
        "training": {"preset": "mntd", "epochs": 4},
        "asr_floor": 0.0, "max_attempts": 1, "examples_per_class": 2,
        "poisoned_examples_per_class": 1,
        "groups": [{"count": clean},
                   {"count": per_attack, "attack": "badnets", "poison_rate": 0.1},
                   {"count": per_attack, "attack": "mntd_m"},
                   {"count": per_attack, "attack": "mntd_b"}],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-kind", type=int, default=52, help="training shadow models per kind")
    ap.add_argument("--target-clean", type=int, default=16)
    ap.add_argument("--target-per-attack", type=int, default=6)
    ap.add_argument("--work", default="/tmp/mntd-bench")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import json

    import torch
    from sklearn.metrics import roc_auc_score

    from xray import detectors
    from xray.detectors.base import ScanContext, ScanData
    from xray.zoo.mntd import train_meta_classifier
    from xray.io.examples import load_examples
    from xray.io.model_loading import load_model
    from xray.zoo.build import build_round
    from xray.zoo.round import model_configs
    from xray.zoo.recipe import parse_recipe

    work = Path(args.work)
    started = time.perf_counter()
    t = time.perf_counter()
    shadow = build_round(parse_recipe(shadow_recipe(args.per_kind)), str(work / "shadow"),
                         workers=args.workers)
    seconds_shadow = time.perf_counter() - t
    t = time.perf_counter()
    target = build_round(parse_recipe(target_recipe(args.target_clean, args.target_per_attack)),
                         str(work / "target"), workers=args.workers)
    seconds_target = time.perf_counter() - t

    t = time.perf_counter()
    meta = train_meta_classifier(str(work / "shadow"), str(work / "meta"), seed=0, threads=1)
    seconds_meta = time.perf_counter() - t

    torch.set_num_threads(1)
    det = detectors.build("mntd", {"artifact": meta.artifact_uri})
    rows = []
    t = time.perf_counter()
    for r in target.records:
        x, y = load_examples(r)
        res = det.score(load_model(r), ScanData(x=x, y=y, num_classes=r.num_classes),
                        ScanContext(seed=0))
        rows.append((r.attack or "clean", int(bool(r.poisoned)), res.score))
    seconds_scan = (time.perf_counter() - t) / max(1, len(rows))

    def auc(attack: str | None) -> float:
        keep = [row for row in rows if row[0] in ("clean", attack) or attack is None]
        return float(roc_auc_score([k[1] for k in keep], [k[2] for k in keep]))

    jumbo_asr = [c["asr"] for c in model_configs(str(work / "shadow")) if c["poisoned"]]
    target_cfg = model_configs(str(work / "target"))
    troj_asr = [c["asr"] for c in target_cfg if c["poisoned"]]
    by_attack = {a: statistics.median(c["asr"] for c in target_cfg if c["attack"] == a)
                 for a in ("badnets", "mntd_m", "mntd_b")}
    figures = {
        "mntd_roc_auc": auc(None),
        "mntd_roc_auc_badnets": auc("badnets"),
        "mntd_roc_auc_m": auc("mntd_m"),
        "mntd_roc_auc_b": auc("mntd_b"),
        "shadow_models": len(shadow.records),
        "target_models": len(target.records),
        "shadow_val_auc": meta.best_val_auc,
        "shadow_jumbo_median_asr": statistics.median(jumbo_asr),
        "target_trojaned_median_asr": statistics.median(troj_asr),
        "target_median_asr_badnets": by_attack["badnets"],
        "target_median_asr_m": by_attack["mntd_m"],
        "target_median_asr_b": by_attack["mntd_b"],
        "seconds_shadow_build": seconds_shadow,
        "seconds_target_build": seconds_target,
        "seconds_meta_train": seconds_meta,
        "seconds_scan_per_model": seconds_scan,
        "seconds": time.perf_counter() - started,
    }
    notes = {"shadow_recipe": shadow_recipe(args.per_kind),
             "target_recipe": target_recipe(args.target_clean, args.target_per_attack),
             "meta": {"n_train": meta.n_train, "n_val": meta.n_val,
                      "best_epoch": meta.best_epoch, "val_auc": meta.val_auc},
             "scores": [{"attack": a, "poisoned": p, "score": s} for a, p, s in rows]}
    out = record("mntd", "python bench/mntd.py " + " ".join(sys.argv[1:]), figures, notes)
    print(json.dumps(figures, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
