"""The combined detector: a small regularised stacker over the detectors' scores and statistics.

    cal = fit(read_table(out, "scores", run_id=train_run))    # labelled models of a round
    cal.save("cal.json"); cal = Calibrator.load("cal.json")
    rows = combined_rows(scores, cal)       # score rows of detector "combined" (probability)
    table = summarize(with_combined(scores, cal))   # the reducer: combined beside single ones

Features, per model (`features_from_results`): for every detector the calibrator knows, its
score and its scalar numeric statistics (lists, labels, seeds and settings are left out:
EXCLUDED_STATS), plus ``<detector>.missing`` = 1 when the detector has no ok, finite score for
the model, ``log2_num_classes`` (an architecture fact a real scan has) and ``target_agreement``
(`target_agreement`: of the detectors that name a target class, at least three, how many name
the most named one; inferred, not from a paper: a backdoor's target is a class every
inverting or probing detector finds, a clean model's "targets" scatter). Missing values are
handled explicitly: the missing indicator is a feature, and a missing value is imputed with its
training mean (0 after standardisation), so a missing detector contributes only through its
indicator's weight. Features whose training values are constant or present in fewer than half of
the labelled models are dropped at fit time.

Model: scikit-learn LogisticRegression (L2, lbfgs) on standardised features, over one of the
`candidate_models` feature subsets: the base rate alone, each detector alone (Platt scaling of
its score), the target agreement alone or beside each detector, every detector's score (and the
agreement), or everything. The subset and C (`C` when given,
else C_GRID) are chosen together by stratified k-fold cross-validation (k = min(5, models per
class)) on the harness cross-entropy; a richer subset must beat every simpler one by more than
SELECTION_TOLERANCE (0.01 nats; inferred: chance gains of a noise feature at strong
regularisation are ~0.001): with the few dozen labelled models of a round, the full stacker
overfits and an uninformative detector would push every prediction to a confident mistake, so
the stacker is never chosen over a single detector, or a single detector over the base rate,
unless it predicts held-out models better. `model` forces a subset. The selection figures are
kept in the artifact (train.selection); they are the minimum over many candidates of figures on
the very folds that chose them, so they flatter the chosen one.

The reported figure (train.cross_validated, printed by `xray calibrate`) comes from NESTED
cross-validation: the whole selection above (subset and C, on inner folds) is repeated on the
training part of each outer fold, and the model it picks is fitted there and scored on the
held-out outer fold. It estimates how well the *procedure* (select, then fit) predicts models it
has not seen, which is what the artifact will be used for. Imputation means and standardisation
are computed once on all models (they do not see the labels).

Leakage: the artifact remembers its training models as (model_id, model_digest) pairs
(`training_models`). A prediction for one of them is in-sample. `combined_rows` marks such
rows (stats ``trained_on``), the summary counts them (``n_training_models`` and a note), the
report warns, and `xray score-testset` refuses a test set holding any unless told to score a
corpus that includes the training round (then its summary has a held-out row as well).
Calibrators of format version 1 have no list: they load with a `LeakageUncheckedWarning`.

The fitted numbers (feature names, imputation means, scales, coefficients, intercept) are
stored as a versioned JSON artifact (FORMAT / FORMAT_VERSION), never as a pickle: loading a
calibrator runs no code, and `predict` is numpy (expit(z @ coef + intercept)), so the
trojai-detect driver does not need scikit-learn.
Probabilities are clipped to `clip` (default [0.01, 0.99]), so one confident mistake costs at
most ln(100) = 4.6 in cross-entropy.

Without a calibrator (`default_probability`), the combined probability is a fixed, rank-free
monotone map of the best available detector (DEFAULT_ORDER: `weights`, then Model X-ray, then
the alphabetically first). For `weights`, p = expit((a - 3.47) / 0.67) of its largest MAD
anomaly index a (WEIGHTS_DEFAULT_MAP: the Platt scaling `xray calibrate` fitted on the
evaluation's training round, a 10-class CNN; an index's clean range grows with the class count,
so on rounds far from 10 classes a calibrator of the user's own is worth more; measured on held-out
rounds in docs/fidelity/combined.md). For Model X-ray
p = expit((c - re / log2(K)) / s), the Renyi entropy of the plane labels normalised by its
maximum log2(K), against a centre c = 0.45 and scale s = 0.15 (MODELXRAY_DEFAULT_MAP; inferred,
not published: a clean plane through three classes has RE near log2(3), i.e. 0.48-0.68 of the
maximum for 5-10 classes, a dominated plane much less; the paper's thresholds hold only for its
settings); for a
detector with a finite ``probability`` statistic that value; otherwise expit(score). Clipped to
DEFAULT_CLIP = [0.05, 0.95]: never a hard 0 or 1.

Package layout: `features` (per-model inputs), `default_map` (no calibrator), `artifact` (the
`Calibrator` and its leakage check), `stacker` (fitting, selection, `xray calibrate`),
`combined` (the combined detector's score rows); every name imports from here.
"""
from xray.reduce.calibrate.artifact import (
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    STACKER_VERSION,
    Calibrator,
    LeakageUncheckedWarning,
    TrainingModelError,
)
from xray.reduce.calibrate.combined import (
    combined_rows,
    trained_on_flag,
    with_combined,
)
from xray.reduce.calibrate.default_map import (
    DEFAULT_CLIP,
    DEFAULT_ORDER,
    DEFAULT_VERSION,
    MODELXRAY_DEFAULT_MAP,
    WEIGHTS_DEFAULT_MAP,
    default_combined,
    default_probability,
    detector_probabilities,
)
from xray.reduce.calibrate.features import (
    CASCADE,
    COMBINED,
    DERIVED_DETECTORS,
    EXCLUDED_STATS,
    TARGET_AGREEMENT,
    features_from_results,
    model_results,
    row_probability,
    scalar_stats,
    target_agreement,
)
from xray.reduce.calibrate.stacker import (
    C_GRID,
    SELECTION_TOLERANCE,
    calibrate,
    candidate_models,
    describe,
    fit,
)

__all__ = [
    "CASCADE", "COMBINED", "C_GRID", "Calibrator", "DEFAULT_CLIP", "DEFAULT_ORDER",
    "DEFAULT_VERSION", "DERIVED_DETECTORS", "EXCLUDED_STATS", "FORMAT", "FORMAT_VERSION",
    "LeakageUncheckedWarning", "MODELXRAY_DEFAULT_MAP", "READABLE_VERSIONS",
    "WEIGHTS_DEFAULT_MAP",
    "SELECTION_TOLERANCE", "STACKER_VERSION", "TARGET_AGREEMENT", "TrainingModelError",
    "calibrate", "candidate_models", "combined_rows", "default_combined",
    "default_probability", "describe", "detector_probabilities", "features_from_results",
    "fit", "model_results", "row_probability", "scalar_stats", "target_agreement",
    "trained_on_flag", "with_combined",
]
