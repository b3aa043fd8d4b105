"""Reduce: metrics per detector x group, summary tables, plots and the HTML report.

Flat API: the metric functions of `xray.reduce.metrics`, `load_scores` / `summarize` /
`format_table` / `write_summary` of `xray.reduce.summary`, and `render_report` (imported on
first use, so that importing xray.reduce does not import matplotlib).
"""
from xray.reduce.metrics import (
    CrossEntropy,
    Counts,
    Metric,
    accuracy,
    best_threshold,
    brier,
    calibrate_threshold,
    confusion_counts,
    cross_entropy,
    logistic,
    roc_auc,
    roc_auc_thresholds,
    runtime_percentiles,
    tpr_at_fpr,
    trojai_threshold_roc,
)
from xray.reduce.summary import (
    SUMMARY_COLUMNS,
    deduplicate,
    format_table,
    load_scores,
    summarize,
    write_summary,
)

__all__ = [
    "CrossEntropy", "Counts", "Metric", "SUMMARY_COLUMNS", "accuracy", "best_threshold", "brier",
    "calibrate_threshold", "confusion_counts", "cross_entropy", "deduplicate", "format_table",
    "load_scores", "logistic", "render_report", "roc_auc", "roc_auc_thresholds",
    "runtime_percentiles", "summarize", "tpr_at_fpr", "trojai_threshold_roc", "write_summary",
]


def __getattr__(name: str):  # lazy: the report pulls in matplotlib and jinja2
    if name == "render_report":
        from xray.reduce.report import render_report

        return render_report
    raise AttributeError(f"module 'xray.reduce' has no attribute {name!r}")
