"""The nightly regression job: twice on an unchanged recipe (nothing rebuilt, nothing scanned the
second time, a clean comparison, the baseline kept), a changed recipe (a new round), and the
baseline moving only on an explicit accept. (A regression's detection is test_compare's: the job
calls the same `compare`.)

The zoo of the tiny recipe is the session's `tiny_round`, copied to where the job keeps its round
(<state>/zoo/<name>-<recipe digest>/), as an earlier night would have left it: training it again
here would repeat the fixture's minute of training."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from _fixtures import TINY_RECIPE
from xray import nightly
from xray.cli import main
from xray.config import parse_config
from xray.zoo.recipe import parse_recipe

JOB = Path(__file__).resolve().parents[1] / "jobs" / "nightly.py"
SMALL = {"detectors": {"modelxray": {"preset": "small"}}}


def _nightly(*args: str):
    """`xray nightly ARGS` (what jobs/nightly.py runs) -> click's result."""
    return CliRunner().invoke(main, ["nightly", *args])


def _files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


def test_nightly_twice_on_an_unchanged_recipe(tiny_round, ray_local, tmp_path):
    round_dir, build = tiny_round
    recipe = parse_recipe(TINY_RECIPE)
    state = tmp_path / "state"
    zoo = state / "zoo" / f"{recipe.name}-{recipe.digest}"
    shutil.copytree(round_dir, zoo)
    assert json.loads((zoo / "round.json").read_text())["recipe_digest"] == recipe.digest
    before = _files(zoo)
    report = {"planes": 0}

    first = nightly.run_nightly(str(state), recipe=recipe, config=parse_config(SMALL),
                                accept=True, report=report)
    assert first.zoo["rebuilt"] is False and first.zoo["round_uri"] == str(zoo)
    assert first.models_scanned == first.models_total == len(build.records)
    assert first.failures == 0 and first.baseline is None and first.regression is None
    assert first.accepted and first.exit_code == 0
    pointer = json.loads((state / "baseline.json").read_text())
    assert pointer["night_id"] == first.night_id and pointer["scan_uri"] == first.scan_uri

    # the second night, through the command: recipe and config as files
    recipe_file, config_file = tmp_path / "recipe.yaml", tmp_path / "config.yaml"
    recipe_file.write_text(yaml.safe_dump(TINY_RECIPE))
    config_file.write_text(yaml.safe_dump(SMALL))
    result = _nightly("--state", str(state), "--recipe", str(recipe_file), "--config",
                      str(config_file), "--drilldown", "0", "--quiet")
    assert result.exit_code == 0, result.output
    assert "comparison with night" in result.output and "clean" in result.output
    second = json.loads((state / "latest.json").read_text())
    assert second["night_id"] != first.night_id
    assert second["zoo"]["rebuilt"] is False and second["zoo"]["trained"] == 0
    assert second["models_planned"] == 0 and second["models_scanned"] == 0
    assert second["scan_uri"] == first.scan_uri
    assert second["regression"] is False and second["regressions"] == []
    assert _files(zoo) == before  # nothing rebuilt, nothing rewritten
    night = state / "nights" / second["night_id"]
    assert {"report.html", "comparison.txt", "comparison.md", "comparison.json",
            "night.json"} <= {p.name for p in night.iterdir()}
    comparison = json.loads((night / "comparison.json").read_text())
    assert comparison["regression"] is False and comparison["flips"] == []
    assert "no regression" in (night / "comparison.txt").read_text()
    assert json.loads((state / "baseline.json").read_text()) == pointer  # not accepted

    # accepting a past night moves the pointer, and only then
    result = _nightly("--state", str(state), "--accept-night", second["night_id"])
    assert result.exit_code == 0 and f"baseline: night {second['night_id']}" in result.output
    moved = json.loads((state / "baseline.json").read_text())
    assert moved["night_id"] == second["night_id"] and moved["scan_uri"] == first.scan_uri


def test_a_changed_recipe_means_a_new_round(tiny_round, tmp_path):
    round_dir, _ = tiny_round
    recipe = parse_recipe(TINY_RECIPE)
    assert nightly.round_is_current(str(round_dir), recipe)
    changed = parse_recipe({**TINY_RECIPE, "seed": TINY_RECIPE["seed"] + 1})
    assert changed.digest != recipe.digest
    assert not nightly.round_is_current(str(round_dir), changed)
    grown = parse_recipe({**TINY_RECIPE, "groups": [*TINY_RECIPE["groups"], {"count": 1}]})
    assert not nightly.round_is_current(str(round_dir), grown)
    partial = tmp_path / "partial"
    shutil.copytree(round_dir, partial)
    shutil.rmtree(next(p for p in sorted(partial.iterdir()) if p.name.startswith("id-")))
    assert not nightly.round_is_current(str(partial), recipe)


def test_usage_errors_exit_2(tmp_path):
    bad = tmp_path / "tol.yaml"
    bad.write_text("auc: 1\n")
    result = _nightly("--state", str(tmp_path), "--recipe", "demo", "--tolerances", str(bad))
    assert result.exit_code == 2 and "auc" in result.output
    result = _nightly("--state", str(tmp_path), "--recipe", "demo", "--manifest", "m.csv")
    assert result.exit_code == 2 and "exclusive" in result.output
    missing = _nightly("--state", str(tmp_path), "--accept-night", "nope")
    assert missing.exit_code == 1 and "no night 'nope'" in missing.output
    assert "Traceback" not in missing.output


def test_the_job_runs_xray_nightly(tmp_path):
    """jobs/nightly.py is `xray nightly` with INFO logging: the same options and exit codes."""
    proc = subprocess.run([sys.executable, str(JOB), "--state", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "one of --recipe and --manifest is required" in proc.stderr
    helped = subprocess.run([sys.executable, str(JOB), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and "--accept-night" in helped.stdout
