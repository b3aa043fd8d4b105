"""Stacked training (xray.zoo.stacked) gives the models one-by-one training gives."""
import json
import os

import numpy as np
import pytest
import torch

from xray.zoo.build import plan_tasks, spec_groups, use_stacks
from xray.zoo.data import load_dataset
from xray.zoo.recipe import parse_recipe
from xray.zoo.stacked import train_stack
from xray.zoo.train import train_model

from _mntd_fixtures import SHADOW_RECIPE


def _recipe(training, groups):
    return parse_recipe({"name": "stack-test", "seed": 7, "dataset": "digits",
                         "architecture": "mntd_mnist_cnn", "training": training,
                         "groups": groups})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=16, test_fraction=0.75, seed=0)  # 449 train


def _update_gap(one, stacked, before):
    """|stacked update - one-by-one update| / |one-by-one update|, over all parameters."""
    gap = norm = 0.0
    for name, p0 in before.items():
        a = dict(one.net.named_parameters())[name].detach() - p0
        b = dict(stacked.net.named_parameters())[name].detach() - p0
        gap += float(((a - b) ** 2).sum())
        norm += float((a ** 2).sum())
    return (gap / norm) ** 0.5


@pytest.mark.parametrize("training", [
    {"preset": "mntd", "epochs": 1},  # Adam, constant lr, batch 100
    {"preset": "reference", "epochs": 1, "batch_size": 96},  # SGD momentum, wd, cosine
])
def test_one_epoch_takes_the_same_steps(digits, training):
    """Same seed -> same initial weights, poisoned set, data order and optimiser updates: after
    an epoch the stacked weights moved as the one-by-one weights did (float rounding only).
    The clean, jumbo (added copies, more steps) and badnets models have different step counts
    and short last batches, so masking and padding are exercised."""
    from xray import models

    recipe = _recipe(training, [{"count": 1}, {"count": 1, "attack": "jumbo"},
                                {"count": 1, "attack": "badnets"}])
    specs = recipe.model_specs()
    stacked = train_stack(specs, digits)
    for spec, s in zip(specs, stacked):
        torch.manual_seed(spec.seed)
        before = {n: p.detach().clone() for n, p in models.create(
            spec.architecture, digits.num_classes, digits.input_shape).named_parameters()}
        one = train_model(spec, digits)
        assert s.poisoned_count == one.poisoned_count
        assert (s.attack is None) == (one.attack is None)
        if one.attack is not None:
            assert s.attack == one.attack
        assert _update_gap(one, s, before) < 0.02, spec.attack


def test_accuracy_and_asr_distributions_match(digits):
    """A small stack of clean and BadNets models against the same recipe trained one by one."""
    badnets = {"size": 4, "row": 12, "col": 12}  # a 4 x 4 patch: learnable in a few epochs
    recipe = _recipe({"preset": "mntd", "epochs": 6, "batch_size": 32, "lr": 3e-3},
                     [{"count": 2}, {"count": 2, "attack": "badnets", "poison_rate": 0.2,
                                     "attack_params": badnets}])
    specs = recipe.model_specs()
    stacked = train_stack(specs, digits)
    one = [train_model(s, digits) for s in specs]
    acc_s = np.array([t.clean_accuracy for t in stacked])
    acc_o = np.array([t.clean_accuracy for t in one])
    asr_s = np.array([t.asr for t in stacked if t.asr is not None])
    asr_o = np.array([t.asr for t in one if t.asr is not None])
    print("stacked vs one by one: acc", acc_s, acc_o, "asr", asr_s, asr_o)
    assert acc_o.min() > 0.8 and asr_o.mean() > 0.5  # the recipe really trains and poisons
    assert abs(acc_s.mean() - acc_o.mean()) < 0.02, (acc_s, acc_o)
    assert np.abs(acc_s - acc_o).max() < 0.05, (acc_s, acc_o)
    assert abs(asr_s.mean() - asr_o.mean()) < 0.1, (asr_s, asr_o)
    assert np.abs(asr_s - asr_o).max() < 0.2, (asr_s, asr_o)


def test_batchnorm_nets_are_refused(digits):
    recipe = parse_recipe({"name": "bn", "seed": 1, "dataset": "digits", "architecture": "nin",
                           "training": {"epochs": 1}, "groups": [{"count": 2}]})
    with pytest.raises(ValueError, match="BatchNorm"):
        train_stack(recipe.model_specs(), digits)


def test_plan_tasks_stacks_only_groups_that_ask():
    recipe = _recipe({"preset": "mntd"}, [
        {"count": 3},  # one by one
        {"count": 5, "stack": 4},
        {"count": 2, "attack": "jumbo", "stack": 4},  # pooled with the group above
        {"count": 1, "stack": 4, "training": {"epochs": 3}},  # other training: own stack
    ])
    specs = recipe.model_specs()
    assert [g.get("stack", 1) for g in spec_groups(recipe)] == [1] * 3 + [4] * 8
    tasks = plan_tasks(recipe, specs)
    singles = [t for stacked, t in tasks if not stacked]
    stacks = [[s.index for s in t] for stacked, t in tasks if stacked]
    assert [t[0].index for t in singles] == [0, 1, 2]
    assert stacks == [[3, 4, 5, 6], [7, 8, 9], [10]]
    # already-written models are not planned again
    assert sum(len(t) for _, t in plan_tasks(recipe, specs[5:])) == len(specs) - 5
    # stacking off (the CPU default): every model alone
    assert plan_tasks(recipe, specs, stacked=False) == [(False, [s]) for s in specs]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert (use_stacks("auto", cpu), use_stacks("auto", gpu)) == (False, True)
    assert use_stacks("on", cpu) and not use_stacks("off", gpu)
    with pytest.raises(ValueError, match="choose one of auto, on, off"):
        use_stacks("sometimes", cpu)


def test_stacked_build_writes_a_complete_round(tiny_shadow):
    """The shadow fixture is built with `stack: 8`: every model is written like any round's."""
    round_dir, result = tiny_shadow
    n = sum(g["count"] for g in SHADOW_RECIPE["groups"])
    assert result.trained == n and not result.failed and len(result.records) == n
    configs = [json.loads((round_dir / d / "config.json").read_text())
               for d in sorted(os.listdir(round_dir)) if d.startswith("id-")]
    assert len(configs) == n
    jumbo = [c for c in configs if c["poisoned"]]
    assert len(jumbo) == n // 2 and all(c["trigger"]["name"] == "jumbo" for c in jumbo)
    # MNTD's sampled inject_p is the poisoning rate (added copies), not the 10% default
    for c in jumbo:
        assert c["poison_rate"] == pytest.approx(c["trigger"]["inject_p"])
        assert c["poisoned_count"] == int(c["trigger"]["inject_p"] * 120)
    assert np.mean([c["clean_accuracy"] for c in configs]) > 0.8
    # ASR recorded for every jumbo model (at this tiny budget most jumbo trojans do not take)
    assert all(0.0 <= c["asr"] <= 1.0 for c in jumbo)
