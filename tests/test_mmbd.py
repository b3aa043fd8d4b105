"""MM-BD: batched margin maximisation, the gamma null, and detection on real BadNets models."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats as sps

from xray import detectors
from xray.detectors.base import ScanContext, ScanData
from xray.detectors.mmbd import Params, maximise_margins, null_test
from xray.io.examples import load_examples
from xray.io.model_loading import load_model


def test_null_test_flags_an_outlier_and_names_it():
    rng = np.random.default_rng(0)
    r = list(sps.gamma.rvs(4.0, loc=1.0, scale=0.5, size=9, random_state=rng))
    clean = null_test(r)
    r_bad = r[:3] + [40.0] + r[3:]
    attacked = null_test(r_bad)
    assert attacked["target"] == 3 and attacked["attack"] and attacked["p_value"] < 1e-3
    assert attacked["fit_error"] is None and attacked["gamma_shape"] > 0
    assert clean["p_value"] > attacked["p_value"]
    # p = 1 - CDF(r_t*)^K with K = len(r)
    shape, loc, scale = sps.gamma.fit(np.delete(r_bad, 3))
    assert attacked["p_value"] == pytest.approx(
        1 - sps.gamma.cdf(40.0, shape, loc, scale) ** 10, abs=1e-9)


@pytest.mark.parametrize("r, reason", [
    ([1.0, 2.0, 3.0], "needs >= 3"),
    ([2.0, 2.0, 2.0, 2.0, 5.0], "Error"),  # constant null: no gamma fit
    ([1.0, float("nan"), 2.0, 3.0, 4.0], "non-finite"),
])
def test_fit_failures_give_p_one_with_reason(r, reason):
    out = null_test(r)
    assert out["p_value"] == 1.0 and not out["attack"]
    assert out["fit_error"] and reason in out["fit_error"]
    assert out["margins"][:1] == r[:1]  # raw statistics kept for calibration


def _reference_margins(model, k, x0, lr, steps, tol):
    """univ_bd.py's loop, one class at a time (momentum never acts), from given starts."""
    out = []
    for t in range(k):
        images = x0[t].clone().requires_grad_(True)
        onehot = torch.nn.functional.one_hot(torch.full((len(images),), t), k).float()
        last_loss = 1000.0
        for _ in range(steps):
            opt = torch.optim.SGD([images], lr=lr, momentum=0.2)
            opt.zero_grad()
            z = model(torch.clamp(images, 0, 1))
            loss = -(z * onehot).sum() + ((1 - onehot) * z - 1000 * onehot).max(1)[0].sum()
            loss.backward()
            opt.step()
            if abs(last_loss - loss.item()) / abs(last_loss) < tol:
                break
            last_loss = loss.item()
        out.append(((z * onehot).sum(1) - ((1 - onehot) * z - 1000 * onehot).max(1)[0]).max()
                   .item())
    return out


def test_batched_classes_equal_the_reference_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 4))
    p = Params(starts=5, max_steps=40, lr=0.5, tol=0.05, batch_size=7)  # chunks cross classes
    ctx = ScanContext(seed=3)
    r, steps, stopped_early = maximise_margins(model, 4, (3, 8, 8), p, ctx)
    assert not stopped_early
    x0 = torch.rand((4 * 5, 3, 8, 8), generator=ctx.generator("mmbd/starts")).view(4, 5, 3, 8, 8)
    expected = _reference_margins(model, 4, x0, p.lr, p.max_steps, p.tol)
    assert r == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert any(s < p.max_steps for s in steps)  # the stopping rule fired for some class


def test_detects_badnets_targets_on_the_tiny_round(tiny_round):
    """Floor: most BadNets models get their real target; raw margins and p-values recorded."""
    round_dir, result = tiny_round
    det = detectors.build("mmbd", {"starts": 4, "max_steps": 40, "lr": 0.2})  # test budget
    rows = []
    for record in result.records:
        model = load_model(record)
        x, y = load_examples(record)  # only for the shape: MM-BD uses no data
        out = det.score(model, ScanData(x=x, y=y, num_classes=record.num_classes),
                        ScanContext(seed=0))
        assert 0.0 <= out.score <= 1.0 and len(out.stats["margins"]) == record.num_classes
        rows.append((record.poisoned, record.target, out.target, out.stats["p_value"]))
    trojaned = [r for r in rows if r[0]]
    clean = [r for r in rows if not r[0]]
    hits = sum(r[1] == r[2] for r in trojaned)
    print("mmbd tiny round:", json.dumps({"target_hits": f"{hits}/{len(trojaned)}",
                                          "p_trojaned": [r[3] for r in trojaned],
                                          "p_clean": [r[3] for r in clean]}))
    assert hits >= len(trojaned) - 1, rows
    assert np.median([r[3] for r in trojaned]) < np.median([r[3] for r in clean]), rows
