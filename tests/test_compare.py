"""`xray compare`: two real scans of the tiny round (same config: clean; a weakened Model X-ray:
AUC drop and flipped models), and the bookkeeping (failures, missing models, tolerances, usage
errors) on scores tables written through the real schema."""
from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from xray.cli import main
from xray.config import parse_config
from xray.reduce.compare import (
    CompareUsageError,
    Tolerances,
    compare,
    load_tolerances,
    parse_side,
)
from xray.reduce.summary import load_scores, summarize
from xray.results.schema import SCORES
from xray.runner import run_scan

# A deliberately weakened Model X-ray: one plane of a 2 x 2 grid (4 forwards per model instead of
# 4 x 32 x 32), so the Renyi entropy takes a handful of values and barely separates the models.
WEAK = {"detectors": {"modelxray": {"preset": "small",
                                    "params": {"num_planes": 1, "resolution": 2}}}}
SAME = {"detectors": {"modelxray": {"preset": "small"}}}


def _auc(out: Path) -> float:
    s = summarize(load_scores(str(out)))
    return float(s[(s.detector == "modelxray") & (s.group_by == "all")].roc_auc.iloc[0])


def test_same_round_same_config_is_clean(scanned_tiny, ray_local, tmp_path):
    out_a, round_dir, first = scanned_tiny
    out_b = tmp_path / "b"
    run_scan(str(round_dir / "manifest.csv"), str(out_b), parse_config(SAME),
             show_progress=False)

    result = compare(str(out_a), f"{out_b}@{load_scores(str(out_b)).run_id.iloc[0]}")
    assert not result.regression and result.regressions == []
    assert result.flips == [] and result.new_failures == [] and result.missing_models == []
    auc = [m for m in result.metrics if m["metric"] == "roc_auc" and m["group"] == "all"]
    assert len(auc) == 1 and auc[0]["a"] == auc[0]["b"] == pytest.approx(_auc(out_a))
    assert all(m["delta"] == 0 for m in result.metrics if m["metric"] != "runtime_p50")
    assert [c["what"] for c in result.changes] == []  # same code, config and manifest

    cli = CliRunner().invoke(main, ["compare", str(out_a), str(out_b)])
    assert cli.exit_code == 0, cli.output
    assert "no regression" in cli.output


def test_weakened_config_is_a_regression_with_flipped_models(scanned_tiny, ray_local, tmp_path):
    out_a, round_dir, _ = scanned_tiny
    out_b = tmp_path / "weak"
    run_scan(str(round_dir / "manifest.csv"), str(out_b), parse_config(WEAK),
             show_progress=False)
    auc_a, auc_b = _auc(out_a), _auc(out_b)
    assert auc_a - auc_b > Tolerances().roc_auc  # what the weakening does to this round

    result = compare(str(out_a), str(out_b))
    assert result.regression and result.exit_code == 1
    row = next(m for m in result.metrics if m["metric"] == "roc_auc" and m["group"] == "all")
    assert row["status"] == "regression"
    assert (row["a"], row["b"]) == (pytest.approx(auc_a), pytest.approx(auc_b))
    assert any("roc_auc dropped" in r for r in result.regressions)
    assert result.flips, "a weakened detector flips some verdicts"
    scores_a = load_scores(str(out_a)).set_index("model_id")["score"]
    scores_b = load_scores(str(out_b)).set_index("model_id")["score"]
    for flip in result.flips:
        assert flip["score_a"] == pytest.approx(scores_a[flip["model_id"]])
        assert flip["score_b"] == pytest.approx(scores_b[flip["model_id"]])
        assert flip["verdict_a"] != flip["verdict_b"]
    change = next(c for c in result.changes if c["what"] == "detector modelxray")
    assert '"resolution": 2' in change["detail"]

    runner = CliRunner()
    cli = runner.invoke(main, ["compare", str(out_a), str(out_b), "--format", "markdown"])
    assert cli.exit_code == 1, cli.output
    assert "# xray compare: REGRESSION" in cli.output and "roc_auc" in cli.output
    for flip in result.flips:
        assert f"| {flip['model_id']} |" in cli.output
    cli = runner.invoke(main, ["compare", str(out_a), str(out_b), "--format", "json"])
    assert cli.exit_code == 1 and json.loads(cli.output)["regression"] is True
    # a looser tolerance file accepts the same change
    loose = tmp_path / "loose.yaml"
    loose.write_text("detectors:\n  modelxray: {roc_auc: 1, accuracy: 1, tpr_at_fpr: 1, ce: 1, "
                     "flipped_to_wrong: 100}\n")
    cli = runner.invoke(main, ["compare", str(out_a), str(out_b), "--tolerances", str(loose)])
    assert cli.exit_code == 0, cli.output


# ---------------------------------------------------------------------------------------------
# Bookkeeping on tables written through the real schema

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _row(model, score, poisoned, status="ok", version="1", config="h", detector="det",
         seconds=1.0):
    return {"run_id": "R", "model_id": model, "model_digest": "d", "detector": detector,
            "detector_version": version, "config_hash": config, "status": status,
            "error": None if status == "ok" else "RuntimeError: boom\nTraceback ...",
            "score": score if status == "ok" else None, "predicted_target": None,
            "stats_json": "{}", "seconds": seconds, "worker": "w", "architecture": "net",
            "num_classes": 10, "gt_poisoned": poisoned, "gt_target": None,
            "gt_attack": "badnets" if poisoned else None, "tags_json": "{}",
            "finished_at": T0 + timedelta(minutes=1)}


def _write(out: Path, rows: list[dict]) -> str:
    (out / "scores" / "run=R").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORES),
                   out / "scores" / "run=R" / "part-0.parquet")
    return str(out)


BASE = [("c0", 0.1, False), ("c1", 0.2, False), ("c2", 0.3, False), ("c3", 0.15, False),
        ("t0", 0.9, True), ("t1", 0.8, True), ("t2", 0.7, True), ("t3", 0.95, True)]


def test_failures_missing_models_and_versions(tmp_path):
    a = _write(tmp_path / "a", [_row(m, s, p) for m, s, p in BASE]
               + [_row(m, s, p, detector="other") for m, s, p in BASE])
    rows_b = [_row(m, s, p, version="2", config="h2") for m, s, p in BASE if m != "t3"]
    rows_b[0] = _row("c0", None, False, status="timeout", version="2", config="h2")
    b = _write(tmp_path / "b", rows_b)
    result = compare(a, b)
    assert result.regression
    assert result.missing_models == ["t3"] and result.detectors_missing == ["other"]
    assert [(f["model_id"], f["status"]) for f in result.new_failures] == [("c0", "timeout")]
    assert any("lost their ok score" in r for r in result.regressions)
    assert any("detector other is in A but not in B" in r for r in result.regressions)
    assert any("1 model(s) of A are missing from B" in r for r in result.regressions)
    change = next(c for c in result.changes if c["what"] == "detector det")
    assert "version 1" in change["a"] and "version 2" in change["b"]

    # the other direction: B has more models and detectors, nothing lost -> clean
    back = compare(b, a)
    assert [f["model_id"] for f in back.fixed_failures] == ["c0"]
    assert back.detectors_new == ["other"] and back.new_models == ["t3"]
    assert not back.regression, back.regressions


def test_missing_models_and_runtime_against_tolerances(tmp_path):
    a = _write(tmp_path / "a", [_row(m, s, p, seconds=2.0) for m, s, p in BASE])
    b = _write(tmp_path / "b", [_row(m, s, p, seconds=5.0) for m, s, p in BASE if m != "c3"])
    result = compare(a, b)
    assert result.missing_models == ["c3"]
    runtime = next(m for m in result.metrics if m["metric"] == "runtime_p50")
    assert runtime["status"] == "regression" and runtime["a"] == 2.0 and runtime["b"] == 5.0
    assert any("missing from B" in r for r in result.regressions)
    tolerant = tmp_path / "t.json"
    tolerant.write_text(json.dumps({"missing_models": 1, "runtime_ratio": 3}))
    assert not compare(a, b, load_tolerances(str(tolerant))).regression
    # a small absolute increase never counts, whatever the ratio
    c = _write(tmp_path / "c", [_row(m, s, p, seconds=0.1) for m, s, p in BASE])
    d = _write(tmp_path / "d", [_row(m, s, p, seconds=0.9) for m, s, p in BASE])
    assert not compare(c, d).regression


def test_no_ground_truth_compares_scores_and_verdicts_only(tmp_path):
    a = _write(tmp_path / "a", [_row(m, s, None) for m, s, _ in BASE])
    b = _write(tmp_path / "b", [_row(m, s + (0.5 if m == "c0" else 0), None) for m, s, _ in BASE])
    result = compare(a, b, thresholds={"det": 0.5})
    auc = next(m for m in result.metrics if m["metric"] == "roc_auc")
    assert auc["status"] == "n/a" and math.isnan(auc["a"]) and "no ground truth" in auc["note"]
    assert [(f["model_id"], f["effect"]) for f in result.flips] == [
        ("c0", "changed (no ground truth)")]
    assert not result.regression


def test_usage_errors_exit_2(tmp_path):
    a = _write(tmp_path / "a", [_row(m, s, p) for m, s, p in BASE])
    runner = CliRunner()
    missing = runner.invoke(main, ["compare", a, str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no scores" in missing.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("roc_acu: 0.1\n")
    typo = runner.invoke(main, ["compare", a, a, "--tolerances", str(bad)])
    assert typo.exit_code == 2 and "unknown tolerance 'roc_acu'" in typo.output
    fmt = runner.invoke(main, ["compare", a, a, "--format", "html"])
    assert fmt.exit_code == 2
    unknown = runner.invoke(main, ["compare", a, a, "--threshold", "nope=1"])
    assert unknown.exit_code == 2 and "nope" in unknown.output
    assert runner.invoke(main, ["compare", a, a, "--threshold", "det=0.5"]).exit_code == 0
    with pytest.raises(CompareUsageError):
        load_tolerances(str(tmp_path / "absent.yaml"))
    assert parse_side("s3://bucket/out@20260101T000000Z-abc") == ("s3://bucket/out",
                                                                 "20260101T000000Z-abc")
    assert parse_side("/data/x@y/out") == ("/data/x@y/out", None)


def test_one_threshold_for_both_sides_so_an_unchanged_score_never_flips(tmp_path):
    """B adds one clean model with a high score: its own clean-quantile threshold would rise
    past t2's unchanged 0.7 and 'flip' it; judged at A's threshold nothing that kept its score
    changes verdict."""
    a = _write(tmp_path / "a", [_row(m, s, p) for m, s, p in BASE])
    b = _write(tmp_path / "b", [_row(m, s, p) for m, s, p in BASE]
               + [_row("c4", 0.85, False)])
    result = compare(a, b)
    assert result.flips == [], result.flips
    assert "both sides at the baseline's threshold" in result.to_text()


def _metric_lines(text: str) -> list[tuple[str, str, str]]:
    """(detector, group, metric) of the metric table's rows in a text comparison."""
    names = {"roc_auc", "accuracy", "tpr_at_fpr", "ce", "runtime_p50"}
    return [(t[0], t[1], t[2]) for t in (line.split() for line in text.splitlines())
            if len(t) > 2 and t[0] in ("det", "other") and t[2] in names
            and not t[1].endswith(":")]


def test_text_shows_what_changed_and_counts_the_rest_all_lists_every_row(tmp_path):
    """B: det's t2 falls under A's threshold (a flip to a wrong verdict; ROC-AUC, accuracy
    drop), detector other is unchanged, an unlabelled model is new. The default text lists the
    changed metric rows, the flip and the new model, and one line counting the others; --all
    lists every metric row."""
    other = [_row(m, s, p, detector="other") for m, s, p in BASE]
    a = _write(tmp_path / "a", [_row(m, s, p) for m, s, p in BASE] + other)
    b = _write(tmp_path / "b", [_row(m, 0.25 if m == "t2" else s, p) for m, s, p in BASE]
               + other + [_row("n0", 0.5, None)])
    result = compare(a, b)
    assert result.regression and [f["model_id"] for f in result.flips] == ["t2"]
    rows = [(m["detector"], m["group"], m["metric"]) for m in result.metrics]
    changed = [r for r, m in zip(rows, result.metrics) if m["changed"]]
    same = [r for r, m in zip(rows, result.metrics) if not m["changed"]]
    assert ("det", "all", "roc_auc") in changed and ("det", "all", "accuracy") in changed
    assert ("det", "all", "runtime_p50") in same
    assert all(r in same for r in rows if r[0] == "other")

    text = result.to_text()
    assert _metric_lines(text) == changed
    assert f"{len(same)} of {len(rows)} metric rows unchanged within their tolerance " \
           "(--all lists every row)" in text
    assert "t2" in text and "now wrong" in text  # the flip
    assert "models new in B: n0" in text and "models missing from B" not in text
    everything = result.to_text(all_rows=True)
    assert _metric_lines(everything) == rows
    assert "metric rows unchanged" not in everything
    assert "models missing from B: none" in everything

    runner = CliRunner()
    default = runner.invoke(main, ["compare", a, b])
    assert default.exit_code == 1 and default.output == text
    listed = runner.invoke(main, ["compare", a, b, "--all"])
    assert listed.exit_code == 1 and listed.output == everything
    md = runner.invoke(main, ["compare", a, b, "--format", "markdown"]).output
    assert f"- {len(same)} of {len(rows)} metric rows unchanged" in md
    assert "| other | all | roc_auc |" not in md and "| det | all | roc_auc |" in md
    assert "| other | all | roc_auc |" in runner.invoke(
        main, ["compare", a, b, "--format", "markdown", "--all"]).output
    as_json = json.loads(runner.invoke(main, ["compare", a, b, "--format", "json"]).output)
    assert [m["changed"] for m in as_json["metrics"]] == [m["changed"] for m in result.metrics]
