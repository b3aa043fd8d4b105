"""The stages part of bench/cascade.py (--part stages): calibrators fitted on one zoo round,
the cascade measured on another (issue 22's cost_share and cross entropies).

Rounds: recipes cascade_train and cascade_test (44 models each: 22 clean, BadNets, polygon,
blended and filter trojans; MNTD's CNN on 32 px signs), built once under --workdir. Both are
scanned with every detector of ALL_DETECTORS (small presets) through `xray scan`; the
calibrators come from `xray calibrate` on the training round: one on the stage-1 detectors, one
on stages 1 and 2, and one on all (the all-detector figure). The cascade (stage 1: STAGE_ONE on
every model; stage 2: the models whose stage-1 probability lies in UNCERTAIN) then runs
through `xray scan --config` on a copy of the test round's output folder, so every row it
needs is reused and its detector-seconds are the seconds those rows took: exactly what a fresh
cascade scan would spend on them.

Stage 2 is chosen on the training round alone (`stage_two`): the detectors outside stage 1 whose
training-round ROC-AUC is at least STAGE_TWO_MIN_AUC. A detector that does not rank the training
round's models earns no place in the cascade, however many seconds it would spend (on these
rounds: abs+exray, 34 s a model, 0.55 on the training round; Model X-ray 0.44). The test round
never informs the choice.

Figures: cost_share (the cascade's detector-seconds over the all-detector scan's, on the test
round), cascade_cross_entropy and all_detectors_cross_entropy (the TrojAI harness's CE of the
cascade's final probability and of the all-detector calibrator's, test round), their ROC-AUC,
stage_two_share (share of test models that went to stage 2), and each single detector's
calibrated CE on the test round (its Platt scaling fitted on the training round).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from _common import build_and_scan, xray_cli

ALL_DETECTORS = ["weights", "karm", "mmbd", "nc", "modelxray", "abs+exray"]
STAGE_ONE = ["weights", "karm"]  # the cheapest: ~1 ms and ~1 s per demo model
UNCERTAIN = [0.1, 0.9]
STAGE_TWO_MIN_AUC = 0.75  # fixed before measuring; the test round is not consulted


def _config(stage_two: list[str], stage1: str, final: str) -> dict[str, Any]:
    """The cascade's scan config: stage 1, then `stage_two` on the uncertain models."""
    return {"seed": 0, "detectors": {d: {"preset": "small"} for d in STAGE_ONE + stage_two},
            "stages": [{"detectors": STAGE_ONE, "calibrator": stage1, "uncertain": UNCERTAIN},
                       {"detectors": stage_two, "calibrator": final}]}


def stage_two(train: Any) -> tuple[list[str], dict[str, float]]:
    """The detectors beyond stage 1 whose ROC-AUC on the training round's rows reaches
    STAGE_TWO_MIN_AUC, and every candidate's training AUC (rank-based: Platt scaling would not
    change it)."""
    from sklearn.metrics import roc_auc_score

    aucs = {}
    for name in ALL_DETECTORS:
        if name in STAGE_ONE:
            continue
        rows = train[(train["detector"] == name) & train["score"].notna()]
        rows = rows.drop_duplicates("model_id", keep="last")
        aucs[name] = float(roc_auc_score(rows["gt_poisoned"].astype(int), rows["score"]))
    return [d for d, auc in aucs.items() if auc >= STAGE_TWO_MIN_AUC], aucs


def measure(workdir: Path, actors: int = 2) -> tuple[dict[str, float], dict[str, Any]]:
    import yaml

    from xray.reduce.calibrate import Calibrator, combined_rows
    from xray.reduce.harness import harness_scores
    from xray.results.sink import read_table

    train_out = build_and_scan("cascade_train", workdir / "train", ALL_DETECTORS, actors)
    test_out = build_and_scan("cascade_test", workdir / "test", ALL_DETECTORS, actors)
    second, train_aucs = stage_two(read_table(str(train_out), "scores"))
    if not second:
        raise SystemExit(f"no detector reaches training ROC-AUC {STAGE_TWO_MIN_AUC} for "
                         f"stage 2: {train_aucs}")
    print(f"stage 2 (training ROC-AUC >= {STAGE_TWO_MIN_AUC}): {', '.join(second)} "
          f"(training AUCs {train_aucs})", flush=True)
    stage1_uri = str(workdir / "stage1.json")
    stages_uri = str(workdir / "stages.json")
    final_uri = str(workdir / "all.json")
    xray_cli("calibrate", str(train_out), "--detectors", ",".join(STAGE_ONE),
             "--train-run", "all", "--artifact", stage1_uri)
    xray_cli("calibrate", str(train_out), "--detectors", ",".join(STAGE_ONE + second),
             "--train-run", "all", "--artifact", stages_uri)
    xray_cli("calibrate", str(train_out), "--train-run", "all", "--artifact", final_uri)

    cascade_out = workdir / "test" / "cascade-out"
    shutil.rmtree(cascade_out, ignore_errors=True)
    shutil.copytree(test_out, cascade_out)
    config = workdir / "cascade.yaml"
    config.write_text(yaml.safe_dump(_config(second, stage1_uri, stages_uri)))
    printed = xray_cli("scan", "--manifest", str(workdir / "test" / "round"), "--out",
                       str(cascade_out), "--config", str(config), "--quiet")
    print("\n".join(line for line in printed.splitlines()
                    if line.startswith(("stage", "cascade"))), flush=True)

    test = read_table(str(test_out), "scores")
    test = test[test["detector"].isin(ALL_DETECTORS)]
    truth = test.drop_duplicates("model_id").set_index("model_id")["gt_poisoned"].astype(float)
    all_seconds = float(test["seconds"].sum())
    cascade = read_table(str(cascade_out), "scores")
    cascade = cascade[cascade["detector"] == "cascade"].set_index("model_id")
    stats = {m: json.loads(s) for m, s in cascade["stats_json"].items()}
    cascade_seconds = float(cascade["seconds"].sum())

    def figures_of(probability: Any) -> Any:
        p = probability.reindex(truth.index).astype(float).to_numpy()
        return harness_scores(truth.to_numpy(), p)

    final = Calibrator.load(final_uri)
    all_p = combined_rows(test, final).set_index("model_id")["score"]
    cascade_h = figures_of(cascade["score"])
    all_h = figures_of(all_p)
    figures = {"cost_share": cascade_seconds / all_seconds,
               "cascade_cross_entropy": cascade_h.cross_entropy,
               "all_detectors_cross_entropy": all_h.cross_entropy,
               "cascade_minus_all_cross_entropy": cascade_h.cross_entropy - all_h.cross_entropy,
               "cascade_roc_auc": cascade_h.roc_auc, "all_detectors_roc_auc": all_h.roc_auc,
               "stage_two_share": sum(st["stage"] == 2 for st in stats.values()) / len(stats),
               "cascade_detector_seconds": cascade_seconds,
               "all_detectors_seconds": all_seconds,
               "test_models": float(len(truth)), "test_trojaned": float(truth.sum())}
    train = read_table(str(train_out), "scores")
    figures["train_models"] = float(train["model_id"].nunique())
    for name in ALL_DETECTORS:  # each detector alone, Platt-scaled on the training round
        from xray.reduce.calibrate import fit

        single = fit(train, detectors=[name], model=name)
        p = combined_rows(test[test["detector"] == name], single).set_index("model_id")["score"]
        h = figures_of(p)
        figures[f"{name}_cross_entropy"] = h.cross_entropy
        figures[f"{name}_roc_auc"] = h.roc_auc
        figures[f"{name}_seconds_per_model"] = float(
            test[test["detector"] == name]["seconds"].mean())
    notes = {"stage_one": STAGE_ONE, "stage_two": second, "uncertain": UNCERTAIN,
             "stage_two_min_auc": STAGE_TWO_MIN_AUC, "training_roc_auc": train_aucs,
             "all_detectors": ALL_DETECTORS,
             "rounds": "recipes cascade_train (calibrators) and cascade_test (measured)",
             "cascade_printed": printed.splitlines()[:3]}
    return figures, notes

