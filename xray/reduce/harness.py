"""Score a test set exactly as the TrojAI harness (rounds 1-4) does: the reduce half of
`xray score-testset` (the scan before it is `xray.pipeline.score_testset`).

    figures = harness_scores(y, p)                              # ce, ce_ci95, brier, ...
    result = testset_report(round_dir, out_uri, scores, run_id)  # per-model CSV + summary + page

Harness rules (ref: usnistgov/trojai-test-harness actor_executor/metrics.py, submission.py,
fs_utils.py; docs/algorithms/trojai-format.md "Scoring"):
  * targets: float(first line) of each id-*/ground_truth.csv;
  * a prediction is float(first line) of the detector's result file; a missing file, a parse
    failure or NaN is 0.5 (`read_prediction` returns NaN, `harness_scores` fills 0.5);
    predictions are otherwise used unclipped;
  * CE_i = -(y ln p + (1-y) ln(1-p)) in float64 with p clipped to [1e-12, 1 - 1e-12]; the score
    is mean CE_i; CI95 = 1.96 * std(CE_i, ddof 0) / sqrt(n);
  * Brier = mean((p - y)^2) on unclipped p;
  * ROC-AUC, rounds 1-4: sklearn.metrics.auc over (FPR, TPR) at thresholds
    np.arange(0, 1.01, 0.01), detection p >= t (round 1's harness: p > t), no end points added;
    the current harness: sklearn roc_auc_score. Both are reported.
These reuse xray.reduce.metrics (cross_entropy, brier, roc_auc_thresholds, roc_auc); only the
round-1 strict form (p > t) is written here.

Leakage: a test set holding models the calibrator was trained on (same model_id and model
digest) is refused (`TrainingModelError`), since its "combined" figures would be in-sample.
With allow_training_models (`--allow-training-models`: a corpus that includes the training
round), they are scored but marked: per model ``in_training``, per summary row
``n_training_models``, and a ``combined_held_out`` row over the other models only.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from markupsafe import Markup
from sklearn.metrics import auc as sk_auc

from xray.io import storage
from xray.reduce import calibrate as C
from xray.reduce import metrics as M
from xray.reduce.templating import render
from xray.results.sink import frame_rows, read_table, write_part

log = logging.getLogger(__name__)

MISSING_PREDICTION = 0.5
HELD_OUT = "combined_held_out"  # summary row: the combined detector over non-training models


@dataclass(frozen=True)
class HarnessScores:
    """The harness's figures for one detector over one test set (missing/NaN = 0.5)."""

    n: int
    n_missing: int
    cross_entropy: float
    ce_ci95: float
    brier: float
    roc_auc_thresholds: float      # rounds 2-4 form: p >= t
    roc_auc_thresholds_r1: float   # round 1 form: p > t
    roc_auc: float                 # sklearn roc_auc_score (current harness)
    reason: str | None = None      # why an AUC is NaN (one class only, ...)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_prediction(uri: str) -> float:
    """float(first line) of a result file; NaN when the file is missing or does not parse
    (the harness then uses 0.5)."""
    try:
        text = storage.read_text(uri)
    except (FileNotFoundError, OSError, UnicodeDecodeError):
        return math.nan
    lines = text.splitlines()
    try:
        return float(lines[0].strip())
    except (IndexError, ValueError):
        return math.nan


def read_ground_truth(uri: str) -> float:
    """float(first line) of ground_truth.csv (the harness's target)."""
    return float(storage.read_text(uri).splitlines()[0].strip().rstrip(","))


def fill_missing(probability) -> np.ndarray:
    """Predictions as the harness holds them: NaN (missing / unparseable) -> 0.5, else as is."""
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    return np.where(np.isnan(p), MISSING_PREDICTION, p)


def roc_auc_thresholds_strict(y_true, probability) -> M.Metric:
    """Round 1's threshold ROC-AUC: detection p > t at np.arange(0, 1.01, 0.01), no end points."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = fill_missing(probability)
    if y.size == 0 or y.min() == y.max():
        return M.Metric(math.nan, "only one class" if y.size else "no models")
    pos, neg = y == 1, y == 0
    pred = p[None, :] > M.TROJAI_THRESHOLDS[:, None]
    tpr = (pred & pos).sum(axis=1) / pos.sum()
    fpr = (pred & neg).sum(axis=1) / neg.sum()
    return M.Metric(float(sk_auc(fpr, tpr)) + 0.0)  # + 0.0: no "-0.0" from a falling curve


def harness_scores(y_true, probability) -> HarnessScores:
    """All harness figures of one detector; NaN predictions count as 0.5."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    raw = np.asarray(probability, dtype=np.float64).reshape(-1)
    if y.shape != raw.shape:
        raise ValueError(f"{y.size} targets but {raw.size} predictions")
    p = fill_missing(raw)
    ce = M.cross_entropy(y, p)
    auc_t = M.roc_auc_thresholds(y, p)
    auc_r1 = roc_auc_thresholds_strict(y, p)
    auc = M.roc_auc(y, p)
    return HarnessScores(
        n=int(y.size), n_missing=int(np.isnan(raw).sum()), cross_entropy=ce.value,
        ce_ci95=ce.ci95, brier=M.brier(y, p).value, roc_auc_thresholds=auc_t.value + 0.0,
        roc_auc_thresholds_r1=auc_r1.value, roc_auc=auc.value,
        reason=auc.reason or auc_t.reason or ce.reason)


def score_result_files(targets: Mapping[str, float], results_dir: str,
                       suffix: str = ".txt") -> tuple[pd.DataFrame, HarnessScores]:
    """Per-model (model_id, target, prediction) from <results_dir>/<model_id><suffix> files, as
    the harness collects them, and their scores."""
    ids = sorted(targets)
    preds = [read_prediction(storage.join(results_dir, f"{m}{suffix}")) for m in ids]
    frame = pd.DataFrame({"model_id": ids, "target": [targets[m] for m in ids],
                          "prediction": preds})
    return frame, harness_scores(frame["target"], frame["prediction"])


# ---------------------------------------------------------------------------------------------
# score-testset


@dataclass
class TestsetResult:
    run_id: str
    per_model: pd.DataFrame     # model_id, target, p_<detector>..., p_combined, in_training, ...
    summary: pd.DataFrame       # one row per detector (and "combined"): harness figures
    per_model_uri: str
    summary_uri: str
    html_uri: str
    warning: str | None = None  # the calibrator's training models among the test models


SUMMARY_ORDER = ["detector", "n", "n_missing", "n_training_models", "cross_entropy", "ce_ci95",
                 "brier", "roc_auc_thresholds", "roc_auc_thresholds_r1", "roc_auc", "reason"]
_FIGURES = ["cross_entropy", "ce_ci95", "brier", "roc_auc_thresholds", "roc_auc_thresholds_r1",
            "roc_auc"]


def training_warning(per_model: pd.DataFrame, calibrator: Any) -> str | None:
    """The line every testset output carries when the calibrator saw some test models."""
    if calibrator is None:
        return None
    if calibrator.training_models is None:
        return (f"calibrator {calibrator.name} does not list its training models: whether "
                "the 'combined' figures are in-sample cannot be checked")
    n = int(per_model["in_training"].eq(True).sum())
    if not n:
        return None
    return (f"{n} of {len(per_model)} test models are training models of calibrator "
            f"{calibrator.name}: the 'combined' figures are partly in-sample; "
            f"'{HELD_OUT}' scores the other {len(per_model) - n} models only")


def testset_tables(records: Sequence[Any], scores: pd.DataFrame, calibrator: Any = None,
                   *, allow_training_models: bool = False
                   ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per-model frame, summary frame, combined score rows) for a round's records and the
    scores of its models. Every record counts; a model without an ok score predicts 0.5.
    Test models the calibrator was trained on: refused, or with allow_training_models marked
    (see the module docstring)."""
    labelled = [r for r in records if r.poisoned is not None]
    if len(labelled) < len(records):
        log.warning("%d of %d models have no ground truth and are left out of the scores",
                    len(records) - len(labelled), len(records))
    ids = [r.model_id for r in labelled]
    frame = pd.DataFrame({"model_id": ids, "target": [float(r.poisoned) for r in labelled]})
    scores = scores[scores["model_id"].isin(ids)] if len(scores) else scores
    if calibrator is not None and not allow_training_models and len(scores):
        calibrator.refuse_training_models(
            zip(scores["model_id"], scores["model_digest"]),
            hint="score a test set it was not trained on, or pass --allow-training-models "
                 f"(allow_training_models=True) to mark them and add a '{HELD_OUT}' row")
    combined = C.combined_rows(scores, calibrator) if len(scores) else scores.iloc[0:0]
    probs = C.detector_probabilities(scores) if len(scores) else pd.DataFrame(index=ids)
    detectors = list(probs.columns)
    for name in detectors:
        frame[f"p_{name}"] = frame["model_id"].map(probs[name]).astype(float)
    p_comb = combined.set_index("model_id")["stats_json"].map(C.row_probability) \
        if len(combined) else pd.Series(dtype=float)
    frame["p_combined"] = frame["model_id"].map(p_comb).astype(float)
    # True / False; None: no calibrator, no combined row, or a calibrator that cannot tell
    flags = combined.set_index("model_id")["stats_json"].map(C.trained_on_flag) \
        if len(combined) else pd.Series(dtype=object)
    frame["in_training"] = frame["model_id"].map(flags).astype(object)
    frame["in_training"] = frame["in_training"].where(frame["in_training"].notna(), None)
    trained = frame["in_training"].eq(True).to_numpy()
    rows = []
    for name in [*detectors, "combined"]:
        col = frame[f"p_{name}"].to_numpy(dtype=float)
        rows.append({"detector": name, "n_training_models": int(trained.sum()),
                     **harness_scores(frame["target"], col).as_dict()})
    if trained.any():  # the honest figure of the combined detector: models it did not see
        held = frame[~trained]
        row = {"detector": HELD_OUT, "n_training_models": 0,
               **harness_scores(held["target"], held["p_combined"]).as_dict()}
        if not len(held):
            row.update({k: math.nan for k in _FIGURES},
                       reason="every test model is a training model")
        rows.append(row)
    summary = pd.DataFrame(rows, columns=SUMMARY_ORDER)
    frame["prediction"] = fill_missing(frame["p_combined"])
    return frame, summary, combined


def format_summary(summary: pd.DataFrame, warning: str | None = None) -> str:
    view = summary.copy()
    for col in _FIGURES:
        view[col] = view[col].map(lambda x: "-" if pd.isna(x) else f"{x:.4f}")
    text = view.drop(columns="reason").to_string(index=False)
    return f"WARNING: {warning}\n{text}" if warning else text


def _html(summary: pd.DataFrame, per_model: pd.DataFrame, title: str,
          warning: str | None = None) -> str:
    """The testset page (templates/testset.html.j2): the two tables as pandas writes them
    (cells escaped), four decimals, '-' for missing."""
    def table(frame: pd.DataFrame) -> Markup:
        return Markup(frame.to_html(index=False, float_format=lambda x: f"{x:.4f}", na_rep="-"))

    return render("testset.html.j2", title=title, warning=warning,
                  summary_table=table(summary), per_model_table=table(per_model))


def testset_report(round_uri: str, out_uri: str, scores: pd.DataFrame, run_id: str, *,
                   calibrator: Any = None, write_combined: bool = True,
                   allow_training_models: bool = False) -> TestsetResult:
    """Score a round's models from their `scores` rows (of run `run_id`, or of the scan that
    just ran) as the harness does. Reads tables only: `xray.pipeline.score_testset` scans first.

    Writes <out>/testset/per_model.csv, summary.csv and testset.html, and (write_combined) the
    combined detector's rows into <out>/scores so that `xray report` shows it beside the others.
    Models the calibrator was trained on: TrainingModelError (the scan's rows are kept), unless
    allow_training_models (then marked; see the module docstring).
    """
    # local: xray.io.manifest imports torch (through io.examples), which scoring never needs
    from xray.io.manifest import read_manifest

    records = read_manifest(round_uri)
    scores = scores[scores["detector"] != C.COMBINED]
    try:
        per_model, summary, combined = testset_tables(
            records, scores, calibrator, allow_training_models=allow_training_models)
    except C.TrainingModelError as e:  # say how to reuse the scan
        raise C.TrainingModelError(f"{e} (the scores are in run {run_id})") from None
    warning = training_warning(per_model, calibrator)
    if write_combined and len(combined):
        for rid, rows in combined.groupby("run_id"):
            write_part(out_uri, "scores", str(rid), frame_rows(rows))
    base = storage.join(out_uri, "testset")
    per_model_uri = storage.join(base, "per_model.csv")
    summary_uri = storage.join(base, "summary.csv")
    html_uri = storage.join(base, "testset.html")
    storage.write_text(per_model_uri, per_model.to_csv(index=False))
    storage.write_text(summary_uri, summary.to_csv(index=False))
    title = f"Test set {os.path.basename(str(round_uri).rstrip('/'))}"
    storage.write_text(html_uri, _html(summary, per_model, title, warning))
    return TestsetResult(run_id, per_model, summary, per_model_uri, summary_uri, html_uri,
                         warning)


def run_scores(out_uri: str, run_id: str) -> pd.DataFrame:
    """The `scores` rows of run `run_id` (ValueError when it has none)."""
    scores = read_table(out_uri, "scores", run_id=run_id)
    if not len(scores):
        raise ValueError(f"no scores under {out_uri} for run {run_id}")
    return scores
