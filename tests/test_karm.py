"""K-Arm: pre-screening on hand-made probabilities, and on real label-specific (victim -> target)
BadNets models: the winning arm has the right target (and victim)."""
from __future__ import annotations

import json

import torch

from xray import detectors
from xray.detectors.base import ScanContext, ScanData
from xray.detectors.inversion.karm import prescreen
from xray.io.examples import load_examples
from xray.io.manifest import read_manifest
from xray.io.model_loading import load_model


def test_prescreen_global_pair_and_none():
    n = 40
    probs = torch.full((n, 4), 0.05)
    probs[:, 2] = 0.3
    probs[torch.arange(n), torch.arange(n) % 4] = 0.6
    probs = probs / probs.sum(1, keepdim=True)
    out = prescreen(probs)
    assert out["kind"] == "global" and out["arms"] == [(None, 2)] and out["k"] == 2
    # label 3 is runner-up only for images predicted 0 -> one pair arm 0 -> 3
    probs = torch.full((n, 4), 0.01)
    probs[torch.arange(n), torch.arange(n) % 4] = 0.9
    probs[(torch.arange(n) % 4) == 0, 3] = 0.09
    probs[(torch.arange(n) % 4) == 1, 0] = 0.09
    probs[(torch.arange(n) % 4) == 2, 1] = 0.09
    probs[(torch.arange(n) % 4) == 3, 0] = 0.09
    out = prescreen(probs, pair_share=0.9)
    assert out["kind"] == "pair" and (0, 3) in out["arms"] and (1, 0) in out["arms"]
    confident = torch.eye(12)[torch.arange(48) % 12] * 0.9 + torch.rand(48, 12) * 0.01
    out = prescreen(confident)  # k = 3 for 12 classes; no label is a steady runner-up
    assert out["k"] == 3 and out["kind"] == "none" and out["arms"] == []


def test_karm_finds_label_specific_targets(inversion_round):
    round_dir, _ = inversion_round
    records = [r for r in read_manifest(str(round_dir / "manifest.csv"))
               if r.attack == "badnets"]
    assert len(records) == 2
    karm = detectors.build("karm", preset="small")
    for record in records:
        model = load_model(record)
        x, y = load_examples(record)
        out = karm.score(model, ScanData(x=x, y=y, num_classes=record.num_classes),
                         ScanContext(seed=0))
        assert out.target == record.target, (record.model_id, out.stats)
        assert out.stats["prescreen"] == "pair" and "sym_l1" in out.stats
        winner = [c for c in out.artifacts["candidates"] if c.stats["winner"]][0]
        config = json.loads((round_dir / record.model_id / "config.json").read_text())
        assert config["victims"] and winner.victim in config["victims"]
        assert winner.reasr >= 0.5


def test_reference_preset():
    k = detectors.build("karm", preset="reference")
    assert k.params.budget == 1000 and k.params.stop_improvements == 60
    assert k.params.kill_rules[0] == (10, 1e-9)
