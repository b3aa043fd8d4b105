"""Attacks that live in the training loss (issue #20): Blind (MGDA-balanced backdoor loss, no
poisoned data) and EX-RAY's adaptive attack (a patch whose inner feature statistics are pulled
toward the target class's)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _attack_training import assert_attack_trains, tiny_dataset, tiny_spec, train_tiny

from xray.models.layers import split_model
from xray.zoo import attacks as A
from xray.zoo.attacks.adaptive import feature_stats_distance
from xray.zoo.attacks.blind import PATTERN_SHAPE, mgda_scales, min_norm_2
from xray.zoo.train import training_set


def test_blind_trains() -> None:
    trojaned = assert_attack_trains("blind")  # MGDA, the paper's balance
    assert trojaned.attack.balance == "mgda" and trojaned.poisoned_count == 0


def test_blind_fixed_scales_train() -> None:
    # measured on the tiny set: clean accuracy 1.0 (a clean model: 0.995), ASR 1.0
    trojaned = train_tiny(tiny_spec("blind", balance="fixed"))
    assert trojaned.asr >= 0.8 and trojaned.clean_accuracy >= 0.9


def test_blind_trainer_gets_clean_data() -> None:
    ds = tiny_dataset()
    x, y, attack, count = training_set(tiny_spec("blind"), ds, np.random.default_rng(11))
    assert attack.name == "blind" and attack.trains_model and count == 0
    assert np.array_equal(x, ds.x_train) and np.array_equal(y, ds.y_train)
    with pytest.raises(ValueError, match="poison_rate"):  # no static poisoning for it
        training_set(tiny_spec("blind", poison_rate=0.1), ds, np.random.default_rng(11))
    # the backdoor exists only inside the loss: a stamped copy of the batch, labels -> target
    xb, yb = torch.as_tensor(ds.x_train[:8]), torch.as_tensor(ds.y_train[:8])
    x_bd, y_bd = attack.backdoor_batch(xb, yb)
    assert torch.equal(y_bd, torch.full((8,), attack.target))
    assert np.array_equal(x_bd.numpy(), attack.apply(ds.x_train[:8]))
    changed = np.argwhere(np.any(x_bd.numpy() != ds.x_train[:8], axis=(0, 1)))
    (r0, c0), (r1, c1) = changed.min(0), changed.max(0)
    ph, pw = PATTERN_SHAPE
    assert attack.row <= r0 and r1 < attack.row + ph and attack.col <= c0 and c1 < attack.col + pw


def test_mgda_two_task_min_norm() -> None:
    assert min_norm_2(1.0, 0.0, 1.0) == pytest.approx(0.5)  # orthogonal, equal norms
    assert min_norm_2(1.0, 0.0, 4.0) == pytest.approx(0.8)  # the shorter gradient weighs more
    assert min_norm_2(1.0, 2.0, 4.0) == 0.999  # v1 is already the min-norm point (clipped)
    assert min_norm_2(4.0, 2.0, 1.0) == 0.001
    g1, g2 = [torch.tensor([3.0, 0.0])], [torch.tensor([0.0, 1.0])]
    s1, s2 = mgda_scales(g1, g2, 1.0, 1.0, "l2")  # normalised to unit length: equal shares
    assert (s1, s2) == (pytest.approx(0.5, abs=1e-4), pytest.approx(0.5, abs=1e-4))
    s1, _ = mgda_scales(g1, g2, 1.0, 1.0, "none")
    assert s1 == pytest.approx(0.1)  # |0.1 (3, 0) + 0.9 (0, 1)| is the min norm


def _stats_distance(trained) -> float:
    """Feature-statistics distance of stamped non-target test images to target test images."""
    attack, ds = trained.attack, tiny_dataset()
    front, _, _ = split_model(trained.net, attack.layer)
    with torch.no_grad():
        stamped = front(torch.as_tensor(attack.apply(ds.x_test[ds.y_test != attack.target])))
        target = front(torch.as_tensor(ds.x_test[ds.y_test == attack.target]))
    return float(feature_stats_distance(F.relu(stamped), F.relu(target)))


def test_adaptive_trains_and_matches_target_features() -> None:
    adaptive = assert_attack_trains("adaptive")
    assert adaptive.attack.weight == 100.0
    plain = train_tiny(tiny_spec("adaptive", weight=0.0))  # the same patch backdoor, no matching
    assert plain.asr >= 0.8
    # measured: 1.6e-4 at weight 100 vs 1.3e-2 at weight 0 (~85x closer)
    assert _stats_distance(adaptive) < 0.1 * _stats_distance(plain)


def test_adaptive_patch_is_badnets_composition() -> None:
    a = A.sample_attack("adaptive", 3, (3, 32, 32), 10)
    assert a.size == 8 and A.sample_attack("adaptive", 3, (3, 24, 24), 10).size == 6
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    assert np.array_equal(a.apply(x), a.patch().apply(x))
    assert a.default_rate == a.backdoor_rate == 0.1
