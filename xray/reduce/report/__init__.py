"""A self-contained HTML report of one output folder: what a person reads after a scan.

    render_report(out_uri, run_id=None, html_path=None)    # -> where the HTML was written

Sections, in page order: the runs (config, code version, manifest and its digest), coverage
(models with no ok score and why, manifest models never scored), the summary per detector x group,
ROC curves of every detector on one plot, score histograms split by ground truth with the
threshold marked, runtime percentiles per detector, errors and timeouts, a drill-down per model
(every detector's score and verdict, Model X-ray's decision-boundary planes, inverted triggers
from the `triggers` table beside the ground-truth trigger), and the table of all scores.

Self-contained: plots are inline base64 PNGs, styles are inline, and the page references nothing
else (no script, font or stylesheet), so it opens from disk or from object storage and can be
mailed or attached to a CI run. Plots use matplotlib's object API with the Agg canvas (no pyplot,
no global backend switch; encoded by `xray.plots`); the page is the jinja2 template
templates/report.html.j2 with autoescaping on.

Scale: the page's cost grows with the number of detectors, not of models, except for
* the drill-down: by default only models some detector flags (score >= threshold) or gets wrong
  (verdict != ground truth), misclassified first, at most `max_drilldown` of them (the rest are
  counted); `drilldown_models` names models to show first whatever their verdicts;
* the per-model tables (coverage, errors, all scores): at most MAX_ROWS rows each, the rest
  counted.

The report reads tables (scores, runs, triggers, and the runs' manifests); it never runs a
scan. Drill-down pictures need the model: they come from `xray.explain.ModelPictures`, the one
module that goes back to model files for the report and `xray explain` alike (Model X-ray's
planes re-run with the run's configuration, limited to the first `planes` and checked against
the scan's stored per-plane RE; the `triggers` table's inverted triggers re-applied to a clean
example; the ground-truth trigger from the model's config.json). They need the run's manifest
and model files to be readable from where the report is made; when they are not, the entry says
why and the page renders all the same. `render_report(..., pictures=...)` takes another
provider; `planes=0` and a run without triggers keep the report to tables alone.

Package layout: `tables` (units and verdicts, runs, coverage, errors, summary view, per-model
table), `plots` (ROC, histograms, runtime), `drilldown` (which models, and each model's entry),
`page` (`render_report`: the template).
"""
from xray.reduce.report.drilldown import (
    DEFAULT_MAX_DRILLDOWN,
    DEFAULT_PLANES,
    MAX_TRIGGERS_PER_DETECTOR,
    select_drilldown,
)
from xray.reduce.report.page import render_report
from xray.reduce.report.tables import MAX_ROWS, leakage_warning

__all__ = [
    "DEFAULT_MAX_DRILLDOWN", "DEFAULT_PLANES", "MAX_ROWS", "MAX_TRIGGERS_PER_DETECTOR",
    "leakage_warning", "render_report", "select_drilldown",
]
