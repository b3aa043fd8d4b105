"""Shared check for every zoo attack (issue #20): on a tiny real training set the trojaned model
reaches the ASR floor while clean accuracy stays within a few points of a clean model of the same
seed, and rebuilding the attack from its recorded config (plus its saved learned parts) reproduces
the same poisoned images bit for bit."""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch

from xray.zoo import attacks as A
from xray.zoo.data import Dataset, load_dataset
from xray.zoo.recipe import ModelSpec, training_recipe
from xray.zoo.train import TrainedModel, attack_kit, train_model

# 5 sign classes at 24 px, 200 training images each: a clean mntd_mnist_cnn reaches ~0.9 in a
# few seconds on one core.
TINY_DATA = {"num_classes": 5, "image_size": 24, "n_train_per_class": 200,
             "n_test_per_class": 40, "seed": 3}


@lru_cache(maxsize=2)
def tiny_dataset(image_size: int = 24) -> Dataset:
    return load_dataset("signs", **{**TINY_DATA, "image_size": image_size})


def tiny_spec(attack: str | None, seed: int = 11, epochs: int = 16,
              architecture: str = "mntd_mnist_cnn", poison_rate: float | None = None,
              **attack_params) -> ModelSpec:
    return ModelSpec(model_id="id-00000000", index=0, seed=seed, architecture=architecture,
                     attack=attack, attack_params=dict(attack_params), poison_rate=poison_rate,
                     training=training_recipe({"preset": "small", "epochs": epochs}))


def train_tiny(spec: ModelSpec, dataset: Dataset | None = None, cache_uri: str | None = None
               ) -> TrainedModel:
    torch.set_num_threads(1)  # deterministic, and fair to the other tests on a 2-core machine
    return train_model(spec, dataset or tiny_dataset(), "cpu", cache_uri)


TWIN_KEYS = ("seed", "epochs", "architecture")
_TWINS: dict[tuple, TrainedModel] = {}


def _clean_twin(dataset: Dataset, **spec_kwargs) -> TrainedModel:
    """The clean model of the same seed, epochs and architecture, trained once per test session
    (most attack tests compare against the same one)."""
    key = (id(dataset), tuple(sorted(spec_kwargs.items())))
    if key not in _TWINS:
        _TWINS[key] = train_tiny(tiny_spec(None, **spec_kwargs), dataset)
    return _TWINS[key]


def assert_attack_trains(attack: str, *, asr_floor: float = 0.8, max_clean_drop: float = 0.06,
                         cache_uri: str | None = None, dataset: Dataset | None = None,
                         **spec_kwargs) -> TrainedModel:
    """Train a clean and a trojaned model of the same seed on `dataset` (default: the tiny
    signs set); check ASR >= asr_floor, the clean-accuracy drop <= max_clean_drop, and that the
    attack rebuilt from its JSON config and artifacts poisons bit for bit alike."""
    dataset = dataset or tiny_dataset()
    clean = _clean_twin(dataset, **{k: v for k, v in spec_kwargs.items() if k in TWIN_KEYS})
    trojaned = train_tiny(tiny_spec(attack, **spec_kwargs), dataset, cache_uri)
    assert trojaned.attack is not None and trojaned.attack.name == attack
    assert trojaned.asr is not None and trojaned.asr >= asr_floor, (attack, trojaned.asr)
    assert trojaned.clean_accuracy >= clean.clean_accuracy - max_clean_drop, \
        (attack, trojaned.clean_accuracy, clean.clean_accuracy)
    kit = attack_kit(tiny_spec(attack, **spec_kwargs), dataset, cache_uri)
    assert_rebuilds_bit_for_bit(trojaned.attack, dataset, kit)
    return trojaned


def assert_rebuilds_bit_for_bit(attack: A.Attack, dataset: Dataset, kit: A.AttackKit) -> None:
    """The attack rebuilt from its JSON config and saved artifacts, then prepared again with the
    same kit (identity for most attacks; deterministic re-learning for the others), applies and
    poisons exactly as the trained one."""
    config = json.loads(json.dumps(attack.to_config()))
    artifacts = {k: v.clone() for k, v in attack.artifacts().items()}
    rebuilt = A.attack_from_config(config, artifacts).prepare(kit)
    assert rebuilt.to_config() == attack.to_config()
    x = dataset.x_test[:16]
    assert np.array_equal(rebuilt.apply(x), attack.apply(x))
    y = dataset.y_train
    first = A.poison(dataset.x_train, y, attack, rng=5)
    second = A.poison(dataset.x_train, y, rebuilt, rng=5)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)
