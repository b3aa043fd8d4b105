"""A tiny session round for the inversion scanners: one filter-attacked model and two
label-specific (victim -> target) BadNets models, 5-class 24 x 24 signs like TINY_RECIPE.

Imported by conftest.py (one line). Built once per session on first use (~40-80 s on 2 cores).
"""
from __future__ import annotations

import copy

import pytest

from _detector_checks import scan_round
from _fixtures import TINY_RECIPE, build_test_round, once_per_run

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


# K-Arm's negative control round. K-Arm's pre-screen needs a label that stays in the clean
# images' top-k, which the narrow MNTD CNN rounds above do not give it (its scores there did not
# separate, even at the reference preset); on NiN they do, as on the EX-RAY bench round (same
# recipe and seeds, 10 models: 4 of 6 trojaned called trojaned, 0 of 4 clean).
NIN_CONTROL_RECIPE = {
    "name": "nin-control", "seed": 7007,
    "dataset": {"name": "signs", "params": {"num_classes": 5, "image_size": 24,
                                            "n_train_per_class": 200, "n_test_per_class": 40,
                                            "seed": 3}},
    "architecture": "nin",
    "training": {"preset": "small", "epochs": 10},
    "asr_floor": 0.8, "max_attempts": 2,
    "examples_per_class": 8, "poisoned_examples_per_class": 4,
    "groups": [{"count": 2}, {"count": 2, "attack": "badnets", "poison_rate": 0.1}],
}


@pytest.fixture(scope="session")
def nin_control_round(tmp_path_factory):
    """(round directory, BuildResult) of NIN_CONTROL_RECIPE (2 clean, 2 BadNets NiN), built once
    per session and shared by the negative controls on NiN (K-Arm, karm+exray, BAN)."""
    return build_test_round(tmp_path_factory, NIN_CONTROL_RECIPE, "nin-control")


@pytest.fixture(scope="session")
def nin_karm_scans(nin_control_round, tmp_path_factory):
    """[(record, DetectorResult)] of karm+exray (small preset, seed 0) on every model of
    NIN_CONTROL_RECIPE (2 clean, 2 BadNets); `upstream_result` gives K-Arm's own result.
    Computed once per run (once_per_run)."""
    from xray import detectors

    round_dir, _ = nin_control_round
    return once_per_run(tmp_path_factory, "nin-karm-scans", str(round_dir), lambda _: scan_round(
        round_dir, detectors.build("karm+exray", preset="small")))


@pytest.fixture(scope="session")
def mnist_composed_scans(mntd_target, tmp_path_factory):
    """scans(name) -> [(record, DetectorResult)] of the composed scanner `name` ("nc+exray",
    "abs+exray", "karm+exray"; small presets, seed 0) on every model of the MNTD target round
    (MNIST, 10 labels: 6 clean, 3 BadNets, 3 MNTD-M), computed once per session.

    A composed result also carries its upstream's (`upstream_result`): the vanilla scanner ran
    with the same parameters on the same data, so the vanilla negative controls (test_nc,
    test_abs) and the composed ones (test_composed) share one optimisation per model, also
    across pytest-xdist workers (once_per_run)."""
    from xray import detectors

    cache: dict[str, list] = {}

    def scans(name: str) -> list:
        if name not in cache:
            cache[name] = once_per_run(
                tmp_path_factory, f"mnist-{name}", [str(mntd_target[0]), name],
                lambda _: scan_round(mntd_target[0], detectors.build(name, preset="small")))
        return cache[name]

    return scans


def upstream_result(composed):
    """The vanilla scanner's own result inside a composed one (score, target, stats and
    candidates exactly as the upstream detector returned them)."""
    return composed.artifacts["upstream_result"]


def assert_mask_outlier_control(scans, min_auc: float, name: str) -> None:
    """The negative control of the mask-size scanners (NC, TABOR) on the MNTD target round
    (6 clean, 6 trojaned): every result took steps, the right target on at least 5 of 6
    trojaned models, every clean model's smallest / median mask L1 above every trojaned one's,
    and the score (MAD anomaly index of the smallest L1) ranking trojaned models higher with a
    ROC-AUC of at least `min_auc`. scans: [(record, DetectorResult)]."""
    import numpy as np

    from xray.reduce.metrics import roc_auc

    clean = [out for r, out in scans if not r.poisoned]
    trojaned = [(r, out) for r, out in scans if r.poisoned]
    assert len(clean) == 6 and len(trojaned) == 6
    assert all(isinstance(o.stats["steps"], int) and o.stats["steps"] > 0 for _, o in scans)
    hits = sum(out.target == r.target for r, out in trojaned)
    assert hits >= 5, [(r.target, out.target) for r, out in trojaned]
    ratio_clean = [o.stats["min_over_median"] for o in clean]
    ratio_trojaned = [o.stats["min_over_median"] for _, o in trojaned]
    assert min(ratio_clean) > max(ratio_trojaned), (ratio_clean, ratio_trojaned)
    y = np.array([0] * len(clean) + [1] * len(trojaned))
    auc = roc_auc(y, np.array([o.score for o in clean] + [o.score for _, o in trojaned]))
    auc = auc[0] if isinstance(auc, tuple) else auc
    assert auc >= min_auc, f"{name} anomaly index ROC-AUC {auc:.3f}"
    assert all(np.isfinite(o.score) for _, o in scans)
