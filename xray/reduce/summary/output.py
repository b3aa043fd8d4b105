"""A summary for a terminal (`format_table`, with `threshold_warning` under it) and as
<out>/summary/summary.parquet."""
from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xray.io import storage
from xray.reduce.formatting import fmt
from xray.reduce.summary.reading import load_scores
from xray.reduce.summary.table import summarize
from xray.reduce.summary.units import MIN_CLEAN_MODELS


def threshold_warning(summary: pd.DataFrame) -> str | None:
    """One line when a detector's clean_q threshold rests on fewer than MIN_CLEAN_MODELS clean
    models (its false-positive rate is then a rough guess), naming the detectors and counts;
    None otherwise. Printed under the summary table and shown in the report."""
    if summary.empty:
        return None
    overall = summary[(summary["group_by"] == "all") & summary["threshold_n_clean"].notna()]
    few = overall[overall["threshold_n_clean"] < MIN_CLEAN_MODELS]
    if not len(few):
        return None
    groups: dict[tuple[int, str], list[str]] = {}
    for row in few.itertuples():
        groups.setdefault((int(row.threshold_n_clean), str(row.threshold_source)),
                          []).append(str(row.detector))
    parts = [f"the {', '.join(names)} threshold{'s' if len(names) > 1 else ''} ({source}) "
             f"rest{'' if len(names) > 1 else 's'} on {n} clean model{'' if n == 1 else 's'}"
             for (n, source), names in sorted(groups.items())]
    return (f"WARNING: {'; '.join(parts)} (fewer than {MIN_CLEAN_MODELS}): the false-positive "
            "rate is a rough guess; scan more clean models or give --threshold DETECTOR=VALUE.")


def format_table(summary: pd.DataFrame) -> str:
    """A compact fixed-width text table of a summary, for a terminal; `threshold_warning`'s line
    under it when there is one."""
    if summary.empty:
        return "(no scores)"
    table = pd.DataFrame(
        {
            "detector": summary["detector"],
            "group": [
                "all" if g == "all" else f"{g}={v}"
                for g, v in zip(summary["group_by"], summary["group"])
            ],
            "n": summary["n"].map(fmt),
            "troj/clean": [
                f"{fmt(a)}/{fmt(b)}" for a, b in zip(summary["n_poisoned"], summary["n_clean"])
            ],
            "miss": summary["n_missing"].map(fmt),
            "thr": [  # how it was set, and on how many clean models (clean_q)
                f"{fmt(t)}({src}{'' if pd.isna(n) else f' of {int(n)} clean'})"
                for t, src, n in zip(summary["threshold"], summary["threshold_source"],
                                     summary["threshold_n_clean"])
            ],
            "acc": summary["accuracy"].map(fmt),
            "best_acc": summary["best_accuracy"].map(fmt),
            "auc": summary["roc_auc"].map(fmt),
            "ce±ci95": [
                "-" if fmt(c) == "-" else f"{fmt(c)}±{fmt(ci)}"
                for c, ci in zip(summary["ce"], summary["ce_ci95"])
            ],
            "ce(0.5)": summary["ce_missing_as_half"].map(fmt),
            "brier": summary["brier"].map(fmt),
            "tpr@fpr": summary["tpr_at_fpr"].map(fmt),
            "p50_s": summary["runtime_p50"].map(lambda x: fmt(x, 1)),
        }
    )
    warning = threshold_warning(summary)
    return table.to_string(index=False) + (f"\n{warning}" if warning else "")


def write_summary(out_uri: str, summary: pd.DataFrame) -> str:
    """Write <out>/summary/summary.parquet atomically; returns its URI."""
    uri = storage.join(out_uri, "summary", "summary.parquet")
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(summary, preserve_index=False), buffer)
    storage.atomic_write_bytes(uri, buffer.getvalue())
    return uri


def refresh_summary(out_uri: str) -> pd.DataFrame:
    """The summary of every score under <out>, written to <out>/summary (what a scan ends with:
    `xray scan`, `xray demo`, `xray.scan`); returns it."""
    summary = summarize(load_scores(out_uri))
    write_summary(out_uri, summary)
    return summary
