"""An output folder works from any working directory, and after it is copied or moved: a run
stores its manifest absolute and relative to the output folder (xray.results.locations), and the
report's drill-down and `xray explain` find the manifest and its models through that one helper.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from xray.io import storage
from xray.io.records import ModelRecord
from xray.results import locations

SMALL = {"detectors": {"modelxray": {"preset": "small"}}}


@pytest.fixture
def cwd(monkeypatch):
    """Change the working directory (restored after the test)."""
    return monkeypatch.chdir


def _two_models(round_dir: Path) -> tuple[str, str]:
    """(a clean model, a trojaned model) of the round."""
    truth = {p.name: json.loads((p / "config.json").read_text())["poisoned"]
             for p in sorted(round_dir.iterdir()) if (p / "config.json").is_file()}
    return (next(m for m, p in truth.items() if not p), next(m for m, p in truth.items() if p))


def _drill(html: str, model_id: str) -> str:
    section = html[html.index(f'id="model-{model_id}"'):]
    return section[:section.index("</section>")]


def _report_and_explain(out: str, trojaned: str, where: Path) -> str:
    """The report (drill-down into `trojaned`, one plane) and `explain` of `out`; returns the
    model's drill-down section."""
    from xray.explain import explain_model
    from xray.reduce.report import render_report

    html = Path(render_report(out, html_path=str(where / "report.html"), max_drilldown=1,
                              drilldown_models=[trojaned], planes=1)).read_text()
    png = explain_model(out, trojaned, png_uri=str(where / "planes.png"), max_planes=1)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unreadable" not in html, "a run's manifest was not found"
    return _drill(html, trojaned)


def test_report_and_explain_from_elsewhere_and_after_a_move(tiny_round, ray_local, tmp_path,
                                                            cwd):
    """Scanned with relative paths from one directory; reported and explained from another, from
    a copy of the output folder, and after the output folder (round inside) moved away."""
    from xray.config import parse_config
    from xray.io.manifest import read_manifest, write_manifest
    from xray.results.sink import read_runs
    from xray.runner import run_scan

    round_dir, _ = tiny_round
    clean, trojaned = _two_models(round_dir)
    work = tmp_path / "work"
    inside = work / "out" / "round"
    for model_id in (clean, trojaned):
        shutil.copytree(round_dir / model_id, inside / model_id)
    # a manifest of absolute model paths, inside the output folder
    records = [dataclasses.replace(r, uri=r.uri.replace(str(round_dir), str(inside)),
                                   examples_uri=r.examples_uri.replace(str(round_dir),
                                                                       str(inside)))
               for r in read_manifest(str(round_dir)) if r.model_id in (clean, trojaned)]
    write_manifest(records, str(inside / "two.csv"))

    cwd(work)
    summary = run_scan("out/round/two.csv", "out", parse_config(SMALL), show_progress=False)
    assert summary.failures == 0 and summary.models_scanned == 2, summary.status_counts
    run = read_runs(str(work / "out")).iloc[-1]
    assert run["manifest_uri"] == str(inside / "two.csv")  # absolute, not as typed
    assert run["manifest_relative"] == "round/two.csv"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd(elsewhere)
    for out in (str(work / "out"), os.path.relpath(work / "out")):  # absolute; relative here
        section = _report_and_explain(out, trojaned, elsewhere)
        assert "pictures not drawn" not in section
        assert "per-plane RE matches the scan" in section

    # a copy reads its own round, the original still in place
    copy = tmp_path / "copy" / "out"
    shutil.copytree(work / "out", copy)
    where = locations.locate_manifest(read_runs(str(copy)).iloc[-1], str(copy))
    assert where.uri == str(copy / "round" / "two.csv")
    assert where.moved == (str(work / "out"), str(copy))
    assert {r.uri for r in locations.run_manifest(run, str(copy))} == {
        str(copy / "round" / m / "model.safetensors") for m in (clean, trojaned)}

    # moved: the stored absolute manifest and model paths are gone
    moved = tmp_path / "moved" / "scan-out"
    moved.parent.mkdir()
    shutil.move(str(work / "out"), str(moved))
    assert not (work / "out").exists()
    section = _report_and_explain(os.path.relpath(moved), trojaned, elsewhere)
    assert "pictures not drawn" not in section
    assert "per-plane RE matches the scan" in section


# ---------------------------------------------------------------------------------------------
# The helper itself: no scan


def _record(uri: str) -> ModelRecord:
    return ModelRecord(model_id="m", uri=uri, format="safetensors", architecture="a",
                       num_classes=2, input_shape=(3, 8, 8), examples_uri=uri + "-examples")


def test_round_beside_the_output_moved_with_its_parent(tmp_path, cwd):
    old = tmp_path / "old"
    (old / "round").mkdir(parents=True)
    (old / "round" / "m.csv").write_text("x")
    cwd(old)
    run = {"run_id": "r", **locations.manifest_columns("round/m.csv", "scan")}
    assert run == {"run_id": "r", "manifest_uri": str(old / "round" / "m.csv"),
                   "manifest_relative": "../round/m.csv"}
    assert locations.locate_manifest(run, str(old / "scan")) == (run["manifest_uri"], None)

    new = tmp_path / "new"
    shutil.move(str(old), str(new))
    cwd(tmp_path)
    where = locations.locate_manifest(run, "new/scan")
    assert where == (str(new / "round" / "m.csv"), (str(old), str(new)))
    rebased = locations.rebase([_record(str(old / "round" / "id-1" / "model.safetensors")),
                                _record(str(old / "models" / "x.safetensors")),
                                _record("/elsewhere/y.safetensors")], where.moved)
    assert [r.uri for r in rebased] == [str(new / "round" / "id-1" / "model.safetensors"),
                                        str(new / "models" / "x.safetensors"),
                                        "/elsewhere/y.safetensors"]
    assert rebased[0].examples_uri == str(new / "round" / "id-1" / "model.safetensors-examples")


def test_a_run_written_before_absolute_paths_is_found_from_the_output(tmp_path, cwd):
    """Older runs stored the manifest as typed (relative to where the scan ran, usually a
    parent of the output folder): tried against the output folder and its parents."""
    (tmp_path / "demo-out" / "round").mkdir(parents=True)
    (tmp_path / "demo-out" / "round" / "manifest.csv").write_text("x")
    run = {"run_id": "r", "manifest_uri": "demo-out/round/manifest.csv",
           "manifest_relative": None}
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    cwd(elsewhere)
    assert locations.resolve_manifest(run, str(tmp_path / "demo-out" / "scan")) == str(
        tmp_path / "demo-out" / "round" / "manifest.csv")
    # nowhere to be found: the stored URI, so that reading it fails naming it
    assert locations.resolve_manifest({**run, "manifest_uri": "gone.csv"},
                                      str(tmp_path / "x")) == "gone.csv"


def test_urls_are_kept_and_related_within_one_store():
    assert storage.absolute("s3://bucket/round/m.csv") == "s3://bucket/round/m.csv"
    assert storage.absolute("file:///data/m.csv") == "file:///data/m.csv"
    assert storage.absolute("memory://x/m.csv") == "memory://x/m.csv"
    assert os.path.isabs(storage.absolute("rel/m.csv"))
    assert locations.manifest_columns("s3://bucket/round/m.csv", "s3://bucket/scans/out") == {
        "manifest_uri": "s3://bucket/round/m.csv", "manifest_relative": "../../round/m.csv"}
    assert locations.manifest_columns("s3://other/m.csv", "s3://bucket/out")[
        "manifest_relative"] is None
    assert locations.manifest_columns("s3://bucket/m.csv", "/local/out")[
        "manifest_relative"] is None
    run = {"run_id": "r", "manifest_uri": "s3://bucket/out/round/m.csv",
           "manifest_relative": "round/m.csv"}
    first = locations.candidates(run, "s3://bucket/copied/out")[0]
    assert first == ("s3://bucket/copied/out/round/m.csv",
                     ("s3://bucket/out", "s3://bucket/copied/out"))
