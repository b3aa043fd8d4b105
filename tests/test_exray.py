"""EX-RAY: the decision rule clause by clause, and the real algorithm on really trained models."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from xray.detectors.exray import ExRay, is_natural

P = ExRay.Params()
NOCV = dataclasses.replace(P, cross_validation=False)
R3 = dataclasses.replace(P, **{k: v for k, v in ExRay.presets["r3"].items()
                               if k in ("rule",)})
Z = (0.0, 0.0, 0.0, 0.0)

# (kind, s1, s2, (acc1_1, acc1_2, acc2_1, acc2_2), params, natural, clause)
CASES = [
    # patch, ref rule (beta = gamma = 0.8)
    ("patch", 0.85, 0.10, Z, P, True, "s1>beta"),
    ("patch", 0.80, 0.10, Z, P, False, "injected"),  # strict >
    ("patch", 0.50, 0.30, (0, 0, 0.80, 0), P, True, "s1>s2&acc2"),
    ("patch", 0.50, 0.30, (0, 0, 0, 0.85), P, True, "s1>s2&acc2"),
    ("patch", 0.30, 0.50, (0, 0, 0.90, 0), P, False, "injected"),  # acc2 needs s1 > s2
    ("patch", 0.10, 0.85, Z, P, True, "s2>beta"),
    ("patch", 0.30, 0.50, (0, 0.85, 0, 0), P, True, "s2>s1&acc1"),
    ("patch", 0.50, 0.30, (0.90, 0, 0, 0), P, False, "injected"),  # acc1 needs s2 > s1
    ("patch", 0.50, 0.50, (0.9, 0.9, 0.9, 0), P, True, "3accs>=gamma"),
    ("patch", 0.50, 0.50, (0.9, 0.9, 0.1, 0), P, False, "injected"),
    ("patch", 0.50, 0.50, (0.4, 0.5, 0.6, 0.7), P, True, "4accs>=low"),
    ("patch", 0.50, 0.50, (0.39, 0.5, 0.6, 0.7), P, False, "injected"),
    # cross-validation off: only the s > beta clauses
    ("patch", 0.50, 0.30, (0, 0, 0.9, 0.9), NOCV, False, "injected"),
    ("patch", 0.50, 0.50, (1, 1, 1, 1), NOCV, False, "injected"),
    ("patch", 0.85, 0.30, Z, NOCV, True, "s1>beta"),
    # filter, ref rule
    ("filter", 0.95, 0.10, Z, P, True, "s1>filter_s1"),
    ("filter", 0.85, 0.10, Z, P, False, "injected"),  # s1 > beta is not a filter clause
    ("filter", 0.50, 0.30, (0, 0, 0.995, 0), P, True, "s1>s2&acc2"),
    ("filter", 0.50, 0.30, (0, 0, 0.98, 0.98), P, False, "injected"),
    ("filter", 0.10, 0.89, Z, P, True, "s2>filter_s2"),
    ("filter", 0.30, 0.50, (0.995, 0, 0, 0), P, True, "s2>s1&acc1"),
    ("filter", 0.20, 0.86, (0.95, 0.95, 0.95, 0), P, True, "3accs>=filter_count_acc&s2"),
    ("filter", 0.20, 0.84, (0.95, 0.95, 0.95, 0), P, False, "injected"),
    ("filter", 0.65, 0.70, Z, P, True, "s1&s2>filter_pair"),
    ("filter", 0.65, 0.70, Z, NOCV, True, "s1&s2>filter_pair"),
    ("filter", 0.50, 0.30, (0, 0, 1, 1), NOCV, False, "injected"),
    ("filter", 0.50, 0.55, (0.5, 0.5, 0.5, 0.5), P, False, "injected"),
    # patch, r3 rule: higher s bounds, both accuracies of a pair
    ("patch", 0.85, 0.10, Z, R3, False, "injected"),
    ("patch", 0.95, 0.10, Z, R3, True, "s1>r3_s"),
    ("patch", 0.10, 0.95, Z, R3, True, "s2>r3_s"),
    ("patch", 0.50, 0.30, (0, 0, 0.96, 0.96), R3, True, "s1>s2&acc2_both"),
    ("patch", 0.50, 0.30, (0, 0, 0.96, 0.50), R3, False, "injected"),
    ("patch", 0.30, 0.50, (0.99, 0.99, 0, 0), R3, True, "s2>s1&acc1_both"),
    ("patch", 0.30, 0.50, (0.99, 0.98, 0, 0), R3, False, "injected"),
    # filters keep the ref rule under rule="r3"
    ("filter", 0.65, 0.70, Z, R3, True, "s1&s2>filter_pair"),
]


@pytest.mark.parametrize("kind,s1,s2,accs,params,natural,clause", CASES)
def test_decision_rule(kind, s1, s2, accs, params, natural, clause):
    assert is_natural(kind, s1, s2, accs, params) == (natural, clause)


def test_decision_rule_thresholds_are_parameters():
    accs = {"acc1_1": 0.0, "acc1_2": 0.0, "acc2_1": 0.75, "acc2_2": 0.0}
    assert is_natural("patch", 0.5, 0.3, accs, P) == (False, "injected")
    assert is_natural("patch", 0.5, 0.3, accs, dataclasses.replace(P, gamma=0.7)) == (
        True, "s1>s2&acc2")
    assert is_natural("patch", 0.75, 0.3, Z, dataclasses.replace(P, beta=0.7)) == (
        True, "s1>beta")
    with pytest.raises(ValueError, match="trigger kind 'blend'"):
        is_natural("blend", 0.5, 0.5, Z, P)


def test_masks_batched_equal_masks_alone():
    """Rows optimised together follow the trajectories they follow alone (own Adam state, own
    permutation stream), with different pair counts per row."""
    from xray import models
    from xray.detectors.exray import optimise_masks
    from xray.models.layers import split_model

    torch.manual_seed(0)
    net = models.create("mntd_mnist_cnn", num_classes=4, input_shape=(1, 16, 16)).eval()
    h, g, _ = split_model(net)
    with torch.no_grad():
        feats = [h(torch.rand(n, 1, 16, 16)) for n in (7, 7, 13, 13)]
    params = dataclasses.replace(P, epochs=6, batch_size=4)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    both = optimise_masks(g, [feats[0], feats[2]], [feats[1], feats[3]], [0, 1], [2, 3], params,
                          gens(1, 2))
    first = optimise_masks(g, [feats[0]], [feats[1]], [0], [2], params, gens(1))
    second = optimise_masks(g, [feats[2]], [feats[3]], [1], [3], params, gens(2))
    for got, alone in ((0, first), (1, second)):
        assert both.best_epoch[got] == alone.best_epoch[0]
        assert both.base_f[got] == alone.base_f[0] and both.base_b[got] == alone.base_b[0]
        if alone.masks[0] is None:
            assert both.masks[got] is None
        else:
            torch.testing.assert_close(both.masks[got], alone.masks[0], rtol=1e-4, atol=1e-5)
    assert both.forwards == 6 * 4  # max 4 minibatches of 4 per epoch, one g pass each


# ----------------------------------------------------------------------------- on real models


def _load(round_dir, record):
    from xray.detectors.base import ScanData
    from xray.io.examples import load_examples
    from xray.io.model_loading import load_model

    x, y = load_examples(record)
    data = ScanData(x=x, y=y, num_classes=record.num_classes, mean=tuple(record.mean),
                    std=tuple(record.std))
    config = json.loads((round_dir / record.model_id / "config.json").read_text())
    return load_model(record), data, config


def _badnets_candidate(trigger, shape):
    """The true BadNets trigger of a trojaned model as a patch candidate (mask + pattern)."""
    from xray.detectors.inversion.core import TriggerCandidate
    from xray.zoo.attacks import attack_from_config

    attack = attack_from_config(trigger)
    c, h, w = shape
    r, q, s = attack.row, attack.col, attack.size
    mask = torch.zeros(h, w)
    mask[r:r + s, q:q + s] = 1
    pattern = torch.zeros(c, h, w)
    pattern[:, r:r + s, q:q + s] = torch.as_tensor(attack.pattern(c))
    return TriggerCandidate(victim=None, target=attack.target, kind="patch", mask=mask,
                            pattern=pattern)


def _natural_candidate(data, target, side=12):
    """A natural trigger: the centre of the target class's mean image pasted on the centre."""
    from xray.detectors.inversion.core import TriggerCandidate

    c, h, w = data.x.shape[1:]
    mask = torch.zeros(h, w)
    top = (h - side) // 2
    mask[top:top + side, top:top + side] = 1
    return TriggerCandidate(victim=None, target=target, kind="patch", mask=mask,
                            pattern=data.x[data.y == target].mean(0))


def test_exray_prunes_a_natural_trigger_and_keeps_the_injected_one(tiny_round):
    """The tiny round's nets split at a 16-channel block: with 8 images per class the ref
    rule's cross-validation clause (gamma 0.8 = 7 of 8 images) also calls the true BadNets
    trigger natural there (s1 ~ 0.5, s2 ~ 0.5, acc1_1 0.88); the (r3) rule, which needs both
    accuracies of a pair, keeps it, and the natural patches have s > 0.9."""
    from xray.detectors.base import ScanContext
    from xray.detectors.inversion.core import measure_reasr

    round_dir, build = tiny_round
    clean = next(r for r in build.records if not r.poisoned)
    trojaned = next(r for r in build.records if r.poisoned and r.attack == "badnets")
    ex = ExRay(ExRay.Params(epochs=200, rule="r3"))

    model, data, _ = _load(round_dir, clean)
    naturals = [_natural_candidate(data, t) for t in range(data.num_classes)]
    for cand in naturals:
        cand.reasr, cand.reasr_per_label = measure_reasr(model, cand, data.x, data.y)
    naturals = [c for c in naturals if c.reasr >= 0.9][:2]
    assert naturals, "no target-class patch flips the clean model: nothing to prune"
    verdicts = ex.examine(model, data, naturals, ScanContext(seed=0))
    assert len(verdicts) == len(naturals)
    assert any(v.natural for v in verdicts), [v.row() for v in verdicts]
    for v in verdicts:
        assert 0 <= v.s1 <= 1 and 0 <= v.s2 <= 1 and set(v.accs) == {
            "acc1_1", "acc1_2", "acc2_1", "acc2_2"}

    model, data, config = _load(round_dir, trojaned)
    injected = _badnets_candidate(config["trigger"], tuple(data.x.shape[1:]))
    injected.reasr, injected.reasr_per_label = measure_reasr(model, injected, data.x, data.y)
    assert injected.reasr >= 0.9
    (verdict,) = ex.examine(model, data, [injected], ScanContext(seed=0))
    assert verdict.target == trojaned.target
    assert not verdict.natural, verdict.row()
    assert verdict.clause == "injected"
