"""ABS: candidate selection on hand-made stimulation results, stimulation on a toy net, and on
real models: patch triggers with REASR >= 0.9 on the BadNets models, a filter trigger on the
filter-attacked model."""
from __future__ import annotations

import torch
import torch.nn as nn

from xray import detectors
from xray.detectors.base import ScanContext, ScanData
from xray.detectors.inversion.abs import select_candidates, stimulate
from xray.io.examples import load_examples
from xray.io.manifest import read_manifest
from xray.io.model_loading import load_model


def test_select_candidates_prefers_runner_ups_and_needs_agreement():
    # 2 images per label (labels 0, 1), 4 channels; label[i, c] = stimulated label
    y = torch.tensor([0, 0, 1, 1])
    label = torch.tensor([[2, 3, 1, 0], [2, 3, 1, 4],   # victim 0: ch 3 disagrees
                          [0, 0, 2, 1], [0, 0, 2, 1]])  # victim 1: ch 3 says its own label
    score = torch.tensor([[5.0, 1.0, 9.0, 1.0], [4.0, 2.0, 8.0, 1.0],
                          [1.0, 3.0, 2.0, 7.0], [2.0, 1.0, 2.0, 7.0]])
    out = select_candidates(label, score, y, {0: [3], 1: []}, per_victim=3)
    v0 = [c for c in out if c[0] == 0]
    assert [(t, ch) for _, t, ch, _ in v0] == [(3, 1), (1, 2), (2, 0)]  # runner-up 3 first
    assert v0[1][3] == 8.0  # value = min score over the victim's images
    v1 = [c for c in out if c[0] == 1]
    assert [(t, ch) for _, t, ch, _ in v1] == [(2, 2), (0, 0)]  # best channel per target
    assert select_candidates(label, score, y, {}, per_victim=1)[0][:3] == (0, 1, 2)


def test_stimulation_finds_the_neuron_wired_to_a_label():
    h = nn.Conv2d(3, 4, 1)
    g = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        h.weight.fill_(0.1)
        h.bias.zero_()
        g[3].weight.zero_()
        g[3].weight[2, 1] = 5.0  # channel 1 drives label 2
        g[3].weight[0, 3] = 1.0  # channel 3 drives label 0, weakly
        g[3].bias.zero_()
    x = torch.rand(4, 3, 6, 6)
    y = torch.tensor([0, 0, 1, 1])
    out = stimulate(h, g, x, y, (0.0, 0.5, 1.0))
    assert (out["label"][:, 1] == 2).all() and (out["label"][:, 3] == 0).all()
    assert (out["score"][:, 1] > out["score"][:, 3]).all()


def _run(record, params):
    model = load_model(record)
    x, y = load_examples(record)
    data = ScanData(x=x, y=y, num_classes=record.num_classes)
    return detectors.build("abs", params, "small").score(model, data, ScanContext(seed=0))


def test_abs_patch_triggers_on_badnets_models(tiny_round):
    round_dir, _ = tiny_round
    bad = [r for r in read_manifest(str(round_dir / "manifest.csv")) if r.poisoned]
    hits = 0
    for record in bad:
        result = _run(record, {"modes": ("patch",)})
        cands = result.artifacts["candidates"]
        assert cands and all(c.kind == "patch" for c in cands)
        assert result.stats["layer"] == "net.features.2"
        assert result.score >= 0.9
        hits += any(c.target == record.target and c.reasr >= 0.9 for c in cands)
        row = result.triggers[0]
        assert row["mask"].shape == (24, 24) and row["pattern"].shape == (3, 1, 1)
    assert hits >= len(bad) - 1


def test_abs_filter_trigger_on_filter_model(inversion_round):
    round_dir, _ = inversion_round
    record = next(r for r in read_manifest(str(round_dir / "manifest.csv"))
                  if r.attack == "filter")
    result = _run(record, {})
    filters = [c for c in result.artifacts["candidates"] if c.kind == "filter"]
    assert filters and all(c.kernel.shape == (12, 3) for c in filters)
    assert any(c.target == record.target and c.reasr >= 0.9 for c in filters)
    assert all(0 < c.size <= 1 for c in filters)  # size = SSIM for filters
    assert result.score >= 0.9
