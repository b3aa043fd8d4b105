"""K-Arm: pre-screening on hand-made probabilities; the deadline; the per-arm trojaned mark; a
golden run against the authors' code on a fixed tiny linear model; real label-specific
(victim -> target) BadNets models; the negative control on a NiN round of clean and BadNets
models (shared with test_composed's karm+exray control)."""
from __future__ import annotations

import json

import pytest
import torch

from xray import detectors
from xray.detectors.base import DeadlinePassed, ScanContext, ScanData
from xray.detectors.inversion.karm import KArm, prescreen

from _detector_checks import ExpiresAfter, scan_round
from _inversion_fixtures import upstream_result

REF_KILL = ((10, 1e-9), (20, 0.3), (200, 0.8))


def golden_model_and_data(seed: int = 2021, classes: int = 5, side: int = 16,
                          per_class: int = 40, noise: float = 0.25, tau: float = 40.0,
                          lift: float = 0.0):
    """A fixed tiny model: a nearest-prototype linear classifier over 3 x 16 x 16 images (1 and
    3, 0 and 2 have close prototypes), `lift` added to label 4's bias; 40 noisy images a class."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(classes, 3, side, side, generator=g)
    protos[3] = 0.8 * protos[1] + 0.2 * protos[3]
    protos[2] = 0.7 * protos[0] + 0.3 * protos[2]
    y = torch.arange(classes).repeat_interleave(per_class)
    x = (protos[y] + noise * torch.randn(len(y), 3, side, side, generator=g)).clamp(0, 1)
    d = 3 * side * side
    lin = torch.nn.Linear(d, classes)
    with torch.no_grad():
        lin.weight.copy_(2 * tau / d * protos.flatten(1))
        lin.bias.copy_(-tau / d * (protos.flatten(1) ** 2).sum(1))
        lin.bias[4] += lift
    return torch.nn.Sequential(torch.nn.Flatten(), lin).eval(), x, y


def golden_karm(**params) -> KArm:
    base = {"epsilon": 0.0, "reasr_holdout": 0.0, "kill_rules": REF_KILL}
    return KArm(KArm.Params(**{**base, **params}))


def golden_score(karm: KArm, ctx: ScanContext | None = None, lift: float = 0.0):
    model, x, y = golden_model_and_data(lift=lift)
    return karm.score(model, ScanData(x=x, y=y, num_classes=5), ctx or ScanContext(seed=1))


# ----------------------------------------------------------------------------- pre-screen


def test_prescreen_global_pair_and_none():
    n = 40
    probs = torch.full((n, 4), 0.05)
    probs[:, 2] = 0.3
    probs[torch.arange(n), torch.arange(n) % 4] = 0.6
    probs = probs / probs.sum(1, keepdim=True)
    out = prescreen(probs)
    assert out["kind"] == "global" and out["arms"] == [(None, 2)] and out["k"] == 2
    # label 3 is runner-up only for images predicted 0 -> one pair arm 0 -> 3
    probs = torch.full((n, 4), 0.01)
    probs[torch.arange(n), torch.arange(n) % 4] = 0.9
    probs[(torch.arange(n) % 4) == 0, 3] = 0.09
    probs[(torch.arange(n) % 4) == 1, 0] = 0.09
    probs[(torch.arange(n) % 4) == 2, 1] = 0.09
    probs[(torch.arange(n) % 4) == 3, 0] = 0.09
    out = prescreen(probs, pair_share=0.9)
    assert out["kind"] == "pair" and (0, 3) in out["arms"] and (1, 0) in out["arms"]
    # k = 3 for 12 classes; each of a label's 4 images has other runners-up, so none is steady
    # (deterministic: unseeded noise made this a steady pair in about 1 run in 7)
    i = torch.arange(48)
    confident = torch.eye(12)[i % 12] * 0.9
    confident[i, (i % 12 + 1 + 3 * (i // 12)) % 12] = 0.009
    confident[i, (i % 12 + 2 + 3 * (i // 12)) % 12] = 0.008
    out = prescreen(confident)
    assert out["k"] == 3 and out["kind"] == "none" and out["arms"] == []


def test_prescreen_sums_over_top_k_only_filters_1e_8_and_keeps_label_order():
    # 12 classes (k = 3); target 11 is a runner-up for victims 0..4 (9 of 10 images in the
    # top-3: share 0.9). Victim 4's one image without 11 in its top-3 carries p(11) = 0.05:
    # summed over every image (the old rule) 4 beats 3, over the top-k only (the reference) not.
    a = {0: 0.2, 1: 0.15, 2: 0.12, 3: 0.1, 4: 0.099}
    rows = []
    for v, p_t in a.items():
        for i in range(10):
            r = torch.full((12,), 1e-4)
            r[v] = 0.5
            if i < 9:
                r[11], r[5 + v] = p_t, 0.05
            else:
                r[5 + v], r[10], r[11] = 0.2, 0.1, (0.05 if v == 4 else 0.0)
            rows.append(r)
    out = prescreen(torch.stack(rows))
    assert out["k"] == 3 and out["kind"] == "pair"
    assert [arm for arm in out["arms"] if arm[1] == 11] == [(0, 11), (1, 11), (2, 11)]
    # <= 3 victims: label order (not by sum); a runner-up at p <= 1e-8 is dropped
    n = 50
    probs = torch.full((n, 5), 1e-12)
    probs[torch.arange(n), torch.arange(n) % 5] = 0.9
    probs[(torch.arange(n) % 5) == 0, 1] = 0.01
    probs[(torch.arange(n) % 5) == 2, 1] = 0.05
    probs[(torch.arange(n) % 5) == 3, 1] = 5e-9  # in the top-2, but below the 1e-8 filter
    probs[(torch.arange(n) % 5) == 4, 0] = 0.05  # label 1 is not in every top-2: no global arm
    out = prescreen(probs)
    assert out["arms"] == [(4, 0), (0, 1), (2, 1)]  # target 1: victims 0, 2 (sums 0.1 < 0.5)


# ----------------------------------------------------------------------------- golden


def test_golden_against_the_authors_code():
    # Figures from the authors' code, PurduePAML/K-ARM_Backdoor_Optimization @ 8c837fd386f64f0cb
    # 2a1021e2d94a327339187ff: main.py's flow (Pre_Screening, identify_trigger_type, K_Arm_Opt
    # 'forward' then 'backward', trojan_det) run in /tmp on golden_model_and_data(), adapted only
    # to run there: CPU device, num_workers 0, dataset.CustomDataSet replaced by an in-memory one
    # (same label filter, images in index order), the initial pattern / mask drawn from
    # ScanContext(seed).generator("karm/init") / ("karm/sym") instead of the global RNG, the
    # central square (side 4 at 16 px), 2500 (first_best_reg), beta 1e4 and the bounds scaled by
    # the area (16 x 16 / 224 x 224), epsilon_for_bandits 0; args step / rounds as below.
    # Pair (seed 1, step 300, rounds 5): arms [[2,0],[3,1],[0,2],[4,2],[1,3]] (victim, target),
    # total_times [12, 11, 41, 11, 47] (arm 0's 12th pull: after arm 2's warm-up the reference
    # goes to the first arm without a trigger, the killed arm 0), best_reg [1e10, 1e10,
    # 45.51560592651367, 1e10, 9.343682289123535], target 3 victim 1; backward: 37 pulls
    # (times > rounds), sym L1 81.03167724609375; 'benign'.
    out = golden_score(golden_karm(budget=300, rounds=5), ScanContext(seed=1))
    s = out.stats
    assert s["prescreen"] == "pair" and s["top_k"] == 2
    assert s["arms"] == [[2, 0], [3, 1], [0, 2], [4, 2], [1, 3]]
    assert s["pulls_per_arm"] == [12, 11, 41, 11, 47] and s["stop_reason"] == "converged"
    l1s = [c.stats["l1_best"] for c in out.artifacts["candidates"]]
    assert l1s[2] == pytest.approx(45.51560592651367, rel=1e-5)
    assert l1s[4] == pytest.approx(9.343682289123535, rel=1e-5)
    assert all(v == float("inf") for i, v in enumerate(l1s) if i in (0, 1, 3))
    assert (out.target, s["victim"]) == (3, 1)
    assert s["sym_pulls"] == 37 and s["sym_stop_reason"] == "converged"
    assert s["sym_l1"] == pytest.approx(81.03167724609375, rel=1e-5)
    assert s["trojaned"] is False and s["steps"] == 12 + 11 + 41 + 11 + 47 + 37
    # Global (label 4's bias + 9; seed 0, step 60, rounds 5): one global arm on all 200 images
    # (7 batches, the last partial), total_times [7], best_reg 15.369129044669014, 'benign'.
    out = golden_score(golden_karm(budget=60, rounds=5), ScanContext(seed=0), lift=9.0)
    s = out.stats
    assert s["prescreen"] == "global" and s["arms"] == [[None, 4]] and out.target == 4
    assert s["pulls_per_arm"] == [7] and s["steps"] == 7
    assert s["l1"] == pytest.approx(15.369129044669014, rel=1e-5)
    assert s["trojaned"] is False


def test_one_initial_trigger_cloned_for_every_arm():
    model, x, _ = golden_model_and_data()
    arms = [(0, 1), (2, 3), (4, 1)]
    pools = [torch.arange(8)] * 3
    opt = KArm()._optimizer(model, x, arms, pools, "pair", ScanContext(seed=0).generator("i"))
    assert torch.equal(opt.theta_m[0], opt.theta_m[1]) and torch.equal(opt.theta_m[0],
                                                                        opt.theta_m[2])
    assert torch.equal(opt.theta_p[0], opt.theta_p[2]) and opt.theta_p.shape[1:] == (3, 1, 1)


# ----------------------------------------------------------------------------- deadline, marks


def test_deadline_already_passed_raises_instead_of_a_benign_floor():
    with pytest.raises(DeadlinePassed):
        golden_score(golden_karm(budget=60, rounds=5), ScanContext(seed=0, deadline=0.0))
    # the pair scan ran out before the symmetric check's first pull: no ratio, no verdict
    with pytest.raises(DeadlinePassed, match="symmetric"):
        golden_score(golden_karm(budget=300, rounds=5), ExpiresAfter(1 + 122, seed=1))


def test_deadline_between_pulls_stops_early_and_counts_the_steps():
    out = golden_score(golden_karm(budget=60, rounds=5), ExpiresAfter(1 + 3, seed=0), lift=9.0)
    assert out.stats["stopped_early"] is True and out.stats["stop_reason"] == "deadline"
    assert out.stats["steps"] == 3 and isinstance(out.stats["steps"], int)
    # cut inside the symmetric check: forward 122 pulls + 5 symmetric ones
    out = golden_score(golden_karm(budget=300, rounds=5), ExpiresAfter(1 + 122 + 5, seed=1))
    s = out.stats
    assert s["stopped_early"] is True and s["sym_stop_reason"] == "deadline"
    assert s["pulls"] == 122 and s["sym_pulls"] == 5 and s["steps"] == 127
    # without a limit: not stopped early
    assert golden_score(golden_karm(budget=60, rounds=5), ScanContext(seed=0),
                        lift=9.0).stats["stopped_early"] is False


def test_no_arm_is_a_verdict_with_zero_steps():
    out = golden_score(golden_karm(), ScanContext(seed=0), lift=6.0)  # label 3 never predicted
    assert out.stats["prescreen"] == "none" and out.stats["steps"] == 0
    assert out.stats["trojaned"] is False and out.score == KArm.Params().score_floor


def test_trojaned_mark_on_every_candidate():
    # thresholds loosened so that the golden model's winner is called trojaned
    out = golden_score(golden_karm(budget=300, rounds=5, pair_l1_224=2500.0, sym_ratio=5.0))
    cands = out.artifacts["candidates"]
    assert out.stats["trojaned"] is True and out.score > 0
    assert [c.stats["trojaned"] for c in cands] == [False, False, False, False, True]
    assert [c.stats["winner"] for c in cands] == [False, False, False, False, True]
    out = golden_score(golden_karm(budget=300, rounds=5))
    assert out.stats["trojaned"] is False
    assert [c.stats["trojaned"] for c in out.artifacts["candidates"]] == [False] * 5


# ----------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def badnets_scans(inversion_round):
    return scan_round(inversion_round[0], detectors.build("karm", preset="small"),
                      keep=lambda record: record.attack == "badnets")


def test_karm_finds_label_specific_targets(badnets_scans, inversion_round):
    round_dir, _ = inversion_round
    assert len(badnets_scans) == 2
    for record, out in badnets_scans:
        assert out.target == record.target, (record.model_id, out.stats)
        assert out.stats["prescreen"] == "pair" and "sym_l1" in out.stats
        assert isinstance(out.stats["steps"], int) and out.stats["steps"] > 0
        winner = [c for c in out.artifacts["candidates"] if c.stats["winner"]][0]
        config = json.loads((round_dir / record.model_id / "config.json").read_text())
        assert config["victims"] and winner.victim in config["victims"]
        assert winner.reasr >= 0.5
        assert all("trojaned" in c.stats for c in out.artifacts["candidates"])


def test_negative_control_clean_models_score_below_trojaned(nin_karm_scans):
    """On the NiN control round (2 clean, 2 BadNets): every clean model scores below every
    trojaned one, no clean model is called trojaned and at least one trojaned model is, on
    its true target. Measured: clean -10 / -2.71, trojaned -0.97 / 0.40 (called, target 4).
    With the old rounds 20 the EX-RAY round had no model called trojaned (docs/fidelity/karm.md)."""
    scans = [(record, upstream_result(out)) for record, out in nin_karm_scans]
    clean = [out for r, out in scans if not r.poisoned]
    trojaned = [(r, out) for r, out in scans if r.poisoned]
    assert len(clean) == 2 and len(trojaned) == 2
    assert all(out.stats["steps"] > 0 or out.stats["stop_reason"] == "no arm" for _, out in scans)
    assert max(o.score for o in clean) < min(o.score for _, o in trojaned), scans
    assert not any(o.stats["trojaned"] for o in clean)
    assert any(o.stats["trojaned"] and o.target == r.target for r, o in trojaned), [
        (r.target, o.target, o.score) for r, o in trojaned]


def test_reference_preset():
    k = detectors.build("karm", preset="reference")
    assert k.params.budget == 1000 and k.params.rounds == 60
    assert k.params.kill_rules[0] == (10, 1e-9)
