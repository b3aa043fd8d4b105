"""BAN: the noisy BatchNorm pinned by hand, the not-applicable error, the model left as found,
the deadline, seed determinism, and the negative control on real NiN models."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from xray import detectors, models
from xray.detectors.ban import NoBatchNorm, _noisy, batchnorms
from xray.detectors.base import DeadlinePassed, ScanContext, ScanData
from xray.io.examples import load_examples
from xray.io.manifest import read_manifest
from xray.io.model_loading import load_model
from xray.models.layers import split_model

from _detector_checks import (ExpiresAfter, assert_as_found, assert_restored_after_error,
                             scan_round, snapshot, untrained_nin)


def test_noise_is_gamma_and_beta_times_one_plus_d():
    """The reference's NoisyBatchNorm2d: F.batch_norm(..., w * (1 + d), b * (1 + d_b))."""
    net, data = untrained_nin()
    for m in net.modules():  # non-trivial affine parameters and running statistics
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                for t in (m.weight, m.bias, m.running_mean):
                    t.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    bns = batchnorms(net)
    g = torch.Generator().manual_seed(0)
    noise = {f"{n}/{p}": torch.rand(m.num_features, generator=g) - 0.5
             for n, m in bns.items() for p in ("w", "b")}
    got = functional_call(net, _noisy(net, bns, noise), (data.x,))
    hand = {}
    for n, m in bns.items():
        hand[n] = m.register_forward_hook(
            lambda mod, inp, out, n=n: F.batch_norm(
                inp[0], mod.running_mean, mod.running_var, mod.weight * (1 + noise[n + "/w"]),
                mod.bias * (1 + noise[n + "/b"]), False, 0.0, mod.eps))
    try:
        expected = net(data.x)
    finally:
        for h in hand.values():
            h.remove()
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, net(data.x), atol=1e-3)  # the noise did act
    # the split parts take the same overrides under their own module paths
    front, head, _ = split_model(net, "last")
    z = functional_call(front, _noisy(front, bns, noise), (data.x,))
    assert torch.allclose(functional_call(head, _noisy(head, bns, noise), (z,)), got, atol=1e-5)


def test_model_without_batchnorm_is_not_applicable():
    net = models.create("mntd_mnist_cnn", 3, (3, 16, 16)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = ScanData(x=torch.rand(6, 3, 16, 16), y=torch.arange(3).repeat(2), num_classes=3)
    with pytest.raises(NoBatchNorm, match="not applicable to MNTDMnistCNN") as err:
        detectors.build("ban", preset="small").score(net, data, ScanContext())
    assert isinstance(err.value, ValueError)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_model_left_as_found():
    """Parameters, BN running statistics and counters, modes and .grad all as before, although
    the scan ran BN in train() mode (statistics moved) and put noise on every BN layer."""
    net, data = untrained_nin()
    net.net.features[0].train()  # a mixed mode, to be given back as it was
    before = snapshot(net)
    out = detectors.build("ban", preset="small").score(net, data, ScanContext(seed=0))
    assert out.stats["mask_steps"] == 50 and out.stats["noise_steps"] == 5
    assert_as_found(net, before)


def test_restored_on_error_too():
    assert_restored_after_error("ban", *untrained_nin())


def test_deadline_stops_early_and_counts_steps():
    net, data = untrained_nin()
    det = detectors.build("ban", preset="small")
    out = det.score(net, data, ExpiresAfter(1 + 3))  # require_time, then 3 mask steps
    s = out.stats
    assert s["stopped_early"] and s["steps"] == s["mask_steps"] == 3 and s["noise_steps"] == 0
    out = det.score(net, data, ExpiresAfter(1 + 50 + 2))  # all 50 mask steps, 2 noise steps
    s = out.stats
    assert s["stopped_early"] and (s["mask_steps"], s["noise_steps"], s["steps"]) == (50, 2, 52)
    with pytest.raises(DeadlinePassed):
        det.score(net, data, ExpiresAfter(1))  # time for require_time only, no step


def test_same_seed_same_result_on_a_real_model(nin_control_round):
    round_dir, _ = nin_control_round
    record = next(r for r in read_manifest(str(round_dir / "manifest.csv")) if r.poisoned)
    x, y = load_examples(record)
    data = ScanData(x=x, y=y, num_classes=record.num_classes)
    det = detectors.build("ban", preset="small")
    model = load_model(record)
    a = det.score(model, data, ScanContext(seed=5))
    b = det.score(model, data, ScanContext(seed=5))
    assert a.score == b.score and a.stats == b.stats


def test_negative_control_clean_models_score_below_trojaned(nin_control_round):
    """2 clean and 2 BadNets NiN (5-class 24 px signs), small preset, seed 0: every trojaned
    model's masked top share above every clean one's, and its target named."""
    round_dir, _ = nin_control_round
    rows = []
    for record, out in scan_round(round_dir, detectors.build("ban", preset="small")):
        assert out.stats["steps"] == 55 and not out.stats["stopped_early"]
        rows.append((record.poisoned, record.target, out.target, out.score,
                     out.stats["top_share_plain"]))
    print("ban nin control:", json.dumps(rows))
    clean = [r[3] for r in rows if not r[0]]
    trojaned = [r for r in rows if r[0]]
    assert len(clean) == 2 and len(trojaned) == 2
    assert max(clean) < min(r[3] for r in trojaned), rows
    assert all(r[1] == r[2] for r in trojaned), rows
