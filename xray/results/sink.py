"""Parquet sink and readers for the long tables.

Part files land under <out>/<table>/run=<run_id>/part-<uuid>.parquet, each written whole through
`storage.atomic_write_bytes`, so a reader never sees a partial file (temporary names start with
"." and readers ignore them). The sink is append-only and buffered: rows are flushed every
`flush_rows` rows or `flush_seconds` seconds, and on close.
"""
from __future__ import annotations

import io
import json
import math
import time
import uuid
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from xray.io import storage
from xray.results.schema import SCORE_KEY, TABLES


def table_uri(out_uri: str, table: str, run_id: str | None = None) -> str:
    base = storage.join(out_uri, table)
    return storage.join(base, f"run={run_id}") if run_id else base


def frame_rows(frame: pd.DataFrame, table: str = "scores") -> list[dict[str, Any]]:
    """DataFrame rows as write_part takes them: NaN / NA -> None, integer columns as int."""
    ints = {f.name for f in TABLES[table] if pa.types.is_integer(f.type)}
    rows = []
    for row in frame.to_dict("records"):
        clean = {}
        for key, value in row.items():
            if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
                value = None
            elif key in ints:
                value = int(value)
            clean[key] = value
        rows.append(clean)
    return rows


def write_part(out_uri: str, table: str, run_id: str, rows: list[dict[str, Any]]) -> str | None:
    """Write `rows` as one part file; the schema check happens here (a wrong type fails)."""
    if not rows:
        return None
    arrow = pa.Table.from_pylist(rows, schema=TABLES[table])
    buf = io.BytesIO()
    pq.write_table(arrow, buf, compression="zstd")
    uri = storage.join(table_uri(out_uri, table, run_id), f"part-{uuid.uuid4().hex}.parquet")
    storage.atomic_write_bytes(uri, buf.getvalue())
    return uri


class ParquetSink:
    def __init__(self, out_uri: str, table: str, run_id: str, flush_rows: int = 256,
                 flush_seconds: float = 10.0) -> None:
        if table not in TABLES:
            raise KeyError(f"unknown table {table!r}; tables: {sorted(TABLES)}")
        self.out_uri, self.table, self.run_id = out_uri, table, run_id
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._rows: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self.parts: list[str] = []

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        self._rows.extend(rows)
        if (len(self._rows) >= self.flush_rows
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        part = write_part(self.out_uri, self.table, self.run_id, self._rows)
        if part:
            self.parts.append(part)
        self._rows = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ParquetSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_table(out_uri: str, table: str, run_id: str | None = None, dedupe: bool = True,
               model_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """All rows of `table` (of one run, or of every run), as pandas, with the table's schema
    (a part file of an older schema reads with the absent columns null).

    `scores` is de-duplicated (`dedupe_scores`) unless dedupe=False. model_ids: only the rows of
    these models, filtered while reading. This is the one reader of the result tables."""
    schema = TABLES[table]
    fs, path = storage.filesystem(table_uri(out_uri, table, run_id))
    fs.invalidate_cache()  # listings cached earlier miss parts written since (by any process)
    if not storage.with_retries(lambda: fs.exists(path)):
        return schema.empty_table().to_pandas()
    dataset = ds.dataset(path, filesystem=fs, format="parquet", schema=schema,
                         partitioning=None, ignore_prefixes=[".", "_"])
    where = None if model_ids is None else ds.field("model_id").isin(
        pa.array([str(m) for m in model_ids], type=pa.string()))
    frame = dataset.to_table(filter=where).to_pandas()
    if table == "scores" and dedupe and len(frame):
        frame = dedupe_scores(frame)
    return frame


def read_runs(out_uri: str, run_id: str | None = None) -> pd.DataFrame:
    """The `runs` table with one row per run, oldest first. A run writes a start row (no
    finished_at) and, when it ends, an end row: the end row is kept when there is one."""
    runs = read_table(out_uri, "runs", run_id=run_id)
    if not len(runs):
        return runs
    runs = runs.assign(_done=runs["finished_at"].notna())
    runs = runs.sort_values(["_done", "started_at"], kind="stable")
    runs = runs.drop_duplicates("run_id", keep="last").drop(columns="_done")
    return runs.sort_values("started_at", kind="stable").reset_index(drop=True)


def json_object(value: Any) -> dict[str, Any]:
    """A stats_json / tags_json cell as a dict ({} when empty, null or not a JSON object)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def dedupe_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per SCORE_KEY: the latest ok row, else the latest row (by finished_at; rows of
    equal time keep their read order), so a retried or re-run model is counted once. Ordered
    by (model_id, detector)."""
    if frame.empty:
        return frame.reset_index(drop=True)
    order = frame.assign(_ok=frame["status"].eq("ok"))
    order = order.sort_values(["_ok", "finished_at"], kind="stable")
    kept = order.drop_duplicates(SCORE_KEY, keep="last").drop(columns="_ok")
    return kept.sort_values(["model_id", "detector"], kind="stable").reset_index(drop=True)
