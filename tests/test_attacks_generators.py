"""LIRA and input-aware (issue #20): trigger generators trained together with the classifier in
the attack's own `train` hook; their weights are the attack's artifacts."""
from __future__ import annotations

import numpy as np
import torch

from _attack_training import assert_attack_trains, tiny_dataset
from xray import models
from xray.zoo import attacks as A
from xray.zoo.recipe import training_recipe
from xray.zoo.train import predict


def _one_epoch(name: str, n: int = 128, **params) -> tuple[A.Attack, torch.nn.Module]:
    """The attack trained for one epoch on n tiny images (a few seconds): enough to look at its
    trigger, not to backdoor the model."""
    torch.set_num_threads(1)
    d = tiny_dataset()
    pick = np.random.default_rng(0).choice(len(d.y_train), n, replace=False)
    attack = A.sample_attack(name, 3, d.input_shape, d.num_classes, **params)
    net = models.create("mntd_mnist_cnn", d.num_classes, d.input_shape)
    trained = attack.train(net, torch.as_tensor(d.x_train[pick]), torch.as_tensor(d.y_train[pick]),
                           training_recipe({"preset": "small", "epochs": 1}),
                           torch.Generator().manual_seed(0))
    assert not net.training and trained == attack
    return trained, net


def test_lira_trains_a_backdoor() -> None:
    assert_attack_trains("lira")


def test_lira_trigger_is_linf_bounded() -> None:
    attack, _ = _one_epoch("lira")
    x = tiny_dataset().x_test[:32]
    delta = np.abs(attack.apply(x) - x)
    assert delta.max() <= attack.eps + 1e-6  # ||x' - x||_inf <= eps (24 px: padded for G)
    assert delta.max() > 1e-3  # and the trigger is there (one epoch: G is still faint)
    rebuilt = A.attack_from_config(attack.to_config(), attack.artifacts())
    assert np.array_equal(rebuilt.apply(x), attack.apply(x))


def test_input_aware_trains_a_backdoor() -> None:
    # Budget: the reference-size generators (width 16) and 25 mask epochs take minutes on one
    # core, so the check trains width 8 and 5 mask epochs. With 10% backdoor and 10%
    # cross-trigger samples the dynamic trigger is learnt slowly (the paper trains hundreds of
    # epochs). Measured on the tiny set, seeds 11 / 12 / 13: ASR 0.01 / 0.00 / 0.02 at 16
    # epochs, 0.85 / 0.45 / 0.32 at 48 (clean accuracy 1.0), so 48 epochs and a floor of 0.3,
    # which each of the three seeds passes. The cross-trigger mode at this budget: another
    # image's trigger sends 0.69 / 0.30 / 0.18 of the source images to the target, at least
    # 0.14 below the own trigger's ASR (the paper's triggers, trained 100+ epochs, do not
    # transfer at all).
    trained = assert_attack_trains("input_aware", asr_floor=0.3, epochs=48, width=8,
                                   mask_epochs=5)
    d = tiny_dataset()
    source = trained.attack.source_mask(d.y_test)
    crossed = trained.attack.apply_noise(d.x_test[source], np.random.default_rng(0))
    crossed_to_target = (predict(trained.net, crossed) == trained.attack.target).mean()
    assert crossed_to_target <= trained.asr - 0.1, (crossed_to_target, trained.asr)


def test_input_aware_trigger_is_input_specific_and_cross_keeps_labels() -> None:
    attack, _ = _one_epoch("input_aware", width=8, mask_epochs=2)
    d = tiny_dataset()
    x = d.x_test[[0, 60]]  # two images of different classes
    own = attack.apply(x)
    swapped = attack.cross(x, x[::-1])  # each stamped with the other's trigger
    assert not np.allclose(own - x, swapped - x, atol=1e-3)
    assert not np.allclose(own[0] - x[0], own[1] - x[1], atol=1e-3)
    # poisoning: backdoor samples go to the target, cross-trigger samples keep their labels
    xp, yp, idx = A.poison(d.x_train, d.y_train, attack, rng=0)
    changed = np.flatnonzero(np.any(xp != d.x_train, axis=(1, 2, 3)))
    cross = np.setdiff1d(changed, idx)
    assert len(idx) == round(0.1 * len(d.y_train)) and np.all(yp[idx] == attack.target)
    assert len(cross) >= 0.9 * len(idx)  # cross_ratio 1 (a cross image may come out unchanged)
    assert np.array_equal(yp[cross], d.y_train[cross])
    assert np.array_equal(yp[np.setdiff1d(np.arange(len(yp)), idx)],
                          d.y_train[np.setdiff1d(np.arange(len(yp)), idx)])
