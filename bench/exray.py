"""EX-RAY benchmark: vanilla ABS vs ABS+EX-RAY on the exray round, and EX-RAY's own cost.

    python bench/exray.py [--round DIR] [--examples-per-class 8] [--max-size 4000] [--nc]

The round is manifests/recipes/exray.yaml (built into --round if that directory has no models:
a few minutes on 2 cores). One "abs+exray" scan per model gives both detectors at once: its
upstream_score is vanilla ABS's score (same run, same seed), its score ABS+EX-RAY's. A model is
flagged when the score reaches the run bound (0.9); TP / FP count trojaned / clean models flagged.
abs_exray_r3rule_*: the same masks judged by the (r3) patch rule (docs/algorithms/exray.md),
computed from the recorded s1, s2 and accuracies.
With --nc the same for Neural Cleanse (vanilla flagged = MAD anomaly index > 2).
abs_exray_true_positives_on_target: flagged trojaned models whose surviving candidates (score >=
the bound) include one aimed at the true target label (a TP for the right reason).

Cost: seconds per EX-RAY-tested trigger (total, and the median over models of each model's
seconds per trigger, robust to a model scanned while other jobs held the cores) and per model,
and batched vs one candidate at a time (speedup_batched) on the model with the most tested
candidates (same candidates, same params).
Writes bench/results/exray.json (keys: abs_true_positives, abs_false_positives,
abs_exray_true_positives, abs_exray_false_positives, seconds_per_trigger, speedup_batched, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import exray_round, record  # noqa: E402


def load(round_dir: Path, model_dir: Path, examples_per_class: int):
    from xray.detectors.base import ScanData
    from xray.io.examples import load_examples
    from xray.io.model_loading import load_model
    from xray.zoo.round import record_from_config

    cfg = json.loads((model_dir / "config.json").read_text())
    rec = record_from_config(str(round_dir), cfg)
    x, y = load_examples(rec, max_per_class=examples_per_class)
    data = ScanData(x=x, y=y, num_classes=rec.num_classes, mean=tuple(rec.mean),
                    std=tuple(rec.std))
    return cfg, load_model(rec), data


def counts(rows: list[dict], key: str, bound: float) -> tuple[int, int, int, int]:
    tp = sum(r["poisoned"] and r[key] >= bound for r in rows)
    fp = sum((not r["poisoned"]) and r[key] >= bound for r in rows)
    return tp, fp, sum(r["poisoned"] for r in rows), sum(not r["poisoned"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--round", default="/tmp/xray-bench-exray-round")
    ap.add_argument("--examples-per-class", type=int, default=8)
    ap.add_argument("--max-size", type=float, default=4000.0,
                    help="ABS trigger bound at 224 x 224 (scaled to the image area)")
    ap.add_argument("--exray-epochs", type=int, default=200)
    ap.add_argument("--bound", type=float, default=0.9)
    ap.add_argument("--nc", action="store_true", help="also NC vs NC+EX-RAY")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from xray import detectors
    from xray.detectors.base import ScanContext
    from xray.detectors.exray import ACC_NAMES, ExRay, is_natural

    round_dir = Path(args.round)
    exray_round(round_dir)
    abs_ex = detectors.build("abs+exray", {"max_size_224": args.max_size,
                                           "exray_epochs": args.exray_epochs,
                                           "run_bound": args.bound})
    nc_ex = detectors.build("nc+exray", {"exray_epochs": args.exray_epochs,
                                         "run_bound": args.bound}) if args.nc else None
    rows, per_model, tested_total, exray_total = [], [], 0, 0.0
    best_case = None
    for model_dir in sorted(round_dir.glob("id-*")):
        if not (model_dir / "config.json").exists():
            continue
        cfg, model, data = load(round_dir, model_dir, args.examples_per_class)
        ctx = ScanContext(seed=0)
        t0 = time.perf_counter()
        res = abs_ex.score(model, data, ctx)
        seconds = time.perf_counter() - t0
        st = res.stats
        row = {"model_id": cfg["model_id"], "poisoned": bool(cfg["poisoned"]),
               "attack": cfg["attack"], "target": cfg["target"], "abs": st["upstream_score"],
               "abs_exray": res.score, "tested": st["tested"], "pruned": st["pruned"],
               "exray_seconds": st["exray_seconds"], "seconds": seconds,
               "clauses": st["clauses"],
               "verdicts": [{k: t.get(k) for k in ("kind", "victim", "target", "reasr",
                                                   "exray_natural", "exray_clause", "exray_s1",
                                                   "exray_s2")}
                            for t in res.triggers if t.get("exray_tested")]}
        # the r3 patch rule on the same masks (same s1, s2, accuracies): a second verdict, free
        r3 = dataclasses.replace(abs_ex.exray.params, rule="r3")
        r3_scores = [0.0]
        for t in res.triggers:
            if not t.get("upstream_selected"):
                continue
            natural = t.get("exray_tested") and t.get("exray_clause") not in (
                "no_mask", "no_images") and is_natural(
                    t["kind"], t["exray_s1"], t["exray_s2"],
                    {k: t["exray_" + k] for k in ACC_NAMES}, r3)[0]
            r3_scores.append(0.0 if natural else float(t["reasr"]))
        row["abs_exray_r3rule"] = max(r3_scores)
        row["surviving_targets"] = sorted({int(t["target"]) for t in res.triggers
                                           if t.get("upstream_selected")
                                           and (t.get("exray_score") or 0.0) >= args.bound})
        if nc_ex is not None:
            nres = nc_ex.score(model, data, ScanContext(seed=0))
            row["nc_flag"] = float(nres.stats["upstream"]["trojaned"])
            row["nc_exray"] = nres.score
            row["nc_tested"], row["nc_pruned"] = nres.stats["tested"], nres.stats["pruned"]
        rows.append(row)
        tested_total += st["tested"]
        exray_total += st["exray_seconds"]
        per_model.append(st["exray_seconds"])
        print(json.dumps({k: v for k, v in row.items() if k != "verdicts"}), flush=True)
        tested = [res.artifacts["candidates"][i] for i in res.artifacts["tested"]]
        if best_case is None or len(tested) > len(best_case[2]):
            best_case = (model, data, tested)

    figures: dict[str, float] = {}
    tp, fp, npos, nneg = counts(rows, "abs", args.bound)
    tp2, fp2, _, _ = counts(rows, "abs_exray", args.bound)
    tp3, fp3, _, _ = counts(rows, "abs_exray_r3rule", args.bound)
    figures.update({"abs_true_positives": tp, "abs_false_positives": fp,
                    "abs_exray_true_positives": tp2, "abs_exray_false_positives": fp2,
                    "abs_exray_r3rule_true_positives": tp3,
                    "abs_exray_r3rule_false_positives": fp3,
                    "trojaned_models": npos, "clean_models": nneg})
    if nc_ex is not None:
        ntp, nfp, _, _ = counts(rows, "nc_flag", 0.5)
        ntp2, nfp2, _, _ = counts(rows, "nc_exray", args.bound)
        figures.update({"nc_true_positives": ntp, "nc_false_positives": nfp,
                        "nc_exray_true_positives": ntp2, "nc_exray_false_positives": nfp2})
    figures["abs_exray_true_positives_on_target"] = sum(
        r["poisoned"] and r["target"] in r["surviving_targets"] for r in rows)
    figures["seconds_per_trigger"] = exray_total / max(tested_total, 1)
    per_trigger = sorted(r["exray_seconds"] / r["tested"] for r in rows if r["tested"])
    figures["seconds_per_trigger_median"] = (
        per_trigger[len(per_trigger) // 2] if len(per_trigger) % 2 else
        sum(per_trigger[len(per_trigger) // 2 - 1:len(per_trigger) // 2 + 1]) / 2
    ) if per_trigger else 0.0
    figures["seconds_per_model"] = exray_total / max(len(rows), 1)
    figures["triggers_per_model"] = tested_total / max(len(rows), 1)

    # batched vs one candidate at a time, same candidates and parameters
    model, data, tested = best_case
    ex = ExRay(ExRay.Params(epochs=args.exray_epochs))
    t0 = time.perf_counter()
    together = ex.examine(model, data, tested, ScanContext(seed=0))
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [ex.examine(model, data, [c], ScanContext(seed=0))[0] for c in tested]
    single = time.perf_counter() - t0
    figures.update({"seconds_batched": batched, "seconds_one_at_a_time": single,
                    "speedup_batched": single / max(batched, 1e-9),
                    "speedup_candidates": len(tested),
                    "batched_verdicts_agree": float(sum(a.natural == b.natural
                                                        for a, b in zip(together, alone))
                                                    / max(len(tested), 1))})
    out = record("exray", "python bench/exray.py " + " ".join(sys.argv[1:]), figures,
                 notes={"models": rows, "bound": args.bound, "max_size_224": args.max_size,
                        "examples_per_class": args.examples_per_class,
                        "exray_epochs": args.exray_epochs})
    print(json.dumps(figures, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
