"""A scan whose driver is killed (SIGKILL, the whole process group) finishes when the same
command is run again, with the same scores as an uninterrupted run and one row per model."""
import os
import signal
import subprocess
import sys
import time

import pytest
import ray

from xray.config import parse_config
from xray.results.schema import SCORE_KEY
from xray.results.sink import read_table
from xray.runner import run_scan

CONFIG = parse_config({"seed": 0, "detectors": {"modelxray": {
    "params": {"num_planes": 6, "resolution": 48}}}})


@pytest.fixture(scope="module")
def no_ray_in_this_process():
    """The interrupted driver must start a Ray instance of its own, as a user's would."""
    ray.shutdown()
    yield


def _one_row_per_key(scores):
    assert not scores.duplicated(SCORE_KEY).any()


@pytest.mark.slow  # a driver subprocess starts its own Ray instance
def test_driver_killed_then_rerun_finishes_with_same_result(no_ray_in_this_process, tiny_round,
                                                          tmp_path):
    round_dir, _ = tiny_round
    manifest = str(round_dir / "manifest.csv")
    out = tmp_path / "interrupted"
    config_file = tmp_path / "config.yaml"
    config_file.write_text("seed: 0\ndetectors:\n  modelxray:\n    params: "
                           "{num_planes: 6, resolution: 48}\n")
    driver = subprocess.Popen(
        [sys.executable, "-m", "xray.cli", "scan", "--manifest", manifest, "--out", str(out),
         "--config", str(config_file), "--flush-seconds", "0", "--quiet", "--actors", "1"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if len(read_table(str(out), "scores", dedupe=False)) >= 2:
            break
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    partial = read_table(str(out), "scores", dedupe=False)
    assert 0 < len(partial) < 8, "the driver was not interrupted mid-run"

    again = run_scan(manifest, str(out), CONFIG, show_progress=False)
    reference = str(tmp_path / "reference")
    run_scan(manifest, reference, CONFIG, show_progress=False)  # uninterrupted, same config
    assert again.models_planned == again.models_total - len(partial)
    final = read_table(str(out), "scores", dedupe=False)
    _one_row_per_key(final)
    ref = read_table(reference, "scores").set_index("model_id")["score"]
    got = final.set_index("model_id")["score"]
    assert got.sort_index().round(9).equals(ref.sort_index().round(9))
