"""docs/OUTPUTS.md is true: every column of every output table is documented, and its Python
examples (pandas, pyarrow.dataset, DuckDB) run against a small output folder, written through the
sink as a scan writes it, and give the right answers."""
from __future__ import annotations

import datetime as dt
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xray.reduce.summary import SUMMARY_COLUMNS, summarize, write_summary
from xray.results.schema import SCORE_KEY, TABLES
from xray.results.sink import read_table, write_part

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "OUTPUTS.md"

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
MODELS = {"m0": False, "m1": False, "m2": False, "m3": True, "m4": True, "m5": True}
SCORE = {"modelxray": [0.1, 0.3, 0.2, 0.9, 0.7, 0.8], "nc": [1.0, 2.0, 1.5, 6.0, 3.0, 5.0]}


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32))
    return buf.getvalue()


def _score(run: str, model: str, detector: str, status: str = "ok", minute: int = 0) -> dict:
    i, ok = list(MODELS).index(model), status == "ok"
    return {"run_id": run, "model_id": model, "model_digest": f"d-{model}", "detector": detector,
            "detector_version": "1", "config_hash": f"h-{detector}", "status": status,
            "error": None if ok else "TimeoutError: time limit of 60 s exceeded",
            "score": SCORE[detector][i] if ok else None, "predicted_target": 2 if ok else None,
            "stats_json": json.dumps({"re": 2 * SCORE[detector][i], "steps": 10} if ok else {}),
            "seconds": 1.0 + i, "worker": "node:host:1", "architecture": "nin",
            "num_classes": 10, "gt_poisoned": MODELS[model],
            "gt_target": 2 if MODELS[model] else None,
            "gt_attack": "badnets" if MODELS[model] else None,
            "tags_json": json.dumps({"round": "r1"}),
            "finished_at": T0 + dt.timedelta(minutes=minute)}


def _run(run: str, hour: int, done: bool) -> dict:
    started = T0 + dt.timedelta(hours=hour)
    return {"run_id": run, "config_hash": "cfg", "config_json": json.dumps({"seed": 0}),
            "code_version": "xray 0.1.0", "manifest_uri": "/data/manifest.csv",
            "manifest_digest": "abc", "models_total": 6, "models_planned": 6,
            "started_at": started,
            "finished_at": started + dt.timedelta(minutes=30) if done else None}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    """Three runs as the runner writes them (start row, scores and triggers, end row): R1
    scans everything (m5 x nc times out); R2 retries m5 x nc (ok) and, overlapping, writes a
    later retryable row for m1 x modelxray (the earlier ok row must win); R3 is interrupted
    (start row only). 14 score rows, 12 keys; 5 runs rows, 3 runs, 2 finished."""
    path = str(tmp_path_factory.mktemp("outputs-doc"))
    write_part(path, "runs", "R1", [_run("R1", 0, False)])
    write_part(path, "scores", "R1", [
        _score("R1", m, d, "timeout" if (m, d) == ("m5", "nc") else "ok", minute=i)
        for d in SCORE for i, m in enumerate(MODELS)])
    write_part(path, "triggers", "R1", [
        {"run_id": "R1", "model_id": m, "model_digest": f"d-{m}", "detector": "nc",
         "config_hash": "h-nc", "trigger_index": 0, "victim": None, "target": 2,
         "kind": "patch", "size": 9.0, "reasr": 0.9, "stats_json": json.dumps({"steps": 10}),
         "mask": _npy(np.ones((1, 8, 8))), "pattern": _npy(np.zeros((3, 8, 8))),
         "kernel": None} for m in MODELS if m != "m5"])
    write_part(path, "runs", "R1", [_run("R1", 0, True)])
    write_part(path, "runs", "R2", [_run("R2", 1, False)])
    write_part(path, "scores", "R2", [_score("R2", "m5", "nc", minute=90),
                                      _score("R2", "m1", "modelxray", "retryable", minute=91)])
    write_part(path, "runs", "R2", [_run("R2", 1, True)])
    write_part(path, "runs", "R3", [_run("R3", 2, False)])
    write_summary(path, summarize(read_table(path, "scores")))
    return path


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def ran(out) -> dict:
    """The namespace after running every Python block of the doc in order, OUT = `out`."""
    namespace: dict = {"OUT": out}
    for block in _blocks():
        code = "\n".join(line for line in block.splitlines() if not line.startswith("OUT = "))
        exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the doc's own examples
    return namespace


def _keyed(frame: pd.DataFrame) -> set[tuple]:
    return {(*k, s, None if pd.isna(v) else float(v))
            for k, s, v in zip(frame[SCORE_KEY].itertuples(index=False), frame["status"],
                               frame["score"])}


def test_every_table_and_column_is_documented():
    text = DOC.read_text()
    for table, schema in TABLES.items():
        assert f"`{table}`" in text, table
        for name in schema.names:
            assert f"`{name}`" in text, f"{table}.{name} is not in docs/OUTPUTS.md"
    for name in SUMMARY_COLUMNS:
        assert f"`{name}`" in text, f"summary.{name} is not in docs/OUTPUTS.md"
    for column in ("probability", "probability_source"):
        assert f"`{column}`" in text
    assert "docs/OUTPUTS.md" in (ROOT / "README.md").read_text()
    assert len(_blocks()) >= 8


def test_pandas_examples_deduplicate_and_count_runs(ran, out):
    assert ran["one_per_key"] and len(ran["raw"]) == 14 and len(ran["scores"]) == 12
    assert _keyed(ran["plain"]) == _keyed(ran["scores"])  # plain pandas, the same rule
    kept = ran["scores"].set_index(["model_id", "detector"])
    assert kept.loc[("m1", "modelxray"), "status"] == "ok"  # the latest ok, not the later row
    assert kept.loc[("m5", "nc"), "score"] == 5.0  # the ok retry of the timeout
    assert len(ran["runs_raw"]) == 5 and ran["n_runs"] == 3  # two rows per finished run
    assert ran["finished"] == {"R1", "R2"} and ran["unfinished"] == ["R3"]
    assert list(ran["runs"]["run_id"]) == ["R1", "R2", "R3"]
    assert ran["mask"].shape == (1, 8, 8)
    overall = ran["overall"]
    assert overall.loc["modelxray", "threshold_source"] == "clean_q0.95"
    assert overall.loc["modelxray", "threshold_n_clean"] == 3
    assert len(ran["nc"]) == 6 and not ran["nc"].duplicated(SCORE_KEY).any()  # pyarrow.dataset


def test_duckdb_examples_give_the_same_answers(ran):
    latest = ran["latest"]
    assert len(latest) == 12 and not latest.duplicated(SCORE_KEY).any()
    assert _keyed(latest) == _keyed(ran["scores"])
    assert tuple(ran["run_counts"]) == (3, 2)
    by_model = ran["re_duckdb"].set_index("model_id")["re"]
    assert by_model.to_dict() == pytest.approx(ran["re_pandas"].to_dict())
    assert set(ran["re_duckdb"]["round"]) == {"r1"} and set(ran["rounds"]) == {"r1"}
    assert list(ran["seeds"]) == [0, 0, 0]


def test_probability_example_is_on_one_scale(ran):
    scored = ran["scored"]
    assert list(scored.columns[scored.columns.get_loc("score") + 1:][:2]) == [
        "probability", "probability_source"]
    p = scored["probability"].to_numpy(dtype=float)
    assert ((p >= 0) & (p <= 1)).all()
    for _, rows in scored.groupby("detector"):
        ordered = rows.sort_values("score")["probability"].to_numpy(dtype=float)
        assert (np.diff(ordered) > 0).all()  # strictly monotone in the score
    every = ran["every_attempt"]
    failed = every[every["status"] != "ok"]
    assert len(failed) == 2 and failed["probability"].isna().all()
    assert failed["probability_source"].isna().all()
    # the stored rows stay what the detector produced
    assert "probability" not in ran["raw"].columns and "probability" not in ran["latest"].columns
    assert not every.loc[every["status"] == "ok", "probability"].isna().any()
