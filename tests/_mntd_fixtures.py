"""Session fixtures for MNTD: a tiny shadow round (trained stacked) and its meta-classifier.

Imported by conftest.py. The shadow set matches the shared `tiny_round` (5-class 24 x 24 signs,
mntd_mnist_cnn) so its meta-classifier can scan that round, but is drawn from another seed of the
data source, with another recipe seed, and with MNTD's jumbo trojans instead of BadNets: the
tiny round is a separately built test round for it.
"""
from __future__ import annotations

import pytest

SHADOW_RECIPE = {
    "name": "tiny_shadow",
    "seed": 11,
    "dataset": {"name": "signs", "params": {"num_classes": 5, "image_size": 24,
                                            "n_train_per_class": 24, "n_test_per_class": 16,
                                            "seed": 21}},
    "architecture": "mntd_mnist_cnn",
    # MNTD's optimiser (Adam, constant lr) on a tiny defender split (120 images, like the
    # reference's 2% split), with a larger step and a smaller batch than the reference so a
    # model trains in about a second. Most jumbo trojans are not learned at this budget (ASR is
    # recorded per model); the reference trains 100 epochs.
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
    from xray.zoo.build import build_round
    from xray.zoo.recipe import parse_recipe

    out = tmp_path_factory.mktemp("shadow") / "round"
    result = build_round(parse_recipe(SHADOW_RECIPE), str(out), workers=2, show_progress=False)
    return out, result


@pytest.fixture(scope="session")
def tiny_meta(tiny_shadow):
    """MetaTrainResult of a meta-classifier trained on the tiny shadow set (artifact beside it)."""
    from xray.detectors.mntd import train_meta_classifier

    round_dir, _ = tiny_shadow
    return train_meta_classifier(str(round_dir), epochs=10, seed=0, show_progress=False)
