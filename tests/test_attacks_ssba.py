"""SSBA (a StegaStamp encoder's sample-specific residual) and TrojanNN (a corner patch optimised
on a clean surrogate to fire well-connected neurons): they train, rebuild, and keep their defining
properties."""
from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch

from _attack_training import assert_attack_trains, tiny_dataset, tiny_spec
from xray import models
from xray.io import storage
from xray.zoo import attacks as A
from xray.zoo.attacks.ssba import StegaDecoder
from xray.zoo.attacks.trojannn import preprocess_layer, well_connected_neurons
from xray.zoo.optim import standard_training
from xray.zoo.recipe import training_recipe
from xray.zoo.train import attack_kit

# 400 encoder steps (the default is 1500) keep the test to ~25 s of encoder training on one core;
# measured on the tiny set: bits decode at ~99 %, mean |residual| ~0.056, ASR ~0.96.
SSBA_TEST = {"encoder_steps": 400}


@pytest.fixture(scope="module")
def ssba_cache(tmp_path_factory) -> str:
    """A cache folder holding the tiny set's encoder, trained once for this module."""
    return str(tmp_path_factory.mktemp("ssba-cache"))


def _ssba(seed: int, cache: str) -> A.Attack:
    dataset = tiny_dataset()
    attack = A.sample_attack("ssba", seed, dataset.input_shape, dataset.num_classes, **SSBA_TEST)
    return attack.prepare(attack_kit(tiny_spec("ssba", **SSBA_TEST), dataset, cache))


def test_ssba_trains_and_rebuilds(ssba_cache: str) -> None:
    trojaned = assert_attack_trains("ssba", cache_uri=ssba_cache, **SSBA_TEST)
    assert trojaned.attack.encoder  # the encoder's identity is recorded in the config
    assert trojaned.attack.to_config()["encoder"] == trojaned.attack.encoder


def test_ssba_trigger_is_sample_specific_small_and_decodable(ssba_cache: str) -> None:
    attack, other = _ssba(11, ssba_cache), _ssba(12, ssba_cache)
    assert attack.encoder == other.encoder  # one encoder per round, reused from the cache
    assert attack.seed != other.seed
    x = tiny_dataset().x_test[:64]
    r = attack.apply(x) - x
    # sample-specific: every image gets its own residual, not one shared pattern
    spread = np.abs(r - r.mean(0)).mean()
    assert spread > 0.1 * np.abs(r).mean(), spread
    assert not np.allclose(r[0], r[1], atol=1e-3)
    # small: far below a blended trigger's full-image change at alpha 0.2 and PSNR > 20 dB
    assert np.abs(r).mean() < 0.08 and 10 * np.log10(1 / np.mean(r ** 2)) > 20
    # the secret matters: another secret, another residual
    assert np.abs((other.apply(x) - x) - r).mean() > 0.2 * np.abs(r).mean()
    # StegaStamp's point: the jointly trained decoder reads this attack's secret back
    (name,) = [n for n in storage.listdir(ssba_cache) if "ssba-encoder" in n]
    tensors = safetensors.torch.load(storage.read_bytes(storage.join(ssba_cache, name)))
    decoder = StegaDecoder(tiny_dataset().input_shape, attack.secret_bits, attack.width)
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in tensors.items()
                             if k.startswith("decoder.")})
    with torch.no_grad():
        bits = (decoder(torch.from_numpy(attack.apply(x))) > 0).float()
    assert (bits == attack.secret()).float().mean() > 0.9


def test_ssba_refuses_a_foreign_encoder(ssba_cache: str) -> None:
    attack = _ssba(11, ssba_cache)
    tensors = attack.artifacts()
    tensors["encoder.residual.bias"] = tensors["encoder.residual.bias"] + 1e-3
    with pytest.raises(ValueError, match="digest"):
        A.attack_from_config(attack.to_config(), tensors)


def test_trojannn_trains_and_rebuilds() -> None:
    trojaned = assert_attack_trains("trojannn")
    assert trojaned.attack.surrogate  # the surrogate's identity is recorded in the config


def test_trojannn_pattern_fires_the_well_connected_neurons() -> None:
    dataset = tiny_dataset()
    torch.manual_seed(0)
    net = models.create("mntd_mnist_cnn", dataset.num_classes, dataset.input_shape)
    recipe = training_recipe({"preset": "small", "epochs": 2})  # an untrained net's are dead
    standard_training(net, torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train),
                      recipe, torch.Generator().manual_seed(0))
    kit = A.AttackKit(dataset=dataset, architecture="mntd_mnist_cnn", training=recipe,
                      clean_model=lambda: net)
    attack = A.sample_attack("trojannn", 3, dataset.input_shape, dataset.num_classes,
                             neuron_epoch=200).prepare(kit)
    pattern, mask = attack.artifacts()["pattern"], attack.artifacts()["mask"]
    assert torch.all(pattern * (1 - mask) == 0) and 0.03 < mask.mean() < 0.08  # a corner square
    layer = preprocess_layer(net)
    assert layer is net.classifier[-1]
    neurons = well_connected_neurons(layer, attack.neuron_num)
    seen = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, neurons]))
    gen = torch.Generator().manual_seed(attack.seed)
    start = mask * (torch.tanh(torch.randn(1, *pattern.shape, generator=gen)) + 1) / 2
    with torch.no_grad():
        net(start), net(pattern[None])
    hook.remove()
    # the optimisation drove them up from the random starting mark (measured x1.8-3.3 over mark
    # seeds; a neuron dead on the black image gets no gradient and stays at 0, as in TrojanZoo)
    assert seen[1].abs().sum() > 1.5 * seen[0].abs().sum() > 0
    x = dataset.x_test[:8]
    out = attack.apply(x)
    assert np.array_equal(out * (1 - mask.numpy()), x * (1 - mask.numpy()))  # only the patch
