"""Session fixtures for MNTD, imported by conftest.py.

`mntd_shadow` / `mntd_target` / `mntd_meta`: MNTD's own setting at a test budget. Shadow models
(benign + jumbo) on a small defender split of MNIST, a meta-classifier trained on them, and a
separately built target round of clean, BadNets and MNTD-M models on a larger MNIST subsample. The
target round has another data subsample seed, another recipe seed and other attacks. MNIST's
dark background lets the CNN learn the jumbo triggers at this budget. On the `signs` images
it does not: the first shadow set here, 120 signs images and 12 epochs, had median jumbo ASR
0.07, and the meta-classifier scored the signs tiny round at ROC-AUC 0.33. Models train one by
one, which is faster than stacked on CPUs (bench/stacked_training.py).

`mntd_contract_artifact`: a tiny meta-classifier for the contract test's net (3 x 16 x 16,
3 classes), fitted in memory on a few briefly trained signs models.

`tiny_shadow` (SHADOW_RECIPE): a stacked build of tiny signs shadow models, used by
tests/test_stacked.py to check a stacked round is written like any round.
"""
from __future__ import annotations

import pytest

from _fixtures import build_test_round, once_per_run

# Defender split: 600 MNIST images (the reference uses 2% of the training set, 1,200). Budget:
# Adam at a constant lr, 8 epochs of batch 50. The reference trains 100 epochs at lr 1e-3,
# batch 100. Jumbo ASRs are recorded per model; about half of them exceed 0.4 at this budget.
MNTD_SHADOW_RECIPE = {
    "name": "tiny_mntd_shadow",
    "seed": 11,
    "dataset": {"name": "mnist", "params": {"n_train": 600, "n_test": 300, "seed": 0}},
    "architecture": "mntd_mnist_cnn",
    "training": {"preset": "mntd", "lr": 2e-3, "batch_size": 50, "epochs": 8},
    "asr_floor": 0.0,  # the reference keeps every jumbo model
    "max_attempts": 1,
    "examples_per_class": 1,
    "poisoned_examples_per_class": 1,
    "groups": [
        {"count": 12},
        {"count": 12, "attack": "jumbo"},
        {"count": 4, "split": "validation"},
        {"count": 4, "attack": "jumbo", "split": "validation"},
    ],
}

# Target (evaluation) models: more data, fewer epochs (the reference: 30,000 images, 4 epochs),
# the attacks scanned for rather than jumbo, and only trojans that took (ASR >= 0.8).
MNTD_TARGET_RECIPE = {
    "name": "tiny_mntd_target",
    "seed": 5,
    "dataset": {"name": "mnist", "params": {"n_train": 2000, "n_test": 300, "seed": 1}},
    "architecture": "mntd_mnist_cnn",
    "training": {"preset": "mntd", "lr": 2e-3, "batch_size": 50, "epochs": 4},
    "asr_floor": 0.8,
    "max_attempts": 2,
    "examples_per_class": 2,
    "poisoned_examples_per_class": 1,
    "groups": [
        {"count": 6},
        {"count": 3, "attack": "badnets", "poison_rate": 0.1},
        {"count": 3, "attack": "mntd_m"},
    ],
}


@pytest.fixture(scope="session")
def mntd_shadow(tmp_path_factory):
    """(round directory, BuildResult) of MNTD_SHADOW_RECIPE."""
    return build_test_round(tmp_path_factory, MNTD_SHADOW_RECIPE, "mntd_shadow")


@pytest.fixture(scope="session")
def mntd_target(tmp_path_factory):
    """(round directory, BuildResult) of MNTD_TARGET_RECIPE."""
    return build_test_round(tmp_path_factory, MNTD_TARGET_RECIPE, "mntd_target")


@pytest.fixture(scope="session")
def mntd_meta(mntd_shadow, tmp_path_factory):
    """MetaTrainResult of the meta-classifier trained on `mntd_shadow` (artifact beside it),
    once per run (the artifact is written into the shared round: once_per_run)."""
    from xray.zoo.mntd import train_meta_classifier

    round_dir, _ = mntd_shadow
    return once_per_run(tmp_path_factory, "mntd-meta", str(round_dir), lambda _: (
        train_meta_classifier(str(round_dir), epochs=10, seed=0, threads=1,
                              show_progress=False)))


CONTRACT_SHADOW_RECIPE = {
    "name": "contract_shadow",
    "seed": 3,
    "dataset": {"name": "signs", "params": {"num_classes": 3, "image_size": 16,
                                            "n_train_per_class": 20, "n_test_per_class": 4,
                                            "seed": 4}},
    "architecture": "mntd_mnist_cnn",
    "training": {"preset": "mntd", "lr": 5e-3, "batch_size": 20, "epochs": 2},
    "groups": [{"count": 3}, {"count": 3, "attack": "jumbo"},
               {"count": 1, "split": "validation"},
               {"count": 1, "attack": "jumbo", "split": "validation"}],
}


@pytest.fixture(scope="session")
def mntd_contract_artifact(tmp_path_factory):
    """URI of a meta-classifier for the contract test's net (3 x 16 x 16, 3 classes), fitted
    on 8 signs models trained in this process (about a second)."""
    import torch

    from xray.detectors.mntd_meta import save_artifact
    from xray.zoo.mntd import _torch_threads, fit_meta_classifier
    from xray.zoo.build import spec_groups
    from xray.zoo.data import load_dataset
    from xray.zoo.recipe import parse_recipe
    from xray.zoo.train import train_model

    recipe = parse_recipe(CONTRACT_SHADOW_RECIPE)
    data = load_dataset(recipe.dataset, **recipe.dataset_params)
    nets, labels, is_val = [], [], []
    with _torch_threads(1):
        for spec, group in zip(recipe.model_specs(), spec_groups(recipe)):
            nets.append(train_model(spec, data).net.requires_grad_(False))
            labels.append(int(spec.attack is not None))
            is_val.append(group.get("split") == "validation")
        x = torch.as_tensor(data.x_train)
        mean, std = x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()
        fit = fit_meta_classifier(nets, labels, is_val, data.input_shape, data.num_classes,
                                  query_mean=mean, query_std=std, epochs=2, seed=0)
    info = {"key": {"input_shape": list(data.input_shape), "num_classes": data.num_classes,
                    "mean": [0.0], "std": [1.0]},
            "n_queries": 10, "hidden": 20, "query_tuning": True, "query_mode": "reference",
            "best": {"repeat": fit.best_repeat, "epoch": fit.best_epoch,
                     "val_auc": fit.best_val_auc}}
    return save_artifact(fit.meta, info, str(tmp_path_factory.mktemp("mntd_contract") / "meta"))


# A stacked build (tests/test_stacked.py): 5-class 24 x 24 signs, MNTD's optimiser on a 120-image
# split with a larger step and a smaller batch, trained in stacks of 8. Its jumbo trojans mostly
# do not take (median ASR 0.07), so it is not used to train a meta-classifier.
SHADOW_RECIPE = {
    "name": "tiny_shadow",
    "seed": 11,
    "dataset": {"name": "signs", "params": {"num_classes": 5, "image_size": 24,
                                            "n_train_per_class": 24, "n_test_per_class": 16,
                                            "seed": 21}},
    "architecture": "mntd_mnist_cnn",
    "training": {"preset": "mntd", "lr": 5e-3, "batch_size": 24, "epochs": 12},
    "asr_floor": 0.0,  # the reference keeps every jumbo model
    "max_attempts": 1,
    "examples_per_class": 2,
    "poisoned_examples_per_class": 1,
    "groups": [
        {"count": 8, "stack": 8},
        {"count": 8, "attack": "jumbo", "stack": 8},
        {"count": 4, "stack": 8, "split": "validation"},
        {"count": 4, "attack": "jumbo", "stack": 8, "split": "validation"},
    ],
}


@pytest.fixture(scope="session")
def tiny_shadow(tmp_path_factory):
    """(round directory, BuildResult) of SHADOW_RECIPE, trained in stacks of 8."""
    # stacking "on": the CPU default ("auto") would train the stacks one by one
    return build_test_round(tmp_path_factory, SHADOW_RECIPE, "shadow", stacking="on")
