"""The command line as a user runs it: help for every option, and scan -> report -> explain."""
import json

import click
import pytest
from click.testing import CliRunner

from xray.cli import main


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path,cmd", list(_commands(main)), ids=lambda v: " ".join(v)
                         if isinstance(v, tuple) else "")
def test_every_option_has_help(path, cmd):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert cmd.help, f"xray {' '.join(path)} has no description"
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"xray {' '.join(path)} {param.opts[0]} has no help"
            assert param.opts[0] in result.output


def test_detectors_lists_modelxray_with_defaults():
    result = CliRunner().invoke(main, ["detectors", "--json"])
    assert result.exit_code == 0, result.output
    listed = {d["name"]: d for d in json.loads(result.output)}
    assert listed["modelxray"]["params"]["num_planes"] == 20
    assert "small" in listed["modelxray"]["presets"]


def test_scan_report_explain(tiny_round, ray_local, tmp_path):
    round_dir, _ = tiny_round
    out = tmp_path / "out"
    runner = CliRunner()
    scan = runner.invoke(main, ["scan", "--manifest", str(round_dir / "manifest.csv"), "--out",
                                str(out), "--detectors", "modelxray", "--preset", "small",
                                "--quiet"])
    assert scan.exit_code == 0, scan.output
    assert "modelxray" in scan.output and "scanned" in scan.output
    report = runner.invoke(main, ["report", str(out)])
    assert report.exit_code == 0, report.output
    assert (out / "report.html").is_file() and (out / "summary" / "summary.parquet").is_file()
    model_id = sorted(p.name for p in round_dir.iterdir() if p.name.startswith("id-"))[-1]
    explain = runner.invoke(main, ["explain", str(out), model_id])
    assert explain.exit_code == 0, explain.output
    png = out / "explain" / f"{model_id}-modelxray.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_manifest_is_one_clear_line(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("model_id,uri\nm1,x.pt\n")
    result = CliRunner().invoke(main, ["scan", "--manifest", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "m.csv" in result.output and "Traceback" not in result.output


def test_unknown_detector_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["scan", "--manifest", "x.csv", "--out", str(tmp_path),
                                       "--detectors", "nope"])
    assert result.exit_code == 1 and "unknown detector 'nope'" in result.output
