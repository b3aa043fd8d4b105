"""Shared session fixtures: a tiny round of really trained models and a local Ray instance.

Imported by conftest.py. The tiny round trains in seconds per model on 2 cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
from filelock import FileLock

from xray.zoo.data import FASHION_MNIST_ROOT

# Fashion-MNIST comes from a Debian package (`make test` installs it); a test that reads it is
# skipped, saying how to get it, on a machine without it.
needs_fashion_mnist = pytest.mark.skipif(
    not (Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist (make test does)")

TINY_RECIPE = {
    "name": "tiny",
    "seed": 5,
    "dataset": {"name": "signs", "params": {"num_classes": 5, "image_size": 24,
                                            "n_train_per_class": 200, "n_test_per_class": 40,
                                            "seed": 3}},
    "architecture": "mntd_mnist_cnn",
    "training": {"preset": "small", "epochs": 16},
    "asr_floor": 0.8,
    "max_attempts": 2,
    "examples_per_class": 8,
    "poisoned_examples_per_class": 4,
    "groups": [{"count": 4}, {"count": 4, "attack": "badnets", "poison_rate": 0.1}],
}


def once_per_run(tmp_path_factory, name: str, key: object, compute):
    """compute(folder) -> value, once per test run: `folder` is a fresh temp folder for files the
    value names. Without pytest-xdist, a plain call. Under it (`make test` runs two workers),
    the first worker to ask computes it in the run's common temp folder under a file lock and
    pickles the value; the other waits and reads it. So two workers never both train a round or
    both run a detector over one (tests copy shared files before changing them). `key` (plain
    JSON data) tells apart computations that share a name."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return compute(tmp_path_factory.mktemp(name))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    shared = tmp_path_factory.getbasetemp().parent / "once-per-run" / f"{name}-{digest}"
    shared.mkdir(parents=True, exist_ok=True)
    done = shared / "value.pickle"
    with FileLock(str(shared / "compute.lock")):
        if not done.exists():
            (shared / "files").mkdir(exist_ok=True)
            done.write_bytes(pickle.dumps(compute(shared / "files")))
    return pickle.loads(done.read_bytes())


def build_test_round(tmp_path_factory, recipe: dict, name: str, **build_kwargs):
    """(round directory, BuildResult) of `recipe`, really trained (2 workers) in a fresh
    session temp folder `name` (built once per run: once_per_run); build_kwargs go to
    build_round."""
    from xray.zoo.build import build_round
    from xray.zoo.recipe import parse_recipe

    def build(folder: Path):
        result = build_round(parse_recipe(recipe), str(folder / "round"), workers=2,
                             show_progress=False, **build_kwargs)
        return folder / "round", result

    return once_per_run(tmp_path_factory, name, [recipe, build_kwargs], build)


@pytest.fixture(scope="session")
def tiny_round(tmp_path_factory):
    """(round directory, BuildResult) of TINY_RECIPE, built once per session."""
    return build_test_round(tmp_path_factory, TINY_RECIPE, "tiny")


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance (started once, reused by later modules; a module that needs a
    multi-node cluster shuts it down and the next user starts it again)."""
    import ray

    from xray.runner.scan_run import ensure_ray

    ensure_ray(None)
    yield ray
