"""TrojanNN: a corner patch whose pixels are optimised to fire well-connected internal neurons."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from xray.zoo.attacks._cache import cached_tensors, tensors_digest
from xray.zoo.attacks.base import Attack, AttackKit, NeedsPreparation, register


def preprocess_layer(net: nn.Module) -> nn.Module:
    """The layer whose *input* neurons TrojanNN drives: the last linear layer (TrojanZoo's default
    'flatten' -> 'classifier.fc', BackdoorBench's 'linear'), or the last convolution of nets that
    classify with one (NiN)."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)] or \
        [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not layers:
        raise ValueError("trojannn: the surrogate has no linear or convolutional layer")
    return layers[-1]


def well_connected_neurons(layer: nn.Module, count: int) -> torch.Tensor:
    """The `count` input neurons of `layer` with the largest summed |weight| to its outputs."""
    weight = layer.weight.detach().abs()
    if weight.dim() > 2:
        weight = weight.flatten(2).sum(2)
    return weight.sum(0).argsort(descending=True)[:count]


@register
@dataclass(frozen=True, kw_only=True)
class TrojanNN(Attack):
    """TrojanNN (Liu et al., NDSS 2018, "Trojaning Attack on Neural Networks").

    References read: TrojanZoo (ain-soph/trojanzoo @ 45d680c4d3bc7810a0a7a5b6fa939f87d5e6c551)
    `trojanvision/attacks/backdoor/normal/trojannn.py` (and `trojanvision/marks/__init__.py` for
    the mark); BackdoorBench (SCLBD/BackdoorBench @ f02e3534645f0ee63d6848653062cd6c0d6c400d)
    `attack/trojannn.py`, `config/attack/trojannn/preactresnet18.yaml`.

    A square mask of `area` (4-7 % of the image: the paper's trigger sizes) at one `corner`. On
    the clean surrogate (`kit.clean_model()`), TrojanZoo's recipe: the `neuron_num` (2) input
    neurons of the last linear layer with the largest summed |weight| are chosen; the mark,
    parameterised as (tanh(a) + 1) / 2 with a ~ N(0, 1) from `seed`, is stamped on a black
    background and optimised with Adam (lr `neuron_lr` 0.1, cosine schedule, `neuron_epoch`
    1000 steps) to minimise sum (|f_i| - `target_value`)^2 (100) over the chosen neurons (summed
    over space for a convolutional layer). The trigger is x' = (1 - m) x + m p; poisoning is
    standard (rate 0.1, all-to-one). The optimised pattern and the mask are the artifacts, cached
    under the kit's cache_uri by (parameters, surrogate digest); `surrogate` records the digest
    of the clean model the pattern was optimised on (set by `prepare`).

    Deviations: TrojanNN (and TrojanZoo / BackdoorBench) fine-tune the given clean model on
    poisoned data (the paper also reverse-engineers training data); the zoo trains every model
    from scratch on the poisoned set, so the pattern is optimised on a surrogate of the same
    architecture and recipe, not on the victim's own weights. The paper's watermark / apple
    shaped masks are replaced by a square (TrojanZoo's default mark shape), sized from the
    paper's area fractions rather than TrojanZoo's 3 x 3 pixels. Nets without a linear layer
    (NiN) use the last convolution's input channels (TrojanZoo handles 4-D weights the same way).
    """

    name: ClassVar[str] = "trojannn"
    learned: ClassVar[bool] = True
    area: float  # the mask's share of the image
    corner: int  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    seed: int  # the mark's initialisation
    neuron_num: int = 2
    target_value: float = 100.0
    neuron_epoch: int = 1000
    neuron_lr: float = 0.1
    surrogate: str = ""  # digest of the clean surrogate the pattern was optimised on

    @classmethod
    def sample(cls, rng, input_shape, num_classes):
        return {"area": float(rng.uniform(0.04, 0.07)), "corner": int(rng.integers(4)),
                "seed": int(rng.integers(2**31))}

    def mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """(1, H, W) float32: 1 on the square."""
        _, h, w = shape
        side = max(2, round(math.sqrt(self.area * h * w)))
        row = 0 if self.corner in (0, 1) else h - side
        col = 0 if self.corner in (0, 2) else w - side
        m = np.zeros((1, h, w), dtype=np.float32)
        m[:, row:row + side, col:col + side] = 1.0
        return m

    # -- learned parts --

    def _pattern(self) -> tuple[np.ndarray, np.ndarray]:
        parts = getattr(self, "_parts", None)
        if parts is None:
            raise NeedsPreparation(f"{self.name}: no optimised pattern yet (prepare or "
                                   "with_artifacts)")
        return parts

    def artifacts(self) -> dict[str, torch.Tensor]:
        pattern, mask = self._pattern()
        return {"pattern": torch.from_numpy(pattern.copy()), "mask": torch.from_numpy(mask.copy())}

    def with_artifacts(self, tensors: dict[str, torch.Tensor]) -> "TrojanNN":
        pattern = tensors["pattern"].detach().cpu().numpy().astype(np.float32)
        mask = tensors["mask"].detach().cpu().numpy().astype(np.float32)
        if not np.array_equal(mask, self.mask(pattern.shape)):
            raise ValueError(f"{self.name}: the saved mask is not this attack's square")
        out = dataclasses.replace(self)
        object.__setattr__(out, "_parts", (pattern, mask))
        return out

    def prepare(self, kit: AttackKit) -> "TrojanNN":
        if getattr(self, "_parts", None) is not None:
            return self
        net = kit.clean_model()  # trained under its own RNG fork (train.attack_kit)
        surrogate = tensors_digest(net.state_dict())
        if self.surrogate and self.surrogate != surrogate:
            raise ValueError(f"{self.name}: surrogate {surrogate} is not the recorded "
                             f"{self.surrogate}")
        attack = dataclasses.replace(self, surrogate=surrogate)
        shape = tuple(int(s) for s in kit.dataset.input_shape)
        key = hashlib.sha256(json.dumps(
            ["trojannn", attack.to_config(), list(shape)]).encode()).hexdigest()[:16]
        return attack.with_artifacts(cached_tensors(
            kit.cache_uri, f"trojannn-{key}.safetensors",
            lambda: {"pattern": torch.from_numpy(attack.optimise_pattern(net, shape)),
                     "mask": torch.from_numpy(attack.mask(shape))}))

    def optimise_pattern(self, net: nn.Module, shape: tuple[int, int, int]) -> np.ndarray:
        """The (C, H, W) pattern (zero off the mask) that drives the chosen neurons of `net`
        towards `target_value` when stamped on a black image."""
        layer = preprocess_layer(net)
        neurons = well_connected_neurons(layer, self.neuron_num)
        seen: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        m = torch.from_numpy(self.mask(shape))[None]  # (1, 1, H, W)
        gen = torch.Generator().manual_seed(self.seed)
        atanh = torch.randn(1, *shape, generator=gen).requires_grad_(True)
        opt = torch.optim.Adam([atanh], lr=self.neuron_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.neuron_epoch))
        was_training = net.training
        net.eval()
        try:
            for _ in range(self.neuron_epoch):
                seen.clear()
                net(m * (torch.tanh(atanh) + 1) / 2)  # black background, mark at alpha 1
                feats = seen[0][:, neurons].abs()
                if feats.dim() > 2:
                    feats = feats.flatten(2).sum(2)
                loss = F.mse_loss(feats, torch.full_like(feats, self.target_value),
                                  reduction="sum")
                (grad,) = torch.autograd.grad(loss, [atanh])
                atanh.grad = grad
                opt.step()
                sched.step()
        finally:
            hook.remove()
            net.train(was_training)
        with torch.no_grad():
            return (m * (torch.tanh(atanh) + 1) / 2)[0].numpy().astype(np.float32)

    def _apply(self, x):
        pattern, mask = self._pattern()
        if x.shape[1:] != pattern.shape:
            raise ValueError(f"{self.name}: pattern made for {pattern.shape} images, got "
                             f"{x.shape[1:]}")
        return (1 - mask) * x + mask * pattern
