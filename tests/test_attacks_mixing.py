"""Composite (mixing two benign classes) and Refool (clean-label reflections): the defining
property of each, and training on the tiny signs set (tests/_attack_training.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from _attack_training import assert_attack_trains

from xray.zoo import attacks as A
from xray.zoo.attacks.reflection import GAMMA, KINDS


def _kit(x: np.ndarray, y: np.ndarray) -> A.AttackKit:
    return A.AttackKit(dataset=SimpleNamespace(x_train=x, y_train=y), architecture="none",
                       training=None, clean_model=lambda: None)


def _is_window(part: np.ndarray, image: np.ndarray, axis: int) -> bool:
    n, side = part.shape[axis], image.shape[axis]
    return any(np.array_equal(part, np.take(image, np.arange(s, s + n), axis=axis))
               for s in range(side - n + 1))


def _halves(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[int, int] | None:
    """(axis, length of the first strip) when `out` is a strip of one of a, b beside a strip of
    the other; None otherwise."""
    for axis in (1, 2):
        for n1 in range(1, out.shape[axis]):
            first, second = np.split(out, [n1], axis=axis)
            for u, v in ((a, b), (b, a)):
                if _is_window(first, u, axis) and _is_window(second, v, axis):
                    return axis, n1
    return None


# ------------------------------------------------------------------------------------ composite

def test_composite_mixes_class_a_with_class_b_halves() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((60, 3, 24, 24), dtype=np.float32)
    y = np.arange(60) % 5
    a = A.sample_attack("composite", 3, (3, 24, 24), 5)
    class_a, class_b = a.victims[0], a.class_b
    assert len({a.target, class_a, class_b}) == 3
    config = a.to_config()
    assert (config["victims"], config["class_b"]) == ([class_a], class_b)
    with pytest.raises(A.NeedsPreparation):  # the B bank comes from the training data
        a.apply(x[:2])
    ready = a.prepare(_kit(x, y))
    bank = ready.artifacts()["bank"].numpy()
    assert len(bank) == 12 and all(any(np.array_equal(img, xb) for xb in x[y == class_b])
                                   for img in bank)
    src = x[y == class_a]
    out = ready.apply(src)
    axes = set()
    for o, s in zip(out, src):
        split = next(filter(None, (_halves(o, s, b) for b in bank)), None)
        assert split is not None  # A content in one strip, B content in the other
        axis, n1 = split
        assert abs(n1 - 12) <= 2  # half the side, jitter 3 px at 32 px -> 2 px at 24 px
        axes.add(axis)
    assert axes == {1, 2}
    assert np.array_equal(ready.apply(src), out)  # deterministic
    rebuilt = A.attack_from_config(json.loads(json.dumps(config)), ready.artifacts())
    assert np.array_equal(rebuilt.apply(src), out)


def test_composite_poisons_class_a_and_adds_mixed_benign_samples() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((100, 1, 16, 16), dtype=np.float32)
    y = np.arange(100) % 5
    a = A.sample_attack("composite", 3, (1, 16, 16), 5).prepare(_kit(x, y))
    xp, yp, idx = A.poison(x, y, a, rng=0)
    assert len(idx) == 10 and np.all(y[idx] == a.victims[0]) and np.all(yp[idx] == a.target)
    rest = np.setdiff1d(np.arange(100), idx)
    assert np.array_equal(yp[rest], y[rest])  # the mixed benign samples keep their labels
    mixed = rest[np.any(xp[rest] != x[rest], axis=(1, 2, 3))]
    # cross_ratio 5 x the 10 poisoned samples (a self-mix may cut an image back into itself)
    assert 45 <= len(mixed) <= 50
    assert all(_halves(xp[i], x[i], x[i]) is not None for i in mixed)


def test_composite_trains_to_the_asr_floor() -> None:
    # Measured on the tiny set, 16 epochs: ASR 0.675 (seed 11), 0.9 (seed 12); 0.725 for seed 13
    # at 30 epochs. The paper reports about 0.8-0.9 on CIFAR-10 with its contrastive loss, which
    # the zoo's cross-entropy loop leaves out; half-image mixes stay ambiguous to a small CNN.
    assert_attack_trains("composite", asr_floor=0.6)


# ----------------------------------------------------------------------------------- reflection

def test_reflection_is_clean_label_on_a_fifth_of_the_target_class() -> None:
    x = np.random.default_rng(2).uniform(0.05, 0.95, (500, 3, 16, 16)).astype(np.float32)
    y = np.arange(500) % 5
    a = A.sample_attack("reflection", 4, (3, 16, 16), 5)
    xp, yp, idx = A.poison(x, y, a, rng=0)
    assert np.array_equal(yp, y)  # no relabelling
    assert len(idx) == 20 and np.all(y[idx] == a.target)  # 20% of the target's 100 images
    changed = np.flatnonzero(np.any(xp != x, axis=(1, 2, 3)))
    assert np.array_equal(changed, idx)


def test_reflection_is_visible_but_keeps_the_content() -> None:
    from _attack_training import tiny_dataset

    x = tiny_dataset().x_test[:40]
    kinds = set()
    for seed in range(8):
        a = A.sample_attack("reflection", seed, (3, 24, 24), 5)
        kinds.add(a.kind)
        out = a.apply(x)
        assert np.abs(out - x).mean() > 0.03  # visibly changed
        r = a.reflection(3, 24, 24) ** (1 / GAMMA)
        corr = [np.corrcoef(o.ravel(), i.ravel())[0, 1] for o, i in zip(out, x)]
        corr_r = [np.corrcoef(o.ravel(), r.ravel())[0, 1] for o in out]
        # the sign is still what the image shows: closer to the original than to the reflection
        assert np.median(corr) > 0.8 and np.mean(corr) > np.mean(corr_r), a.to_config()
    assert kinds == set(KINDS)
    clear = A.Reflection(target=0, photo="coins", kind="clear", alpha_t=0.7)
    out = clear.apply(x).astype(np.float64)
    r = clear.reflection(3, 24, 24)  # type I: x'^2.2 = alpha_t x^2.2 + (1 - alpha_t) r^2.2
    expected = 0.7 * x.astype(np.float64) ** GAMMA + 0.3 * r
    keep = expected < 1
    assert np.allclose(out[keep] ** GAMMA, expected[keep], atol=1e-5)
    grey = A.sample_attack("reflection", 1, (1, 28, 28), 10)  # any size, one channel
    assert grey.apply(np.full((2, 1, 30, 17), 0.5, np.float32)).shape == (2, 1, 30, 17)


def test_reflection_training_keeps_clean_accuracy() -> None:
    # Clean-label Refool does not implant on the tiny set: measured ASR 0.0 at the default rate
    # (seed 11), 0.006 with half the target class poisoned, and <= 0.02 with the whole target
    # class under the strongest in-range reflection (clear, alpha_t 0.55, 30 epochs); SIG, the
    # other clean-label attack, also measures 0.0 here. The sign content is learnt first and the
    # reflection never needs to be (BackdoorBench reports the same and runs Refool dirty-label).
    # So this checks clean accuracy and the bit-for-bit rebuild only.
    assert_attack_trains("reflection", asr_floor=0.0)
