"""The Python API: xray.scan, xray.score, xray.read_scores (xray/api.py), exported lazily."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pandas as pd
import pytest

import xray
from xray.results.schema import SCORE_KEY

# MM-BD's small preset, cut further: the tests compare scores, not detection quality
FAST_MMBD = {"mmbd": {"preset": "small", "params": {"starts": 2, "max_steps": 20}}}


def test_import_xray_imports_neither_torch_nor_ray():
    code = ("import sys, xray\n"
            "heavy = [m for m in ('torch', 'ray', 'pandas', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert {'scan', 'score', 'read_scores'} <= set(dir(xray))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_package_exports_the_api_functions():
    from xray import api, read_scores, scan, score

    assert (scan, score, read_scores) == (api.scan, api.score, api.read_scores)
    with pytest.raises(TypeError, match="unknown option 'bogus'"):
        xray.scan("m.csv", "out", bogus=1)


def _subset(round_dir, tmp_path, n: int) -> str:
    """A manifest of the round's first n models (absolute paths), as a string."""
    from xray.io.manifest import read_manifest, write_manifest

    uri = str(tmp_path / "subset.csv")
    write_manifest(read_manifest(str(round_dir))[:n], uri)
    return uri


def test_scan_then_read_scores_every_key_once(tiny_round, ray_local, tmp_path):
    from xray.results.sink import read_runs, read_table, write_part

    round_dir, _ = tiny_round
    manifest, out = _subset(round_dir, tmp_path, 3), str(tmp_path / "out")
    summary = xray.scan(manifest, out, detectors=["mmbd"], preset="small")
    assert (summary.models_scanned, summary.failures) == (3, 0), summary.status_counts
    assert (tmp_path / "out" / "summary" / "summary.parquet").is_file()
    assert json.loads(read_runs(out).iloc[-1]["config_json"])["allow_pickle"] is False

    # an older failed attempt of every model beside the ok rows; a re-run scans nothing
    failed = read_table(out, "scores").assign(status="error", score=None, run_id="older",
                                              error="RuntimeError: earlier")
    failed["finished_at"] = failed["finished_at"] - pd.Timedelta("1h")
    write_part(out, "scores", "older",
               failed.astype(object).where(failed.notna(), None).to_dict("records"))
    assert xray.scan(manifest, out, detectors="mmbd", preset="small").models_planned == 0

    scores = xray.read_scores(out)
    assert len(read_table(out, "scores", dedupe=False)) == 6
    assert len(scores) == 3 and not scores.duplicated(SCORE_KEY).any()
    assert set(scores["status"]) == {"ok"} and scores["score"].notna().all()
    assert list(scores["detector"]) == ["mmbd"] * 3
    assert scores["probability"].between(0, 1).all()  # every detector on one scale


def test_pickle_is_only_the_callers_switch():
    from xray.api import make_config
    from xray.config import PickleNotAConfigSetting, ScanConfig

    with pytest.raises(PickleNotAConfigSetting):
        xray.scan("m.csv", "out", config={"allow_pickle": True})
    carried = make_config(dataclasses.replace(ScanConfig(), allow_pickle=True))
    assert carried.allow_pickle is False
    assert make_config(None, ["mmbd"], "small", allow_pickle=True).allow_pickle is True
    made = make_config({"seed": 3, "detectors": {"mmbd": {"params": {"starts": 2}}}},
                       preset="small")
    assert made.seed == 3 and made.detectors[0].preset == "small"
    assert dict(made.detectors[0].params) == {"starts": 2}


def test_score_an_in_memory_model_as_a_scan_would(tiny_round):
    """An nn.Module with (x, y) tensors gives the row scan_model gives for its file; so do its
    manifest row and its file URI with the manifest's fields."""
    from xray.config import parse_config
    from xray.io.examples import load_examples
    from xray.io.manifest import read_manifest
    from xray.io.model_loading import load_model
    from xray.scanning import scan_model

    round_dir, _ = tiny_round
    record = next(r for r in read_manifest(str(round_dir)) if r.poisoned)
    config = parse_config({"detectors": FAST_MMBD, "device": "cpu"})
    expected = scan_model(record, [d.build() for d in config.detectors], config)["scores"][0]
    assert expected["status"] == "ok"

    net = load_model(record)  # takes pixel-space input, normalisation folded in
    net.train()
    x, y = load_examples(record)
    rows = xray.score(net, (x, y), detectors=FAST_MMBD, model_id=record.model_id)
    assert net.training  # its mode given back
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row["detector"], row["status"], row["num_classes"]) == ("mmbd", "ok",
                                                                    record.num_classes)
    assert row["model_id"] == record.model_id and row["config_hash"] == expected["config_hash"]
    assert math.isclose(row["score"], expected["score"], rel_tol=1e-6)
    assert row["predicted_target"] == expected["predicted_target"]

    from_row = xray.score(record.to_row(), detectors=FAST_MMBD, device="cpu")
    from_uri = xray.score(record.uri, record.examples_uri, detectors=FAST_MMBD, device="cpu",
                          architecture=record.architecture,
                          num_classes=record.num_classes, input_shape=record.input_shape,
                          format=record.format)
    for frame in (from_row, from_uri):
        assert frame.loc[0, "status"] == "ok", frame.loc[0, "error"]
        assert math.isclose(frame.loc[0, "score"], expected["score"], rel_tol=1e-6)
        assert frame.loc[0, "model_digest"] == expected["model_digest"]
