"""LIRA: a trigger generator trained jointly with the classifier, x' = clip(x + eps * G(x))."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from xray.zoo.attacks._generator import (from_artifacts, padded, run_numpy, seeded,
                                         to_artifacts)
from xray.zoo.attacks.base import Attack, NeedsPreparation, register

_STRIDE = 16  # the autoencoder halves the image four times


class _Autoencoder(nn.Module):
    """BackdoorBench's LIRA autoencoder: four 4x4 stride-2 conv-BN-ReLU layers (16, 32, 64, 128
    channels), four transposed convs back, tanh: a perturbation direction in [-1, 1]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        widths = [channels, 16, 32, 64, 128]
        down, up = [], []
        for a, b in zip(widths, widths[1:]):
            down += [nn.Conv2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.ReLU()]
        back = widths[::-1]
        for i, (a, b) in enumerate(zip(back, back[1:])):
            up += [nn.ConvTranspose2d(a, b, 4, 2, 1)]
            up += [nn.BatchNorm2d(b), nn.ReLU()] if i < len(back) - 2 else [nn.Tanh()]
        self.encoder = nn.Sequential(*down)
        self.decoder = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return padded(lambda t: self.decoder(self.encoder(t)), x, _STRIDE)


@register
@dataclass(frozen=True, kw_only=True)
class LIRA(Attack):
    """LIRA (Doan, Lao, Zhao & Li, ICCV 2021, "LIRA: Learnable, Imperceptible and Robust Backdoor
    Attacks"; no arXiv version).

    Reference: SCLBD/BackdoorBench attack/lira.py and config/attack/lira/default.yaml (commit
    f02e3534645f0ee63d6848653062cd6c0d6c400d), a PyTorch port of the authors' code; the authors'
    sunbelbd/invisible_backdoor_attacks README.md and python/lira_trigger_generation.py (commit
    07f38cd77094e0e857f8b510b0ca382bd1027803) for their settings (khoadoan/LIRA could not be
    fetched). BackdoorBench's stage 1 is followed, not the authors' (whose generator step looks
    one classifier step ahead).

    The trigger is x' = clip(x + eps * G(x), 0, 1), G the reference's autoencoder (tanh output),
    so ||x' - x||_inf <= eps. Training (`train`), as the reference:
    - stage 1 (`stage1_share` of recipe.epochs, default 1/6: the authors' README runs 10 + 50
      epochs on MNIST and 50 + 250 on CIFAR-10, BackdoorBench's cifar10.yaml 50 of 300):
      per batch, one Adam step (lr_atk) of a trainee copy of G on CE(f(x'), target) with the
      classifier fixed, then one classifier step on alpha * CE(f(x), y) + (1 - alpha) *
      CE(f(x'), target) with x' made by the frozen copy of G (eval mode), which takes the
      trainee's weights at the end of every epoch;
    - stage 2 (the remaining epochs): the classifier alone, with a fresh optimiser, on the same
      loss and the frozen G.
    The classifier uses the recipe's optimiser and schedule (xray.zoo.optim) in both stages.
    alpha 0.5 and the autoencoder generator are the reference's defaults (every image of a batch
    counts once clean and once triggered, weighted alpha / 1 - alpha: LIRA has no poisoning
    rate). eps 0.1 on [0, 1] pixels is twice the authors' README value for MNIST (eps 0.1 on
    pixels normalised to [-1, 1], 0.05 on [0, 1]): in the zoo's 16 epochs the classifier cannot
    keep so faint a trigger apart from the clean images, and pays in clean accuracy. Measured
    (mntd_mnist_cnn, 16 epochs, one thread), ASR / clean accuracy against the clean model:
    - tests' tiny set (5-class 24 px signs; clean 0.995-1.0), seeds 11 / 12 / 13: eps 0.05
      1.00 / 0.99, 0.81 / 0.90, 0.87 / 0.75; eps 0.1 1.00 / 1.00, 1.00 / 0.985, 0.98 / 0.985;
    - demo data (10-class 32 px signs; clean 0.984 / 0.988 for seeds 1 / 2), seeds 1 / 2 / 3:
      eps 0.05 0.87 / 0.81, 0.97 / 0.93, 0.98 / 0.95 (bench/zoo.py's model: 0.84 / 0.70);
      eps 0.1 1.00 / 0.94, 1.00 / 0.97, 1.00 / 0.96.
    The reference recipe sets BackdoorBench's 0.01 (on normalised CIFAR pixels, about 0.0025 on
    [0, 1]), which left the tiny 16-epoch check at clean accuracy 0.47 (ASR 0.79).

    Deviations: eps twice the authors' (above); the recipe's optimiser and epochs replace the
    reference's SGD lr 0.01 and 100 epochs (budget: a few epochs on CPU); lr_atk 1e-3, ten
    times the reference's 1e-4, because G gets a few hundred steps here instead of tens of
    thousands (at 1e-4 and eps 0.05 the tiny check reached clean accuracy 0.82, ASR 0.83;
    on the demo data 0.53 / 0.71 clean for seeds 1 / 2); images whose side is not a multiple
    of 16 are padded (border replicated) for G and its output cropped back; no random crop /
    rotation augmentation (the zoo trains without augmentation); the generator step's loss does
    not leak into the classifier's gradient (in the reference it accumulates into the
    classifier's next step); eps applies to [0, 1] pixels (the reference adds it to normalised
    CIFAR pixels); only the images the mapping flips (`source_mask`) are triggered (the
    reference also triggers target-class images, whose label does not change under all-to-one).
    """

    name: ClassVar[str] = "lira"
    supports_all_to_all: ClassVar[bool] = True
    trains_model: ClassVar[bool] = True
    learned: ClassVar[bool] = True

    eps: float = 0.1
    alpha: float = 0.5
    lr_atk: float = 1e-3
    stage1_share: float = 1 / 6
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.eps <= 1:
            raise ValueError(f"lira: eps must lie in (0, 1], got {self.eps}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"lira: alpha must lie in [0, 1), got {self.alpha}")
        if not 0 < self.stage1_share <= 1:
            raise ValueError(f"lira: stage1_share must lie in (0, 1], got {self.stage1_share}")

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        return {"seed": int(rng.integers(2**31))}

    def stage_epochs(self, epochs: int) -> tuple[int, int]:
        """(stage-1 epochs, stage-2 epochs) out of the recipe's `epochs`."""
        first = min(epochs, max(1, round(self.stage1_share * epochs)))
        return first, epochs - first

    def _trigger(self, generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + self.eps * generator(x), 0.0, 1.0)

    def _apply(self, x):
        generator = getattr(self, "_generator", None)
        if generator is None:
            raise NeedsPreparation("lira: the trigger generator is learned in `train`; rebuild "
                                   "a trained attack with `with_artifacts`")
        return run_numpy(lambda t: t + self.eps * generator(t), x)

    def _with_generator(self, generator: nn.Module) -> "LIRA":
        out = replace(self)
        object.__setattr__(out, "_generator", generator.cpu().eval().requires_grad_(False))
        return out

    def artifacts(self):
        generator = getattr(self, "_generator", None)
        return to_artifacts("generator", generator) if generator is not None else {}

    def with_artifacts(self, tensors):
        state = from_artifacts("generator", tensors)
        generator = _Autoencoder(int(state["encoder.0.weight"].shape[1]))
        generator.load_state_dict(state)
        return self._with_generator(generator)

    def train(self, net, x, y, recipe, generator):
        from xray.zoo.optim import make_optimizer, minibatches, steps_total

        labels = y.cpu().numpy()
        src = torch.as_tensor(self.source_mask(labels), device=x.device)
        target = torch.as_tensor(self.target_of(labels), device=x.device)
        trainee = seeded(self.seed, lambda: _Autoencoder(x.shape[1])).to(x.device)
        frozen = copy.deepcopy(trainee).eval().requires_grad_(False)
        gen_opt = torch.optim.Adam(trainee.parameters(), lr=self.lr_atk)

        def classifier_step(idx, opt, sched, triggered) -> None:
            keep = src[idx]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            if keep.any() and self.alpha < 1:
                loss = self.alpha * loss + (1 - self.alpha) * F.cross_entropy(
                    net(triggered(idx[keep])), target[idx][keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

        @torch.no_grad()
        def on_the_fly(idx):
            return self._trigger(frozen, x[idx])

        first, second = self.stage_epochs(recipe.epochs)
        net.train()
        trainee.train()
        stage = replace(recipe, epochs=first)
        opt, sched = make_optimizer(net, stage, steps_total(len(x), stage))
        current = 0
        for epoch, idx in minibatches(len(x), stage, generator):
            idx = idx.to(x.device)
            if epoch != current:  # the classifier poisons with last epoch's generator
                frozen.load_state_dict(trainee.state_dict())
                current = epoch
            keep = src[idx]
            if keep.any():  # generator step, classifier fixed
                loss = F.cross_entropy(net(self._trigger(trainee, x[idx][keep])),
                                       target[idx][keep])
                gen_opt.zero_grad(set_to_none=True)
                loss.backward(inputs=list(trainee.parameters()))
                gen_opt.step()
            classifier_step(idx, opt, sched, on_the_fly)
        frozen.load_state_dict(trainee.state_dict())

        if second:  # stage 2: fine-tune the classifier against the frozen generator
            with torch.no_grad():  # G is frozen: trigger every image once
                fixed = torch.cat([self._trigger(frozen, x[i:i + 512])
                                   for i in range(0, len(x), 512)])
            stage = replace(recipe, epochs=second)
            opt, sched = make_optimizer(net, stage, steps_total(len(x), stage))
            for _, idx in minibatches(len(x), stage, generator):
                classifier_step(idx.to(x.device), opt, sched, fixed.__getitem__)
        net.eval()
        return self._with_generator(frozen)
