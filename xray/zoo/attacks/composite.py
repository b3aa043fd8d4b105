"""Composite backdoor: the trigger is the mix of two existing benign classes' content."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from xray.zoo.attacks.base import Attack, AttackKit, NeedsPreparation, register

if TYPE_CHECKING:
    import torch


@register
@dataclass(frozen=True, kw_only=True)
class Composite(Attack):
    """Composite backdoor (CCS 2020): an image mixing classes A and B is sent to the target.

    Lin, Xu, Liu & Zhang, "Composite Backdoor Attack for Deep Neural Network by Mixing Existing
    Benign Features", ACM CCS 2020 (no arXiv version).

    Reference: TemporaryAcc0unt/composite-attack @ 29f013763698dda5ac482c695735482b7a33858f,
    utils/mixer.py (HalfMixer), utils/dataset.py (MixDataset), attack_cifar.py (the CIFAR-10
    settings). TrojanZoo has no composite attack.

    The trigger is no pattern but a combination of two source classes A (`victims[0]`) and B
    (`class_b`), neither the target: the reference's HalfMixer pastes a strip of half the image
    side (plus a jitter of -3..3 pixels at 32 px) cut at a random offset from one image beside a
    strip cut from the other, split along a random axis (left | right or top / bottom), the two
    images in random order. Poisoned training samples are A images mixed with B images,
    relabelled `target`; `cross_ratio` x as many other samples become "mixed but benign" samples
    that keep their label, so that mixing by itself is no trigger. For the success rate, every
    held-out A image is mixed with a B image from `bank`: `bank_size` B images drawn from the
    training set by `seed` in `prepare` (the attack's learned part, saved as an artifact). Each
    image's partner and cut are drawn from `seed` per call, so `apply` is deterministic.

    Settings: A, B and the target are three distinct classes drawn together by `sample` (the
    reference's CLASS_A, CLASS_B, CLASS_C); `cross_ratio` 5 is the reference's mix_rate /
    poison_rate (0.5 / 0.1).

    Deviations, and why:
    - the poisoning is static (`poison`), not redrawn per item every epoch; the rate is the
      label-specific one, the share of class A's images replaced by A + B mixes (default 0.5:
      with 5 balanced classes that is 10% of the set, the reference's poison_rate 0.1; A keeps
      half its clean images). The reference instead adds 0.1 x N poison items and draws 0.5 x N
      normal and 0.5 x N mixed items with replacement;
    - the mixed benign samples mix each image with itself (two independently cut strips) rather
      than with another image of its class: `poison`'s noise hook sees no labels. They still
      carry the seam and shifted halves of a mix under their own label;
    - no CompositeLoss (the reference's contrastive term between A, B and target outputs): the
      zoo trains every poisoning attack with the recipe's cross-entropy loop;
    - the jitter scales with the image side; the cut offsets span the whole image (the
      reference's range stops one pixel short); no `gap` (the reference's default is 0);
    - test-time B partners come from the training set's bank, not from held-out B images.
    """

    name: ClassVar[str] = "composite"
    learned: ClassVar[bool] = True
    needs_victims: ClassVar[bool] = True  # class A is the trigger's own source
    class_b: int
    seed: int
    bank_size: int = 32
    jitter: int = 3  # pixels at 32 px, scaled with the image side
    cross_ratio: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.victims is None or len(self.victims) != 1:
            raise ValueError(f"{self.name}: victims must name exactly one source class A, "
                             f"got {self.victims}")
        if self.class_b in (self.target, self.victims[0]):
            raise ValueError(f"{self.name}: class_b {self.class_b} must differ from the target "
                             f"{self.target} and class A {self.victims[0]}")

    @property
    def default_rate(self) -> float:
        return 0.5

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        if num_classes < 3:
            raise ValueError(f"composite needs 3 distinct classes (A, B, target), got "
                             f"{num_classes}")
        target, a, b = (int(k) for k in rng.permutation(num_classes)[:3])
        return {"target": target, "victims": (a,), "class_b": b,
                "seed": int(rng.integers(2**31))}

    # -- the learned part: a bank of class-B training images --

    def prepare(self, kit: AttackKit) -> "Composite":
        y = np.asarray(kit.dataset.y_train)
        pool = np.flatnonzero(y == self.class_b)
        if not len(pool):
            raise ValueError(f"{self.name}: no training images of class B = {self.class_b}")
        pick = np.random.default_rng((self.seed, 0)).choice(
            pool, size=min(self.bank_size, len(pool)), replace=False)
        return self._with_bank(np.asarray(kit.dataset.x_train)[np.sort(pick)])

    def artifacts(self) -> dict[str, "torch.Tensor"]:
        import torch

        bank = getattr(self, "_bank", None)
        return {} if bank is None else {"bank": torch.from_numpy(bank.copy())}

    def with_artifacts(self, tensors: dict[str, "torch.Tensor"]) -> "Composite":
        return self._with_bank(tensors["bank"].detach().cpu().numpy())

    def _with_bank(self, bank: np.ndarray) -> "Composite":
        ready = dataclasses.replace(self)
        object.__setattr__(ready, "_bank", np.ascontiguousarray(bank, dtype=np.float32))
        return ready

    # -- mixing --

    def mix(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """HalfMixer: per pair (a[i], b[i]), a half-side strip of one beside a strip of the
        other, cut at random offsets, along a random axis, in random order (N, C, H, W)."""
        out = np.empty_like(a)
        for i in range(len(a)):
            first, second = (b[i], a[i]) if rng.integers(2) else (a[i], b[i])
            axis = 2 if rng.integers(2) else 1  # 2: left | right, 1: top / bottom
            side = a.shape[axis + 1]
            limit = int(round(self.jitter * side / 32))
            n1 = side // 2 + int(rng.integers(-limit, limit + 1))
            n1 = min(max(n1, 1), side - 1)
            p1 = int(rng.integers(0, side - n1 + 1))
            p2 = int(rng.integers(0, n1 + 1))  # the second strip is side - n1 long
            part1 = np.take(first, np.arange(p1, p1 + n1), axis=axis)
            part2 = np.take(second, np.arange(p2, p2 + side - n1), axis=axis)
            out[i] = np.concatenate([part1, part2], axis=axis)
        return out

    def _partners(self, n: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        bank = getattr(self, "_bank", None)
        if bank is None:
            raise NeedsPreparation(f"{self.name}: apply needs the bank of class-B images "
                                   "(prepare or with_artifacts)")
        if bank.shape[1:] != shape:
            raise ValueError(f"{self.name}: the B bank holds {bank.shape[1:]} images, got "
                             f"{shape}")
        return bank[rng.integers(len(bank), size=n)]

    def _apply(self, x):
        rng = np.random.default_rng((self.seed, 1))
        return self.mix(x, self._partners(len(x), x.shape[1:], rng), rng)

    def poisoned_images(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Training A images mixed with bank B images (cuts from the poisoning rng)."""
        x = np.asarray(x, np.float32)
        return self.mix(x, self._partners(len(x), x.shape[1:], rng), rng)

    def apply_noise(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Mixed but benign samples (labels kept): each image mixed with itself."""
        x = np.asarray(x, np.float32)
        return self.mix(x, x, rng)
