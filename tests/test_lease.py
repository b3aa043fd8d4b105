"""One writer per output folder (xray.results.lease): a second driver on the same --out refuses
with the holder's name instead of planning from the same scored set and scanning everything
twice; a dead driver's lease is taken over; a driver whose lease was taken over stops."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from xray.io import storage
from xray.results.lease import LEASE_FILE, LeaseHeld, LeaseLost, OutputLease
from xray.results.schema import SCORE_KEY
from xray.results.sink import read_table


def _folders(tmp_path, s3=None):
    if s3 is None:
        return str(tmp_path / "out")
    return f"s3://{s3.bucket}/lease-{uuid.uuid4().hex[:8]}/out"


def _exercise(out):
    first = OutputLease(out, "run-a")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld, match="run-a"):
            OutputLease(out, "run-b").acquire()
    finally:
        first.release()
    assert not storage.exists(storage.join(out, LEASE_FILE))
    with OutputLease(out, "run-b"):  # free again
        pass


def test_second_holder_refused_until_released_local(tmp_path):
    _exercise(_folders(tmp_path))


def test_second_holder_refused_until_released_s3(tmp_path, s3_server):
    _exercise(_folders(tmp_path, s3_server))  # exclusive create = a conditional PUT


def _plant(out, **fields):
    body = {"token": "someone-else", "run_id": "old-run", "host": "elsewhere", "pid": 1,
            "renewed_at": time.time(), "ttl_s": 60.0, **fields}
    storage.write_text(storage.join(out, LEASE_FILE), json.dumps(body))


def test_stale_leases_are_taken_over(tmp_path):
    out = _folders(tmp_path)
    _plant(out, renewed_at=time.time() - 3600)  # not renewed for an hour
    with OutputLease(out, "new"):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    _plant(out, host=os.uname().nodename, pid=int(dead))  # a killed driver on this host
    with OutputLease(out, "new"):
        pass
    _plant(out)  # alive elsewhere and fresh: refused, saying when it expires
    with pytest.raises(LeaseHeld, match="expires in"):
        OutputLease(out, "new").acquire()


def test_a_driver_whose_lease_was_taken_over_stops(tmp_path):
    out = _folders(tmp_path)
    lease = OutputLease(out, "slow", ttl=3600)
    lease.acquire()
    try:
        _plant(out, token="the-new-holder", run_id="taker")
        with pytest.raises(LeaseLost, match="taker"):
            lease.renew()
    finally:
        lease.release()
    assert json.loads(storage.read_text(storage.join(out, LEASE_FILE)))["run_id"] == "taker"


def _ray_processes_of(driver_pid: int) -> list[str]:
    """Command lines of the processes of the Ray instance a driver started (its session folder
    ends with the driver's pid)."""
    import re

    session = re.compile(rf"session_[^ /]*_{driver_pid}(?![0-9])")
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if session.search(line)]


def _scan_actors() -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.startswith("ray::ScanActor")]


@pytest.mark.slow
def test_a_second_driver_refuses_and_sigterm_ends_the_first_cleanly(tiny_round, tmp_path):
    """Two `xray scan` processes on one --out: the second refuses while the first holds the
    folder (before, both planned from the same empty output and wrote every key twice). Then
    SIGTERM to the first, mid-run: it stops (exit 143, or 1 from inside a Ray call), the rows
    delivered so far are on disk once each, the lease is gone (the next run starts at once),
    and no process of its Ray instance is left."""
    import signal

    round_dir, _ = tiny_round
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text("seed: 0\ndetectors:\n  modelxray:\n    params: "
                      "{num_planes: 24, resolution: 100}\n")  # several seconds a model
    command = [sys.executable, "-m", "xray.cli", "scan", "--manifest",
               str(round_dir / "manifest.csv"), "--out", str(out), "--config", str(config),
               "--quiet", "--actors", "1", "--flush-seconds", "600"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + 120
    while not (out / LEASE_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (out / LEASE_FILE).exists(), first.communicate()[0]
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "another xray scan is writing to this folder" in second.stderr
    assert "Traceback" not in second.stderr

    while not _ray_processes_of(first.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ray_processes_of(first.pid), "the driver's Ray instance never showed up"
    # The scan actor's start-up varies with the machine's load: count from when it is up (only
    # this driver's scan runs now), then let a few models be scanned, their rows buffered
    # (flush every 600 s).
    while not _scan_actors() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(20.0)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=120)[0]
    assert first.returncode in (143, 1) and "models scanned" not in output, output
    assert not (out / LEASE_FILE).exists()
    scores = read_table(str(out), "scores", dedupe=False)
    assert len(scores) > 0 and not scores.duplicated(SCORE_KEY).any()
    deadline = time.monotonic() + 30
    while _ray_processes_of(first.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes_of(first.pid), _ray_processes_of(first.pid)
