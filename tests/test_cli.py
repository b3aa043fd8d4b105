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
    result = CliRunner().invoke(main, ["scan", "--manifest", str(bad),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "m.csv" in result.output and "Traceback" not in result.output


def test_root_confines_the_manifest_before_anything_runs(tiny_round, tmp_path):
    """A manifest row pointing outside --root (here at /etc/passwd) is refused, naming row and
    field, before any model is read or any output written."""
    import pandas as pd

    round_dir, _ = tiny_round
    rows = pd.read_csv(round_dir / "manifest.csv").head(2)
    rows["examples_uri"] = [str(round_dir / v) for v in rows["examples_uri"]]
    rows["uri"] = [str(round_dir / rows["uri"][0]), "/etc/passwd"]
    hostile = tmp_path / "hostile.csv"
    rows.to_csv(hostile, index=False)
    result = CliRunner().invoke(main, ["scan", "--manifest", str(hostile), "--out",
                                       str(tmp_path / "o"), "--root", str(round_dir)])
    assert result.exit_code == 1, result.output
    assert "outside the allowed root" in result.output and "'uri'" in result.output
    assert not (tmp_path / "o").exists()


def test_an_output_path_through_a_file_is_one_clear_line(tiny_round, tmp_path):
    """--out naming a file (or a folder under one): one line naming the path, no traceback,
    nothing written; found giving `xray zoo build` a file."""
    round_dir, _ = tiny_round
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for command, out in ((["zoo", "build", "--recipe", "demo"], a_file),
                         (["scan", "--manifest", str(round_dir), "--detectors", "weights"], a_file),
                         (["scan", "--manifest", str(round_dir), "--detectors", "weights"],
                          a_file / "sub")):
        result = CliRunner().invoke(main, [*command, "--out", str(out)])
        assert result.exit_code == 1, result.output
        assert f"Error: {out}: " in result.output, result.output
        assert "(a file where a folder is needed)" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert a_file.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [a_file]


def test_unknown_detector_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["scan", "--manifest", "x.csv", "--out", str(tmp_path),
                                       "--detectors", "nope"])
    assert result.exit_code == 1 and "unknown detector 'nope'; available: abs," in result.output


def test_help_imports_no_heavy_library():
    """`xray --help` starts fast: torch, Ray, pandas and matplotlib load only in command
    bodies."""
    import subprocess
    import sys

    code = ("import sys\nfrom xray.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'ray', 'pandas', 'matplotlib', 'numpy') "
            "if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nightly" in proc.stdout and "trojai-detect" in proc.stdout
    assert proc.stdout.rstrip().endswith("[]"), proc.stdout


def test_shared_options_are_the_same_everywhere():
    """An option from xray.cli_args reads the same in every command that takes it."""
    seen: dict[str, dict[str, tuple]] = {}
    for path, cmd in _commands(main):
        for param in cmd.params:
            if param.opts[0] in ("--stack", "--address", "--actors", "--quiet", "--calibrator",
                                 "--tolerances", "--threshold", "--preset", "--workers"):
                seen.setdefault(param.opts[0], {})[" ".join(path)] = (
                    param.name, param.help, param.default)
    for name, where in seen.items():
        assert len(set(where.values())) == 1, (name, where)
    assert set(seen["--stack"]) == {"scan", "score-testset"}
    assert set(seen["--address"]) == {"scan", "score-testset", "nightly"}
    assert set(seen["--threshold"]) == {"report", "compare"}


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_bad_threshold_is_a_usage_error(command, tmp_path):
    args = [str(tmp_path)] if command == "report" else [str(tmp_path), str(tmp_path)]
    result = CliRunner().invoke(main, [command, *args, "--threshold", "modelxray=high"])
    assert result.exit_code == 2
    assert "'modelxray=high': expected DETECTOR=NUMBER" in result.output


def test_unreachable_output_store_is_one_clear_line(tiny_round, tmp_path, unreachable_s3):
    """An object store that does not answer (after the retries) ends the command with one
    line saying so and what to do, not a botocore traceback."""
    round_dir, _ = tiny_round
    result = CliRunner().invoke(main, ["scan", "--manifest", str(round_dir / "manifest.csv"),
                                       "--out", "s3://bucket/out"])
    assert result.exit_code == 1, result.output
    assert "storage unavailable after retries" in result.output
    assert "run the same command again" in result.output and "Traceback" not in result.output


def test_unreachable_address_fails_fast_with_one_line(tiny_round, tmp_path, closed_port):
    """--address of a cluster that is not there: one line within seconds (Ray's client kept
    retrying for over 10 minutes), nothing written."""
    import time

    port = closed_port
    round_dir, _ = tiny_round
    started = time.monotonic()
    result = CliRunner().invoke(main, ["scan", "--manifest", str(round_dir / "manifest.csv"),
                                       "--out", str(tmp_path / "o"), "--address",
                                       f"127.0.0.1:{port}"])
    assert result.exit_code == 1, result.output
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output and time.monotonic() - started < 60
    assert not (tmp_path / "o").exists()


def test_friendly_errors_for_a_missing_config_a_typo_and_an_unknown_preset(tmp_path):
    runner = CliRunner()
    args = ["scan", "--manifest", "x.csv", "--out", str(tmp_path / "o")]
    missing = runner.invoke(main, [*args, "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "config file" in missing.output
    assert "not found" in missing.output and "Errno" not in missing.output
    typo = runner.invoke(main, [*args, "--detectors", "modelxay"])
    assert typo.exit_code == 1 and "did you mean 'modelxray'?" in typo.output
    assert typo.output.startswith("Error: --detectors:"), typo.output  # not "<defaults>:"
    preset = runner.invoke(main, [*args, "--preset", "nope"])
    assert preset.exit_code == 1 and "their presets: " in preset.output
    assert "reference" in preset.output and "small" in preset.output


SCAN = ["scan", "--manifest", "x.csv", "--detectors", "weights"]


@pytest.mark.parametrize("command, option, value", [
    (SCAN, "--actors", "0"), (SCAN, "--stack", "0"), (SCAN, "--time-limit", "0"),
    (SCAN, "--time-limit", "-5"), (SCAN, "--max-retries", "-1"),
    (SCAN, "--cpus-per-actor", "0"), (SCAN, "--gpus-per-actor", "-1"),
    (SCAN, "--flush-seconds", "-1"), (["zoo", "build", "--recipe", "demo"], "--workers", "0"),
    (["mntd", "train", "--shadow", "x"], "--epochs", "0"),
    (["mntd", "train", "--shadow", "x"], "--time-limit", "-1"),
    (["report", "x"], "--max-drilldown", "-1"), (["explain", "x", "m"], "--planes", "0")])
def test_out_of_range_numbers_are_refused_before_anything_runs(command, option, value,
                                                                  tmp_path):
    """Found trying them: scan --actors 0 hung with no actor to take a model, --time-limit -5
    timed every model out, zoo build --workers 0 trained on, the others were taken silently."""
    out = [] if command[0] in ("report", "explain") else ["--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*command, *out, option, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': " in result.output, result.output
    assert "is not in the range" in result.output
    assert not (tmp_path / "o").exists()


def test_a_config_time_limit_must_be_positive():
    from xray.config import parse_config

    for bad in (0, -1.5, "10", True):
        with pytest.raises(ValueError, match="model_time_limit_s must be a positive number"):
            parse_config({"model_time_limit_s": bad}, source="c.yaml")
    assert parse_config({"model_time_limit_s": 2}).model_time_limit_s == 2


def test_every_command_with_a_progress_bar_takes_quiet():
    """A command whose body asks for a progress bar (show_progress=...) takes --quiet."""
    import inspect

    with_bar = set()
    for path, cmd in _commands(main):
        if cmd.callback is None or isinstance(cmd, click.Group):
            continue
        if "show_progress" in inspect.getsource(inspect.unwrap(cmd.callback)):
            with_bar.add(" ".join(path))
            assert any("--quiet" in p.opts for p in cmd.params), " ".join(path)
    assert with_bar == {"zoo build", "mntd train", "scan", "report", "score-testset",
                        "nightly", "demo"}


def _scores_out(out) -> str:
    """An output folder of one run, detector det: 5 clean and 3 trojaned models."""
    import datetime as dt

    from xray.results.sink import write_part

    rows = []
    for i in range(8):
        trojaned = i >= 5
        rows.append({
            "run_id": "R", "model_id": f"m{i}", "model_digest": "d", "detector": "det",
            "detector_version": "1", "config_hash": "h", "status": "ok", "error": None,
            "score": float(i), "predicted_target": None, "stats_json": "{}", "seconds": 1.0,
            "worker": "w", "architecture": "net", "num_classes": 10, "gt_poisoned": trojaned,
            "gt_target": None, "gt_attack": "badnets" if trojaned else None, "tags_json": "{}",
            "finished_at": dt.datetime(2026, 1, 1, 0, i, tzinfo=dt.timezone.utc)})
    write_part(str(out), "scores", "R", rows)
    return str(out)


def test_report_quiet_and_the_threshold_warning(tmp_path):
    """xray report draws its drill-down progress bar unless --quiet; its threshold rests on 5
    clean models, which one line under the table and the page say."""
    out = _scores_out(tmp_path / "out")
    runner = CliRunner()
    loud = runner.invoke(main, ["report", out, "--planes", "0"])
    assert loud.exit_code == 0, loud.output
    assert "report drill-down" in loud.stderr
    quiet = runner.invoke(main, ["report", out, "--planes", "0", "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "report drill-down" not in quiet.stderr and "%|" not in quiet.stderr
    warnings = [line for line in quiet.stdout.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "WARNING: the det threshold (clean_q0.95) rests on 5 clean models (fewer than 20)")
    assert "(clean_q0.95 of 5 clean)" in quiet.stdout
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="threshold-warning"' in html and "rests on 5 clean models" in html
