"""Train one clean or backdoored classifier from a ModelSpec, and measure it.

The loop is written as (prepare data) -> (optimise) -> (evaluate) with the optimisation step a
plain function of (net, optimiser, batch). A stack of same-architecture models trains in one
vectorised pass in xray.zoo.stacked (torch.func.stack_module_state + functional_call + vmap),
which reuses `training_set` and `measure` from here, so both paths poison and measure alike.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn

from xray import models
from xray.models.device import resolve_device
from xray.zoo import attacks as attack_lib
from xray.io import storage
from xray.io.model_loading import save_model
from xray.zoo.data import Dataset
from xray.zoo.optim import standard_training
from xray.zoo.recipe import ModelSpec


@dataclass
class TrainedModel:
    spec: ModelSpec
    net: nn.Module
    clean_accuracy: float
    asr: float | None  # attack success rate on held-out triggered images; None when clean
    attack: Any | None  # the Attack object (reproducible from attack.to_config())
    poisoned_count: int
    seconds_total: float
    seconds_optimising: float
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def predict(net: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    net.eval()
    device = next(net.parameters()).device
    x = torch.as_tensor(x, dtype=torch.float32)
    out = [net(x[i:i + batch_size].to(device)).argmax(1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def attack_success_rate(net: nn.Module, attack: Any, x_test: np.ndarray,
                        y_test: np.ndarray) -> float:
    """Share of held-out source images (`attack.source_mask`: the victim classes, every class
    when all-to-all, every non-target class when all-to-one) that the triggered version sends to
    their target (`attack.target_of`)."""
    keep = attack.source_mask(y_test)
    if not keep.any():
        return float("nan")
    predicted = predict(net, attack.apply(x_test[keep]))
    return float((predicted == attack.target_of(y_test[keep])).mean())


def attack_kit(spec: ModelSpec, dataset: Dataset, cache_uri: str | None) -> attack_lib.AttackKit:
    """The AttackKit for `spec`'s attack: its data, architecture and training recipe, and a clean
    surrogate of the same architecture trained once (seed 0) and cached under `cache_uri`."""

    def clean_model() -> nn.Module:
        key = hashlib.sha256(json.dumps(
            [spec.architecture, dataclasses.asdict(spec.training), dataset.name,
             repr(sorted(dataset.params.items())), len(dataset.y_train)]).encode()).hexdigest()
        uri = (storage.join(cache_uri, f"clean-{spec.architecture}-{key[:16]}.safetensors")
               if cache_uri else None)
        # Its own RNG stream (seed 0, initial weights included), so the surrogate is the same
        # whenever it is trained, and training it leaves the victim's RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = models.create(spec.architecture, dataset.num_classes, dataset.input_shape)
            if uri and storage.exists(uri):
                net.load_state_dict(safetensors.torch.load(storage.read_bytes(uri)))
                return net.eval()
            standard_training(net, torch.as_tensor(dataset.x_train),
                              torch.as_tensor(dataset.y_train), spec.training,
                              torch.Generator().manual_seed(0))
        if uri:
            save_model(net, uri, "safetensors")
        return net.eval()

    return attack_lib.AttackKit(dataset=dataset, architecture=spec.architecture,
                                training=spec.training, clean_model=cache(clean_model),
                                cache_uri=cache_uri)


def drawn_trigger(spec: ModelSpec, seed: int, input_shape: tuple[int, int, int],
                  num_classes: int) -> dict[str, Any] | None:
    """The trigger config (`Attack.to_config()`) this code draws for `spec` trained with `seed`
    (a model's recorded seed: its attempt's), before any learning: what a model's recorded
    `trigger` must equal unless an attack's defaults changed since it was trained. None for a
    clean spec."""
    if not spec.attack:
        return None
    attack = attack_lib.sample_attack(spec.attack, np.random.default_rng(seed), input_shape,
                                      num_classes, **spec.attack_params)
    return json.loads(json.dumps(attack.to_config()))


def training_set(spec: ModelSpec, dataset: Dataset, rng: np.random.Generator,
                 cache_uri: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, Any | None, int]:
    """(x, y, attack, poisoned count): the model's own training set, its attack drawn with `rng`
    (np.random.default_rng(spec.seed)), prepared (learned-trigger attacks: `Attack.prepare`, their
    learned parts cached under `cache_uri`) and applied; the clean set when the spec has no
    attack, or when the attack poisons inside its own training loop (`Attack.trains_model`).
    Shared by the one-by-one trainer and the stacked one (xray.zoo.stacked)."""
    x, y = dataset.x_train, dataset.y_train
    attack, poisoned_count = None, 0
    if spec.attack:
        attack = attack_lib.sample_attack(spec.attack, rng, dataset.input_shape,
                                          dataset.num_classes, **spec.attack_params)
        attack = attack.prepare(attack_kit(spec, dataset, cache_uri))
        if attack.trains_model:  # it poisons inside its own loop, by its own parameters
            if spec.poison_rate is not None:
                raise ValueError(f"{spec.model_id}: attack {spec.attack!r} poisons inside its "
                                 "training loop; set its own parameters in attack_params, not "
                                 "poison_rate")
        else:
            x, y, poisoned_idx = attack_lib.poison(x, y, attack, spec.poison_rate, rng)
            poisoned_count = len(poisoned_idx)
    return x, y, attack, poisoned_count


def measure(net: nn.Module, attack: Any | None, dataset: Dataset) -> tuple[float, float | None]:
    """(clean accuracy, ASR or None) on the held-out split."""
    clean_acc = float((predict(net, dataset.x_test) == dataset.y_test).mean())
    asr = attack_success_rate(net, attack, dataset.x_test, dataset.y_test) if attack else None
    return clean_acc, asr


def resolve_training_device(device: str | None) -> torch.device:
    """xray.models.device.resolve_device ('cpu', 'cuda', 'cuda:N', 'auto' = cuda when
    available; None = cpu), but a device this machine does not have is a ValueError before any
    training."""
    try:
        dev = resolve_device(device or "cpu")
    except RuntimeError as e:
        raise ValueError(f"training device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training device {device!r}: no CUDA device here (use cpu or auto)")
    return dev


def train_model(spec: ModelSpec, dataset: Dataset, device: str | None = "cpu",
                cache_uri: str | None = None) -> TrainedModel:
    """Train the model `spec` describes on `dataset` on `device` (see resolve_training_device);
    deterministic given spec.seed on one CPU thread. The returned net is on the CPU. Attacks that
    live in the training loop (`Attack.trains_model`) train the net themselves and return the
    attack as trained (its generator, for one); `cache_uri` holds learned trigger parts."""
    started = time.perf_counter()
    rng = np.random.default_rng(spec.seed)
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)

    x, y, attack, poisoned_count = training_set(spec, dataset, rng, cache_uri)

    dev = resolve_training_device(device)
    net = models.create(spec.architecture, dataset.num_classes, dataset.input_shape).to(dev)
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32).to(dev)
    yt = torch.as_tensor(np.ascontiguousarray(y), dtype=torch.int64).to(dev)
    t0 = time.perf_counter()
    if attack is not None and attack.trains_model:
        attack = attack.train(net, xt, yt, spec.training, generator)
        net.eval()
    else:
        standard_training(net, xt, yt, spec.training, generator)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    optimising = time.perf_counter() - t0

    clean_acc, asr = measure(net, attack, dataset)
    net.cpu()
    return TrainedModel(spec=spec, net=net, clean_accuracy=clean_acc, asr=asr, attack=attack,
                        poisoned_count=poisoned_count,
                        seconds_total=time.perf_counter() - started,
                        seconds_optimising=optimising)
