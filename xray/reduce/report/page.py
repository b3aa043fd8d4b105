"""The report page: every section's rows and plots put through the jinja2 template
templates/report.html.j2 (`xray.reduce.templating`: autoescaping on, strict undefined)."""
from __future__ import annotations

import math
import posixpath
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from xray.io import storage
from xray.reduce.formatting import fmt
from xray.reduce.report.drilldown import (
    DEFAULT_MAX_DRILLDOWN,
    DEFAULT_PLANES,
    drilldown,
    select_drilldown,
)
from xray.reduce.report.plots import hist_png, roc_png, runtime
from xray.reduce.report.tables import (
    SUMMARY_HELP,
    Manifests,
    build_units,
    cascade_view,
    coverage_rows,
    error_rows,
    leakage_warning,
    model_table,
    never_scored,
    read_runs_frame,
    runs_view,
    summary_view,
)
from xray.reduce.summary import (
    load_scores,
    summarize,
    threshold_clean_models,
    threshold_warning,
)
from xray.reduce.templating import render

if TYPE_CHECKING:  # the type only: importing it would import torch and the detectors
    from xray.explain import ModelPictures


def render_report(
    out_uri: str,
    run_id: str | None = None,
    html_path: str | None = None,
    *,
    thresholds: Mapping[str, float] | None = None,
    max_drilldown: int = DEFAULT_MAX_DRILLDOWN,
    drilldown_models: Sequence[str] = (),
    planes: int = DEFAULT_PLANES,
    show_progress: bool = False,
    pictures: ModelPictures | None = None,
) -> str:
    """Render the HTML report of <out> (one run, or all) and return where it was written.

    html_path defaults to <out>/report.html; any fsspec URI works, written atomically.
    thresholds: as in `summarize`. max_drilldown: models with a drill-down section (flagged or
    misclassified ones, misclassified first; 0 = none). drilldown_models: models to drill into
    first whatever their verdicts. planes: Model X-ray planes re-run and drawn per drill-down
    model (0 = none). show_progress: a progress bar over the drill-down models (their pictures
    re-run detectors). pictures: what draws the drill-down's planes and triggers (default: an
    `xray.explain.ModelPictures` over the runs, made when a drill-down model needs a picture).
    """
    scores = load_scores(out_uri, run_id)
    summary = summarize(scores, thresholds)
    units = build_units(scores, thresholds)
    runs, runs_note = read_runs_frame(out_uri, run_id)
    manifests = Manifests(runs, out_uri)

    roc, roc_note = roc_png(units) if units else (None, "No scores.")
    detectors = [{"label": u.label, "version": u.key["detector_version"],
                  "config_hash": u.key["config_hash"], "threshold": fmt(u.threshold, 4),
                  "threshold_source": u.source,
                  "threshold_n_clean": threshold_clean_models(u.per_model, u.source),
                  "hist_png": hist_png(u)} for u in units]
    runtime_rows, runtime_png = runtime(units)
    coverage_counts, coverage_missing, coverage_left_out = coverage_rows(units)
    errors, errors_left_out, errors_by_status = error_rows(scores)
    picked, drill_left_out = select_drilldown(units, max_drilldown, drilldown_models)
    entries = drilldown(picked, units, scores, manifests, out_uri, run_id, planes,
                        show_progress, pictures)
    cascade_stages, decided_at = cascade_view(scores)
    models, models_left_out = model_table(units, {m for m, _ in picked}, decided_at)
    labelled = bool(units) and any((~np.isnan(u.per_model["y"].to_numpy(dtype=float))).any()
                                   for u in units)

    html = render("report.html.j2",
        title=run_id or posixpath.basename(str(out_uri).rstrip("/")) or str(out_uri),
        out_uri=str(out_uri),
        run_id=run_id,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        n_rows=len(scores),
        n_models=int(scores["model_id"].nunique()) if len(scores) else 0,
        n_units=len(units),
        labelled=labelled,
        runs=runs_view(runs),
        runs_note=runs_note,
        never_scored=never_scored(runs, scores, manifests),
        coverage_counts=coverage_counts,
        coverage_missing=coverage_missing,
        coverage_left_out=coverage_left_out,
        summary=summary_view(summary),
        summary_help=leakage_warning(summary) + SUMMARY_HELP,
        threshold_warning=threshold_warning(summary),
        roc_png=roc,
        roc_note=roc_note,
        detectors=detectors,
        runtime_rows=runtime_rows,
        runtime_png=runtime_png,
        cascade_stages=cascade_stages,
        errors=errors,
        errors_left_out=errors_left_out,
        errors_by_status=errors_by_status,
        drilldown=entries,
        drill_left_out=drill_left_out,
        max_drilldown=max_drilldown,
        no_threshold=[u.label for u in units if math.isnan(u.threshold)],
        models=models,
        models_left_out=models_left_out,
    )
    target = html_path or storage.join(out_uri, "report.html")
    storage.write_text(target, html)
    return str(target)
