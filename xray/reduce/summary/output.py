"""A summary for a terminal (`format_table`) and as <out>/summary/summary.parquet."""
from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xray.io import storage
from xray.reduce.formatting import fmt


def format_table(summary: pd.DataFrame) -> str:
    """A compact fixed-width text table of a summary, for a terminal."""
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
            "thr": [
                f"{fmt(t)}({src})"
                for t, src in zip(summary["threshold"], summary["threshold_source"])
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
    return table.to_string(index=False)


def write_summary(out_uri: str, summary: pd.DataFrame) -> str:
    """Write <out>/summary/summary.parquet atomically; returns its URI."""
    uri = storage.join(out_uri, "summary", "summary.parquet")
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(summary, preserve_index=False), buffer)
    storage.atomic_write_bytes(uri, buffer.getvalue())
    return uri
