"""Reducer: metrics against hand-computed values, summaries of a synthetic scores table, report."""
import json
import math
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xray.reduce import metrics as M
from xray.reduce.report import render_report
from xray.reduce.summary import (
    MIN_CLEAN_MODELS,
    SUMMARY_COLUMNS,
    deduplicate,
    format_table,
    load_scores,
    summarize,
    threshold_warning,
    unit_frames,
    verdicts,
    with_probability,
    write_summary,
)
from xray.reduce.formatting import fmt
from xray.results.schema import RUNS, SCORES

nan = float("nan")
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# metrics


def test_confusion_counts_and_accuracy():
    y = [1, 1, 0, 0, 1]
    s = [0.9, 0.4, 0.5, 0.1, 0.5]
    # threshold 0.5, score >= t -> trojaned: pred [1, 0, 1, 0, 1]
    assert M.confusion_counts(y, s, 0.5) == M.Counts(tp=2, fp=1, fn=1, tn=1)
    assert M.accuracy(y, s, 0.5) == M.Metric(3 / 5)
    assert M.confusion_counts([], [], 0.5) == M.Counts(0, 0, 0, 0)
    with pytest.raises(ValueError):
        M.confusion_counts([1, 0], [0.3, nan], 0.5)
    acc = M.accuracy(y, s, nan)
    assert math.isnan(acc.value) and acc.reason == "threshold is NaN"


def test_best_threshold_lowest_on_ties():
    y = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.4, 0.4, 0.8, 0.2, 0.9]
    # t=0.1: 3/6, 0.2: 4/6, 0.4: 5/6, 0.8: 5/6, 0.9: 4/6 -> lowest best = 0.4
    thr, acc = M.best_threshold(y, s)
    assert thr.value == 0.4 and acc.value == pytest.approx(5 / 6)
    thr, acc = M.best_threshold([], [])
    assert math.isnan(thr.value) and thr.reason == "no models"


def test_best_threshold_matches_accuracy_at_every_candidate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 12, 60) / 4.0  # many ties
    thr, acc = M.best_threshold(y, s)
    brute = {t: M.accuracy(y, s, t).value for t in np.unique(s)}
    assert acc.value == pytest.approx(max(brute.values()))
    assert thr.value == min(t for t, a in brute.items() if a == pytest.approx(acc.value))
    # one class: still defined (the lowest threshold flags everything)
    assert M.best_threshold([1, 1], [0.2, 0.3]) == (M.Metric(0.2), M.Metric(1.0))


def test_roc_auc_with_ties_and_one_class():
    # positives {0.5, 0.9} vs negatives {0.5, 0.2}: 0.5 (tie) + 1 + 2 = 3.5 of 4 pairs
    assert M.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]).value == pytest.approx(0.875)
    one = M.roc_auc([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(one.value) and "only one class (clean)" in one.reason
    missing_truth = M.roc_auc([0, nan, 1], [0.1, 0.2, 0.3])
    assert math.isnan(missing_truth.value) and "no ground truth" in missing_truth.reason
    nan_score = M.roc_auc([0, 1], [0.1, nan])
    assert math.isnan(nan_score.value) and "NaN" in nan_score.reason


def test_roc_auc_threshold_form_bins_tie():
    y = [0, 0, 1, 1, 0, 1]
    p = [0.105, 0.405, 0.409, 0.805, 0.205, 0.905]
    # Exact: every trojaned above every clean.
    assert M.roc_auc(y, p).value == 1.0
    # Threshold form: 0.405 (clean) and 0.409 (trojaned) share a 0.01 bin. Points (FPR, TPR):
    # (1,1) (2/3,1) (1/3,1) (0,2/3) (0,1/3) (0,0): area 1/3 + 1/3 + (1 + 2/3)/2 * 1/3 = 17/18.
    assert M.roc_auc_thresholds(y, p).value == pytest.approx(17 / 18)
    fpr, tpr = M.trojai_threshold_roc(y, p)
    assert fpr.shape == tpr.shape == (101,)
    assert (fpr[0], tpr[0]) == (1.0, 1.0)
    # No end points added (as the harness): all probabilities 1.0 -> one point (1, 1), area 0.
    assert M.roc_auc_thresholds([0, 1], [1.0, 1.0]).value == 0.0
    assert math.isnan(M.roc_auc_thresholds([1, 1], [0.2, 0.3]).value)
    # NaN probabilities: NaN with a reason, or 0.5 when asked (TrojAI convention).
    assert "NaN" in M.roc_auc_thresholds([0, 1], [0.2, nan]).reason
    # p = [0.2, 0.5]: t <= 0.2 (1,1), 0.21..0.5 (0,1), above (0,0): area 1.
    assert M.roc_auc_thresholds([0, 1], [0.2, nan], missing=0.5).value == 1.0


def test_cross_entropy_hand_values():
    y = [1, 0, 1, 0]
    p = [0.8, 0.3, 1.0, 0.0]
    # CE_i = [-ln 0.8, -ln 0.7, -ln(1 - 1e-12), -ln(1 - 1e-12)]
    #      = [0.2231436, 0.3566749, ~1e-12, ~1e-12]
    ce = M.cross_entropy(y, p)
    assert ce.reason is None
    assert ce.value == pytest.approx(0.1449546, abs=1e-7)
    # std (ddof 0) of CE_i = 0.1524494; ci95 = 1.96 * 0.1524494 / sqrt(4)
    assert ce.ci95 == pytest.approx(0.1494004, abs=1e-6)
    # p = 0 for a trojaned model is clipped to 1e-12: CE = -ln(1e-12) = 27.6310211
    assert M.cross_entropy([1], [0.0]).value == pytest.approx(27.6310211, abs=1e-6)
    # p = 1 for a clean model: clipped to 1 - 1e-12, which float64 rounds to 1 - 9.99978e-13, so
    # CE = -ln(9.99978e-13) = 27.6310432, not 27.6310211: the harness's float64 arithmetic, kept.
    assert M.cross_entropy([0], [1.0]).value == pytest.approx(27.6310432, abs=1e-6)
    assert M.cross_entropy([1], [1.0]).value == pytest.approx(1e-12, abs=1e-15)
    # one element: std 0 -> ci95 0
    assert M.cross_entropy([1], [0.5]) == M.CrossEntropy(pytest.approx(LN2), 0.0, None)


def test_cross_entropy_nan_handling():
    # NaN probability: NaN with a reason by default, never filled silently.
    ce = M.cross_entropy([1, 0], [nan, 0.2])
    assert math.isnan(ce.value) and math.isnan(ce.ci95)
    assert "1 of 2 probabilities are NaN" in ce.reason
    # missing=0.5: the harness's NaN -> 0.5. CE = (ln 2 + -ln 0.8) / 2 = 0.4581454
    half = M.cross_entropy([1, 0], [nan, 0.2], missing=0.5)
    assert half.value == pytest.approx(0.4581454, abs=1e-7)
    # NaN ground truth is never filled.
    assert "no ground truth" in M.cross_entropy([nan, 0], [0.5, 0.2], missing=0.5).reason
    assert M.cross_entropy([], []).reason == "no models"


def test_brier_unclipped():
    # ((0.8-1)^2 + (0.3-0)^2 + 0 + 0) / 4 = (0.04 + 0.09) / 4
    assert M.brier([1, 0, 1, 0], [0.8, 0.3, 1.0, 0.0]).value == pytest.approx(0.0325)
    # unclipped: p = 1.5 for a clean model counts 2.25
    assert M.brier([0], [1.5]).value == pytest.approx(2.25)
    assert "NaN" in M.brier([0, 1], [nan, 1.0]).reason
    assert M.brier([0, 1], [nan, 1.0], missing=0.5).value == pytest.approx(0.125)


def test_tpr_at_fpr_runtime_calibration():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.95, 0.5, 0.6, 0.9, 0.99]
    assert M.tpr_at_fpr(y, s, 0.05).value == 0.25  # only 0.99 beats every clean score
    assert M.tpr_at_fpr(y, s, 0.25).value == 1.0  # flagging 0.95 (one clean) catches all
    assert math.isnan(M.tpr_at_fpr([1, 1], [0.1, 0.2]).value)
    rt = M.runtime_percentiles([1.0, 2.0, 3.0, 4.0, nan])
    assert rt == {"p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97), "max": 4.0}
    assert all(math.isnan(v) for v in M.runtime_percentiles([]).values())
    assert M.calibrate_threshold(np.arange(21.0)).value == pytest.approx(19.0)
    assert M.calibrate_threshold([1, 2, 3, 4]).value == pytest.approx(3.85)
    assert M.calibrate_threshold([nan]).reason == "no clean model with a score"
    assert M.logistic([0.0, nan])[0] == 0.5 and math.isnan(M.logistic([nan])[0])


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="entries"):
        M.roc_auc([0, 1], [0.1])


# ---------------------------------------------------------------------------------------------
# synthetic scores table

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)

# model: (poisoned, attack, architecture, dataset)
MODELS = {
    "m0": (False, None, "resnet18", "mnist"),
    "m1": (False, None, "resnet18", "cifar10"),
    "m2": (False, None, "vgg11", "mnist"),
    "m3": (False, None, "vgg11", "cifar10"),
    "m4": (True, "patch", "resnet18", "mnist"),
    "m5": (True, "patch", "vgg11", "cifar10"),
    "m6": (True, "filter", "resnet18", "mnist"),
    "m7": (True, "filter", "vgg11", "cifar10"),
}
DET_A = {"m0": 0.1, "m1": 0.2, "m2": 0.3, "m3": 0.4, "m4": 0.9, "m5": 0.8, "m6": 0.35, "m7": 0.7}
DET_B = {"m0": 1.0, "m1": 2.0, "m2": 3.0, "m3": 4.0, "m4": 5.0, "m5": 6.0, "m6": 2.5}  # m7 errors


def _row(run, model, detector, status, score, minutes, *, truth=True, stats=None, error=None):
    poisoned, attack, arch, dataset = MODELS.get(model, (None, None, "resnet18", "mnist"))
    return {
        "run_id": run, "model_id": model, "model_digest": f"d-{model}", "detector": detector,
        "detector_version": "1", "config_hash": f"cfg-{detector}", "status": status,
        "error": error, "score": score, "predicted_target": None,
        "stats_json": json.dumps(stats or {}), "seconds": 10.0 + minutes, "worker": "w0",
        "architecture": arch, "num_classes": 10,
        "gt_poisoned": poisoned if truth else None,
        "gt_target": (0 if poisoned else None) if truth else None,
        "gt_attack": attack if truth else None,
        "tags_json": json.dumps({"dataset": dataset, "round": run}),
        "finished_at": T0 + timedelta(minutes=minutes),
    }


def scores_frame() -> pd.DataFrame:
    rows = []
    for i, (m, s) in enumerate(DET_A.items()):
        rows.append(_row("A", m, "det_a", "ok", s, i, stats={"probability": s}))
    for i, (m, s) in enumerate(DET_B.items()):
        rows.append(_row("A", m, "det_b", "ok", s, i))
    error = "Traceback ...\nRuntimeError: boom"
    rows.append(_row("A", "m7", "det_b", "error", None, 30, error=error))
    # a run without ground truth (other models), det_a only
    for i, (m, s) in enumerate({"u0": 0.2, "u1": 0.7, "u2": 0.95}.items()):
        rows.append(_row("B", m, "det_a", "ok", s, 60 + i, truth=False, stats={"probability": s}))
    return pa.Table.from_pylist(rows, schema=SCORES).to_pandas()


def _pick(summary, detector, group_by="all", group="all"):
    sel = summary[
        (summary.detector == detector) & (summary.group_by == group_by) & (summary.group == group)
    ]
    assert len(sel) == 1, (detector, group_by, group, len(sel))
    return sel.iloc[0]


def test_summarize_labelled_run_given_and_calibrated_thresholds():
    scores = scores_frame()
    s = summarize(scores[scores.run_id == "A"], thresholds={"det_a": 0.5})
    assert list(s.columns) == SUMMARY_COLUMNS

    a = _pick(s, "det_a")
    assert (a.n, a.n_poisoned, a.n_clean, a.n_unlabelled, a.n_ok, a.n_missing) == (8, 4, 4, 0, 8, 0)
    assert a.threshold == 0.5 and a.threshold_source == "given"
    assert (a.TP, a.FP, a.FN, a.TN) == (3, 0, 1, 4)  # 0.35 (filter) is missed
    assert a.accuracy == pytest.approx(7 / 8)
    assert (a.best_threshold, a.best_accuracy) == (0.35, pytest.approx(7 / 8))
    assert a.roc_auc == pytest.approx(15 / 16) and a.roc_auc_reason is None  # 0.35 < 0.4 only
    assert a.probability_source == "stats"
    p = np.array(list(DET_A.values()))
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert a.ce == pytest.approx(M.cross_entropy(y, p).value)
    assert a.brier == pytest.approx(M.brier(y, p).value)
    assert a.ce_missing_as_half == pytest.approx(a.ce)  # nothing missing
    assert a.coverage == 1.0
    assert a.runtime_p50 == pytest.approx(13.5) and a.runtime_max == 17.0

    # attack groups: that attack's trojaned models vs every clean model
    patch = _pick(s, "det_a", "attack", "patch")
    filt = _pick(s, "det_a", "attack", "filter")
    assert (patch.n, patch.n_poisoned, patch.n_clean, patch.roc_auc) == (6, 2, 4, 1.0)
    assert (filt.n, filt.roc_auc) == (6, pytest.approx(7 / 8))
    # architecture and tag groups
    assert _pick(s, "det_a", "architecture", "vgg11").n == 4
    assert _pick(s, "det_a", "dataset", "mnist").n == 4
    assert _pick(s, "det_a", "round", "A").n == 8

    b = _pick(s, "det_b")
    # threshold calibrated on the clean scores [1, 2, 3, 4]: their 0.95 quantile 3.85
    assert b.threshold_source == "clean_q0.95" and b.threshold == pytest.approx(3.85)
    assert (b.n, b.n_ok, b.n_missing, b.n_error, b.n_not_scored) == (8, 7, 1, 1, 0)
    assert b.coverage == pytest.approx(7 / 8)
    assert (b.TP, b.FP, b.FN, b.TN) == (2, 1, 1, 3)
    assert b.probability_source == "logistic"
    yb = np.array([0, 0, 0, 0, 1, 1, 1])
    # the default map: logistic((score - threshold) / sd of the clean scores [1, 2, 3, 4])
    pb = M.logistic((np.array(list(DET_B.values())) - 3.85) / np.std([1, 2, 3, 4], ddof=1))
    assert b.ce == pytest.approx(M.cross_entropy(yb, pb).value)
    # missing m7 (trojaned) counted as 0.5
    ce_half = M.cross_entropy(np.append(yb, 1), np.append(pb, 0.5))
    assert b.ce_missing_as_half == pytest.approx(ce_half.value)
    assert b.ce_ci95_missing_as_half == pytest.approx(ce_half.ci95)
    auc_half = M.roc_auc(np.append(yb, 1), np.append(pb, 0.5))
    assert b.roc_auc_missing_as_half == pytest.approx(auc_half.value)
    # filter group of det_b: m6 (2.5) vs 4 clean; m7 missing
    fb = _pick(s, "det_b", "attack", "filter")
    assert (fb.n, fb.n_missing, fb.roc_auc) == (6, 1, pytest.approx(0.5))

    with pytest.raises(ValueError, match="det_c"):
        summarize(scores, thresholds={"det_c": 1.0})

    # no given threshold: det_a calibrated from its clean models too
    s2 = summarize(scores[scores.run_id == "A"], group_by=["attack"])
    assert set(s2.group_by) == {"all", "attack"}
    assert _pick(s2, "det_a").threshold == pytest.approx(np.quantile([0.1, 0.2, 0.3, 0.4], 0.95))


def test_summarize_run_without_ground_truth():
    scores = scores_frame()
    s = summarize(scores[scores.run_id == "B"])
    a = _pick(s, "det_a")
    assert (a.n, a.n_unlabelled, a.n_ok) == (3, 3, 3)
    assert a.threshold_source == "none" and math.isnan(a.threshold)
    for col in ("accuracy", "best_accuracy", "roc_auc", "roc_auc_thresholds", "ce", "brier",
                "tpr_at_fpr", "ce_missing_as_half", "roc_auc_missing_as_half"):
        assert math.isnan(a[col]), col
    assert "no ground truth" in a.roc_auc_reason and "no ground truth" in a.notes
    assert a.score_median == 0.7
    assert pd.isna(a.TP) and pd.isna(a.n_flagged)
    # with a threshold the flagged count is there even without ground truth
    g = _pick(summarize(scores[scores.run_id == "B"], thresholds={"det_a": 0.5}), "det_a")
    assert g.n_flagged == 2 and math.isnan(g.accuracy)
    assert "attack" not in set(s.group_by)


def test_summarize_mixed_runs_leaves_unlabelled_out():
    s = summarize(scores_frame(), thresholds={"det_a": 0.5})
    a = _pick(s, "det_a")
    assert (a.n, a.n_unlabelled, a.n_poisoned) == (11, 3, 4)
    assert a.roc_auc == pytest.approx(15 / 16)  # same as run A alone
    assert "3 unlabelled models left out" in a.notes
    b = _pick(s, "det_b")
    assert b.n == 8  # det_b never ran in run B: its models are not det_b's missing models
    text = format_table(s)
    assert "det_a" in text and "attack=patch" in text and "\n" in text
    assert format_table(summarize(scores_frame().iloc[0:0])) == "(no scores)"


def test_deduplicate_prefers_latest_ok():
    scores = scores_frame()
    first = scores.iloc[[0]].copy()
    later = first.finished_at + timedelta(hours=5)
    retry = first.assign(status="timeout", score=nan, finished_at=later)
    older_ok = first.assign(score=0.01, finished_at=first.finished_at - timedelta(hours=5))
    both = pd.concat([scores, retry, older_ok], ignore_index=True)
    d = deduplicate(both)
    assert len(d) == len(scores)
    kept = d[(d.model_id == "m0") & (d.detector == "det_a")].iloc[0]
    assert kept.status == "ok" and kept.score == 0.1  # latest ok, not the later timeout


def test_verdicts_say_why_a_model_without_a_score_has_none():
    scores = scores_frame()
    scores = scores[scores.run_id == "A"]
    # m3 of det_b: status ok but no finite score; m7 of det_b: an error row (scores_frame);
    # m6 of det_b: no row at all
    scores = scores[~((scores.detector == "det_b") & (scores.model_id == "m6"))].copy()
    scores.loc[(scores.detector == "det_b") & (scores.model_id == "m3"), "score"] = nan
    frames = {u["detector"]: (pm, thr) for u, pm, thr, _, _ in unit_frames(scores)}
    pm, thr = frames["det_b"]
    v = verdicts(pm, thr)
    assert v["m7"] == "error" and v["m3"] == "bad score" and v["m6"] == "not scored"
    assert v["m4"] == "trojaned" and v["m0"] == "clean"
    assert set(v[pm["usable"]]) <= {"trojaned", "clean"}
    # the same per-model frame without a threshold: usable models say so, the others still why
    nothr = verdicts(pm, nan)
    assert nothr["m4"] == "no threshold" and nothr["m7"] == "error"
    assert nothr["m6"] == "not scored"


def test_probability_beside_the_score_is_monotone_bounded_and_nan_without_a_score():
    """with_probability: det_a's rows carry a calibrated probability statistic (used as is);
    det_b's go through the default map, monotone in the score, 0.5 at the threshold; rows
    without a usable score (error, ok with NaN) get NaN; the input frame is not changed."""
    scores = scores_frame()
    scores = scores[scores.run_id == "A"].reset_index(drop=True)
    scores.loc[(scores.detector == "det_b") & (scores.model_id == "m2"), "score"] = nan
    before = scores.copy()
    p = with_probability(scores)
    assert scores.equals(before) and "probability" not in scores.columns
    assert list(p.columns[list(p.columns).index("score"):][:3]) == [
        "score", "probability", "probability_source"]
    usable = p["status"].eq("ok") & p["score"].notna()
    assert p.loc[usable, "probability"].between(0, 1).all()
    assert p.loc[~usable, "probability"].isna().all() and len(p[~usable]) == 2  # m7 error, m2 NaN
    assert p.loc[~usable, "probability_source"].isna().all()
    a = p[p.detector == "det_a"]
    assert (a["probability_source"] == "stats").all()
    assert a["probability"].tolist() == a["score"].tolist()  # the stat, as stored
    b = p[(p.detector == "det_b") & usable].sort_values("score")
    assert (b["probability_source"] == "logistic").all()
    assert (np.diff(b["probability"].to_numpy()) > 0).all()  # strictly monotone in the score
    (_, pm, thr, source, _), = [f for f in unit_frames(scores) if f[0]["detector"] == "det_b"]
    clean = pm.loc[(pm.y == 0) & pm.usable, "score"].to_numpy()  # m2's score is gone
    assert source == "clean_q0.95" and thr == pytest.approx(np.quantile(clean, 0.95))
    expect = M.logistic((b["score"].to_numpy() - thr) / np.std(clean, ddof=1))
    assert b["probability"].to_numpy() == pytest.approx(expect)
    # p >= 0.5 is the verdict "trojaned"
    v = verdicts(pm, thr)
    assert ((pm.loc[pm.usable, "probability"] >= 0.5) == (v[pm.usable] == "trojaned")).all()
    assert with_probability(scores, thresholds={"det_b": 3.0}).query(
        "detector == 'det_b' and model_id == 'm1'")["probability"].item() == pytest.approx(
        float(M.logistic([(2.0 - 3.0) / np.std(clean, ddof=1)])[0]))
    # no threshold (no labels, none given): the default map has no centre, the stat still counts
    nolabel = with_probability(scores_frame().query("run_id == 'B'"))
    assert (nolabel["probability_source"] == "stats").all()
    nostat = scores_frame().query("run_id == 'B'").assign(stats_json="{}")
    assert with_probability(nostat)["probability"].isna().all()


def test_threshold_says_how_many_clean_models_it_rests_on_and_warns_below_20():
    scores = scores_frame()
    s = summarize(scores[scores.run_id == "A"], thresholds={"det_a": 0.5})
    assert pd.isna(_pick(s, "det_a").threshold_n_clean)  # given: rests on no clean model
    b = _pick(s, "det_b")
    assert (b.threshold_source, b.threshold_n_clean) == ("clean_q0.95", 4)
    warning = threshold_warning(s)
    assert warning.startswith("WARNING: the det_b threshold (clean_q0.95) rests on 4 clean "
                              "models (fewer than 20)") and "\n" not in warning
    text = format_table(s)
    assert text.splitlines()[-1] == warning and "3.850(clean_q0.95 of 4 clean)" in text
    # several detectors on the same clean models: one line naming both
    both = threshold_warning(summarize(scores[scores.run_id == "A"]))
    assert "the det_a, det_b thresholds (clean_q0.95) rest on 4 clean models" in both
    # MIN_CLEAN_MODELS clean models: no warning
    rows = [_row("C", f"c{i}", "det_b", "ok", float(i), i) for i in range(MIN_CLEAN_MODELS)]
    for row in rows:
        row["gt_poisoned"], row["gt_attack"] = False, None
    rows.append(_row("C", "m4", "det_b", "ok", 99.0, 30))
    enough = summarize(pa.Table.from_pylist(rows, schema=SCORES).to_pandas())
    assert _pick(enough, "det_b").threshold_n_clean == MIN_CLEAN_MODELS
    assert threshold_warning(enough) is None and "WARNING" not in format_table(enough)


def test_one_number_format():
    assert [fmt(None), fmt(pd.NA), fmt(nan), fmt(pd.NaT)] == ["-"] * 4
    assert fmt(0.123456) == "0.123" and fmt(0.5, 4) == "0.5000" and fmt(np.float32(2)) == "2.000"
    assert fmt(12345.6) == "1.23e+04" and fmt(3) == "3" and fmt(np.int64(7)) == "7"
    assert fmt(True) == "True" and fmt("patch") == "patch"


def _write_out(out, scores: pd.DataFrame):
    for run, part in scores.groupby("run_id"):
        path = out / "scores" / f"run={run}"
        path.mkdir(parents=True)
        table = pa.Table.from_pandas(part, schema=SCORES, preserve_index=False)
        pq.write_table(table, path / "part-0.parquet")
    (out / "scores" / "run=A" / ".tmp-123-part-1.parquet").write_bytes(b"half a file")
    runs = pa.Table.from_pylist(
        [{
            "run_id": r, "config_hash": "cfg", "config_json": json.dumps({"detectors": ["det_a"]}),
            "code_version": "0.1.0", "manifest_uri": f"file:///manifests/{r}.csv",
            "manifest_digest": "abc", "models_total": 8, "models_planned": 8,
            "started_at": T0, "finished_at": T0 + timedelta(hours=1),
        } for r in ("A", "B")],
        schema=RUNS,
    )
    (out / "runs" / "run=A").mkdir(parents=True)
    pq.write_table(runs, out / "runs" / "run=A" / "part-0.parquet")


def test_load_scores_write_summary_roundtrip(tmp_path):
    scores = scores_frame()
    # a duplicate of one key in a second part file: an earlier error, de-duplicated on read
    dup = scores.iloc[[1]].assign(status="error", score=nan, finished_at=T0 - timedelta(days=1))
    _write_out(tmp_path, scores)
    pq.write_table(pa.Table.from_pandas(dup, schema=SCORES, preserve_index=False),
                   tmp_path / "scores" / "run=A" / "part-9.parquet")
    loaded = load_scores(str(tmp_path))
    assert len(loaded) == len(scores)
    assert list(loaded.columns) == SCORES.names
    assert len(load_scores(str(tmp_path), run_id="B")) == 3
    assert load_scores(str(tmp_path / "nowhere")).empty
    s = summarize(loaded)
    uri = write_summary(str(tmp_path), s)
    back = pq.read_table(uri).to_pandas()
    assert list(back.columns) == SUMMARY_COLUMNS and len(back) == len(s)


def test_report_is_self_contained(tmp_path):
    _write_out(tmp_path, scores_frame())
    path = render_report(str(tmp_path))
    assert path == str(tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert '<img src="data:image/png;base64,' in html
    assert html.count('<img src="data:image/png;base64,') == 4  # ROC + histogram per detector
    assert "http://" not in html and "https://" not in html
    assert "RuntimeError: boom" in html  # errors list
    assert "m7" in html and "u2" in html  # per-model table
    assert "config_json" in html  # run info
    # the threshold: how it was set, on how many clean models, and the warning below 20
    assert "(clean_q0.95: the scores of 4 clean models)" in html
    warning = re.search(r'<p class="warn" id="threshold-warning">([^<]*)</p>', html)
    assert warning and "the det_a, det_b thresholds (clean_q0.95) rest on 4 clean" in warning[1]
    assert "<th>probability</th>" in html  # beside each score in the drill-down
    other = render_report(str(tmp_path), run_id="B", html_path=str(tmp_path / "b.html"))
    assert "RuntimeError" not in (tmp_path / "b.html").read_text() and other.endswith("b.html")


def test_cross_entropy_difference_is_paired():
    y = np.array([1, 1, 0, 0])
    a, b = np.array([0.9, 0.8, 0.2, 0.1]), np.array([0.6, 0.5, 0.5, 0.4])
    d = M.cross_entropy_difference(y, a, b)
    assert d.value == pytest.approx(M.cross_entropy(y, a).value - M.cross_entropy(y, b).value)
    assert d.value < 0 and 0 < d.ci95 < M.cross_entropy(y, b).ci95 + M.cross_entropy(y, a).ci95
    assert M.cross_entropy_difference(y, a, a) == (0.0, 0.0, None)
    assert "NaN" in M.cross_entropy_difference(y, a, [0.5, np.nan, 0.5, 0.5]).reason


def test_roc_auc_interval_brackets_the_auc_and_narrows_with_more_models():
    rng = np.random.default_rng(3)

    def sample(n):
        y = np.r_[np.ones(n), np.zeros(n)]
        return y, np.r_[rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)]

    y, s = sample(20)
    low, high = M.roc_auc_interval(y, s)
    assert low < M.roc_auc(y, s).value < high
    assert M.roc_auc_interval(y, s) == (low, high)  # deterministic for a seed
    big_low, big_high = M.roc_auc_interval(*sample(400))
    assert big_high - big_low < (high - low) / 2
    assert M.roc_auc_interval([1, 0, 1], [0.9, 0.1, 0.8]) == (1.0, 1.0)  # separated
    assert M.roc_auc_interval([1, 0], [0.5, 0.5]) == (0.5, 0.5)  # one tie counts a half
    assert all(math.isnan(v) for v in M.roc_auc_interval([1, 1], [0.2, 0.3]))
