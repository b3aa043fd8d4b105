"""The inversion core: batched Adam == torch Adam per row, the cost schedule, batched trigger
optimisation == one trigger alone, candidates (apply, rows, round trip), REASR, SSIM, and the
the Parquet round trip of a candidate (the runner test is in test_nc.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from xray.detectors.inversion.core import (BatchedAdam, CostSchedule, PatchOptimizer,
                                           ScheduleState, TriggerCandidate, apply_filter,
                                           atanh01, filter_pool_size, measure_reasr, ms_ssim,
                                           stamp, tanh01)


def test_tanh01_round_trip_and_range():
    v = torch.rand(50) * 0.98 + 0.01
    np.testing.assert_allclose(tanh01(atanh01(v)), v, atol=1e-5)
    big = tanh01(torch.tensor([-100.0, 100.0]))
    assert abs(float(big[0])) < 1e-6 and abs(float(big[1]) - 1) < 1e-6
    assert float(tanh01(torch.tensor([100.0]), eps=0.0)) == 1.0


def test_batched_adam_matches_torch_adam_per_row_with_paused_rows():
    torch.manual_seed(0)
    start = torch.randn(3, 4, 5)
    batched = start.clone()
    opt = BatchedAdam([batched], lr=0.1, betas=(0.5, 0.9))
    singles = [start[i].clone().requires_grad_(True) for i in range(3)]
    torch_opts = [torch.optim.Adam([s], lr=0.1, betas=(0.5, 0.9)) for s in singles]
    for step in range(7):
        grads = torch.randn(3, 4, 5)
        rows = torch.tensor([True, step % 2 == 0, step < 3])  # rows pause on their own
        opt.step([grads], rows)
        for i in range(3):
            if rows[i]:
                torch_opts[i].zero_grad()
                singles[i].grad = grads[i].clone()
                torch_opts[i].step()
    for i in range(3):
        torch.testing.assert_close(batched[i], singles[i].detach(), rtol=1e-5, atol=1e-6)
    assert opt.steps.tolist() == [7, 4, 3]


def test_cost_schedule_follows_neural_cleanse():
    sched = CostSchedule(init_cost=1e-3, init_patience=2, patience=2, up=2.0, down=4.0)
    state = ScheduleState.zeros(1)
    costs = []
    for acc in [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]:
        state.update(sched, np.array([acc]), np.array([0]))
        costs.append(float(state.cost[0]))
    # 2 successes -> 1e-3 (counters reset, then that step's success counts, as in the ref);
    # one more success -> x2; 2 failures -> /4; 1 success: unchanged
    assert costs == pytest.approx([0, 1e-3, 2e-3, 2e-3, 2e-3, 5e-4, 5e-4])
    assert state.up_flag[0] and state.down_flag[0]


class _PixelNet(nn.Module):
    """Logit for `target` rises with the brightness of a 2 x 2 corner; other logits fixed."""

    def __init__(self, classes: int = 4, target: int = 2) -> None:
        super().__init__()
        self.classes, self.target = classes, target
        self.lin = nn.Linear(3 * 8 * 8, classes)

    def forward(self, x):
        base = self.lin(x.flatten(1))
        corner = x[:, :, :2, :2].mean((1, 2, 3))
        bump = torch.zeros_like(base)
        bump[:, self.target] = 12 * (corner - 0.5)
        return base + bump


def _data(n=24, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.3
    y = torch.arange(n) % classes
    return x, y


def test_batched_rows_follow_their_lone_trajectories():
    torch.manual_seed(1)
    net = _PixelNet().eval()
    x, y = _data()
    k = 3
    g0 = torch.Generator().manual_seed(5)
    theta_m = torch.randn(k, 8, 8, generator=g0)
    theta_p = torch.randn(k, 3, 8, 8, generator=g0)
    targets = [2, 0, 1]
    pools = [torch.nonzero(y != t).flatten() for t in targets]
    # batch >= pool: a step is one minibatch holding the whole pool, so the draw order is moot
    kw = dict(schedule=CostSchedule(), lr=0.1, betas=(0.5, 0.9), batch_size=64,
              mini_batches=None, early_stop_patience=None)
    together = PatchOptimizer(net, x, theta_m, theta_p, targets, pools,
                              generator=torch.Generator().manual_seed(0), **kw)
    together.run(12)
    assert together.forwards == 12  # one forward per step for all rows
    for r in range(k):
        alone = PatchOptimizer(net, x, theta_m[r:r + 1], theta_p[r:r + 1], [targets[r]],
                               [pools[r]], generator=torch.Generator().manual_seed(9), **kw)
        alone.run(12)
        torch.testing.assert_close(together.theta_m[r], alone.theta_m[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.best_mask[r], alone.best_mask[0], rtol=1e-4,
                                   atol=1e-5)
        assert together.state.cost[r] == alone.state.cost[0]


def test_optimizer_finds_the_corner_trigger():
    net = _PixelNet().eval()
    x, y = _data()
    g = torch.Generator().manual_seed(3)
    opt = PatchOptimizer(net, x, atanh01(torch.rand(1, 8, 8, generator=g)),
                         atanh01(torch.rand(1, 3, 8, 8, generator=g)), [2],
                         [torch.nonzero(y != 2).flatten()], generator=g, batch_size=16,
                         mini_batches=2, early_stop_patience=None,
                         schedule=CostSchedule(init_patience=2, patience=2))
    opt.run(60)
    mask = opt.best_mask[0]
    assert np.isfinite(opt.best_l1[0]) and opt.best_l1[0] < 10  # was ~32 at the start
    assert float(mask[:2, :2].mean()) > float(mask[2:, 2:].mean()) + 0.3


def test_patch_candidate_apply_binarises_and_rows_round_trip():
    from xray.scanning import trigger_rows

    mask = torch.zeros(8, 8)
    mask[:2, :2] = 0.9
    mask[5, 5] = 0.05  # below the 0.1 threshold: not stamped
    pattern = torch.ones(3, 1, 1)
    cand = TriggerCandidate(victim=1, target=2, kind="patch", mask=mask, pattern=pattern,
                            size=5.0, reasr=0.5, reasr_per_label={0: 0.5, 1: 0.25},
                            stats={"steps": 3})
    x, _ = _data(4)
    out = cand.apply(x)
    assert torch.all(out[:, :, :2, :2] == 1) and torch.equal(out[:, :, 5, 5], x[:, :, 5, 5])
    cont = TriggerCandidate(victim=1, target=2, kind="patch", mask=mask, pattern=pattern,
                            binarize=None)
    torch.testing.assert_close(cont.apply(x), stamp(x, mask[None, None], pattern[None]))

    class _Rec:
        model_id = "m"

    class _Det:
        name = "nc"

    rows = trigger_rows(_Rec(), "d", _Det(), "h", [cand.to_row()])
    assert rows[0]["victim"] == 1 and rows[0]["kind"] == "patch" and rows[0]["kernel"] is None
    back = TriggerCandidate.from_row(rows[0])
    torch.testing.assert_close(back.mask, mask)
    assert back.reasr_per_label == {0: 0.5, 1: 0.25} and back.stats["steps"] == 3
    torch.testing.assert_close(back.apply(x), out)


@pytest.mark.parametrize("side,pool", [(24, 11), (32, 15), (16, 31), (8, 1)])
def test_filter_features_are_the_two_dimensional_pools(side, pool):
    """The separable pools give the 2-D pools' maxima exactly and their averages to float
    rounding, with and without the padding counted, whatever the window against the image."""
    import torch.nn.functional as F

    from xray.detectors.inversion.core import filter_features

    x = torch.floor(torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(side))
                    * 6) / 6  # flat patches: ties in every window
    pad = pool // 2
    for count_pad in (True, False):
        feats = filter_features(x, pool, count_pad)
        mx = F.max_pool2d(x, pool, stride=1, padding=pad)
        av = F.avg_pool2d(x, pool, stride=1, padding=pad, count_include_pad=count_pad)
        assert torch.equal(feats[:, :3], x) and torch.equal(feats[:, 3:6], mx)
        assert torch.equal(feats[:, 6:9], -mx)
        torch.testing.assert_close(feats[:, 9:], av, rtol=0, atol=1e-6)


def test_filter_identity_kernel_is_identity_and_pool_scales():
    x, _ = _data(3)
    kernel = torch.zeros(12, 3)
    kernel[torch.arange(3), torch.arange(3)] = 1
    torch.testing.assert_close(apply_filter(x, kernel), x)
    brighter = kernel.clone()
    brighter[9 + torch.arange(3), torch.arange(3)] = 0.5  # + half the local average
    assert float(apply_filter(x, brighter).mean()) > float(x.mean())
    assert filter_pool_size(224) == 111 and filter_pool_size(24) == 11
    cand = TriggerCandidate(victim=None, target=0, kind="filter", kernel=kernel)
    torch.testing.assert_close(cand.apply(x), x)
    with pytest.raises(ValueError, match="kernel"):
        TriggerCandidate(victim=None, target=0, kind="filter")


def test_measure_reasr_per_label():
    net = _PixelNet().eval()
    x, y = _data(40)
    mask = torch.zeros(8, 8)
    mask[:2, :2] = 1
    cand = TriggerCandidate(victim=None, target=2, kind="patch", mask=mask,
                            pattern=torch.ones(3, 1, 1))
    reasr, per_label = measure_reasr(net, cand, x, y)
    assert set(per_label) == {0, 1, 3}
    assert reasr == max(per_label.values()) == 1.0
    blank = TriggerCandidate(victim=None, target=2, kind="patch", mask=torch.zeros(8, 8),
                             pattern=torch.ones(3, 1, 1))
    assert measure_reasr(net, blank, x, y)[0] < 0.5


def test_ms_ssim_is_one_on_equal_images_and_drops_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2), atol=1e-5)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    little = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert float(ms_ssim(noisy, x).mean()) < float(ms_ssim(little, x).mean()) < 1
