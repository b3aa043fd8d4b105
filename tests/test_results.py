"""Parquet sink: atomic part files, schema checks at write, de-duplicating readers."""
import datetime as dt
import os

import pyarrow as pa
import pytest

from xray.results.sink import ParquetSink, dedupe_scores, read_runs, read_table, write_part


def _row(model_id, status="ok", score=0.5, minute=0, detector="modelxray"):
    return {"run_id": "r1", "model_id": model_id, "model_digest": "d", "detector": detector,
            "detector_version": "1", "config_hash": "h", "status": status, "error": None,
            "score": score, "predicted_target": None, "stats_json": "{}", "seconds": 1.0,
            "worker": "w", "architecture": "nin", "num_classes": 10, "gt_poisoned": True,
            "gt_target": 3, "gt_attack": "badnets", "tags_json": "{}",
            "finished_at": dt.datetime(2026, 1, 1, 0, minute, tzinfo=dt.timezone.utc)}


def test_sink_buffers_and_writes_complete_parts(tmp_path):
    with ParquetSink(str(tmp_path), "scores", "r1", flush_rows=3) as sink:
        sink.write([_row("a"), _row("b")])
        assert not (tmp_path / "scores").exists()  # buffered, nothing visible yet
        sink.write([_row("c")])
        assert len(sink.parts) == 1
        sink.write([_row("d")])
    assert len(sink.parts) == 2
    files = os.listdir(tmp_path / "scores" / "run=r1")
    assert all(f.startswith("part-") and f.endswith(".parquet") for f in files)
    assert sorted(read_table(str(tmp_path), "scores")["model_id"]) == ["a", "b", "c", "d"]


def test_reader_ignores_temporary_files(tmp_path):
    write_part(str(tmp_path), "scores", "r1", [_row("a")])
    (tmp_path / "scores" / "run=r1" / ".tmp-123-part-x.parquet").write_bytes(b"half a file")
    assert list(read_table(str(tmp_path), "scores")["model_id"]) == ["a"]


def test_wrong_type_fails_at_write(tmp_path):
    bad = _row("a")
    bad["score"] = "high"
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        write_part(str(tmp_path), "scores", "r1", [bad])
    assert not (tmp_path / "scores").exists()


def test_dedupe_keeps_latest_ok_row(tmp_path):
    write_part(str(tmp_path), "scores", "r1", [_row("a", "crashed", None, 1), _row("b", score=0.1)])
    write_part(str(tmp_path), "scores", "r2",
               [_row("a", "ok", 0.9, 2), _row("b", "crashed", None, 3)])
    scores = read_table(str(tmp_path), "scores").set_index("model_id")
    assert len(scores) == 2
    assert scores.loc["a", "score"] == 0.9 and scores.loc["b", "score"] == 0.1
    assert len(read_table(str(tmp_path), "scores", dedupe=False)) == 4
    assert list(read_table(str(tmp_path), "scores", run_id="r2")["model_id"]) == ["a", "b"]


def test_memory_filesystem(tmp_path):
    write_part("memory://xray-test-out", "scores", "r1", [_row("a")])
    assert list(read_table("memory://xray-test-out", "scores")["model_id"]) == ["a"]


def test_empty_output_reads_as_empty_table(tmp_path):
    frame = read_table(str(tmp_path / "nothing"), "scores")
    assert len(frame) == 0 and "model_id" in frame.columns


def test_one_dedupe_rule_and_order(tmp_path):
    rows = [_row("b", "error", None, 1), _row("b", "ok", 0.2, 0), _row("a", "ok", 0.3, 2),
            _row("a", "ok", 0.4, 2, detector="nc"), _row("a", "timeout", None, 5)]
    write_part(str(tmp_path), "scores", "r1", rows)
    frame = read_table(str(tmp_path), "scores")
    # latest ok row else latest row; ordered by (model_id, detector)
    assert list(zip(frame["model_id"], frame["detector"])) == [
        ("a", "modelxray"), ("a", "nc"), ("b", "modelxray")]
    assert list(frame["score"]) == [0.3, 0.4, 0.2]
    raw = read_table(str(tmp_path), "scores", dedupe=False)
    assert dedupe_scores(raw).equals(frame)
    # equal times: the row read last wins (a stable rule, not the sort's whim)
    tie = raw.iloc[[2, 2]].reset_index(drop=True).assign(score=[0.7, 0.8])
    assert list(dedupe_scores(tie)["score"]) == [0.8]


def test_read_only_some_models_and_one_row_per_run(tmp_path):
    write_part(str(tmp_path), "scores", "r1", [_row("a"), _row("b"), _row("c")])
    assert list(read_table(str(tmp_path), "scores", model_ids=["c", "a"])["model_id"]) == ["a", "c"]
    assert read_table(str(tmp_path), "scores", model_ids=[]).empty

    def run(run_id, start, end=None):
        t = dt.datetime(2026, 1, 1, start, tzinfo=dt.timezone.utc)
        return {"run_id": run_id, "config_hash": "h", "config_json": "{}", "code_version": "v",
                "manifest_uri": "m.csv", "manifest_digest": "d", "models_total": 1,
                "models_planned": 1, "started_at": t,
                "finished_at": None if end is None else t + dt.timedelta(hours=end)}

    write_part(str(tmp_path), "runs", "r2", [run("r2", 5)])
    write_part(str(tmp_path), "runs", "r1", [run("r1", 1)])
    write_part(str(tmp_path), "runs", "r1", [run("r1", 1, end=2)])
    runs = read_runs(str(tmp_path))
    assert list(runs["run_id"]) == ["r1", "r2"]  # oldest first, one row per run
    assert runs["finished_at"].notna().tolist() == [True, False]  # r1's end row, r2 unfinished
    assert list(read_runs(str(tmp_path), "r2")["run_id"]) == ["r2"]
    assert read_runs(str(tmp_path / "nothing")).empty
