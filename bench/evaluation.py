"""The evaluation table (issue 21): every detector on every attack, train and test rounds apart,
beside the papers' figures.

    .venv/bin/python bench/evaluation.py [--workdir /tmp/xray-evaluation] [--actors 2]
        [--detectors a,b,...] [--size cpu|reference --data DIR] [--architecture-round]
        [--tabulate-only]

Three rounds (recipes evaluation_train / evaluation_test / evaluation_shifted in
manifests/recipes/), and a fourth with --architecture-round (evaluation_architecture; the
default at the reference size): train and test differ only in their seed; the shifted round
trains the same CNN on other sign data, the architecture round torchvision's ResNet-18 on the
same data, so threshold and calibrator transfer is measured, not assumed. The architecture
round is left out of the CPU size by default to keep it within the issue's 2 hours on 2 cores:
without it the CPU size builds and scans in about 92 minutes (measured 2026-12-07); the
ResNet-18 round adds 16 minutes of building and 30 of scanning.
Each round is built with `xray zoo build` and scanned with every detector through `xray scan`
(both resume: a re-run reuses every trained model and every score). Then:

- per detector, a threshold from the training round (its clean models' 95th percentile, the
  summary's default rule) and a Platt scaling fitted on the training round (`xray calibrate`'s
  stacker restricted to that detector);
- per detector x attack on the test round (that attack's models and every clean model): ROC-AUC,
  TPR at 5% FPR, accuracy at the training threshold, TrojAI cross-entropy of the Platt-scaled
  probability, seconds per model; the same per mapping (all-to-one, label-specific, all-to-all);
- the combined detector (`xray calibrate` on the training round, every detector) on the test,
  shifted and architecture rounds, against the best single detector;
- per detector on the architecture round: the same figures over all its models, per attack and
  per mapping (the training round's thresholds and Platt scalings, fitted on the other network);
- at the CPU size, a fourth round for the clean-label attacks (recipe clean_label: SIG,
  label-consistent, Refool on Fashion-MNIST with the hard class shirt as target), which do not
  implant in the sign models of the three rounds: per detector x attack, ROC-AUC, TPR at 5% FPR
  and seconds within that round (no calibration round on that data, so no accuracy or
  cross-entropy).

Writes docs/EVALUATION.md (the table, with the published figures beside it) and
bench/results/evaluation.json. `--size reference` turns the three recipes into the seeds'
settings (PreActResNet-18, 50 epochs, the `reference` training preset, images from a local
folder `--data DIR` as the `folder` data source reads it; the architecture round keeps
torchvision's ResNet-18): for a GPU cluster.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from _common import build_and_scan, record, xray_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = "architecture"  # the optional split (--architecture-round)
SPLITS = ("train", "test", "shifted", ARCHITECTURE)
# The rounds the combined detector (fitted on "train") is scored on.
HELD_OUT = ("test", "shifted", ARCHITECTURE)
# The clean-label attacks' own round (CPU size only): they implant only where the target class is
# hard to learn (docs/algorithms/zoo.md), which no class of the signs is; at the reference size
# (CIFAR-10) they are in the three rounds themselves.
CLEAN_LABEL = "clean_label"
# Every registered detector that needs no extra artefact; mntd needs a shadow-trained
# meta-classifier (bench/mntd.py measures it on its own shadow sets).
DETECTORS = ["weights", "trodo", "karm", "mmbd", "modelxray", "nc", "tabor", "ban", "btidbf",
             "abs", "abs+exray", "nc+exray", "karm+exray"]
MAX_FPR = 0.05

# Published figures, (value, source and setting); see the footnotes in docs/EVALUATION.md.
PUBLISHED: dict[tuple[str, str], tuple[float, str]] = {
    ("modelxray", "badnets"): (0.99, "mx"), ("modelxray", "ssba"): (1.00, "mx"),
    ("modelxray", "lf"): (0.81, "mx"), ("modelxray", "bpp"): (0.76, "mx"),
    ("modelxray", "trojannn"): (0.74, "mx"), ("modelxray", "lira"): (1.00, "mx"),
    ("modelxray", "blind"): (0.92, "mx"),
}
FOOTNOTES = {
    "mx": "Model X-ray supplement Table 4: RE AUROC at eta 5, CIFAR-10 PreActResNet-18, 10% "
          "poisoning, 50 epochs (the paper's own models, not these).",
}
# Written from the figures of the last CPU run (bench/results/evaluation.json); update with them.
ANALYSIS = """
- The CPU size, measured end to end on 2 cores (2026-12-07, the three rounds rebuilt with BPP at
  2 bits; the architecture round left out, its default there): about 92 minutes. Builds 9.6
  (train), 8.8 (test), 9.2 (shifted) and 4.6 (clean-label) minutes; scans 21 (train: 15.8 for
  its last 30 models, the first 10 scanned before an interruption), 19.2, 15.6 and 3.4 minutes;
  the table 0.4. Some niced test runs shared the machine at times. This table adds the
  architecture round scanned in the previous run (`--architecture-round`; its recipe did not
  change and its models rebuild bit for bit): 16 minutes of building and 30 of scanning more,
  about 2.3 hours in all. Per CNN model the 13 detectors take 49-71 s of one core, 58-64% of
  it ABS and ABS+EX-RAY (`abs`, `abs+exray`). BPP, at 2 bits, now implants (ASR 0.96-0.98) and is
  in the test round: every detector but `btidbf` (0.17), `karm` (0.00), `abs` and the two
  constant composed ones ranks it above the clean models' median, most at 1.0 (Model X-ray 1.0
  against the paper's 0.76). The other models are bit-identical to the previous run's, and so
  are their cells.
- The combined detector equals the best single one: its nested selection on the training round
  (40 models, 16 trojaned) chose `weights` alone (cross-validated CE 0.225; `weights+agreement`
  0.233, `all` 0.273, `mmbd+agreement` 0.346; the outer folds chose `weights` four times and
  `mmbd` once, nested CE 0.338), so test CE 0.371 (95% interval 0.16-0.58) / ROC-AUC 0.912,
  shifted 0.363 / 0.914. Issue 21's targets (CE <= 0.20, ROC-AUC >= 0.95 on the test round)
  are missed, though the 0.20 lies inside the interval one round of 43 models allows. Tried
  after the fact and not adopted (measured on the previous run's rounds, which differ only in
  BPP): a feature per detector counting how many others name its target (`weights` with it:
  selection CE 0.253 against 0.236 for `weights` alone), and Platt-scaled pairs of the five
  strongest detectors, by logistic regression or by the mean of their logits (best
  cross-validated pair `weights`+`tabor` 0.213, test CE 0.418; `weights`+`mmbd` 0.220 / 0.380;
  `weights` alone 0.226 / 0.391 in that script). Input_aware, LIRA at eps 0.1 and Blind are
  built: ROC-AUC 0.92-1.0 on input_aware from every detector but the constant abs /
  karm+exray, abs+exray 0.38 and btidbf 0.75; Blind trodo 1.0, tabor 0.96, weights and mmbd
  0.88. Per-attack cells rest on one model each.
- On the shifted round (smaller, rotated and shifted signs on other backgrounds) the detectors
  whose scores are a trigger's size lose most: ROC-AUC over all after the training round's Platt
  scaling (ranks, so the scaling does not matter) `mmbd` 0.93, `weights` 0.91, `trodo` 0.78,
  `karm` 0.73, `modelxray` 0.68, `tabor` 0.63, `nc` 0.49, `btidbf` 0.44 (test round: 0.89, 0.91,
  0.88, 0.44, 0.62, 0.81, 0.79, 0.66). Measured for NC (previous run): the clean models' median
  ratio of the smallest to the median mask L1 falls from 0.73 (test) to 0.63 (shifted) while the
  trojaned ones' stays at 0.39 / 0.38: on the smaller signs a clean model's easiest label needs a
  smaller trigger than its others (why is not established). The combined detector, `weights`
  alone, transfers (CE 0.363).
- On another architecture (torchvision's ResNet-18, 9 clean and 9 trojaned, stamp and blend
  triggers, all-to-one and label-specific; recipe evaluation_architecture) the combined
  detector fitted on the CNN's training round (`weights` Platt-scaled) transfers: CE 0.27,
  ROC-AUC 0.95 (0.21 / 0.98 with the agreement feature, chosen in the earlier fold order: a
  count of targets has no scale). Single detectors there:
  `weights` 0.95, `btidbf` 0.80, `nc` 0.79, `mmbd` 0.78, `tabor` 0.77, `ban` 0.69 (BatchNorm:
  applicable here), `karm` 0.57, `trodo` 0.53, `modelxray` 0.47; `abs` again scores 1.0 on every
  model and `abs+exray` 0.49: at 32 px this ResNet's stem leaves `layer3` (ABS's and EX-RAY's
  layer) 2 x 2 positions, every model has natural triggers at REASR 1.0, and EX-RAY prunes
  every tested one on 17 of the 18 models, trojaned ones included (one polygon model keeps one,
  on its true target), so the score is the best untested REASR (0.8-0.9) almost everywhere.
  TRODO's confidence is saturated before its attack (MSP 0.95-0.98 on its near-OOD images), so
  its gain (0.01-0.05) carries little. Issue 21 quotes an
  outside ResNet-18 round where `abs+exray` reached 0.83 and Model X-ray 0.67 (its image size
  unknown to us). Not the split layer's resolution, measured on six models of this recipe
  (3 clean, BadNets x2, polygon): at `layer2` (4 x 4) instead of `layer3` EX-RAY still prunes
  every tested trigger; the polygon model's injected triggers (victim 0 -> its target 7, 17-27
  px against natural ones at the 32.7 px size bound, all REASR 1.0) get s1 0.91-0.95 at
  `layer2` and 0.99 at `layer3` (> beta 0.8: the channels the trigger moves contain those
  that tell the target from the victim), so EX-RAY calls them natural at either layer. Nor the
  image size: at 64 px (one clean and one polygon model of the recipe, `layer3` 4 x 4) ABS
  again finds REASR 1.0 triggers on both, EX-RAY prunes every tested one, and the polygon
  model's trigger to its target (119 of the 130 px bound) gets s1 1.00.
- Stacking more detectors' scores does not help on these rounds, measured after the fact and
  kept out of the table: a calibrator restricted to the detectors that beat the base rate alone
  in cross-validation on the training round (weights, trodo, mmbd, tabor, nc+exray; before the
  agreement feature) reaches test CE 0.325 / ROC-AUC 0.93 but shifted CE 0.86 (trodo's and
  tabor's scales move with the data). The agreement transfers because it has no scale; reaching
  the targets needs detectors that are stronger on these models.
- `abs` scores 1.0 on every model of the three rounds, clean ones included (ROC-AUC 0.50): on
  10-class signs a patch of a sign's own colour and glyph flips a clean model (natural triggers;
  `manifests/recipes/exray.yaml` says why), which is what EX-RAY exists to prune. `abs+exray`
  prunes some (clean models 0.7-1.0, test ROC-AUC 0.66, shifted 0.51), far from EX-RAY Table
  9's 0.81-0.88 accuracy: this CNN's split block has 16 channels, too narrow for EX-RAY's
  sparse masks (any two masks overlap, so injected triggers look natural too; docs/FIDELITY.md).
  On NiN models (96 channels at the split) the EX-RAY bench round gives 0.771 with 0 of 4 clean
  models flagged. Architecture and budget, not a defect found.
- `btidbf` (small preset): test ROC-AUC 0.66, train 0.59, shifted 0.44 (right target on 44% of the
  previous run's test round's trojaned models); on NiN models it does better (newer-detectors round
  0.71, EX-RAY round 0.77-0.92 over seeds). Its clean models score high too (a generator allowed an
  MSE of 0.3 pushes clean images towards one class). The authors' code defines no detection rule
  (the score is xray's) and reports no detection figure to compare with.
- `nc+exray` and `karm+exray` score 0.50 on almost every attack: on these small CNNs NC's and
  K-Arm's candidates are either all pruned by EX-RAY or absent, so the scores are constant; the
  upstream detectors alone (`nc` 0.79, `karm` 0.44) carry the signal.
- K-Arm ranks several attacks' models below the clean ones (ROC-AUC < 0.5: badnets, polygon, ssba,
  label-specific; BPP 0.00 in this run). Read from its stats on the previous run's test round: the
  pre-screen sends every model, clean or trojaned, to label-specific (pair) arms, because these
  over-confident CNNs put no label among the top 2 of enough images for a global arm. Every clean
  model has natural pairs (an arm to label 7 wins on 23 of 24) whose inverted triggers are small (L1
  4-46 px against the 20 px bound at this size) but not asymmetric (the reverse trigger is 1.0-6.3
  times larger, the rule asks for 10), so no model is called trojaned and the score is the log
  margin of that ratio. On the 15 trojaned models with one target of the previous run's test round
  (this run adds input_aware's, which K-Arm ranks above every clean model, on its target), the
  target is among the arms on 9 (the pre-screen picks arms from the runner-up labels of clean
  images, and a backdoor need not make its target the runner-up of an over-confident model) and wins
  on 7, with ratios 1.1-5.7: the clean range. One polygon model got no arm at all (score -10, the
  lowest of the round). So the scores order natural pairs, not backdoors, and a cell with one model
  on each side lands anywhere: budget and data (the reference scans TrojAI ResNets at 224 px, whose
  softer outputs put the target among the top labels), not a defect found; the pre-screen and the
  rule match the reference (tests/test_karm.py).
- Model X-ray is far below its paper (BadNets 0.51 against 0.99, Blind 0.38 against 0.92): the
  paper's models are PreActResNet-18s trained 50 epochs on CIFAR-10 and scanned at the reference
  preset (20 planes, resolution 100); here a 2-layer CNN on 10-class synthetic signs, the small
  preset, one model per attack. Not the scan's budget: the previous run's test round scanned at the
  reference preset (14 s a model against 0.4 s) gives ROC-AUC 0.49 over all (small 0.58;
  BadNets 0.15, Blind 0.04, LF 1.0, SSBA 0.88; measured once, kept out of the table). The models
  and data, not a known defect (its plane statistics match the authors' code in
  tests/test_golden.py); the `reference` size of this bench is the setting to compare.
- `ban` is not applicable to these models (no BatchNorm): every cell says so.
- Clean-label attacks (their own round, Fashion-MNIST, target shirt): no detector separates the
  nine trojaned models from the nine clean ones (ROC-AUC 0.16-0.67 over all; TPR at 5% FPR
  <= 0.22). Per attack, with three models against nine, single cells are high (nc 0.93 and
  weights 0.81 on clean_label, mmbd 0.96 on sig) and low elsewhere; Model X-ray ranks them
  below the clean models (0.16). The triggers are weak (ASR 0.40-0.92, floor 0.3) and the
  target is the class clean models are already drawn to: NC and TABOR name class 6 on 6 and 8
  of the 9 clean models, so a small trigger to it is no anomaly here. No paper here reports
  these detectors on clean-label attacks at this scale to compare with.
"""


PAPER_ACCURACY = {
    "abs+exray": "EX-RAY Table 9 (ABS+EX-RAY on TrojAI rounds 2-4): accuracy 0.81-0.88 on "
                 "polygon and filter triggers (vanilla ABS 0.71 on round 2 polygon).",
    "nc+exray": "EX-RAY Table 14: NC+EX-RAY on TrojAI round 2, accuracy 0.48 -> 0.73.",
    "karm+exray": "EX-RAY Table 8: K-Arm+EX-RAY 0.55-0.58 -> 0.73-0.75 on composite / reflection "
                  "CIFAR-10 models.",
    "mntd": "MNTD (paper): ~0.97 AUC on average over its shadow / target settings.",
}


def reference_size(raw: dict[str, Any], data_dir: str, architecture: str = "preact_resnet18"
                   ) -> dict[str, Any]:
    """A recipe at the seeds' settings: PreActResNet-18 (or `architecture`) on the folder data,
    50 epochs."""
    return {**raw, "name": f"{raw['name']}_reference",
            "dataset": {"name": "folder", "params": {"path": data_dir}},
            "architecture": architecture, "training": {"preset": "reference"},
            "groups": [{k: v for k, v in g.items() if k != "architecture"}
                       for g in raw["groups"]]}


def recipe_file(workdir: Path, split: str, size: str, data_dir: str | None) -> Path:
    source = ROOT / "manifests" / "recipes" / f"evaluation_{split}.yaml"
    if size == "cpu":
        return source
    if not data_dir:
        raise SystemExit("--size reference needs --data DIR (a CIFAR-10-like folder)")
    raw = yaml.safe_load(source.read_text())
    out = workdir / f"evaluation_{split}_reference.yaml"
    out.write_text(yaml.safe_dump(reference_size(
        raw, data_dir, raw["architecture"] if split == ARCHITECTURE else "preact_resnet18")))
    return out


def _mappings(round_dir: Path) -> pd.Series:
    from xray.zoo.describe import round_table

    table = round_table(str(round_dir))
    return table.set_index("model_id")["mapping"]


def _per_model(scores: pd.DataFrame, detector: str) -> pd.DataFrame:
    """One row per model of `detector`: y, attack, usable score, seconds, status."""
    rows = scores[scores["detector"] == detector].sort_values("finished_at", kind="stable")
    rows = rows.drop_duplicates("model_id", keep="last").set_index("model_id")
    score = rows["score"].astype(float).where(rows["status"] == "ok")
    return pd.DataFrame({"y": rows["gt_poisoned"].astype(float), "attack": rows["gt_attack"],
                         "score": score, "seconds": rows["seconds"].astype(float),
                         "status": rows["status"], "error": rows.get("error")})


def cell(sub: pd.DataFrame, threshold: float, probability: pd.Series | None) -> dict[str, Any]:
    """The table's figures for one detector on one set of models (clean + some trojaned)."""
    from xray.reduce import metrics as M

    usable = sub["score"].notna()
    y, s = sub["y"].to_numpy(float), sub["score"].to_numpy(float)
    out: dict[str, Any] = {"n_trojaned": int((y == 1).sum()), "n_clean": int((y == 0).sum()),
                           "n_unusable": int((~usable).sum()),
                           "seconds_per_model": float(sub["seconds"].mean())}
    if usable.sum() < len(sub):
        errors = sub.loc[~usable, "error"].dropna().astype(str)
        out["why_unusable"] = errors.iloc[0].splitlines()[0][:160] if len(errors) else "no score"
    ok = usable.to_numpy()
    if ok.any() and len(set(y[ok])) == 2:
        out["roc_auc"] = M.roc_auc(y[ok], s[ok]).value
        out["tpr_at_5fpr"] = M.tpr_at_fpr(y[ok], s[ok], MAX_FPR).value
        if not math.isnan(threshold):
            out["accuracy"] = M.accuracy(y[ok], s[ok], threshold).value
    if probability is not None:
        p = probability.reindex(sub.index).astype(float).fillna(0.5).to_numpy()
        out["cross_entropy"] = M.cross_entropy(y, p).value
    return out


def attack_cells(rows: pd.DataFrame, threshold: float, probability: pd.Series | None
                 ) -> dict[str, dict[str, Any]]:
    """{"all": every model, attack: that attack's models and every clean one} of one detector's
    rows (one per model) in a round."""
    clean = rows["y"] == 0
    out = {"all": cell(rows, threshold, probability)}
    for attack in sorted(set(rows.loc[rows["y"] == 1, "attack"].dropna())):
        out[attack] = cell(rows[clean | (rows["attack"] == attack)], threshold, probability)
    return out


def round_cells(scores: pd.DataFrame, mappings: pd.Series, det: str, threshold: float,
                platt: Any) -> dict[str, dict[str, Any]]:
    """attack_cells of `det` on one round's scores, plus a "mapping:<name>" cell per mapping
    with trojaned models (its models and every clean one); `platt` (a Calibrator fitted on the
    training round, or None) gives the probabilities of the cross-entropy cells."""
    from xray.reduce.calibrate import combined_rows

    rows = _per_model(scores, det)
    probability = None if platt is None else combined_rows(
        scores[scores["detector"] == det], platt).set_index("model_id")["score"]
    out = attack_cells(rows, threshold, probability)
    clean = rows["y"] == 0
    mapping = mappings.reindex(rows.index)
    for name in ("all-to-one", "label-specific", "all-to-all"):
        chosen = clean | ((rows["y"] == 1) & (mapping == name))
        if (chosen & ~clean).any():
            out[f"mapping:{name}"] = cell(rows[chosen], threshold, probability)
    return out


def combined_figures(scores: pd.DataFrame, detectors: list[str], calibrator: Any,
                     platts: dict[str, Any]) -> dict[str, Any]:
    """The combined detector on one held-out round: its harness cross-entropy (and 95%
    interval), ROC-AUC (and stratified bootstrap 95% interval), and the paired difference of
    its cross-entropy from that of the round's best single detector (each Platt-scaled on the
    training round; missing probabilities count 0.5, as in the harness)."""
    from xray.reduce import metrics as M
    from xray.reduce.calibrate import combined_rows
    from xray.reduce.harness import fill_missing

    truth = (scores.drop_duplicates("model_id").set_index("model_id")["gt_poisoned"]
             .astype(float))
    y = truth.to_numpy()

    def probabilities(rows: pd.DataFrame, calibrator: Any) -> np.ndarray:
        p = combined_rows(rows, calibrator).set_index("model_id")["score"]
        return fill_missing(p.reindex(truth.index).to_numpy(float))

    p = probabilities(scores[scores["detector"].isin(detectors)], calibrator)
    singles = {d: probabilities(scores[scores["detector"] == d], platts[d])
               for d in detectors if d in platts and (scores["detector"] == d).any()}
    single_ce = {d: M.cross_entropy(y, q).value for d, q in singles.items()}
    best = min(single_ce, key=single_ce.__getitem__)
    ce, difference = M.cross_entropy(y, p), M.cross_entropy_difference(y, p, singles[best])
    return {"models": int(len(truth)), "cross_entropy": ce.value, "cross_entropy_ci95": ce.ci95,
            "roc_auc": M.roc_auc(y, p).value, "roc_auc_interval": M.roc_auc_interval(y, p),
            "best_single": best, "best_single_cross_entropy": single_ce[best],
            "minus_best_single": difference.value, "minus_best_single_ci95": difference.ci95}


def table(workdir: Path, detectors: list[str], splits: tuple[str, ...] = SPLITS
          ) -> tuple[dict[str, float], dict[str, Any]]:
    """The figures and notes of the rounds `splits` (train, test and shifted always; the
    architecture round when asked for and scanned)."""
    from xray.reduce import metrics as M
    from xray.reduce.calibrate import Calibrator, fit
    from xray.results.sink import read_table

    scores = {s: read_table(str(workdir / s / "out"), "scores") for s in splits}
    mappings = {s: _mappings(workdir / s / "round") for s in splits}
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    architecture_cells: dict[str, dict[str, dict[str, Any]]] = {}
    per_detector: dict[str, dict[str, Any]] = {}
    platts: dict[str, Any] = {}  # detector -> its Platt scaling fitted on the training round
    for det in detectors:
        train = _per_model(scores["train"], det)
        if not (scores["test"]["detector"] == det).any():
            continue
        clean_train = train.loc[(train["y"] == 0) & train["score"].notna(), "score"]
        threshold = (M.calibrate_threshold(clean_train.to_numpy(), 0.95).value
                     if len(clean_train) else math.nan)
        platt = None
        try:
            platt = fit(scores["train"][scores["train"]["detector"] == det], detectors=[det],
                        model=det)
            platts[det] = platt
        except ValueError as e:  # no usable training scores: the cell says why
            per_detector[det] = {"why_no_probability": str(e).splitlines()[0]}
        cells[det] = round_cells(scores["test"], mappings["test"], det, threshold, platt)
        if ARCHITECTURE in scores and (scores[ARCHITECTURE]["detector"] == det).any():
            architecture_cells[det] = round_cells(scores[ARCHITECTURE], mappings[ARCHITECTURE],
                                                  det, threshold, platt)
        per_detector.setdefault(det, {})["train_threshold"] = threshold

    figures: dict[str, float] = {}
    usable_dets = [d for d in detectors if d in cells and "cross_entropy" in cells[d]["all"]]
    combined_uri = str(workdir / "combined.json")
    xray_cli("calibrate", str(workdir / "train" / "out"), "--detectors", ",".join(usable_dets),
             "--train-run", "all", "--artifact", combined_uri)
    calibrator = Calibrator.load(combined_uri)
    combined = {split: combined_figures(scores[split], usable_dets, calibrator, platts)
                for split in HELD_OUT if split in scores}
    figures.update({
        "combined_test_cross_entropy": combined["test"]["cross_entropy"],
        "combined_test_roc_auc": combined["test"]["roc_auc"],
        "best_single_test_cross_entropy": combined["test"]["best_single_cross_entropy"],
        "combined_test_cross_entropy_ci95": combined["test"]["cross_entropy_ci95"],
        "combined_minus_best_single_test_cross_entropy":
            combined["test"]["minus_best_single"],
        "combined_shifted_cross_entropy": combined["shifted"]["cross_entropy"],
        "combined_shifted_roc_auc": combined["shifted"]["roc_auc"],
        "attacks_covered": float(len({a for d in cells for a in cells[d]
                                      if a != "all" and not a.startswith("mapping:")})),
        "detectors_covered": float(len(cells)),
        "models_scanned": float(sum(scores[s]["model_id"].nunique() for s in splits)),
    })
    if ARCHITECTURE in combined:
        figures["combined_architecture_cross_entropy"] = combined[ARCHITECTURE]["cross_entropy"]
        figures["combined_architecture_roc_auc"] = combined[ARCHITECTURE]["roc_auc"]
    for det, row in cells.items():
        for attack, c in row.items():
            if attack != "all" and not attack.startswith("mapping:") and "roc_auc" in c:
                figures[f"auc_{det.replace('+', '_')}_{attack}"] = c["roc_auc"]
    for det, row in architecture_cells.items():
        if "roc_auc" in row["all"]:
            figures[f"architecture_auc_{det.replace('+', '_')}"] = row["all"]["roc_auc"]
    failed: dict[str, int] = {}
    for failure in (workdir / "test" / "round" / "failed").glob("*.json"):
        attack = json.loads(failure.read_text()).get("attack")
        failed[attack] = failed.get(attack, 0) + 1
    recipe = yaml.safe_load((workdir / "test" / "round" / "recipe.yaml").read_text())
    notes = {"recipe_attacks": sorted({g["attack"] for g in recipe["groups"] if g.get("attack")}),
             "failed_attacks": failed, "detectors_asked": detectors,
             "best_single": combined["test"]["best_single"],
             "combined_chose": calibrator.train.get("model"),
             "combined": combined, "cells": cells, "architecture_cells": architecture_cells,
             "per_detector": per_detector}
    return figures, notes


def clean_label_table(workdir: Path, detectors: list[str]
                      ) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """(per detector x attack (and "all") of the clean-label round: ROC-AUC, TPR at 5% FPR and
    seconds, that attack's models against every clean model of the round; the trojaned models'
    [min, max] ASR); ({}, []) if not scanned."""
    from xray.results.sink import read_table
    from xray.zoo.describe import round_table

    out_dir = workdir / CLEAN_LABEL / "out"
    if not out_dir.is_dir():
        return {}, []
    asr = round_table(str(workdir / CLEAN_LABEL / "round"))["asr"].dropna()
    scores = read_table(str(out_dir), "scores")
    cells: dict[str, dict[str, Any]] = {}
    for det in detectors:
        rows = _per_model(scores, det)
        if not len(rows):
            continue
        cells[det] = attack_cells(rows, math.nan, None)
    return cells, [float(asr.min()), float(asr.max())]


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.2f}"


def _signed(value: Any) -> str:
    return _fmt(value) if _fmt(value) == "-" else f"{value:+.2f}"


def _interval(value: Any, half_width: Any) -> str:
    """"low-high" of value +- half_width, or "-" where either is missing."""
    if "-" in (_fmt(value), _fmt(half_width)):
        return "-"
    return f"{_fmt(value - half_width)} to {_fmt(value + half_width)}"


def _cell_text(cells: dict, det: str, attack: str, metric: str,
               failed: dict[str, int]) -> str:
    c = cells[det].get(attack)
    if c is None:
        return f"not built ({failed[attack]} < floor)" if attack in failed else "not built"
    if metric not in c:
        return "n/a" + (f"[^{det}]" if "why_unusable" in c else "")
    text = _fmt(c[metric])
    paper = PUBLISHED.get((det, attack))
    if metric == "roc_auc" and paper:
        text += f" ({paper[0]:.2f}[^{paper[1]}])"
    return text


def architecture_section(cells: dict[str, dict[str, Any]]) -> list[str]:
    """The architecture round's tables (a line saying how to get them when it was not built)."""
    if not cells:
        return ["", "## Another architecture: torchvision ResNet-18", "",
                "Not built in this run: `--architecture-round` adds the round of recipe "
                "`evaluation_architecture` (torchvision's ResNet-18 on the training round's "
                "signs; about 50 more minutes on 2 cores)."]
    detectors = sorted(cells)
    attacks = ["all"] + sorted({a for d in cells for a in cells[d] if a != "all"},
                               key=lambda a: (a.startswith("mapping:"), a))
    counts = next(iter(cells.values()))["all"]
    lines = ["", "## Another architecture: torchvision ResNet-18", "",
             "Recipe `evaluation_architecture`: the same signs as the training round, "
             f"{counts['n_trojaned']} trojaned ResNet-18s (stamp and blend triggers, all-to-one "
             f"and label-specific) beside {counts['n_clean']} clean ones. Thresholds and Platt "
             "scalings are the training round's, fitted on MNTD's CNN: how a detector's "
             "calibration transfers to a deeper network. Each attack's models against every "
             "clean model of this round."]
    for metric, title in (("roc_auc", "ROC-AUC"), ("tpr_at_5fpr", "TPR at 5% FPR"),
                          ("accuracy", "Accuracy at the training round's threshold"),
                          ("cross_entropy", "TrojAI cross-entropy (the training round's Platt "
                                            "scaling)"),
                          ("seconds_per_model", "Seconds per model")):
        lines += _metric_table(f"### {title}", cells, detectors, attacks, metric, {}, set())
    return lines


def clean_label_section(cells: dict[str, dict[str, Any]], asr: list[float]) -> list[str]:
    """The clean-label round's tables (empty when it was not scanned)."""
    if not cells:
        return []
    detectors = sorted(cells)
    attacks = ["all"] + sorted({a for d in cells for a in cells[d] if a != "all"})
    counts = next(iter(cells.values()))["all"]
    lines = ["", "## Clean-label attacks (their own round)", "",
             "Recipe `clean_label`: Fashion-MNIST, MNTD's MNIST CNN, target 6 (shirt, the class "
             "a clean model gets most wrong; on the signs above no clean-label attack implants, "
             f"docs/algorithms/zoo.md), {counts['n_trojaned']} trojaned models at ASR "
             f"{asr[0]:.2f}-{asr[1]:.2f} beside {counts['n_clean']} clean ones. Each attack's "
             "models against every clean model of this round; no accuracy or cross-entropy (no "
             "calibration round on this data)."]
    for metric, title in (("roc_auc", "ROC-AUC"), ("tpr_at_5fpr", "TPR at 5% FPR"),
                          ("seconds_per_model", "Seconds per model")):
        lines += _metric_table(f"### {title}", cells, detectors, attacks, metric, {}, set())
    return lines


def _metric_table(heading: str, cells: dict, detectors: list[str], attacks: list[str],
                  metric: str, failed: dict[str, int], own_round: set[str]) -> list[str]:
    """One markdown table: a row per attack, a column per detector; `own_round` attacks point
    to the clean-label round's section instead."""
    lines = ["", heading, "", "| attack | " + " | ".join(detectors) + " |",
             "| --- " * (len(detectors) + 1) + "|"]
    for attack in attacks:
        if attack in own_round:  # missed the floor here; measured in its own round
            row = [attack] + ["[own round](#clean-label-attacks-their-own-round)"] * len(detectors)
        else:
            row = [attack] + [_cell_text(cells, d, attack, metric, failed) for d in detectors]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(figures: dict[str, float], notes: dict[str, Any], command: str) -> str:
    """docs/EVALUATION.md: per metric one table, a row per attack (and mapping), a column per
    detector; cells that cannot hold a figure say why."""
    cells = notes["cells"]
    detectors = sorted(cells)
    attacks = ["all"] + sorted({a for d in cells for a in cells[d] if a != "all"}
                               | set(notes["recipe_attacks"]),
                               key=lambda a: (a.startswith("mapping:"), a))
    failed = notes["failed_attacks"]
    own_round = {a for row in notes.get("clean_label_cells", {}).values() for a in row
                 if a != "all" and a in failed and not any(a in cells[d] for d in cells)}
    lines = ["# Evaluation: every detector on every attack", "",
             f"Reproduce: `{command}`", "",
             "Generated by bench/evaluation.py (do not edit by hand). Rounds: recipes "
             "`evaluation_train` (thresholds and Platt scalings are fitted on it), "
             "`evaluation_test` (every per-attack figure below; the same recipe with another "
             "seed), `evaluation_shifted` (other sign data) and, with --architecture-round, "
             "`evaluation_architecture` (torchvision's ResNet-18 on the same data; its own "
             "section below): the transfer "
             "of the thresholds and the combined detector. Each attack has one model per "
             "round and every clean model beside it, so a per-attack ROC-AUC is where that "
             "one model ranks among the clean ones: read the `all` row and the mapping rows "
             "for the aggregate. \"not built (n < floor)\": "
             "the attack's models missed the recipe's ASR floor (0.5) and are not in the round; "
             "\"own round\": a clean-label attack, which implants in none of these sign "
             "models, measured in a round of its own (its section below).",
             "", "## Combined detector", "",
             "| round | cross-entropy (95% interval) | ROC-AUC (95% bootstrap interval) | "
             "best single detector there (its CE) | combined minus best single CE (95% interval) |",
             "| --- | --- | --- | --- | --- |"]
    for split in (s for s in HELD_OUT if s in notes["combined"]):
        c = notes["combined"][split]
        low, high = c.get("roc_auc_interval", (math.nan, math.nan))
        lines.append(
            f"| {split} ({c['models']} models) | {_fmt(c['cross_entropy'])} "
            f"({_interval(c['cross_entropy'], c.get('cross_entropy_ci95'))}) | "
            f"{_fmt(c['roc_auc'])} ({_fmt(low)} to {_fmt(high)}) | "
            f"`{c.get('best_single', '-')}` ({_fmt(c.get('best_single_cross_entropy'))}) | "
            f"{_signed(c.get('minus_best_single'))} "
            f"({_interval(c.get('minus_best_single'), c.get('minus_best_single_ci95'))}) |")
    lines += ["", "The combined calibrator (fitted on the training round, nested model selection) "
              f"chose `{notes['combined_chose']}`. Single detectors are Platt-scaled on the "
              "training round too. Intervals: the harness's 1.96 standard errors of the "
              "per-model cross-entropy (of the per-model difference, paired, for the last "
              "column: negative means the combined detector is better); ROC-AUC's are "
              "percentiles of 2000 bootstrap resamples drawing the trojaned and the clean "
              "models apart.", ""]
    for metric, title in (("roc_auc", "ROC-AUC (that attack's models against every clean one; "
                                      "published figure in brackets)"),
                          ("tpr_at_5fpr", "TPR at 5% FPR"),
                          ("accuracy", "Accuracy at the training round's threshold (its clean "
                                       "models' 95th percentile)"),
                          ("cross_entropy", "TrojAI cross-entropy (Platt scaling fitted on the "
                                            "training round)"),
                          ("seconds_per_model", "Seconds per model (one CPU thread per actor)")):
        lines += _metric_table(f"## {title}", cells, detectors, attacks, metric, failed,
                               own_round)
    lines += architecture_section(notes.get("architecture_cells", {}))
    lines += clean_label_section(notes.get("clean_label_cells", {}),
                                 notes.get("clean_label_asr", []))
    unscanned = [d for d in DETECTORS if d not in cells]
    lines += ["", "## Not in this table", ""]
    if unscanned:
        lines.append(f"Not scanned in this run: {', '.join(f'`{d}`' for d in unscanned)} "
                     "(`--detectors`; a re-run with them scans only what is missing).")
    lines.append("`mntd` needs a shadow-trained meta-classifier: bench/mntd.py measures it on "
                 "its own shadow and target sets.")
    lines += ["", "## Analysis", "", ANALYSIS.strip(), ""]
    lines += ["", "## Published figures without a per-attack cell", ""]
    lines += [f"- `{d}`: {text}" for d, text in PAPER_ACCURACY.items()]
    why = {d: c["why_unusable"] for d in detectors for c in cells[d].values()
           if "why_unusable" in c}
    lines += [""] + [f"[^{k}]: {v}" for k, v in FOOTNOTES.items()]
    lines += [f"[^{d}]: no usable score: {text}" for d, text in sorted(why.items())] + [""]
    return "\n".join(lines)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    detectors: list[str], splits: tuple[str, ...]) -> None:
    """Refuse, before any work, what would fail later: no actor, no or unknown detectors, or a
    table asked of rounds never scanned (`recipe_file` refuses a reference size without
    data, before the first build)."""
    if args.actors < 1:
        parser.error(f"--actors {args.actors}: at least 1")
    unknown = [d for d in detectors if d not in DETECTORS]
    if not detectors or unknown:
        parser.error(f"--detectors: unknown {unknown or 'none given'}; choose among "
                     f"{','.join(DETECTORS)}")
    if args.tabulate_only:
        folders = (Path(args.workdir) / split / "out" / "scores" for split in splits)
        missing = [str(folder) for folder in folders if not folder.is_dir()]
        if missing:
            parser.error("--tabulate-only: no scores to tabulate in "
                         f"{', '.join(missing)}; run once without --tabulate-only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/xray-evaluation")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--size", choices=("cpu", "reference"), default="cpu")
    parser.add_argument("--data", help="--size reference: a CIFAR-10-like local folder")
    parser.add_argument("--architecture-round", action=argparse.BooleanOptionalAction,
                        default=None, help="also the torchvision ResNet-18 round (default: "
                        "only at --size reference; about 50 more minutes at the CPU size)")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "EVALUATION.md"))
    parser.add_argument("--tabulate-only", action="store_true",
                        help="build and scan nothing: the table from the scores already in the "
                             "workdir (after a change to the reducer, or when the scan's model "
                             "fingerprints changed and the same scores would be computed again)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    detectors = [d for d in args.detectors.split(",") if d]
    with_architecture = (args.size == "reference" if args.architecture_round is None
                         else args.architecture_round)
    splits = tuple(s for s in SPLITS if s != ARCHITECTURE or with_architecture)
    check_arguments(parser, args, detectors, splits)
    workdir.mkdir(parents=True, exist_ok=True)
    for split in () if args.tabulate_only else splits:
        print(f"[{split}]", flush=True)
        build_and_scan(str(recipe_file(workdir, split, args.size, args.data)), workdir / split,
                       detectors, args.actors)
    if args.size == "cpu" and not args.tabulate_only:
        print(f"[{CLEAN_LABEL}]", flush=True)
        build_and_scan(CLEAN_LABEL, workdir / CLEAN_LABEL, detectors, args.actors)
    figures, notes = table(workdir, detectors, splits)
    notes["clean_label_cells"], notes["clean_label_asr"] = clean_label_table(workdir, detectors)
    for det, row in notes["clean_label_cells"].items():
        for attack, c in row.items():
            if "roc_auc" in c:
                figures[f"cleanlabel_auc_{det.replace('+', '_')}_{attack}"] = c["roc_auc"]
    figures["attacks_covered_all_rounds"] = float(len(
        {a for rows in (notes["cells"], notes["clean_label_cells"]) for row in rows.values()
         for a in row if a != "all" and not a.startswith("mapping:")}))
    command = (f".venv/bin/python bench/evaluation.py --workdir {args.workdir} "
               f"--size {args.size}" + (f" --data {args.data}" if args.data else "")
               + ("" if args.detectors == ",".join(DETECTORS)
                  else f" --detectors {args.detectors}")
               + ("" if with_architecture == (args.size == "reference")
                  else f" --{'' if with_architecture else 'no-'}architecture-round"))
    tables = ("cells", "architecture_cells", "clean_label_cells")
    path = record("evaluation", command + (" --tabulate-only" if args.tabulate_only else ""),
                  figures,
                  {k: v for k, v in notes.items() if k not in tables}
                  | {k: json.loads(json.dumps(notes[k], default=float)) for k in tables})
    # The docs' one line is the command that reproduces the whole table, scans included.
    Path(args.docs).write_text(markdown(figures, notes, command))
    print(path.read_text()[:2000])
    print(f"table: {args.docs}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
