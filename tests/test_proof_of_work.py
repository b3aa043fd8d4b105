"""Detectors do the work before they answer: the model's deadline is seconds left (and stops
loops gracefully), a detector that could take no step gives a timeout / error row, and the
fidelity fixes that need no trained round (EX-RAY's relu, Model X-ray's stacked path, MNTD's
query initialisation) are pinned here. Per-detector negative controls and golden figures live in
each detector's own test file."""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from xray import detectors, models
from xray.config import parse_config
from xray.detectors.base import DeadlinePassed, ScanContext, ScanData
from xray.io.model_loading import Normalized


def _tiny(classes: int = 3, side: int = 16):
    torch.manual_seed(0)
    net = Normalized(models.create("mntd_mnist_cnn", classes, (3, side, side)), (0.5,),
                     (0.25,)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6 * classes, 3, side, side, generator=g)
    y = torch.arange(classes).repeat_interleave(6)
    return net, ScanData(x=x, y=y, num_classes=classes, mean=(0.5,), std=(0.25,))


# ------------------------------------------------------------------ the deadline's meaning


def test_deadline_is_seconds_left_on_a_monotonic_clock():
    assert ScanContext().seconds_left() is None and not ScanContext().expired()
    ctx = ScanContext(deadline=30.0)
    left = ctx.seconds_left()
    assert 29.0 < left <= 30.0 and not ctx.expired()  # not compared with time.time() (~1.7e9)
    assert ScanContext(deadline=0.0).expired() and ScanContext(deadline=-1.0).expired()
    short = ScanContext(deadline=0.05)
    time.sleep(0.1)
    assert short.expired() and short.seconds_left() < 0


@pytest.mark.parametrize("name,params", [
    ("nc", {"steps": 100000, "early_stop_patience": 100000}),
    ("mmbd", {"max_steps": 1000000, "tol": 0.0}),
])
def test_a_detector_stops_at_the_deadline_with_what_it_has(name, params):
    net, data = _tiny()
    started = time.monotonic()
    result = detectors.build(name, params).score(net, data, ScanContext(seed=0, deadline=1.5))
    assert time.monotonic() - started < 20  # stopped near the deadline, not after its budget
    assert result.stats["stopped_early"] is True
    assert isinstance(result.stats["steps"], int) and result.stats["steps"] > 0
    assert np.isfinite(result.score)


@pytest.mark.parametrize("name", ["nc", "mmbd", "nc+exray"])
def test_no_time_left_is_a_named_error_not_a_score(name):
    net, data = _tiny()
    with pytest.raises(DeadlinePassed, match="time limit"):
        detectors.build(name, preset="small").score(net, data, ScanContext(deadline=0.0))


def test_scan_model_turns_a_spent_time_limit_into_timeout_rows(tiny_round):
    """The runner's per-model time limit reaches detectors as ctx.deadline (scan_stack): a limit
    already spent gives `timeout` rows naming DeadlinePassed; a generous one lets NC work and
    its row carries the steps."""
    from xray.io.manifest import read_manifest
    from xray.scanning import scan_model

    round_dir, _ = tiny_round
    record = read_manifest(str(round_dir / "manifest.csv"))[0]
    spent = parse_config({"seed": 0, "model_time_limit_s": 0.05,
                          "detectors": {"nc": {"params": {"steps": 3}}}})
    (row,) = scan_model(record, [d.build() for d in spent.detectors], spent)["scores"]
    assert row["status"] == "timeout" and "DeadlinePassed" in row["error"]
    assert row["score"] is None
    ample = dataclasses.replace(spent, model_time_limit_s=600.0)
    (row,) = scan_model(record, [d.build() for d in ample.detectors], ample)["scores"]
    stats = json.loads(row["stats_json"])
    assert row["status"] == "ok" and stats["steps"] > 0 and stats["stopped_early"] is False


# ------------------------------------------------------------------ fidelity fixes


class _Add(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return x + self.value


def test_exray_masks_see_relu_features_as_the_reference(monkeypatch):
    """ref (Exray mask_prune_by_neuron_mask): F.relu on the inner outputs of V, V+t and T. The
    split is shifted by -1 (and back by +1 in g, so g(h(x)) == model(x)), as a layer whose
    output is pre-activation (PreActResNet layer3, VGG-BN): the masks must see relu(h(x))."""
    import xray.models.layers as layers
    from xray.detectors import exray as exray_module
    from xray.detectors.inversion.core import TriggerCandidate

    net, data = _tiny()
    real_split, real_optimise = layers.split_model, exray_module.optimise_masks

    def shifted_split(model, position):
        h, g, name = real_split(model, position)
        return nn.Sequential(h, _Add(-1.0)), nn.Sequential(_Add(1.0), g), name

    seen = []

    def watched_optimise(g, a_feats, b_feats, *args, **kwargs):
        seen.extend(list(a_feats) + list(b_feats))
        return real_optimise(g, a_feats, b_feats, *args, **kwargs)

    monkeypatch.setattr(layers, "split_model", shifted_split)
    monkeypatch.setattr(exray_module, "optimise_masks", watched_optimise)
    h, _, _ = shifted_split(net, "middle")
    with torch.no_grad():
        assert float(h(data.x).min()) < 0  # the raw features are negative here
    cand = TriggerCandidate(victim=0, target=1, kind="patch", mask=torch.zeros(16, 16),
                            pattern=torch.ones(3, 1, 1))
    cand.mask[:4, :4] = 1.0
    ex = exray_module.ExRay(exray_module.ExRay.Params(layer="middle", epochs=2))
    verdicts = ex.examine(net, data, [cand], ScanContext(seed=0))
    assert len(verdicts) == 1 and seen
    assert all(float(f.min()) >= 0 for f in seen)  # relu(h(x)), never the raw h(x)


def test_modelxray_stack_runs_in_inference_mode_and_restores_modes():
    det = detectors.build("modelxray", {"num_planes": 2, "resolution": 4})
    nets, datas = [], []
    for seed in (0, 1):
        net, data = _tiny()
        torch.manual_seed(seed)
        for p in net.parameters():
            p.data.normal_(0, 0.1)
        nets.append(net)
        datas.append(data)
    inner = nets[0].net
    inner.train()  # a submodule left in training mode by its owner
    modes_before = [[m.training for m in n.modules()] for n in nets]
    seen = []
    real_forward = type(inner).forward

    def watch(self, x):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return real_forward(self, x)

    type(inner).forward = watch
    try:
        stacked = det.score_stack(nets, datas, ScanContext(seed=0))
    finally:
        type(inner).forward = real_forward
    assert seen and all(inf for inf, _ in seen)  # no autograd graph is built
    assert [[m.training for m in n.modules()] for n in nets] == modes_before
    alone = [det.score(n, d, ScanContext(seed=0)) for n, d in zip(nets, datas)]
    assert [r.score for r in stacked] == pytest.approx([r.score for r in alone])


def test_mntd_query_init_measures_every_shadow_examples_folder(tmp_path):
    """ref: the query initialisation is measured over the shadow models' data, not the first
    record's alone (a dark first folder and a bright second one average to grey)."""
    from xray.detectors.mntd import measure_query_init
    from xray.io.examples import write_examples
    from xray.io.records import ModelRecord

    records = []
    for i, value in enumerate((0.0, 1.0)):
        folder = tmp_path / f"m{i}" / "clean_example_data"
        write_examples(torch.full((4, 3, 8, 8), value), torch.tensor([0, 0, 1, 1]), str(folder))
        records.append(ModelRecord(model_id=f"m{i}", uri=str(tmp_path / f"m{i}" / "model.pt"),
                                   format="safetensors", architecture="mntd_mnist_cnn",
                                   num_classes=2, input_shape=(3, 8, 8),
                                   examples_uri=str(folder)))
    mean, std = measure_query_init(records)
    assert mean == pytest.approx([0.5, 0.5, 0.5], abs=1e-6)
    assert std == pytest.approx([0.5] * 3, abs=0.01)


def test_karm_exray_examines_only_the_arms_karm_calls_trojaned():
    """karm+exray used to read a mark K-Arm never set and so examined every arm, unconverged ones
    included; now it takes K-Arm's own trojaned arms (none on a model K-Arm calls benign)."""
    net, data = _tiny()
    result = detectors.build("karm+exray", preset="small").score(net, data, ScanContext(seed=0))
    cands = result.artifacts["candidates"]
    assert cands, "the tiny net should give K-Arm some arms to try"
    trojaned = [bool(c.stats["trojaned"]) for c in cands]
    assert [row["upstream_selected"] for row in result.triggers] == trojaned
    assert result.stats["selected"] == sum(trojaned)
    assert sum(trojaned) <= 1 and (sum(trojaned) == 1) == result.stats["upstream"]["trojaned"]
    if not any(trojaned):
        assert result.score == 0.0 and result.target is None
    assert result.stats["steps"] >= result.stats["upstream"]["steps"] > 0
