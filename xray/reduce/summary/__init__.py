"""From the `scores` long table to one summary row per detector x group.

Reading: `load_scores` returns the de-duplicated `scores` rows of one run or of all runs (one row
per SCORE_KEY: the latest ok row, else the latest row), through the one reader of the result
tables, `xray.results.sink.read_table`; `deduplicate` is `xray.results.sink.dedupe_scores`.

Summarising (`summarize`) works on *units* and *models*:

* A unit is one (detector, detector_version, config_hash): results of different detector code or
  parameters are never pooled.
* A unit's models are every model that appears, under any detector, in the runs where the unit
  has rows. A model the unit did not score (no row, error, timeout, crash, NaN score) is
  *missing*: it is counted in the coverage columns, left out of the plain metrics and counted as
  probability 0.5 in the ``*_missing_as_half`` metrics (the TrojAI convention for models a
  submission did not reach). If the unit has several rows for one model (e.g. the model file
  changed between runs), the latest ok row is used, else the latest row; ``n_superseded`` counts
  the others.
* Groups, in columns ``group_by`` (the kind) and ``group`` (the value): ``all``/``all``;
  ``attack`` = each gt_attack value of the trojaned models, with the group
  holding the trojaned models of that attack *and every clean model* as the negatives (so each
  attack group answers "trojaned-by-this-attack vs clean"; unlabelled models are in no attack
  group); ``architecture`` = each architecture; and each key of ``tags_json`` (dataset, round,
  split, ...) = each of its values, over the models that carry the key.
* Threshold (``score >= threshold`` -> trojaned), per detector, recorded in ``threshold_source``:
  ``given`` (the `thresholds` argument), else ``clean_q<quantile>`` = `calibrate_threshold` over
  the unit's known-clean models (an in-sample FPR of about 1 - quantile), else
  ``best_separating`` (the best accuracy threshold over all labelled models), else ``none``.
  ``threshold_n_clean`` says how many clean models a ``clean_q`` threshold rests on; below
  MIN_CLEAN_MODELS (20) the 0.95 quantile lies between the two largest clean scores, and
  `threshold_warning` (under `format_table`'s table, and in the report) says so in one line.
* Probability, per model (for CE, Brier and the threshold-form ROC-AUC; `with_probability`
  puts it beside every score row): the detector's stat ``probability`` when its stats_json
  has a finite one (``probability_source`` "stats": a calibrated map, e.g. the combined
  detector's stacker or MNTD's meta-classifier), else the default map
  ``logistic((score - threshold) / scale)`` ("logistic"), with scale = the standard deviation
  of the unit's clean scores (`probability_scale`). It is monotone in the score, 0.5 exactly at
  the threshold (p >= 0.5 is the verdict "trojaned"), and in units of the clean models' spread,
  so detectors with different score scales compare on one scale. A heuristic, not a fitted
  calibration: a calibrator (`xray calibrate`, the combined detector) fits one. NaN for a
  model without a usable score or a unit without a threshold. The summary's
  ``probability_source`` says which was used (stats / logistic / mixed).
* Leakage: ``n_training_models`` counts the group's models whose row a calibrator made for one
  of its own training models (the combined detector's stats ``trained_on``, see
  xray.reduce.calibrate); their probabilities are in-sample, and ``notes`` says so (or that a
  calibrator without its training list could not be checked). Marked, not refused: a corpus
  may legitimately include the training round.
* Models without ground truth (gt_poisoned null) are counted (``n_unlabelled``, ``n_flagged``,
  ``score_median``) but left out of every metric; a group with no labelled model has NaN metrics
  with the reason in ``roc_auc_reason`` / ``notes``.

Package layout: `reading`, `units` (per-model frames, thresholds, probabilities, verdicts),
`groups`, `table` (`summarize`), `output` (`format_table`, `write_summary`,
`refresh_summary`); every name imports from here.
"""
from xray.reduce.summary.output import (format_table, refresh_summary, threshold_warning,
                                        write_summary)
from xray.reduce.summary.reading import deduplicate, load_scores
from xray.reduce.summary.table import MAX_FPR, SUMMARY_COLUMNS, summarize
from xray.reduce.summary.units import (
    CLEAN_QUANTILE,
    MIN_CLEAN_MODELS,
    UNIT,
    probability_scale,
    threshold_clean_models,
    unit_frames,
    verdicts,
    with_probability,
)

__all__ = [
    "CLEAN_QUANTILE", "MAX_FPR", "MIN_CLEAN_MODELS", "SUMMARY_COLUMNS", "UNIT", "deduplicate",
    "format_table", "load_scores", "probability_scale", "refresh_summary", "summarize",
    "threshold_clean_models",
    "threshold_warning", "unit_frames", "verdicts", "with_probability", "write_summary",
]
