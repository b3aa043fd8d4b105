"""Model X-ray: RE / ATS pinned on hand-built grids, plane geometry, a backdoor-like toy model,
determinism, batched == naive, the adaptive grid against the full one, the picture."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from xray import detectors
from xray.detectors.base import ScanContext, ScanData
from xray.detectors.modelxray import (ModelXray, Plane, areas_of_triple_samples,
                                      coarse_step, draw_planes, lattice, make_plane,
                                      predict_planes, predict_planes_adaptive, renyi_entropy,
                                      sample_areas, summarise)
from xray.models import create

# ----------------------------------------------------------------------------- RE


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 10.0, math.inf])
def test_renyi_one_label_everywhere_is_zero(alpha):
    grid = np.full((12, 12), 3)
    assert renyi_entropy(grid, 10, alpha) == 0.0


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 10.0, 37.0, math.inf])
def test_renyi_three_equal_regions_is_log2_3(alpha):
    grid = np.repeat(np.array([[0], [4], [7]]), 6, axis=0).repeat(18, axis=1)  # 18 x 18
    assert grid.shape == (18, 18)
    assert renyi_entropy(grid, 10, alpha) == pytest.approx(math.log2(3), rel=1e-12, abs=1e-12)


def test_renyi_matches_formula_on_unequal_shares():
    grid = np.array([[0, 0], [1, 2]])  # shares 1/2, 1/4, 1/4
    expected = 1 / (1 - 2) * math.log2(0.25 + 0.0625 + 0.0625)
    assert renyi_entropy(grid, 3, 2.0) == pytest.approx(expected, rel=1e-12)
    # alpha 10: dominated by the largest share, close to -log2(1/2) * 10/9
    assert renyi_entropy(grid, 3, 10.0) == pytest.approx(
        -math.log2(0.5 ** 10 + 2 * 0.25 ** 10) / 9, rel=1e-12)


def test_renyi_empty_grid_raises():
    with pytest.raises(ValueError, match="empty"):
        renyi_entropy(np.zeros((0, 0), dtype=int), 3, 10.0)


# ----------------------------------------------------------------------------- ATS


def test_ats_one_label_everywhere_counts_nothing():
    grid = np.full((10, 10), 1)
    cells = np.array([[0, 0], [5, 5], [9, 9]])
    # sample 0 owns the whole plane (>= T: counts 0); samples 1, 2 sit on another label (A = 0)
    np.testing.assert_allclose(sample_areas(grid, cells, [1, 2, 3]), [1.0, 0.0, 0.0])
    assert areas_of_triple_samples(grid, cells, [1, 2, 3], 0.5) == 0.0


def test_ats_sample_on_another_label_is_zero():
    grid = np.zeros((10, 10), dtype=int)
    grid[:2, :2] = 1  # a small region of label 1 ...
    cells = np.array([[8, 8], [0, 0], [9, 0]])
    # ... but sample 0 (label 1) sits on label 0: A_0 = 0 although a label-1 region exists
    np.testing.assert_allclose(sample_areas(grid, cells, [1, 1, 2]), [0.0, 0.04, 0.0])


def test_ats_small_components_count_8_connected():
    grid = np.zeros((10, 10), dtype=int)
    grid[0:2, 0:2] = 1                    # label 1: 4 cells
    grid[5, 5] = grid[6, 6] = grid[7, 7] = 2  # label 2: a diagonal, one 8-connected component
    grid[9, 0] = 2                        # another label-2 island, not the sample's
    cells = np.array([[3, 8], [1, 1], [6, 6]])
    areas = sample_areas(grid, cells, [0, 1, 2])
    np.testing.assert_allclose(areas, [0.92, 0.04, 0.03])
    # label 0's component covers 92% >= T: counts 0; the two small ones count
    assert areas_of_triple_samples(grid, cells, [0, 1, 2], 0.5) == pytest.approx(0.07)


def test_ats_threshold_is_exclusive():
    grid = np.zeros((4, 4), dtype=int)
    grid[:, 2:] = 1  # label 1: exactly half the plane
    cells = np.array([[0, 3], [0, 0], [3, 3]])
    assert areas_of_triple_samples(grid, cells, [1, 5, 6], 0.5) == 0.0   # A = T: not counted
    assert areas_of_triple_samples(grid, cells, [1, 5, 6], 0.51) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- planes


def test_plane_geometry_reconstructs_the_samples():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 3, 4, 4, generator=g)
    plane = make_plane(z[0], z[1], z[2], resolution=41, eta=5.0)
    assert plane is not None
    assert float(plane.a @ plane.a) == pytest.approx(1.0, abs=1e-5)
    assert float(plane.u @ plane.u) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(plane.a @ plane.u)) < 1e-5
    for k in range(3):
        x, y = plane.coords[k]
        rebuilt = plane.origin + float(x) * plane.a + float(y) * plane.u
        torch.testing.assert_close(rebuilt, z[k].reshape(-1), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(plane.coords[0], [0.0, 0.0])
    assert plane.coords[1][1] == 0.0
    # axes: bounding box widened by eta times its sides on each end
    xs, ys = plane.coords[:, 0], plane.coords[:, 1]
    lx, ly = xs.max() - xs.min(), ys.max() - ys.min()
    assert float(plane.c1[0]) == pytest.approx(xs.min() - 5 * lx, rel=1e-5)
    assert float(plane.c2[-1]) == pytest.approx(ys.max() + 5 * ly, rel=1e-5)
    # each sample's cell is the nearest grid point
    for k, (i, j) in enumerate(plane.cells):
        d = (plane.c1.numpy()[:, None] - xs[k]) ** 2 + (plane.c2.numpy()[None, :] - ys[k]) ** 2
        assert d[i, j] == d.min()


def test_collinear_triplet_is_none_and_all_collinear_data_raises():
    z = torch.rand(3, 4, 4)
    d = torch.rand(3, 4, 4)
    assert make_plane(z, z + d, z + 2 * d, 10, 5.0) is None
    assert make_plane(z, z, z + d, 10, 5.0) is None
    x = torch.stack([0.1 + 0.01 * k * torch.ones(3, 4, 4) for k in range(12)])  # all on a line
    data = ScanData(x=x, y=torch.arange(12) % 3, num_classes=3)
    with pytest.raises(ValueError, match="collinear"):
        draw_planes(data, 1, 8, 5.0, torch.Generator().manual_seed(0))


def test_fewer_than_three_labels_raises():
    data = ScanData(x=torch.rand(6, 3, 4, 4), y=torch.tensor([0, 1, 0, 1, 0, 1]), num_classes=2)
    with pytest.raises(ValueError, match="at least 3 labels"):
        ModelXray(ModelXray.Params(num_planes=1, resolution=8)).score(
            nn.Flatten(), data, ScanContext())


def test_triplets_have_three_labels_and_are_recorded():
    data, _ = _prototype_data()
    result = _xray(num_planes=6, resolution=8).score(_Prototypes(_PROTOS), data,
                                                     ScanContext(seed=3))
    for idx, labels in zip(result.stats["triplet_indices"], result.stats["triplet_labels"]):
        assert len(set(labels)) == 3
        assert [int(data.y[i]) for i in idx] == labels


# ----------------------------------------------------------------------------- toy models


class _Prototypes(nn.Module):
    """Nearest-prototype classifier in pixel space: logit_c = -|x - p_c|^2. With `target`, that
    label's logit is the constant -radius^2, so every other label wins only inside a ball of
    `radius` around its prototype: the target swallows the plane (an all-to-one backdoor's
    picture)."""

    def __init__(self, protos: torch.Tensor, target: int | None = None,
                 radius: float = 0.6) -> None:
        super().__init__()
        self.register_buffer("protos", protos.reshape(len(protos), -1).clone())
        self.target = target
        self.radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = -((x.reshape(len(x), 1, -1) - self.protos[None]) ** 2).sum(-1)
        if self.target is not None:
            logits[:, self.target] = -self.radius ** 2
        return logits


_PROTOS = 0.2 + 0.6 * torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(11))


def _prototype_data(per_class: int = 4) -> tuple[ScanData, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    y = torch.arange(5).repeat_interleave(per_class)
    x = (_PROTOS[y] + 0.03 * torch.randn(len(y), 3, 4, 4, generator=g)).clamp(0, 1)
    return ScanData(x=x, y=y, num_classes=5, mean=(0.5,), std=(0.25,)), y


def _xray(**params) -> ModelXray:
    return ModelXray(ModelXray.Params(**params))


def test_backdoor_like_model_has_lower_re_and_names_its_target():
    data, _ = _prototype_data()
    det = _xray(num_planes=4, resolution=24)
    clean = det.score(_Prototypes(_PROTOS), data, ScanContext(seed=0))
    trojan = det.score(_Prototypes(_PROTOS, target=2), data, ScanContext(seed=0))
    assert trojan.stats["re"] < clean.stats["re"]
    assert trojan.stats["ats"] < clean.stats["ats"]  # the samples' own regions shrank
    assert trojan.score > clean.score  # higher = more suspicious
    assert trojan.score == -trojan.stats["re"]
    assert trojan.target == trojan.stats["target_label"] == 2
    assert trojan.stats["dominated_planes"] == 4
    assert trojan.stats["target_share"] > 0.9
    assert clean.stats["re"] > 0.5
    assert len(trojan.stats["re_per_plane"]) == len(trojan.stats["ats_per_plane"]) == 4
    assert trojan.stats["re"] == pytest.approx(np.mean(trojan.stats["re_per_plane"]))
    assert trojan.stats["ats"] == pytest.approx(np.mean(trojan.stats["ats_per_plane"]))
    assert trojan.stats["published_thresholds"]["re"]["cifar10"] == 0.873


def test_score_stat_ats_gives_minus_ats():
    data, _ = _prototype_data()
    result = _xray(num_planes=2, resolution=16, score_stat="ats").score(
        _Prototypes(_PROTOS), data, ScanContext(seed=0))
    assert result.score == -result.stats["ats"]
    with pytest.raises(ValueError, match="score_stat"):
        _xray(score_stat="entropy")


def test_same_seed_same_result_on_a_real_cnn():
    torch.manual_seed(0)
    model = create("mntd_cifar_cnn", 5, (3, 8, 8))  # left in train mode: dropout must not matter
    data = ScanData(x=torch.rand(20, 3, 8, 8), y=torch.arange(20) % 5, num_classes=5,
                    mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    det = _xray(num_planes=2, resolution=16)
    first = det.score(model, data, ScanContext(seed=7))
    again = det.score(model, data, ScanContext(seed=7))
    other = det.score(model, data, ScanContext(seed=8))
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert math.isfinite(first.score)
    assert first.score == again.score and first.stats == again.stats
    for a, b in zip(first.artifacts["planes"], again.artifacts["planes"]):
        np.testing.assert_array_equal(a["pred"], b["pred"])
    assert other.stats["triplet_indices"] != first.stats["triplet_indices"]
    assert other.stats["seed"] == 8


def test_batched_equals_naive_one_point_at_a_time():
    data, _ = _prototype_data()
    model = _Prototypes(_PROTOS, target=1, radius=1.2)
    params = ModelXray.Params(num_planes=3, resolution=12)
    ctx = ScanContext(seed=5)
    planes = draw_planes(data, params.num_planes, params.resolution, params.eta,
                         ctx.generator("modelxray/triplets"))  # the planes score() draws
    naive = np.zeros((3, 12, 12), dtype=np.int64)
    with torch.no_grad():
        for n, plane in enumerate(planes):
            for i in range(12):
                for j in range(12):
                    z = plane.origin + plane.c1[i] * plane.a + plane.c2[j] * plane.u
                    x = data.denormalize(z.view(1, 3, 4, 4))
                    naive[n, i, j] = int(model(x).argmax(1))
    assert len(np.unique(naive)) > 1  # a non-trivial picture
    for batch_size in (7, 144, 100_000, None):  # chunks across plane borders, one chunk, default
        np.testing.assert_array_equal(predict_planes(model, data, planes, batch_size, "cpu"), naive)
    batched = ModelXray(params).score(model, data, ctx)
    expected = summarise(naive, planes, 5, params, seed=5)
    assert batched.score == expected.score
    assert batched.stats == expected.stats


# ----------------------------------------------------------------------------- adaptive grid


def _grids(result) -> np.ndarray:
    return np.stack([p["pred"] for p in result.artifacts["planes"]])


def test_full_grid_reports_n_r_squared_forwards():
    data, _ = _prototype_data()
    result = _xray(num_planes=3, resolution=20).score(_Prototypes(_PROTOS), data,
                                                      ScanContext(seed=0))
    assert result.stats["forwards"] == 3 * 20 * 20 and isinstance(result.stats["forwards"], int)
    assert "grid" not in result.stats


def test_invalid_grid_raises():
    with pytest.raises(ValueError, match="grid must be 'full' or 'adaptive'"):
        _xray(grid="coarse")
    assert _xray(grid="adaptive").params.grid == "adaptive"
    assert ModelXray.Params().grid == "full"


def test_lattice_levels():
    assert coarse_step(100) == 16 and coarse_step(32) == 4 and coarse_step(8) == 1
    np.testing.assert_array_equal(lattice(100, 16), [0, 16, 32, 48, 64, 80, 96, 99])
    np.testing.assert_array_equal(lattice(33, 8), [0, 8, 16, 24, 32])


def test_adaptive_equals_full_on_a_linear_classifier():
    # _Prototypes without a target is linear: argmax_c 2 x.p_c - |p_c|^2, so on every plane the
    # label map is convex polygons cut by straight lines
    data, _ = _prototype_data()
    model = _Prototypes(_PROTOS)
    full = _xray(num_planes=4, resolution=100).score(model, data, ScanContext(seed=0))
    for batch_size in (None, 37):
        adaptive = _xray(num_planes=4, resolution=100, grid="adaptive",
                         batch_size=batch_size).score(model, data, ScanContext(seed=0))
        np.testing.assert_array_equal(_grids(adaptive), _grids(full))
        assert len(np.unique(_grids(full))) >= 3  # a picture with boundaries
        assert adaptive.stats["grid"] == "adaptive"
        assert adaptive.stats["forwards"] < 0.2 * full.stats["forwards"]  # ~9% measured
        assert adaptive.score == full.score
        same = {k: v for k, v in adaptive.stats.items() if k not in ("forwards", "grid")}
        assert same == {k: v for k, v in full.stats.items() if k != "forwards"}


def test_adaptive_stack_falls_back_to_score():
    data, _ = _prototype_data()
    det = _xray(num_planes=2, resolution=24, grid="adaptive")
    models = [_Prototypes(_PROTOS), _Prototypes(_PROTOS, target=1)]
    stacked = det.score_stack(models, [data, data], ScanContext(seed=4))
    for model, result in zip(models, stacked):
        alone = det.score(model, data, ScanContext(seed=4))
        assert result.stats == alone.stats
        np.testing.assert_array_equal(_grids(result), _grids(alone))


class _Islands(nn.Module):
    """A 2-D input (x0, x1) labelled 0, except 1 inside the given discs (centre, radius)."""

    def __init__(self, discs) -> None:
        super().__init__()
        self.discs = discs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = torch.zeros(len(x), dtype=torch.bool)
        for (c0, c1), rad in self.discs:
            inside |= (x[:, 0] - c0) ** 2 + (x[:, 1] - c1) ** 2 <= rad ** 2
        return torch.stack([(~inside).float(), inside.float()], dim=1)


def _index_plane(r: int, cells) -> Plane:
    """The plane of 2-D inputs where grid point (i, j) is the input (i, j)."""
    axis = torch.arange(r, dtype=torch.float32)
    return Plane(origin=torch.zeros(2), a=torch.tensor([1.0, 0.0]), u=torch.tensor([0.0, 1.0]),
                 coords=np.asarray(cells, np.float64), c1=axis, c2=axis.clone(),
                 cells=np.asarray(cells, np.int64), labels=(1, 0, 0), indices=(0, 1, 2))


def test_adaptive_finds_an_island_around_a_sample_and_misses_one_without():
    # R 65: coarse step 16. Both islands (radius 3) sit inside one coarse cell, clear of its
    # corners; the one holding sample 0's cell is found (evaluated, then refined around), the
    # other is the documented blind spot: smaller than the coarse step, wholly in a uniform cell.
    r = 65
    data = ScanData(x=torch.zeros(3, 2), y=torch.arange(3), num_classes=2)
    model = _Islands([((24.0, 24.0), 3.0), ((40.0, 56.0), 3.0)])
    plane = _index_plane(r, [(24, 25), (5, 5), (60, 60)])
    full = predict_planes(model, data, [plane], None, "cpu")
    adaptive, forwards = predict_planes_adaptive(model, data, [plane], None, "cpu")
    island_a = np.zeros((r, r), dtype=bool)
    island_a[20:29, 20:29] = True
    np.testing.assert_array_equal(adaptive[0][island_a], full[0][island_a])
    assert full[0, 40, 56] == 1 and adaptive[0, 40, 56] == 0  # the island with no sample
    assert (adaptive[0] != full[0]).sum() == (full[0][~island_a] == 1).sum()
    assert forwards < r * r / 4
    ats_full = sample_areas(full[0], plane.cells, plane.labels)
    ats_adaptive = sample_areas(adaptive[0], plane.cells, plane.labels)
    assert ats_adaptive[0] == ats_full[0] > 0


def test_adaptive_on_trained_models_is_close_to_full(tiny_round):
    from xray.io.examples import load_examples
    from xray.io.manifest import read_manifest
    from xray.io.model_loading import load_model

    round_dir, _ = tiny_round
    records = read_manifest(str(round_dir))
    chosen = [next(r for r in records if not r.poisoned), next(r for r in records if r.poisoned)]
    agreement, forwards, cells = [], 0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: more threads only contend (2 shared cores)
    try:
        for record in chosen:
            model = load_model(record)
            x, y = load_examples(record)
            data = ScanData(x=x, y=y, num_classes=record.num_classes, mean=tuple(record.mean),
                            std=tuple(record.std))
            full = _xray(num_planes=4, resolution=64).score(model, data, ScanContext(seed=1))
            adaptive = _xray(num_planes=4, resolution=64, grid="adaptive").score(
                model, data, ScanContext(seed=1))
            agreement.append(float((_grids(full) == _grids(adaptive)).mean()))
            forwards += adaptive.stats["forwards"]
            cells += full.stats["forwards"]
            assert abs(adaptive.stats["re"] - full.stats["re"]) <= 0.05
    finally:
        torch.set_num_threads(threads)
    assert min(agreement) >= 0.98
    assert forwards < 0.6 * cells


# ----------------------------------------------------------------------------- registry, picture


def test_registry_and_presets():
    assert detectors.get("modelxray") is ModelXray
    assert ModelXray.version == "1"
    default = detectors.build("modelxray").params
    assert (default.num_planes, default.resolution, default.eta, default.alpha,
            default.ats_threshold, default.score_stat) == (20, 100, 5.0, 10.0, 0.5, "re")
    assert detectors.build("modelxray", preset="reference").params == default
    small = detectors.build("modelxray", preset="small").params
    assert (small.num_planes, small.resolution) == (4, 32)
    assert detectors.build("modelxray", preset="current").params.resolution == 200
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.num_planes = 3  # frozen


def test_planes_artifacts_draw_as_a_png():
    from xray.plots import planes_figure, png_bytes

    data, _ = _prototype_data()
    result = _xray(num_planes=3, resolution=16).score(
        _Prototypes(_PROTOS, target=0), data, ScanContext(seed=0))
    planes = result.artifacts["planes"]
    assert planes[0]["pred"].shape == (16, 16) and planes[0]["pred"].dtype == np.int32
    assert {"c1", "c2", "sample_coords", "sample_labels", "dominating_label"} <= set(planes[0])
    assert png_bytes(planes_figure(planes[:2], 5, total=3))[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_grid_parameter_leaves_earlier_results_hashes_alone():
    """`grid` came after results were stored: at its default the config hash is the one
    computed without the field (those rows stay reused); set, it is a new configuration."""
    import dataclasses
    import hashlib
    import json

    from xray.config import parse_config

    config = parse_config({"detectors": {"modelxray": {"preset": "small"}}})
    detector = config.detectors[0].build()
    before = dataclasses.asdict(detector.params)
    del before["grid"]
    payload = {"detector": "modelxray", "version": detector.version, "params": before,
               "seed": 0, "examples_per_class": None}
    text = json.dumps(payload, sort_keys=True, default=str)
    assert config.detector_hash(detector) == hashlib.sha256(text.encode()).hexdigest()[:16]
    adaptive = parse_config({"detectors": {"modelxray": {"preset": "small",
                                                         "params": {"grid": "adaptive"}}}})
    assert adaptive.detector_hash(adaptive.detectors[0].build()) != \
        config.detector_hash(detector)
