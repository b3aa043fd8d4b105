"""Benchmark: the newer detectors (issue 23) side by side on one zoo round, and the `weights`
detector's speed and separation on the bench rounds.

    .venv/bin/python bench/newer_detectors.py [--repeats 200] [--workdir DIR] [--actors 2]
    # writes bench/results/newer_detectors.json

Figures:
  <detector>_roc_auc, <detector>_target_accuracy, <detector>_scan_seconds_per_model for each of
      NEWER (weights, tabor, trodo, ban, btidbf; small presets, seed 0): ROC-AUC of the score,
      share of trojaned models whose predicted target is the true one (none for trodo, which
      names none) and the mean seconds of a model's row, on the recipe `newer_detectors` (24
      NiN models on 5-class 24 x 24 signs: 12 clean; 3 each of BadNets, Blended, WaNet, filter;
      built once under --workdir with `xray zoo build`, scanned with `xray scan`; both resume).
      newer_round_models / newer_round_trojaned: the models the round kept (the zoo drops a
      model that misses the ASR floor after two attempts).
  weights_seconds_per_model: median over the demo round's 16 models of the median wall-clock
      seconds of `score(model, data, ctx)` alone (model loaded, 1 thread, `--repeats` calls).
  weights_roc_auc_demo: ROC-AUC of the score on the demo round (`demo_round()`: 16
      mntd_mnist_cnn, 10-class 32 x 32 signs; 8 clean, 4 BadNets, 4 polygon), ground truth
      record.poisoned.
  weights_target_accuracy_demo: share of the demo round's trojaned models whose predicted
      target is record.target.
  weights_roc_auc_exray: the same ROC-AUC on the EX-RAY round (10 NiN, 5-class 24 x 24 signs;
      4 clean, 4 BadNets, 2 filter), when /tmp/exray-round or bench/_common.EXRAY_ROUND holds it
      (not built here: the detector's figures do not justify 5 minutes of training).
  weights_roc_auc_cascade_train / _test: the same on the cascade bench rounds
      (/tmp/cascade-bench/{train,test}/round, 44 models each), when their METADATA.csv exists.
  *_per_statistic (notes): each statistic's ROC-AUC alone, per round, for the docs.

The default statistics (mean, positive) were chosen on the demo and EX-RAY rounds: their AUCs
are not held-out figures; the cascade rounds' are.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EXRAY_ROUND, build_and_scan, demo_round, record  # noqa: E402

CASCADE = Path("/tmp/cascade-bench")
EXRAY_FOUND = Path("/tmp/exray-round")
NEWER = ["weights", "tabor", "trodo", "ban", "btidbf"]


def newer_round(workdir: Path, actors: int) -> tuple[dict[str, float], dict]:
    """Every detector of NEWER on the recipe `newer_detectors` (built and scanned once under
    workdir; a re-run reuses both): per detector ROC-AUC, target accuracy, seconds per model."""
    from sklearn.metrics import roc_auc_score

    from xray.results.sink import read_table

    out = build_and_scan("newer_detectors", workdir, NEWER, actors)
    scores = read_table(str(out), "scores")
    figures: dict[str, float] = {}
    notes: dict = {"round": str(workdir / "round"), "recipe": "newer_detectors"}
    for name in NEWER:
        rows = scores[scores["detector"] == name].drop_duplicates("model_id", keep="last")
        ok = rows[rows["status"] == "ok"]
        truth = ok["gt_poisoned"].astype(bool)
        trojaned = ok[truth]
        named = trojaned["predicted_target"].notna().any()
        figures[f"{name}_roc_auc"] = (float(roc_auc_score(truth, ok["score"]))
                                      if truth.nunique() == 2 else float("nan"))
        if named:  # trodo names no target: no figure (JSON has no NaN)
            figures[f"{name}_target_accuracy"] = float(
                (trojaned["predicted_target"] == trojaned["gt_target"]).mean())
        figures[f"{name}_scan_seconds_per_model"] = float(rows["seconds"].mean())
        notes[name] = {"ok": len(ok), "not_ok": rows.loc[rows["status"] != "ok", "error"]
                       .astype(str).str[:120].tolist(),
                       "scores_clean": [round(v, 3) for v in ok.loc[~truth, "score"]],
                       "scores_trojaned": [round(v, 3) for v in trojaned["score"]],
                       "attacks_trojaned": trojaned["gt_attack"].tolist()}
    models = scores.drop_duplicates("model_id")
    figures["newer_round_models"] = float(len(models))
    figures["newer_round_trojaned"] = float(models["gt_poisoned"].astype(bool).sum())
    return figures, notes


def _models(round_dir: Path):
    from xray.detectors.base import ScanData
    from xray.io.manifest import read_round_dir
    from xray.io.model_loading import load_model

    for rec in read_round_dir(str(round_dir)):
        c, h, w = rec.input_shape
        # weights reads no data: an empty batch of the right shape stands in for the examples
        data = ScanData(x=torch.zeros(0, c, h, w), y=torch.zeros(0, dtype=torch.long),
                        num_classes=rec.num_classes)
        yield rec, load_model(rec).eval(), data


def evaluate(round_dir: Path, repeats: int = 0) -> dict:
    from sklearn.metrics import roc_auc_score

    from xray import detectors
    from xray.detectors.base import ScanContext
    from xray.detectors.weights import DIRECTIONS

    det = detectors.build("weights")
    y, scores, hits, trojaned, seconds = [], [], 0, 0, []
    per_stat: dict[str, list[float]] = {s: [] for s in DIRECTIONS}
    for rec, model, data in _models(round_dir):
        out = det.score(model, data, ScanContext())
        y.append(int(rec.poisoned))
        scores.append(out.score)
        for s in DIRECTIONS:
            per_stat[s].append(out.stats[f"anomaly_{s}"])
        if rec.poisoned:
            trojaned += 1
            hits += int(out.target == rec.target)
        if repeats:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                det.score(model, data, ScanContext())
                times.append(time.perf_counter() - t0)
            seconds.append(statistics.median(times))
    return {"roc_auc": roc_auc_score(y, scores),
            "target_accuracy": hits / trojaned if trojaned else float("nan"),
            "seconds": statistics.median(seconds) if seconds else None,
            "models": len(y), "trojaned": trojaned,
            "per_statistic": {s: round(roc_auc_score(y, v), 3) for s, v in per_stat.items()},
            "scores_clean": [round(s, 2) for s, t in zip(scores, y) if not t],
            "scores_trojaned": [round(s, 2) for s, t in zip(scores, y) if t]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--workdir", default="/tmp/xray-bench-newer",
                    help="where the newer_detectors round and its scan live (reused)")
    ap.add_argument("--actors", type=int, default=2, help="scan actors for that round")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    figures, notes_round = newer_round(workdir, args.actors)
    notes: dict = {}
    torch.set_num_threads(1)
    demo = evaluate(demo_round(), repeats=args.repeats)
    figures.update(weights_seconds_per_model=demo["seconds"],
                   weights_roc_auc_demo=demo["roc_auc"],
                   weights_target_accuracy_demo=demo["target_accuracy"])
    notes["demo"] = demo
    rounds = {"exray": next((d for d in (EXRAY_FOUND, EXRAY_ROUND)
                             if (d / "METADATA.csv").exists()), None)}
    for split in ("train", "test"):
        d = CASCADE / split / "round"
        rounds[f"cascade_{split}"] = d if (d / "METADATA.csv").exists() else None
    for key, d in rounds.items():
        if d is None:
            notes[key] = "round not found: not measured"
            continue
        out = evaluate(d)
        figures[f"weights_roc_auc_{key}"] = out["roc_auc"]
        figures[f"weights_target_accuracy_{key}"] = out["target_accuracy"]
        notes[key] = dict(out, round=str(d))
    for key, value in figures.items():
        print(f"{key}: {value:.4g}")
    print(record("newer_detectors", "python bench/newer_detectors.py", figures,
                 {"newer_round": notes_round} | notes))


if __name__ == "__main__":
    main()
