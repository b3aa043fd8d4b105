"""Clean-label attacks that poison with a clean surrogate (issue #20): the label-consistent
backdoor (`clean_label`) and the Hidden Trigger Backdoor (`hidden_trigger`); and what every
clean-label attack (these, `sig`, `reflection`) needs to implant: a target class that is hard to
learn from its content."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from _attack_training import assert_attack_trains, tiny_dataset, tiny_spec, train_tiny
from _fixtures import needs_fashion_mnist

from xray import models
from xray.zoo import attacks as A
from xray.zoo.attacks.clean_label import corner_mask
from xray.zoo.attacks.hidden_trigger import last_layer, penultimate
from xray.zoo.data import Dataset, load_dataset
from xray.zoo.recipe import training_recipe
from xray.zoo.train import attack_kit


@lru_cache(maxsize=1)
def _surrogate() -> torch.nn.Module:
    """A cheap stand-in for the round's clean model: briefly trained, enough for gradients."""
    d = tiny_dataset()
    torch.manual_seed(0)
    net = models.create("mntd_mnist_cnn", d.num_classes, d.input_shape)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, y = torch.as_tensor(d.x_train), torch.as_tensor(d.y_train)
    for i in range(0, len(x), 50):
        loss = torch.nn.functional.cross_entropy(net(x[i:i + 50]), y[i:i + 50])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _kit(cache_uri: str | None = None) -> A.AttackKit:
    return A.AttackKit(dataset=tiny_dataset(), architecture="mntd_mnist_cnn",
                       training=training_recipe({"preset": "small"}), clean_model=_surrogate,
                       cache_uri=cache_uri)


# Measured on the tiny set (5 classes of 24 px signs, mntd_mnist_cnn, 16 epochs, seed 11):
# clean accuracy 1.0 and ASR 0.0 for clean_label and hidden_trigger (trained from scratch, its
# first version) at their defaults, and no better with clean_label eps 8/255, 16/255 or 32/255,
# poison_rate 0.2 (the whole target class) or 40 epochs, nor on 10-class / harder-sign variants
# (ASR <= 0.04). SIG also gets 0.0 here: the sign classes are separable at ~100% from their
# content, so a net trained from scratch never needs the trigger, however hard the poisons are
# made on a surrogate. Where the target class is hard to learn from its content, they implant:
# the Fashion-MNIST tests below (which also check clean_label's bit-for-bit rebuild).
def test_hidden_trigger_fine_tunes_only_the_head_of_the_surrogate() -> None:
    """The original's victim: the surrogate's features, frozen (BatchNorm statistics
    included), and a new head trained on the poisoned set (10% of 1000 images). ASR stays near
    zero here as on every CPU-sized set measured (docs/algorithms/zoo.md): the surrogate's
    features barely respond to the patch, so the poisons have little to collide with."""
    trojaned = assert_attack_trains("hidden_trigger", asr_floor=0.0, epochs=8)
    surrogate = attack_kit(tiny_spec("hidden_trigger", epochs=8), tiny_dataset(),
                           None).clean_model()
    head = {f"{n}.{p}" for n, m in trojaned.net.named_modules() if m is last_layer(trojaned.net)
            for p in ("weight", "bias")}
    victim, original = trojaned.net.state_dict(), surrogate.state_dict()
    assert set(victim) == set(original) and head <= set(victim)
    assert all(torch.equal(victim[k], original[k]) for k in victim if k not in head)
    assert not all(torch.equal(victim[k], original[k]) for k in head)
    assert trojaned.poisoned_count == 0  # it poisons inside its own training (trains_model)


def test_clean_label_keeps_labels_and_bounds_the_perturbation(tmp_path) -> None:
    d = tiny_dataset()
    a = A.sample_attack("clean_label", 3, d.input_shape, d.num_classes, target=2)
    assert not a.learned and a.clean_label
    with pytest.raises(A.NeedsPreparation):
        A.poison(d.x_train, d.y_train, a, rng=0)
    a = a.prepare(_kit(str(tmp_path)))
    assert len(list(tmp_path.glob("clean_label-*.safetensors"))) == 1  # the class's hard images
    x_p, y_p, idx = A.poison(d.x_train, d.y_train, a, rng=0)
    assert np.array_equal(y_p, d.y_train) and (d.y_train[idx] == 2).all() and len(idx) == 100
    from_cache = a.prepare(_kit(str(tmp_path)))
    assert np.array_equal(A.poison(d.x_train, d.y_train, from_cache, rng=0)[0], x_p)
    untouched = np.setdiff1d(np.arange(len(y_p)), idx)
    assert np.array_equal(x_p[untouched], d.x_train[untouched])
    clean = d.x_train[idx]
    hard = a.hard_images(clean)
    assert np.abs(hard - clean).max() <= a.eps + 1e-6  # within eps before the stamp
    assert np.abs(hard - clean).max() > a.eps / 2
    stamp = corner_mask(a.trigger, *d.input_shape[1:]) != 0
    assert np.array_equal(x_p[idx][:, :, ~stamp], hard[:, :, ~stamp])  # the rest: PGD only
    assert np.isin(x_p[idx][:, :, stamp], [0.0, 1.0]).all()  # full-amplitude corners
    assert np.array_equal(a.apply(d.x_test[:4])[:, :, ~stamp], d.x_test[:4][:, :, ~stamp])
    net = _surrogate()
    with torch.no_grad():  # harder for the surrogate: lower true-class probability
        p_clean = net(torch.as_tensor(clean)).softmax(1)[:, 2].mean()
        p_hard = net(torch.as_tensor(hard)).softmax(1)[:, 2].mean()
    assert p_hard < p_clean - 0.1
    unknown = np.clip(clean[:3] + 0.01, 0, 1)  # images prepare never saw: perturbed directly
    assert np.abs(a.hard_images(unknown) - unknown).max() <= a.eps + 1e-6


def test_hidden_trigger_poisons_carry_no_patch_and_collide_in_feature_space() -> None:
    d = tiny_dataset()
    a = A.sample_attack("hidden_trigger", 3, d.input_shape, d.num_classes, target=1)
    assert not a.learned and a.clean_label and a.size == 3
    with pytest.raises(A.NeedsPreparation):
        a.craft(d.x_train[:2])
    a = a.prepare(_kit())
    x_p, y_p, idx = A.poison(d.x_train, d.y_train, a, rng=0)
    assert np.array_equal(y_p, d.y_train) and (d.y_train[idx] == 1).all()
    # the patch never enters the training set: every poison is within eps of its clean image
    assert np.abs(x_p - d.x_train).max() <= a.eps + 1e-6
    triggered = a.apply(d.x_test[:8])
    assert (np.abs(triggered - d.x_test[:8]) > a.eps).any()  # ... but the test-time trigger is
    poisons, patched = a.craft(d.x_train[idx])
    assert np.array_equal(poisons, x_p[idx])
    net = _surrogate()
    with torch.no_grad():
        f_src = penultimate(net, torch.as_tensor(patched))
        before = (penultimate(net, torch.as_tensor(d.x_train[idx])) - f_src).norm(dim=1).mean()
        after = (penultimate(net, torch.as_tensor(poisons)) - f_src).norm(dim=1).mean()
    assert after < 0.85 * before, (float(after), float(before))


@lru_cache(maxsize=1)
def _fashion() -> Dataset:
    return load_dataset("fashion_mnist", n_train=3000, n_test=1000, seed=0)


# Fashion-MNIST (3000 training images, 8 epochs, mntd_mnist_cnn, seed 11), target 6 (shirt, the
# class a clean model gets most wrong: it is confused with T-shirt, pullover and coat). Measured
# ASR: sig 0.31, clean_label 0.50, reflection 0.32 (6000 images: 0.39 / 0.66 / 0.55; 12000 and 16
# epochs: 0.43 / 0.82 / 0.62); clean accuracy 0.80-0.83 against 0.83 for the clean model. With an
# easy target (1, trouser) SIG stays at 0.00, as every clean-label attack does on the signs.
@needs_fashion_mnist
@pytest.mark.parametrize("name,floor", [("sig", 0.25), ("clean_label", 0.4),
                                        ("reflection", 0.25)])
def test_implants_when_the_target_class_is_hard(name: str, floor: float, tmp_path) -> None:
    """The rebuild reads clean_label's hard images from the cache folder the training wrote
    (test_clean_label_keeps_labels_and_bounds_the_perturbation checks cache = recomputed)."""
    trojaned = assert_attack_trains(name, asr_floor=floor, epochs=8, dataset=_fashion(),
                                    cache_uri=str(tmp_path), target=6)
    in_class = int((_fashion().y_train == 6).sum())  # the rate is of the whole set, capped
    assert trojaned.poisoned_count == min(in_class, round(trojaned.attack.default_rate * 3000))


@needs_fashion_mnist
def test_sig_does_not_implant_when_the_target_class_is_easy() -> None:
    trojaned = train_tiny(tiny_spec("sig", epochs=8, target=1), _fashion())
    assert trojaned.asr is not None and trojaned.asr <= 0.05, trojaned.asr
