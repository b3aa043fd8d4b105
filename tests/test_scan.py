"""End to end: scan a round of real trained models through a real local Ray instance."""
import shutil

import numpy as np
import pandas as pd
import pytest

from xray.config import parse_config
from xray.io.manifest import read_manifest
from xray.reduce.metrics import roc_auc
from xray.results.sink import read_table
from xray.runner import run_scan
from xray.scanning import scan_model

CONFIG = parse_config({"seed": 0, "detectors": {"modelxray": {"preset": "small"}}})


@pytest.fixture(scope="module")
def scanned(tiny_round, ray_local, tmp_path_factory):
    round_dir, _ = tiny_round
    out = tmp_path_factory.mktemp("scan") / "out"
    summary = run_scan(str(round_dir / "manifest.csv"), str(out), CONFIG, show_progress=False)
    return round_dir, out, summary


def test_scan_writes_one_ok_row_per_model(scanned):
    round_dir, out, summary = scanned
    records = read_manifest(str(round_dir / "manifest.csv"))
    scores = read_table(str(out), "scores")
    assert summary.models_scanned == len(records) == len(scores)
    assert set(scores["status"]) == {"ok"}
    assert scores["score"].notna().all()
    assert set(scores["run_id"]) == {summary.run_id}
    runs = read_table(str(out), "runs")
    assert summary.run_id in set(runs["run_id"])
    assert 0.0 <= summary.idle_tail_seconds <= summary.schedule_seconds
    assert 0.0 <= summary.idle_tail_share <= 1.0


def _planned(model_id: str, size: int, architecture: str = "nin"):
    from xray.io.records import ModelRecord
    from xray.runner.plan import PlannedModel

    record = ModelRecord(model_id=model_id, uri=f"/m/{model_id}", format="safetensors",
                         architecture=architecture, num_classes=5, input_shape=(3, 24, 24))
    return PlannedModel(record, "d", ("nc",), size)


def test_the_plan_puts_the_longest_models_first():
    import pandas as pd

    from xray.runner.plan import kind_seconds, longest_first, previous_seconds

    earlier = pd.DataFrame({  # a's newest nc row took 9 s, b's 1 s (+ 1 s of mmbd)
        "model_id": ["a", "a", "b", "b"], "detector": ["nc", "nc", "nc", "mmbd"],
        "seconds": [50.0, 9.0, 1.0, 1.0],
        "finished_at": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-01", "2026-01-01"])})
    seconds = previous_seconds(earlier)
    assert seconds == {"a": 9.0, "b": 2.0}
    items = [_planned("b", 100), _planned("a", 100), _planned("c", 50), _planned("d", 5)]
    # c and d never ran: the (upper) median of a's 0.09 and b's 0.02 s per byte, 0.09, makes
    # c 4.5 s and d 0.45 s
    order = [p.record.model_id for p in longest_first(items, seconds)]
    assert order == ["a", "c", "b", "d"]
    assert [p.record.model_id for p in longest_first(items)] == ["a", "b", "c", "d"]  # by size
    # a model of a kind seen before takes that kind's median, whatever its file size: a small
    # resnet file after slow resnets goes before a big nin file
    earlier["architecture"], earlier["num_classes"] = ["resnet18"] * 2 + ["nin"] * 2, 5
    kinds = kind_seconds(earlier)
    assert kinds == {("resnet18", 5): 9.0, ("nin", 5): 2.0}
    items = [_planned("big-nin", 1000), _planned("small-resnet", 10, "resnet18")]
    order = [p.record.model_id for p in longest_first(items, {}, kinds)]
    assert order == ["small-resnet", "big-nin"]


def test_parquet_rows_match_scan_model(scanned):
    round_dir, out, _ = scanned
    record = read_manifest(str(round_dir / "manifest.csv"))[0]
    detector = CONFIG.detectors[0].build()
    direct = scan_model(record, [detector], CONFIG)["scores"][0]
    stored = read_table(str(out), "scores").set_index("model_id").loc[record.model_id]
    assert stored["score"] == pytest.approx(direct["score"], rel=1e-6)
    assert stored["predicted_target"] == direct["predicted_target"]
    assert stored["config_hash"] == direct["config_hash"]
    assert stored["model_digest"] == direct["model_digest"]


def test_second_run_scans_nothing(scanned):
    round_dir, out, _ = scanned
    again = run_scan(str(round_dir / "manifest.csv"), str(out), CONFIG, show_progress=False)
    assert again.models_planned == 0 and again.models_scanned == 0
    assert len(read_table(str(out), "scores")) == again.models_total


def test_modelxray_separates_clean_from_badnets(scanned):
    _, out, _ = scanned
    scores = read_table(str(out), "scores")
    y = scores["gt_poisoned"].astype(int).to_numpy()
    auc = roc_auc(y, scores["score"].to_numpy())
    auc = auc[0] if isinstance(auc, tuple) else auc
    assert auc >= 0.75, f"Model X-ray ROC-AUC {auc:.3f} on the tiny round"


def test_corrupt_model_gives_error_row_others_scored(tiny_round, ray_local, tmp_path):
    """A corrupt model file: an error row for it, the others scored, and `xray scan` says under
    its run line which model and detector failed, with the error's first line."""
    from click.testing import CliRunner

    from xray.cli import main

    round_dir, _ = tiny_round
    copy = tmp_path / "round"
    shutil.copytree(round_dir, copy)
    records = read_manifest(str(copy / "manifest.csv"))
    broken = records[1]
    with open(broken.uri, "wb") as f:
        f.write(b"this is not a safetensors file")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["scan", "--manifest", str(copy / "manifest.csv"),
                                       "--out", str(out), "--detectors", "modelxray",
                                       "--preset", "small", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "1 with errors" in result.output, result.output
    scores = read_table(str(out), "scores").set_index("model_id")
    assert scores.loc[broken.model_id, "status"] == "error"
    error = scores.loc[broken.model_id, "error"]
    assert error and "Traceback" not in error.splitlines()[0]
    assert (f"  {broken.model_id} modelxray (error): {error.splitlines()[0]}"
            in result.output), result.output
    assert f"tracebacks: `xray report {out}`" in result.output
    others = scores.drop(index=broken.model_id)
    assert len(others) == len(records) - 1 and (others["status"] == "ok").all()
    assert np.isfinite(others["score"].to_numpy(dtype=float)).all()


def test_zero_actors_is_refused_not_a_hang(tmp_path):
    """run_scan with num_actors=0 waited forever for an actor to take a model."""
    with pytest.raises(ValueError, match="num_actors must be at least 1"):
        run_scan(str(tmp_path / "m.csv"), str(tmp_path / "out"), CONFIG, num_actors=0)
    assert not (tmp_path / "out").exists()


def test_stacked_scan_gives_the_same_scores(scanned, tmp_path):
    """Same-architecture stacks (one vmapped Model X-ray pass) score exactly as one by one."""
    round_dir, out, _ = scanned
    stacked = tmp_path / "stacked"
    summary = run_scan(str(round_dir / "manifest.csv"), str(stacked), CONFIG, stack_size=4,
                       show_progress=False)
    assert summary.models_scanned == summary.models_total
    one = read_table(str(out), "scores").set_index("model_id")
    many = read_table(str(stacked), "scores").set_index("model_id")
    assert (many["status"] == "ok").all()
    assert np.allclose(many.loc[one.index, "score"], one["score"], rtol=1e-6)
    assert (many.loc[one.index, "predicted_target"] == one["predicted_target"]).all()


def test_a_storage_outage_is_retryable_not_a_verdict(tiny_round, tmp_path, unreachable_s3):
    """A model whose object store does not answer (connection refused) gets `retryable` rows,
    which the next run plans again without --retry-errors; a missing file stays a final
    `error`."""
    import dataclasses

    from xray.config import parse_config
    from xray.io.manifest import read_manifest
    from xray.runner.plan import plan
    from xray.results.sink import write_part
    from xray.scanning import scan_model

    round_dir, _ = tiny_round
    record = read_manifest(str(round_dir / "manifest.csv"))[0]
    config = parse_config({"seed": 0, "detectors": {"modelxray": {"preset": "small"}}})
    detectors = [d.build() for d in config.detectors]
    unreachable = dataclasses.replace(record, uri="s3://bucket/id-0/model.safetensors")
    missing = dataclasses.replace(record, model_id="gone", uri=str(tmp_path / "gone.pt"))
    rows = [*scan_model(unreachable, detectors, config)["scores"],
            *scan_model(missing, detectors, config)["scores"]]
    assert [r["status"] for r in rows] == ["retryable", "error"], [r["error"] for r in rows]
    write_part(str(tmp_path / "out"), "scores", "r1", rows)
    keys = [(d.name, d.version, config.detector_hash(d)) for d in detectors]
    again = plan([unreachable, missing], str(tmp_path / "out"), keys)
    assert [p.record.model_id for p in again] == [unreachable.model_id]


def test_a_detector_that_does_not_apply_is_an_answer_not_an_error(tiny_round, ray_local,
                                                                   tmp_path):
    """BAN on the tiny round's MNTD CNNs (no BatchNorm), beside `weights`: every BAN row is a
    final `not_applicable` row carrying the reason without a traceback, the run counts no model
    as failed (the CLI says how many rows did not apply), the next run, --retry-errors or not,
    plans nothing, and the summary and the report count those rows apart from errors."""
    from click.testing import CliRunner

    from xray.cli import main

    round_dir, _ = tiny_round
    manifest, out = str(round_dir / "manifest.csv"), tmp_path / "out"
    records = read_manifest(manifest)
    scan = ["scan", "--manifest", manifest, "--out", str(out), "--detectors", "ban,weights",
            "--preset", "small", "--quiet"]
    first = CliRunner().invoke(main, scan)
    assert first.exit_code == 0, first.output
    assert (f"scanned (0 already scored), 0 with errors, {len(records)} detector rows not "
            "applicable") in first.output, first.output
    scores = read_table(str(out), "scores")
    ban, weights = scores[scores["detector"] == "ban"], scores[scores["detector"] == "weights"]
    assert len(ban) == len(weights) == len(records)
    assert set(ban["status"]) == {"not_applicable"} and set(weights["status"]) == {"ok"}
    assert ban["score"].isna().all()
    for error in ban["error"]:
        assert error.startswith("NoBatchNorm: ban: not applicable to") and "File " not in error

    for retry in ([], ["--retry-errors"]):
        again = CliRunner().invoke(main, scan + retry)
        assert again.exit_code == 0, again.output
        assert f"0 of {len(records)} models scanned ({len(records)} already scored)" in \
            again.output, again.output

    report = CliRunner().invoke(main, ["report", str(out)])
    assert report.exit_code == 0, report.output
    summary = pd.read_parquet(out / "summary" / "summary.parquet")
    row = summary[(summary["detector"] == "ban") & (summary["group_by"] == "all")].iloc[0]
    assert (row["n_not_applicable"], row["n_error"], row["n_ok"]) == (len(records), 0, 0)
    html = (out / "report.html").read_text()
    assert f"ban: not_applicable {len(records)}" in html
    assert 'id="errors-table"' not in html  # nothing failed, so no error rows to list
