"""An S3 outage in the middle of a scan (moto on 127.0.0.1, stopped and restarted on its port).

A short outage (shorter than the storage retries) is ridden out: every model is scored exactly
once. A long one ends the driver with the CLI's one storage error, keeping what it wrote; the
same command run once the store is back scans only what is missing. moto keeps its state in
module-level backends, so a server restarted on the same port serves the same buckets.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections import Counter

import pytest

from xray.io import storage

from _moto import Moto

BUCKET = "xray-outage"


@pytest.fixture
def moto(monkeypatch):
    """An own moto server (the shared `s3_server` fixture must never go down) with one bucket;
    botocore's own retries off, so the outage meets xray's retries (5 attempts, ~7.5 s)."""
    import boto3

    server = Moto()
    monkeypatch.setenv("XRAY_S3_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("XRAY_STORAGE_ATTEMPTS", "5")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield server
    finally:
        server.stop()


def _upload_round(round_dir, prefix: str) -> str:
    """The tiny round copied to s3://BUCKET/prefix as it is (its manifest's URIs are relative);
    returns the manifest URI."""
    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    local = round_dir.parent / f"upload-{prefix.replace('/', '-')}"
    shutil.copytree(round_dir, local, dirs_exist_ok=True)
    fs.put(str(local) + "/", f"{BUCKET}/{prefix}", recursive=True)
    return f"s3://{BUCKET}/{prefix}/manifest.csv"


def _config():
    """What `xray scan --detectors modelxray --preset small` scans with."""
    from xray.config import load_config, with_preset

    return with_preset(load_config(None, ["modelxray"]), "small")


def _ok_counts(out: str) -> tuple[Counter, Counter]:
    """(ok rows per (model_id, detector), statuses of every row), nothing de-duplicated."""
    from xray.results.sink import read_table

    rows = read_table(out, "scores", dedupe=False)
    ok = rows[rows["status"] == "ok"]
    return Counter(zip(ok["model_id"], ok["detector"])), Counter(rows["status"])


def _assert_each_scored_once(out: str, models: int) -> None:
    ok, statuses = _ok_counts(out)
    assert len(ok) == models, (sorted(ok), statuses)
    assert set(ok.values()) == {1}, ok  # never twice
    assert set(statuses) <= {"ok", "retryable"}, statuses


def test_short_outage_mid_scan_is_ridden_out(tiny_round, moto, ray_local):
    """The store goes down for 2.5 s after the first rows land (retries cover ~7.5 s): the run
    ends normally and every model is scored exactly once. A model whose load still failed gets a
    `retryable` row, which the next run completes."""
    from xray.runner import run_scan

    models = len(tiny_round[1].records)
    manifest = _upload_round(tiny_round[0], "rounds/short")
    out = f"s3://{BUCKET}/scans/short"
    outage: list[float] = []

    def on_result(result):
        if not outage:  # the first model's rows are in a part file already (flush_seconds=0)
            moto.stop()
            outage.append(time.monotonic())
            threading.Timer(2.5, moto.start).start()

    summary = run_scan(manifest, out, _config(), show_progress=False, flush_seconds=0,
                       on_result=on_result)
    assert outage and moto.up
    assert summary.models_scanned == models
    ok, statuses = _ok_counts(out)
    if statuses.get("retryable"):  # a worker's load outlasted its retries: scanned again
        again = run_scan(manifest, out, _config(), show_progress=False, flush_seconds=0)
        assert again.models_planned == statuses["retryable"]
    _assert_each_scored_once(out, models)
    fs, path = storage.filesystem(out)
    assert not fs.exists(f"{path}/_lease.json")  # released once the store came back


def test_long_outage_ends_with_storage_error_and_resumes(tiny_round, moto, ray_local,
                                                         monkeypatch):
    """The store stays down longer than every retry: `xray scan` ends with its one line
    "storage unavailable after retries" (exit 1), the part files it wrote before are intact, and
    the same scan once the store is back plans only the models without an ok row."""
    import boto3
    from click.testing import CliRunner

    from xray.cli import main
    from xray.runner import run_scan

    monkeypatch.setenv("XRAY_STORAGE_ATTEMPTS", "3")  # 1.5 s of backoff: fail fast
    models = len(tiny_round[1].records)
    manifest = _upload_round(tiny_round[0], "rounds/long")
    out = f"s3://{BUCKET}/scans/long"
    client = boto3.client("s3", endpoint_url=moto.endpoint)
    written: list[str] = []
    stop_watching = threading.Event()

    def cut_after_first_part():
        while not stop_watching.wait(0.1):
            listing = client.list_objects_v2(Bucket=BUCKET, Prefix="scans/long/scores/")
            parts = [o["Key"] for o in listing.get("Contents", [])]
            if parts:
                moto.stop()
                written.extend(parts)
                return

    watcher = threading.Thread(target=cut_after_first_part, daemon=True)
    watcher.start()
    try:
        result = CliRunner().invoke(main, [
            "scan", "--manifest", manifest, "--out", out, "--detectors", "modelxray",
            "--preset", "small", "--flush-seconds", "0", "--quiet"])
    finally:
        stop_watching.set()
        watcher.join()
        if not moto.up:
            moto.start()
    assert written, "the scan ended before its first part file landed"
    assert result.exit_code == 1, result.output
    assert "storage unavailable after retries" in result.output, result.output
    assert "Traceback" not in result.output

    # Kept: every part it wrote before the outage is there, whole.
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="scans/long/scores/")
    assert set(written) <= {o["Key"] for o in listing.get("Contents", [])}
    ok, _ = _ok_counts(out)
    assert ok and len(ok) < models and set(ok.values()) == {1}

    # The same scan again, in this process (its lease of the failed run was left behind on the
    # store that was down): plans only what is missing and completes the round.
    again = run_scan(manifest, out, _config(), show_progress=False, flush_seconds=0)
    assert again.models_planned == models - len(ok)
    _assert_each_scored_once(out, models)
