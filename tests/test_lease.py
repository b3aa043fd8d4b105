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


class _ScanProgress:
    """Reads a driver's merged output on a thread: `done` / `total` are the latest counts of its
    scan progress bar (tqdm's "scan <run>: ... 3/16")."""

    def __init__(self, stream) -> None:
        import re
        import threading

        self._bar = re.compile(r"\| *(\d+)/(\d+) \[")  # tqdm's "...| 3/16 [00:09<..."
        self._chunks: list[str] = []
        self.done, self.total = 0, 0
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        # os.read returns what has arrived; a text stream's read(n) would wait for n characters
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            self._chunks.append(chunk.decode(errors="replace"))
            counts = self._bar.findall("".join(self._chunks[-8:]))
            if counts:
                self.done, self.total = map(int, counts[-1])

    def join(self) -> None:
        self._thread.join(timeout=30)

    def text(self) -> str:
        """What it printed so far (all of it once the process has ended)."""
        return "".join(self._chunks)


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
                      "{num_planes: 8, resolution: 60}\n")  # about a second a model
    command = [sys.executable, "-m", "xray.cli", "scan", "--manifest",
               str(round_dir / "manifest.csv"), "--out", str(out), "--config", str(config),
               "--actors", "1", "--flush-seconds", "600"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    progress = _ScanProgress(first.stdout)
    deadline = time.monotonic() + 120
    while not (out / LEASE_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (out / LEASE_FILE).exists(), progress.text()
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "another xray scan is writing to this folder" in second.stderr
    assert "Traceback" not in second.stderr

    while not _ray_processes_of(first.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ray_processes_of(first.pid), "the driver's Ray instance never showed up"
    # Stop it once its progress bar counts two models scanned, their rows buffered (flush every
    # 600 s), and models are left: a fixed wait was either too short on a loaded machine or
    # most of this test's time.
    deadline = time.monotonic() + 240
    while progress.done < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 2 <= progress.done < progress.total, progress.text()
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    progress.join()
    output = progress.text()
    assert first.returncode in (143, 1) and "models scanned" not in output, output
    assert not (out / LEASE_FILE).exists()
    scores = read_table(str(out), "scores", dedupe=False)
    assert len(scores) > 0 and not scores.duplicated(SCORE_KEY).any()
    deadline = time.monotonic() + 30
    while _ray_processes_of(first.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes_of(first.pid), _ray_processes_of(first.pid)
