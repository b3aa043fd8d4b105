"""Pickle loading runs the file's code, so only the person running a command can allow it: the
command line's --allow-pickle (or the explicit Python argument). A config file, a stored run
record (a results folder anyone may have written) or a calibrator artifact never can.

Each test plants a payload pickle (tests/_trojai_fixtures.PidPayload: unpickling appends the
pid to a marker file) and fails if the payload ran."""
from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from _trojai_fixtures import FAST_CONFIG, PidPayload

from xray.cli import main
from xray.config import PickleNotAConfigSetting, load_config, parse_config
from xray.io.manifest import read_manifest
from xray.reduce.calibrate import Calibrator
from xray.results.sink import read_table, write_part
from xray.scanning import scan_model

PAYLOAD_ID = "id-99999999"


def _payload_round(trojai_rounds, tmp_path):
    """A copy of the tiny TrojAI r4 round with one more model whose model.pt is a payload."""
    round_dir = tmp_path / "round"
    shutil.copytree(trojai_rounds["r4"], round_dir)
    template = sorted(p.name for p in (round_dir / "models").iterdir())[0]
    shutil.copytree(round_dir / "models" / template, round_dir / "models" / PAYLOAD_ID)
    marker = tmp_path / "payload-ran.txt"
    torch.save(PidPayload(str(marker)), round_dir / "models" / PAYLOAD_ID / "model.pt")
    return round_dir, marker


def test_a_config_file_cannot_allow_pickles(tmp_path):
    cfg = tmp_path / "scan.yaml"
    cfg.write_text("allow_pickle: true\ndetectors: [modelxray]\n")
    with pytest.raises(PickleNotAConfigSetting, match="--allow-pickle"):
        load_config(str(cfg))
    with pytest.raises(PickleNotAConfigSetting, match=str(cfg)):
        parse_config({"allow_pickle": True}, source=str(cfg))
    # the command line's switch is the one way in
    assert load_config(None, allow_pickle=True).allow_pickle
    assert not load_config(None).allow_pickle


def test_scan_with_such_a_config_refuses_before_loading_anything(trojai_rounds, tmp_path):
    round_dir, marker = _payload_round(trojai_rounds, tmp_path)
    cfg = tmp_path / "scan.yaml"
    cfg.write_text("allow_pickle: true\n")
    result = CliRunner().invoke(main, ["scan", "--manifest", str(round_dir), "--out",
                                       str(tmp_path / "out"), "--config", str(cfg)])
    assert result.exit_code == 1, result.output
    assert "allow_pickle is not a config setting" in result.output
    assert not marker.exists() and not (tmp_path / "out" / "scores").exists()


def test_stored_configs_never_turn_pickles_on():
    stored = {**FAST_CONFIG, "allow_pickle": True}  # what runs.config_json records
    assert not parse_config(stored, source="run r1", stored=True).allow_pickle
    cal = Calibrator(detectors=[], features=[], impute=[], mean=[], scale=[], coef=[],
                     intercept=0.0, C=1.0, scan=stored)
    assert not cal.scan_config().allow_pickle


def _forged_results(round_dir, out):
    """A results folder as a scan WITHOUT --allow-pickle left it (the payload model an error
    row), then forged: the run's config says allow_pickle true and the row says ok."""
    config = parse_config(FAST_CONFIG)
    detectors = [d.build() for d in config.detectors]
    record = next(r for r in read_manifest(str(round_dir)) if r.model_id == PAYLOAD_ID)
    rows = scan_model(record, detectors, config, run_id="forged")["scores"]
    assert rows[0]["status"] == "error" and "--allow-pickle" in rows[0]["error"]
    rows[0].update(status="ok", score=0.9, error=None)
    write_part(str(out), "scores", "forged", rows)
    now = dt.datetime.now(dt.timezone.utc)
    write_part(str(out), "runs", "forged", [{
        "run_id": "forged", "config_hash": config.config_hash,
        "config_json": json.dumps({**json.loads(config.to_json()), "allow_pickle": True}),
        "code_version": "forged", "manifest_uri": str(round_dir), "manifest_digest": "x",
        "models_total": 1, "models_planned": 1, "started_at": now, "finished_at": now}])
    assert json.loads(read_table(str(out), "runs")["config_json"][0])["allow_pickle"] is True


@pytest.mark.parametrize("command", ["report", "explain"])
def test_a_forged_results_folder_runs_no_payload(trojai_rounds, tmp_path, command):
    round_dir, marker = _payload_round(trojai_rounds, tmp_path)
    out = tmp_path / "out"
    _forged_results(round_dir, out)
    args = (["report", str(out), "--model", PAYLOAD_ID, "--html", str(tmp_path / "r.html")]
            if command == "report" else ["explain", str(out), PAYLOAD_ID,
                                         "--png", str(tmp_path / "x.png")])
    result = CliRunner().invoke(main, args)
    assert not marker.exists(), f"payload ran in `xray {command}`: {result.output}"
    if command == "explain":  # refused with the reason, not drawn
        assert result.exit_code == 1 and "--allow-pickle" in result.output, result.output
