"""A tiny session round for the inversion scanners: one filter-attacked model and two
label-specific (victim -> target) BadNets models, 5-class 24 x 24 signs like TINY_RECIPE.

Imported by conftest.py (one line). Built once per session on first use (~40-80 s on 2 cores).
"""
from __future__ import annotations

import copy

import pytest

from _fixtures import TINY_RECIPE, build_test_round

INVERSION_RECIPE = copy.deepcopy(TINY_RECIPE)
INVERSION_RECIPE.update(name="inversion", seed=11, groups=[
    {"count": 1, "attack": "filter", "poison_rate": 0.1},
    {"count": 1, "attack": "badnets", "poison_rate": 0.3,
     "attack_params": {"victims": [1], "target": 3}},
    {"count": 1, "attack": "badnets", "poison_rate": 0.3,
     "attack_params": {"victims": [0], "target": 2}},
])


@pytest.fixture(scope="session")
def inversion_round(tmp_path_factory):
    """(round directory, BuildResult) of INVERSION_RECIPE, built once per session."""
    return build_test_round(tmp_path_factory, INVERSION_RECIPE, "inversion")


INVERSION_SCAN_CONFIG = {"seed": 0, "detectors": {"nc": {"preset": "small"},
                                                  "abs": {"preset": "small"},
                                                  "karm": {"preset": "small"}}}


@pytest.fixture(scope="module")
def inversion_scan(tiny_round, ray_local, tmp_path_factory):
    """The tiny round scanned with nc, abs and karm (small presets) through the real runner:
    (round_dir, out_dir, RunSummary)."""
    from xray.config import parse_config
    from xray.runner import run_scan

    round_dir, _ = tiny_round
    out = tmp_path_factory.mktemp("inversion-scan") / "out"
    summary = run_scan(str(round_dir / "manifest.csv"), str(out),
                       parse_config(INVERSION_SCAN_CONFIG), show_progress=False)
    return round_dir, out, summary
