"""Harness scoring pinned against values computed by hand, and `xray score-testset`."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from xray.reduce.harness import (fill_missing, harness_scores, read_prediction,
                                 roc_auc_thresholds_strict, score_result_files)

NAN = float("nan")
# Targets and predictions with NaN (-> 0.5), exact 0 and 1, and scores tied within one bin.
Y = [1, 0, 1, 0, 1, 0, 1, 0, 0]
P = [0.93, 0.203, NAN, 1.0, 0.0, 0.207, 0.207, 0.62, 0.0]


def _ce_by_hand() -> list[float]:
    hi = 1 - 1e-12  # the harness's clipping
    return [-math.log(0.93), -math.log(0.5), -math.log(1e-12), -math.log(0.207),   # positives
            -math.log(1 - 0.203), -math.log(1 - hi), -math.log(1 - 0.207),          # negatives
            -math.log(1 - 0.62), -math.log(1 - 1e-12)]


def test_cross_entropy_and_interval_by_hand():
    s = harness_scores(Y, P)
    # Same per-model order as _ce_by_hand: positives first, then negatives.
    ce = np.array(_ce_by_hand())
    mean = ce.sum() / 9
    std = math.sqrt(((ce - mean) ** 2).sum() / 9)  # ddof 0
    assert s.n == 9 and s.n_missing == 1
    assert s.cross_entropy == pytest.approx(mean, rel=1e-12)
    assert s.ce_ci95 == pytest.approx(1.96 * std / 3.0, rel=1e-12)


def test_brier_unclipped_by_hand():
    # pos: .07^2 + .5^2 + 1^2 + .793^2; neg: .203^2 + 1^2 + .207^2 + .62^2 + 0
    by_hand = (0.0049 + 0.25 + 1.0 + 0.628849 + 0.041209 + 1.0 + 0.042849 + 0.3844 + 0.0) / 9
    assert harness_scores(Y, P).brier == pytest.approx(by_hand, rel=1e-12)
    # Unclipped: a prediction outside [0, 1] counts as it is (the harness does not clip it).
    assert harness_scores([1], [1.5]).brier == pytest.approx(0.25)


def test_roc_auc_threshold_forms_and_roc_auc_score_by_hand():
    s = harness_scores(Y, P)
    # p >= t curve: (1,1) (.8,.75) (.4,.5) (.4,.25) (.2,.25) (.2,0) -> .175 + .25 + .05
    assert s.roc_auc_thresholds == pytest.approx(0.475, abs=1e-12)
    # p > t (round 1): starts at (.8,.75), no end point added -> .25 + .05
    assert s.roc_auc_thresholds_r1 == pytest.approx(0.30, abs=1e-12)
    # roc_auc_score: (4 + 3 + 0.5 + 2.5) of 20 pairs, ties count one half
    assert s.roc_auc == pytest.approx(0.5, abs=1e-12)


def test_scores_within_one_bin_tie_in_the_threshold_form():
    s = harness_scores([1, 0], [0.203, 0.207])
    assert s.roc_auc == 0.0                 # roc_auc_score sees the order
    assert s.roc_auc_thresholds == 0.5      # one bin: (1,1) -> (0,0)
    assert roc_auc_thresholds_strict([1, 0], [0.203, 0.207]).value == 0.5


def test_missing_predictions_are_one_half():
    assert list(fill_missing([NAN, 0.2, 1.0])) == [0.5, 0.2, 1.0]
    a, b = harness_scores([1, 0, 1], [NAN, NAN, 0.9]), harness_scores([1, 0, 1], [0.5, 0.5, 0.9])
    assert a.cross_entropy == b.cross_entropy and a.n_missing == 2 and b.n_missing == 0
    one_class = harness_scores([1, 1], [0.2, 0.9])
    assert math.isnan(one_class.roc_auc) and "one class" in one_class.reason


def test_result_files_read_as_the_harness_does(tmp_path):
    (tmp_path / "id-0.txt").write_text("0.7\nignored\n")
    (tmp_path / "id-1.txt").write_text("nan\n")
    (tmp_path / "id-2.txt").write_text("not a number\n")
    assert read_prediction(str(tmp_path / "id-0.txt")) == 0.7
    assert all(math.isnan(read_prediction(str(tmp_path / f"id-{i}.txt"))) for i in (1, 2, 3))
    frame, s = score_result_files({"id-0": 1.0, "id-1": 0.0, "id-2": 1.0, "id-3": 0.0},
                                  str(tmp_path))
    assert s.n_missing == 3
    assert s.cross_entropy == pytest.approx((-math.log(0.7) + 3 * math.log(2)) / 4, rel=1e-12)


def test_score_testset_reuses_a_run_and_reports_combined(tiny_round, tiny_scores, tmp_path):
    import shutil

    from xray.cli import main
    from xray.reduce.summary import summarize
    from xray.results.sink import read_table

    round_dir, _ = tiny_round
    src, run_id, rows, _ = tiny_scores
    out = tmp_path / "out"
    shutil.copytree(src, out)
    result = CliRunner().invoke(main, ["score-testset", str(round_dir), "--out", str(out),
                                       "--run", run_id])
    assert result.exit_code == 0, result.output
    per_model = pd.read_csv(out / "testset" / "per_model.csv")
    summary = pd.read_csv(out / "testset" / "summary.csv")
    assert (out / "testset" / "testset.html").is_file()
    assert set(summary["detector"]) == {"modelxray", "combined"}
    assert len(per_model) == len(rows)
    # The summary is the harness's figures of the per-model probabilities.
    for name in ("modelxray", "combined"):
        s = harness_scores(per_model["target"], per_model[f"p_{name}"])
        row = summary[summary["detector"] == name].iloc[0]
        assert row["cross_entropy"] == pytest.approx(s.cross_entropy)
        assert row["roc_auc_thresholds"] == pytest.approx(s.roc_auc_thresholds)
    # Without a calibrator the combined probability is the default map: never 0 or 1.
    assert per_model["p_combined"].between(0.05, 0.95).all()
    # The combined detector is in the scores table, so the reducer reports it beside the others.
    table = summarize(read_table(str(out), "scores"))
    assert {"modelxray", "combined"} <= set(table["detector"])
    assert "combined" in result.output and "cross_entropy" in result.output


# ---------------------------------------------------------------------------------------------
# Leakage: a test set holding the calibrator's training models


def _records(scores: pd.DataFrame) -> list:
    from types import SimpleNamespace

    truth = scores.drop_duplicates("model_id")
    return [SimpleNamespace(model_id=m, poisoned=bool(p))
            for m, p in zip(truth["model_id"], truth["gt_poisoned"])]


def test_testset_refuses_training_models_or_marks_them_with_a_held_out_row():
    from test_calibrate import _rows

    from xray.reduce import calibrate as C
    from xray.reduce.harness import HELD_OUT, testset_tables, training_warning

    train = _rows()
    cal = C.fit(train)
    fresh = _rows(seed=1, digest="other")  # same ids, other weights: held out
    fresh = fresh.assign(model_id=fresh["model_id"] + "-new")
    corpus = pd.concat([train[train["model_id"] < "id-00000010"], fresh], ignore_index=True)
    with pytest.raises(C.TrainingModelError, match=rf"calibrator {cal.id} was trained on 10 "):
        testset_tables(_records(corpus), corpus, cal)
    # a test set it was not trained on: nothing to mark, no extra row
    per_model, summary, _ = testset_tables(_records(fresh), fresh, cal)
    assert not per_model["in_training"].any() and HELD_OUT not in set(summary["detector"])
    assert training_warning(per_model, cal) is None
    # a corpus that includes the training round: marked, and the held-out figure beside it
    per_model, summary, combined = testset_tables(_records(corpus), corpus, cal,
                                                  allow_training_models=True)
    trained = per_model["in_training"].eq(True)
    assert trained.sum() == 10 and set(per_model.loc[trained, "model_id"]) == {
        f"id-{i:08d}" for i in range(10)}
    assert combined["stats_json"].map(C.trained_on_flag).sum() == 10
    rows = summary.set_index("detector")
    assert (rows["n_training_models"].drop(HELD_OUT) == 10).all()
    held = per_model[~trained]
    s = harness_scores(held["target"], held["p_combined"])
    assert rows.loc[HELD_OUT, "n"] == 40 and rows.loc[HELD_OUT, "n_training_models"] == 0
    assert rows.loc[HELD_OUT, "cross_entropy"] == pytest.approx(s.cross_entropy)
    warning = training_warning(per_model, cal)
    assert "10 of 50" in warning and cal.id in warning and HELD_OUT in warning


def test_score_testset_cli_with_a_calibrator_of_the_same_round(tiny_round, tiny_scores,
                                                               tmp_path):
    import shutil

    from xray.cli import main

    round_dir, _ = tiny_round
    src, run_id, rows, _ = tiny_scores
    out = tmp_path / "out"
    shutil.copytree(src, out)
    artifact = tmp_path / "cal.json"
    fit = CliRunner().invoke(main, ["calibrate", str(out), "--train-run", run_id,
                                    "--model", "modelxray", "--artifact", str(artifact)])
    assert fit.exit_code == 0, fit.output
    assert "cross-validated (nested" in fit.output
    args = ["score-testset", str(round_dir), "--out", str(out), "--run", run_id,
            "--calibrator", str(artifact)]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "was trained on" in refused.output
    assert str(artifact) in refused.output and "--allow-training-models" in refused.output
    assert not (out / "testset").exists()
    result = CliRunner().invoke(main, [*args, "--allow-training-models"])
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "in-sample" in result.output
    per_model = pd.read_csv(out / "testset" / "per_model.csv")
    summary = pd.read_csv(out / "testset" / "summary.csv").set_index("detector")
    assert per_model["in_training"].all() and len(per_model) == len(rows)
    assert summary.loc["combined", "n_training_models"] == len(rows)
    assert math.isnan(summary.loc["combined_held_out", "cross_entropy"])
    assert "every test model" in summary.loc["combined_held_out", "reason"]
    assert "WARNING" in (out / "testset" / "testset.html").read_text()
