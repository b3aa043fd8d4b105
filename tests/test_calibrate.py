"""The stacker: a real scikit-learn fit, missing scores explicit, versioned JSON artifact."""
from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from xray.reduce import calibrate as C
from xray.results.schema import SCORES


def _rows(n: int = 40, seed: int = 0, drop_b: tuple[int, ...] = (),
          digest: str = "d") -> pd.DataFrame:
    """Score rows of two detectors on n labelled models: a is informative, b is noise."""
    rng = np.random.default_rng(seed)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for i in range(n):
        y = i % 2 == 1
        for det, score, stats in (
                ("a", float(rng.normal(2.0 if y else 0.0, 0.7)), {"re": float(rng.normal(1, 0.1)),
                                                                   "target_label": 3, "seed": 0}),
                ("b", float(rng.normal(0.0, 1.0)), {})):
            missing = det == "b" and i in drop_b
            rows.append({"run_id": "r", "model_id": f"id-{i:08d}", "model_digest": digest,
                         "detector": det, "detector_version": "1", "config_hash": f"h{det}",
                         "status": "error" if missing else "ok",
                         "error": "boom" if missing else None,
                         "score": None if missing else score, "predicted_target": None,
                         "stats_json": json.dumps(stats), "seconds": 1.0, "worker": "w",
                         "architecture": "nin", "num_classes": 10, "gt_poisoned": y,
                         "gt_target": 0 if y else None, "gt_attack": "badnets" if y else None,
                         "tags_json": "{}", "finished_at": now})
    return pd.DataFrame(rows, columns=SCORES.names)


def test_fit_separates_and_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    scores = _rows()
    cal = C.fit(scores, C=1.0, model="all")
    assert {"a.score", "a.re", "b.score", "a.missing", "b.missing"} <= set(cal.features)
    # labels, seeds and constant features are left out
    assert not any(f.endswith(("target_label", "seed", "log2_num_classes")) for f in cal.features)
    results = C.model_results(scores)
    ids = sorted(results)
    feats = [C.features_from_results(results[m], 10) for m in ids]
    p = cal.predict(feats)
    y = np.array([int(m[-1]) % 2 for m in ids])
    assert cal.train["in_sample"]["roc_auc"] > 0.9 and cal.train["cross_validated"]["folds"] == 5
    assert cal.train["model"] == "all"
    # the same fit written out with scikit-learn's own pipeline pieces
    x = cal.matrix(feats)
    z = (x - np.array(cal.mean)) / np.array(cal.scale)
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(z, y).predict_proba(z)[:, 1]
    np.testing.assert_allclose(p, np.clip(ref, 0.01, 0.99), rtol=1e-6)


def test_missing_detector_is_explicit_and_never_fatal():
    scores = _rows(drop_b=(0, 1, 2, 3, 4, 5))
    cal = C.fit(scores, model="scores")
    assert "b.missing" in cal.features
    results = C.model_results(scores)
    assert "b" not in results["id-00000000"] and "b" in results["id-00000010"]
    a_only = {"a": results["id-00000010"]["a"]}
    with_b = results["id-00000010"]
    p_missing, p_full = cal.predict_results(a_only, 10), cal.predict_results(with_b, 10)
    assert 0.01 <= p_missing <= 0.99 and 0.01 <= p_full <= 0.99
    x = cal.matrix([C.features_from_results(a_only, 10)])[0]
    assert x[cal.features.index("b.missing")] == 1.0
    assert np.isnan(x[cal.features.index("b.score")])  # imputed at predict time, not here
    # nothing usable at all: the combined row is an error row saying so, never a filled number
    empty = scores[scores["detector"] == "a"].assign(status="error", score=None)
    rows = C.combined_rows(empty, cal)
    assert set(rows["status"]) == {"error"} and rows["score"].isna().all()


def test_artifact_round_trip_and_version_check(tmp_path):
    cal = C.fit(_rows())
    uri = cal.save(str(tmp_path / "cal.json"))
    again = C.Calibrator.load(uri)
    assert again.id == cal.id and again.to_dict() == cal.to_dict()
    feats = [C.features_from_results(r, 10) for r in C.model_results(_rows(seed=1)).values()]
    np.testing.assert_array_equal(again.predict(feats), cal.predict(feats))
    d = json.loads((tmp_path / "cal.json").read_text())
    assert d["format"] == C.FORMAT and d["format_version"] == C.FORMAT_VERSION
    with pytest.raises(ValueError, match="format version"):
        C.Calibrator.from_dict({**d, "format_version": 99})
    with pytest.raises(ValueError, match="do not match the stored id"):
        C.Calibrator.from_dict({**d, "coef": [c + 1 for c in d["coef"]]})
    with pytest.raises(ValueError, match="at least 2 trojaned"):
        C.fit(_rows(n=3))


def test_selection_prefers_what_predicts_held_out_models():
    # a informative, b noise: a single detector or the score stack wins, never the base rate
    cal = C.fit(_rows(n=60))
    assert cal.train["model"] != "prior"
    assert set(cal.train["selection"]) == {"prior", "a", "b", "scores", "all"}
    sel = cal.train["selection"]
    assert sel[cal.train["model"]]["cross_entropy"] <= min(v["cross_entropy"] for v in sel.values())
    assert sel["a"]["cross_entropy"] < sel["prior"]["cross_entropy"] < 0.70
    # only noise: the base rate wins, so every prediction is the training prior, never a
    # confident mistake
    noise = _rows(n=60)
    noise = noise[noise["detector"] == "b"]
    cal = C.fit(noise)
    assert cal.train["model"] == "prior" and cal.features == []
    feats = [C.features_from_results(r, 10) for r in C.model_results(noise).values()]
    np.testing.assert_allclose(cal.predict(feats), 0.5)
    with pytest.raises(ValueError, match="choose one of"):
        C.fit(noise, model="nope")


def test_default_map_is_monotone_and_never_hard():
    ps = [C.default_probability("modelxray", -re, {"re": re}, 10) for re in (0.0, 1.0, 2.0, 3.3)]
    assert ps == sorted(ps, reverse=True) and all(0.05 <= p <= 0.95 for p in ps)
    assert C.default_probability("other", 50.0, {}, 10) == 0.95
    assert C.default_probability("other", 0.0, {"probability": 0.3}, 10) == 0.3
    assert C.default_combined({}, 10) == (0.5, None)
    ws = [C.default_probability("weights", a, {}, 10) for a in (0.5, 2.0, 3.47, 5.0, 12.0)]
    assert ws == sorted(ws) and ws[0] == 0.05 and ws[-1] == 0.95
    assert ws[2] == pytest.approx(0.5)  # the map's centre


def test_default_combined_prefers_weights_then_modelxray():
    weights = {"score": 6.0, "stats": {}}
    modelxray = {"score": -0.2, "stats": {"re": 0.2}}
    assert C.default_combined({"modelxray": modelxray, "weights": weights, "abs": weights},
                              10) == (0.95, "weights")
    p, best = C.default_combined({"modelxray": modelxray, "abs": weights}, 10)
    assert best == "modelxray" and p > 0.9
    assert C.default_combined({"karm": weights, "abs": weights}, 10)[1] == "abs"


def test_reducer_reports_combined_beside_single_ones():
    from xray.reduce.summary import summarize

    scores = _rows()
    cal = C.fit(scores)
    table = summarize(C.with_combined(scores, cal))
    overall = table[table["group_by"] == "all"].set_index("detector")
    assert {"a", "b", "combined"} <= set(overall.index)
    assert overall.loc["combined", "probability_source"] == "stats"
    assert overall.loc["combined", "roc_auc"] > overall.loc["b", "roc_auc"]


def test_cli_calibrate_on_a_scanned_round(tiny_scores, tmp_path):
    from xray.cli import main

    out, run_id, rows, _ = tiny_scores
    artifact = tmp_path / "cal.json"
    result = CliRunner().invoke(main, ["calibrate", str(out), "--train-run", run_id,
                                       "--model", "modelxray", "--artifact", str(artifact)])
    assert result.exit_code == 0, result.output
    cal = C.Calibrator.load(str(artifact))
    assert cal.detector_names == ["modelxray"] and cal.train["n"] == len(rows)
    assert "modelxray.score" in cal.features
    # the artifact carries the training run's scan config: trojai-detect / score-testset use it
    assert cal.scan_config().detectors[0].params == (("num_planes", 2), ("resolution", 16))
    bad = CliRunner().invoke(main, ["calibrate", str(out), "--train-run", "no-such-run"])
    assert bad.exit_code == 1 and "no scores" in bad.output


# ---------------------------------------------------------------------------------------------
# Leakage: the artifact remembers its training models


def test_artifact_remembers_training_models_and_old_ones_still_load(tmp_path):
    scores = _rows()
    cal = C.fit(scores)
    assert cal.training_models == sorted([f"id-{i:08d}", "d"] for i in range(40))
    again = C.Calibrator.load(cal.save(str(tmp_path / "cal.json")))
    assert again.training_models == cal.training_models and again.trained_on("id-00000003", "d")
    # same id, other weights: another model; other id, same digest: another model too
    assert again.trained_on("id-00000003", "other") is False
    assert again.trained_on("id-99999999", "d") is False
    # a format-1 artifact (no list): loads, same id and predictions, with a warning
    d = json.loads((tmp_path / "cal.json").read_text())
    old = {k: v for k, v in d.items() if k != "training_models"} | {"format_version": 1}
    with pytest.warns(C.LeakageUncheckedWarning, match="cannot be checked"):
        v1 = C.Calibrator.from_dict(old, "old.json")
    assert v1.id == cal.id and v1.training_models is None
    assert v1.trained_on("id-00000003", "d") is None
    v1.refuse_training_models([("id-00000003", "d")])  # cannot tell: nothing to refuse
    rows = C.combined_rows(scores, v1)
    assert all(json.loads(v)["trained_on"] is None for v in rows["stats_json"])


def test_refusal_names_the_models_and_the_calibrator(tmp_path):
    cal = C.Calibrator.load(C.fit(_rows()).save(str(tmp_path / "cal.json")))
    cal.refuse_training_models([("id-00000001", "new-digest"), ("id-00000999", "d")])
    with pytest.raises(C.TrainingModelError) as err:
        cal.refuse_training_models([("id-00000001", "d"), ("id-00000002", "d"),
                                    ("id-00000999", "d")], hint="do something else")
    text = str(err.value)
    assert "id-00000001, id-00000002" in text and "id-00000999" not in text
    assert cal.id in text and "cal.json" in text and "do something else" in text
    assert isinstance(err.value, ValueError)  # the CLI turns it into one clean line


def test_combined_rows_summary_and_report_mark_training_models():
    from xray.reduce.report import leakage_warning
    from xray.reduce.summary import summarize

    train = _rows()
    cal = C.fit(train)
    # the training round itself: every combined row marked, summary counts and says so
    rows = C.combined_rows(train, cal)
    assert rows["stats_json"].map(C.trained_on_flag).eq(True).all()
    table = summarize(C.with_combined(train, cal))
    overall = table[table["group_by"] == "all"].set_index("detector")
    assert overall.loc["combined", "n_training_models"] == 40
    assert "training models of calibrator " + cal.id in overall.loc["combined", "notes"]
    assert overall.loc["a", "n_training_models"] == 0
    warning = leakage_warning(table)
    assert warning.startswith("WARNING") and cal.id in warning and "40 of 40" in warning
    # other models (same ids, other weights): not marked, no warning
    fresh = _rows(seed=1, digest="other")
    assert not C.combined_rows(fresh, cal)["stats_json"].map(C.trained_on_flag).any()
    table = summarize(C.with_combined(fresh, cal))
    assert (table["n_training_models"] == 0).all() and leakage_warning(table) == ""
    # a corpus holding both: only the training half is counted
    both = pd.concat([train, fresh.assign(model_id=fresh["model_id"] + "-new")])
    table = summarize(C.with_combined(both, cal))
    assert table.set_index(["detector", "group_by"]).loc[("combined", "all"),
                                                         "n_training_models"] == 40


# ---------------------------------------------------------------------------------------------
# Nested cross-validation: the reported figure is not flattered by the selection


def _noise_rows(n: int, k: int, seed: int) -> pd.DataFrame:
    """n labelled models, k detectors of pure noise."""
    rng = np.random.default_rng(seed)
    base = _rows(n=n)
    base = base[base["detector"] == "a"].drop(columns="detector")
    parts = [base.assign(detector=f"n{d:02d}", config_hash="h",
                         score=rng.normal(size=len(base)), stats_json="{}") for d in range(k)]
    return pd.concat(parts, ignore_index=True)[SCORES.names]


def test_nested_figure_is_not_flattered_by_selection_over_noise():
    chance = np.log(2.0)
    flattered = []
    for seed in (1, 2, 3):
        cal = C.fit(_noise_rows(30, 8, seed))
        cv = cal.train["cross_validated"]
        selection_ce = cal.train["selection"][cal.train["model"]]["cross_entropy"]
        assert cv["nested"] and len(cv["chosen_per_fold"]) == cv["folds"] == 5
        # the selection's own figure of what it chose is optimistic; the nested one is not
        assert cv["cross_entropy"] >= selection_ce
        assert cv["cross_entropy"] >= chance - 0.02
        flattered.append(selection_ce)
    assert np.mean(flattered) < chance - 0.01  # there was something to flatter


def test_nested_figure_is_still_good_on_informative_data():
    cal = C.fit(_rows(n=60))
    cv = cal.train["cross_validated"]
    assert cv["nested"] and cv["cross_entropy"] < 0.45 and cv["roc_auc"] > 0.85
    assert "nested, 5 outer folds" in C.describe(cal)


def _agreeing_rows(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Score rows of four detectors whose scores are noise, but whose predicted targets agree
    on trojaned models (each names the true target with probability 0.8) and scatter over 10
    classes on clean ones."""
    rng = np.random.default_rng(seed)
    rows = _rows(n=n, seed=seed)
    rows = pd.concat([rows[rows["detector"] == "b"].assign(detector=d, config_hash=f"h{d}")
                      for d in ("b", "c", "d", "e")], ignore_index=True)
    rows["score"] = rng.normal(0.0, 1.0, len(rows))
    agrees = rows["gt_poisoned"].astype(bool) & (rng.random(len(rows)) < 0.8)
    rows["predicted_target"] = np.where(agrees, 4, rng.integers(0, 10, len(rows)))
    return rows


def test_target_agreement_is_a_feature_the_selection_can_choose():
    assert C.target_agreement([3, 3, 3]) == 3 and C.target_agreement([1, 2, 3, 1]) == 2
    assert C.target_agreement([1, 2]) is None  # too few detectors name a target
    scores = _agreeing_rows()
    results = C.model_results(scores)
    assert {r["target"] for m in results.values() for r in m.values()} <= set(range(10))
    cal = C.fit(scores)
    # every score is noise: only the detectors' agreement on a target separates the models
    assert "agreement" in cal.train["model"] and C.TARGET_AGREEMENT in cal.features
    assert cal.train["cross_validated"]["roc_auc"] > 0.9
    assert cal.train["cross_validated"]["cross_entropy"] < 0.45 < math.log(2)
    # a model whose detectors name fewer than three targets has the feature imputed, not 0
    few = {d: {"score": 0.0, "stats": {}, "target": 4} for d in ("b", "c")}
    assert C.TARGET_AGREEMENT not in C.features_from_results(few, 10)


def test_the_fit_does_not_depend_on_the_order_models_finished_scanning():
    """Two scans of one round give the same rows in another finishing order (actors pick
    models as they free up): the calibrator, its selection and its cross-validated figures are
    the same. (Its folds followed finished_at: the evaluation bench's Model X-ray Platt scaling
    moved by 0.055 nats over the ResNet round, up to 0.37 on one attack's models, after 24
    training models were scanned again with identical scores.)"""
    scores = _rows(n=40)
    order = np.random.default_rng(5).permutation(40)
    start = scores["finished_at"].iloc[0]
    finished = {f"id-{i:08d}": start + dt.timedelta(seconds=int(order[i])) for i in range(40)}
    reordered = scores.assign(finished_at=scores["model_id"].map(finished))
    first, second = C.fit(scores), C.fit(reordered)
    assert first.train["selection"] == second.train["selection"]
    assert first.train["cross_validated"] == second.train["cross_validated"]
    assert (first.coef, first.intercept) == (second.coef, second.intercept)
