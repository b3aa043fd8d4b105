"""The composed scanners (nc+exray, abs+exray, karm+exray) on the MNTD target round (MNIST, 10
labels, 2 examples per class: 6 clean, 3 BadNets, 3 MNTD-M patch models), one scan per model
shared with the vanilla negative controls of test_nc and test_abs.

EX-RAY only ever removes triggers (a natural one scores 0), so on any round a composed scanner
flags no clean model its upstream did not flag, never scores above the best REASR of the
candidates its upstream reports, and proves its work with more steps than its upstream's when
it examined a trigger. The negative control (clean models below trojaned ones) is asserted
where the round lets it mean something:

- nc+exray: measured ROC-AUC 0.75, clean all 0 (NC alone flags 2 clean models), 3 trojaned
  models flagged on their true target.
- abs+exray: not here. This round's MNTD CNN splits at a 16-channel block, too narrow for
  EX-RAY's sparse masks (manifests/recipes/exray.yaml): it pruned both flagged BadNets triggers
  and kept a clean model's label-8 trigger (measured ROC-AUC 0.42). Its control is on the NiN
  round (`nin_control_round`, 2 clean, 2 BadNets) with the EX-RAY round's trigger bound
  (`max_size_224` 4000, as bench/exray.py; the paper's bound for its hidden-trigger rounds):
  ABS reaches REASR 1.0 on every model there, clean ones included, and EX-RAY prunes every
  clean model's triggers and keeps an injected one on each trojaned model's true target.
- karm+exray: not here, where K-Arm calls no model trojaned, so there is no arm to examine
  (every score 0). Its control is on a NiN round (`nin_karm_scans`, 2 clean, 2 BadNets) where
  K-Arm calls one trojaned model trojaned: EX-RAY keeps that trigger (score 1.0 on target 4),
  both clean models score 0.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from xray.reduce.metrics import roc_auc

RUN_BOUND = 0.9  # the small presets' run_bound: a composed score >= it flags the model


def _auc(labels, scores) -> float:
    auc = roc_auc(np.array(labels), np.array(scores))
    return float(auc[0] if isinstance(auc, tuple) else auc)


def _split(scans):
    clean = [out for r, out in scans if not r.poisoned]
    trojaned = [(r, out) for r, out in scans if r.poisoned]
    assert len(clean) == 6 and len(trojaned) == 6
    return clean, trojaned


@pytest.mark.parametrize("name", ["nc+exray", "abs+exray", "karm+exray"])
def test_pruning_only_removes_and_proves_its_work(mnist_composed_scans, name):
    scans = mnist_composed_scans(name)
    clean, trojaned = _split(scans)
    for _, out in scans:
        stats = out.stats
        assert isinstance(stats["steps"], int) and stats["steps"] >= stats["upstream"]["steps"]
        assert stats["steps"] > stats["upstream"]["steps"] or stats["tested"] == 0
        assert out.score <= stats["best_reasr_upstream"] + 1e-9
        assert stats["pruned"] <= stats["tested"] <= stats["selected"]
    flagged = sum(o.score >= RUN_BOUND for o in clean)
    flagged_upstream = sum(o.stats["best_reasr_upstream"] >= RUN_BOUND for o in clean)
    assert flagged <= flagged_upstream
    scores = [o.score for o in clean] + [o.score for _, o in trojaned]
    print(name, json.dumps({"auc": round(_auc([0] * 6 + [1] * 6, scores), 3),
                            "clean": [round(o.score, 3) for o in clean],
                            "trojaned": [round(o.score, 3) for _, o in trojaned],
                            "flagged_clean": flagged, "flagged_clean_upstream": flagged_upstream}))


def test_nc_exray_negative_control_clean_models_score_below_trojaned(mnist_composed_scans):
    clean, trojaned = _split(mnist_composed_scans("nc+exray"))
    scores = [o.score for o in clean] + [o.score for _, o in trojaned]
    auc = _auc([0] * len(clean) + [1] * len(trojaned), scores)
    assert auc >= 0.7, (auc, scores)
    assert not any(o.score >= RUN_BOUND for o in clean), scores
    on_target = sum(o.score >= RUN_BOUND and o.target == r.target for r, o in trojaned)
    assert on_target >= 2, [(r.target, o.target, o.score) for r, o in trojaned]


def test_karm_exray_negative_control_clean_models_score_below_trojaned(nin_karm_scans):
    clean = [out for r, out in nin_karm_scans if not r.poisoned]
    trojaned = [(r, out) for r, out in nin_karm_scans if r.poisoned]
    assert len(clean) == 2 and len(trojaned) == 2
    assert max(o.score for o in clean) < max(o.score for _, o in trojaned)
    assert not any(o.score >= RUN_BOUND for o in clean), [o.score for o in clean]
    kept = [(r, o) for r, o in trojaned if o.score >= RUN_BOUND]
    assert kept and all(o.target == r.target for r, o in kept), [
        (r.target, o.target, o.score) for r, o in trojaned]
    for _, out in nin_karm_scans:  # it examined exactly K-Arm's trojaned arms
        assert out.stats["selected"] == int(bool(out.stats["upstream"]["trojaned"]))


def test_abs_exray_negative_control_clean_models_score_below_trojaned(nin_control_round):
    """Measured (seed 0, about 13 s a model): ABS alone scores 1.0 on all four; abs+exray
    scores the clean models 0.875, 0.875 (every tested trigger pruned, 6 and 4 of them) and the
    trojaned ones 1.0, 1.0 on their true targets (4 of 8 and 3 of 9 tested triggers kept, all
    injected). With ABS's default bound (1600) no patch trigger of the trojaned models reaches
    REASR 0.9, only colour filters, which EX-RAY prunes: no model is flagged
    (docs/FIDELITY.md, "abs+exray")."""
    from xray import detectors

    from _detector_checks import scan_round

    detector = detectors.build("abs+exray", {"max_size_224": 4000.0}, preset="small")
    scans = scan_round(nin_control_round[0], detector)
    clean = [out for r, out in scans if not r.poisoned]
    trojaned = [(r, out) for r, out in scans if r.poisoned]
    assert len(clean) == 2 and len(trojaned) == 2
    print("abs+exray nin control:", json.dumps(
        [(r.poisoned, r.target, o.target, o.score, o.stats["upstream_score"], o.stats["tested"],
          o.stats["pruned"]) for r, o in scans]))
    for out in clean:  # ABS flags it; EX-RAY examined its triggers and pruned them all
        assert out.stats["tested"] > 0 and out.stats["pruned"] == out.stats["tested"], out.stats
        assert out.score < RUN_BOUND
    for record, out in trojaned:  # an injected trigger survives, on the true target
        assert out.score >= RUN_BOUND and out.target == record.target, (record.target, out.target)
        kept = [t for t in out.triggers if t.get("exray_tested") and not t["exray_natural"]]
        assert kept and all(t["target"] == record.target for t in kept), kept
    assert max(o.score for o in clean) < min(o.score for _, o in trojaned)


CLOCK_READINGS = {"elapsed_s", "started_at", "finished_at", "worker", "upstream_shared"}


def _without_timing(value):
    """A row's figures without its clock readings (seconds, timestamps, worker)."""
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items()
                if "seconds" not in k and k not in CLOCK_READINGS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _parsed(row):
    return _without_timing({**{k: v for k, v in row.items() if k != "stats_json"},
                            "stats": json.loads(row["stats_json"])})


def _rows(out):
    scores = {r["detector"]: _parsed(r) for r in out["scores"]}
    triggers = sorted((_parsed(r) for r in out["triggers"]),
                      key=lambda r: (r["detector"], r["trigger_index"]))
    return scores, triggers


def test_a_scanner_and_its_composed_twin_share_one_upstream_run(tiny_round):
    """nc + nc+exray (composed first) and abs + abs+exray (vanilla first) in one scan give the
    rows each gives alone, with one upstream run per pair: the second of each pair says so
    (composed: stats upstream_shared) and takes no upstream steps of its own."""
    from xray.config import parse_config
    from xray.io.manifest import read_manifest
    from xray.scanning import scan_model

    round_dir, _ = tiny_round
    record = next(r for r in read_manifest(str(round_dir / "manifest.csv")) if r.poisoned)
    # small budgets: the test is about sharing, not about finding triggers
    nc, abs_, exray = {"steps": 12}, {"epochs": 6, "trial_epochs": 2}, {"exray_epochs": 40}
    config = parse_config({"seed": 0, "detectors": {
        "nc+exray": {"preset": "small", "params": {**nc, **exray}},
        "nc": {"preset": "small", "params": nc},
        "abs": {"preset": "small", "params": abs_},
        "abs+exray": {"preset": "small", "params": {**abs_, **exray}}}})
    together = scan_model(record, [d.build() for d in config.detectors], config)
    apart = {"scores": [], "triggers": []}
    for spec in config.detectors:
        one = scan_model(record, [spec.build()], config)
        apart["scores"] += one["scores"]
        apart["triggers"] += one["triggers"]
    assert all(r["status"] == "ok" for r in together["scores"] + apart["scores"])
    stats = {r["detector"]: json.loads(r["stats_json"]) for r in together["scores"]}
    assert stats["nc+exray"]["upstream_shared"] is False  # first of its pair: ran NC itself
    assert stats["abs+exray"]["upstream_shared"] is True  # ABS's run came from "abs"
    assert _rows(together) == _rows(apart)


def test_abs_and_karm_share_one_clean_forward_pass(tiny_round):
    """ABS's runner-up labels and K-Arm's pre-screen read the scan's one clean forward pass
    (ScanData.clean_logits): on one ScanData, as scanning hands a model's detectors, the pass
    is computed once, and each detector gives exactly what it gives on data of its own. Another
    model object gets its own pass."""
    import copy

    from xray import detectors
    from xray.detectors.base import ScanContext, ScanData
    from xray.io.examples import load_examples
    from xray.io.manifest import read_manifest
    from xray.io.model_loading import load_model

    round_dir, _ = tiny_round
    record = next(r for r in read_manifest(str(round_dir / "manifest.csv")) if r.poisoned)
    model = load_model(record)
    x, y = load_examples(record)
    scanners = [detectors.build("abs", {"epochs": 6, "trial_epochs": 2}, preset="small"),
                detectors.build("karm", preset="small")]

    def outcome(result):  # everything but wall-clock time
        stats = {k: v for k, v in result.stats.items() if k != "elapsed_s"}
        return result.score, result.target, json.dumps(stats, sort_keys=True, default=str)

    shared = ScanData(x=x, y=y, num_classes=record.num_classes)
    together = [outcome(d.score(model, shared, ScanContext(seed=0))) for d in scanners]
    assert shared.clean_forwards == 1
    apart = [outcome(d.score(model, ScanData(x=x, y=y, num_classes=record.num_classes),
                             ScanContext(seed=0))) for d in scanners]
    assert together == apart
    shared.clean_logits(copy.deepcopy(model))
    assert shared.clean_forwards == 2
