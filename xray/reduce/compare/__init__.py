"""Regression comparison of two scans: did anything get worse, and which models flipped?

    result = compare("nightly/base", "nightly/today@20260101T...")   # A = baseline, B = new
    result.regression     # True when something is worse than its tolerance
    print(result.to_text())   # what changed; to_text(all_rows=True) every row; or
                              # to_markdown(), to_json() (everything)

A side is an output folder, optionally narrowed to one run as ``OUT@RUN_ID``; its scores are
read and de-duplicated as everywhere else (`summary.load_scores`) and summarised with
`summary.summarize` (each side calibrates its own thresholds, exactly as its report shows them).

Detectors are matched by name. When a side holds several configurations of one detector
(detector_version / config_hash), the one with the newest row is compared and the others are
listed as ignored; a version or configuration that differs between the sides is reported (it is
usually the point of the comparison), not judged.

What is judged (each against `Tolerances`; B worse than A by more than the tolerance is a
regression, anything else is reported):

* per detector x group (the summary's groups: all, attack, architecture, tags): ROC-AUC,
  accuracy at the threshold and TPR at the fixed FPR may drop by at most `roc_auc`, `accuracy`,
  `tpr_at_fpr`; TrojAI cross-entropy may rise by at most `ce`. A metric undefined on either side
  (no ground truth, one class) is shown as n/a and not judged.
* per detector (group all): p50 runtime may grow by at most the factor `runtime_ratio`;
  increases under `runtime_min_seconds` never count (timings of small models are noise).
* models whose verdict flipped (score >= threshold on one side, not on the other), with both
  scores: at most `flipped_to_wrong` labelled models may go from a right verdict to a wrong one.
  Flips of unlabelled models and flips to a right verdict are listed, not judged.
* models with an ok score in A and none in B (new errors, timeouts, crashes, not scored): at
  most `new_failures`.
* models of A absent from B: at most `missing_models`; a detector of A absent from B is always a
  regression. Models and detectors new in B are listed.

Output: `to_text` / `to_markdown` (`xray compare`'s text and markdown) show what changed: the
metric rows `changed` marks (a regression, a move beyond the tolerance either way, a group or
metric present on one side only), the flips, new and fixed failures, models and detectors
missing or new, and what differs between the runs, with one line counting the metric rows
that did not change; `all_rows=True` (`xray compare --all`) lists every row. `to_json` holds
everything, each metric row with its ``changed`` mark.

Defaults (`Tolerances()`): roc_auc 0.05, accuracy 0.05, tpr_at_fpr 0.10, ce 0.10,
runtime_ratio 1.5 with runtime_min_seconds 1.0, flipped_to_wrong 0, new_failures 0,
missing_models 0. A tolerances file (YAML or JSON) overrides any of them, globally and per
detector:

    roc_auc: 0.02
    runtime_ratio: 2.0
    detectors:
      modelxray: {roc_auc: 0.1}

Package layout: `tolerances`, `sides` (reading one side), `comparison` (the judgement),
`render` (text / markdown); every name imports from here.
"""
from xray.reduce.compare.comparison import METRICS, RUNTIME, Comparison, changed, compare
from xray.reduce.compare.sides import load_side, parse_side
from xray.reduce.compare.tolerances import (
    CompareUsageError,
    Tolerances,
    ToleranceSet,
    load_tolerances,
    parse_tolerances,
)

__all__ = [
    "METRICS", "RUNTIME", "CompareUsageError", "Comparison", "ToleranceSet", "Tolerances",
    "changed", "compare", "load_side", "load_tolerances", "parse_side", "parse_tolerances",
]
