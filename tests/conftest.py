"""Shared fixtures. `s3_server`: an S3-compatible server (moto) on loopback for the session."""
from __future__ import annotations

import os
import socket
from typing import Iterator, NamedTuple

import pytest

from _fixtures import TINY_RECIPE, ray_local, tiny_round  # noqa: F401  (shared session fixtures)
from _trojai_fixtures import tiny_scores, trojai_rounds  # noqa: F401  (TrojAI tests)
from _report_fixtures import scanned_tiny  # noqa: F401  (report / compare tests)
from _mntd_fixtures import (mntd_contract_artifact, mntd_meta, mntd_shadow,  # noqa: F401
                            mntd_target, tiny_shadow)  # (MNTD shadow and target rounds)
from _inversion_fixtures import (inversion_round, inversion_scan, nin_karm_scans,  # noqa: F401  (NC / ABS / K-Arm)
                                 mnist_composed_scans, nin_control_round)  # (and BAN)


# Tests that use one of these fixtures train a round of their own or start Ray (a local instance
# or a simulated cluster): they are marked `slow`, so `pytest -m "not slow"` (make test-fast)
# is the inner loop; `make test` runs everything. tiny_round (~40 s) stays in the fast subset:
# most model-level tests need one real round.
SLOW_FIXTURES = {"ray_local", "ray_head", "two_nodes", "scanned", "scanned_tiny",
                 "inversion_round", "inversion_scan", "mntd_shadow", "mntd_target", "mntd_meta",
                 "tiny_shadow", "mnist_composed_scans", "nin_control_round", "nin_karm_scans",
                 "badnets_scans", "trojai_rounds",
                 "tiny_scores", "s3_server"}


# Modules whose fixtures shut this process's local Ray instance down (a simulated cluster; a
# driver subprocess that must start its own). They run last, so the local instance that the
# other Ray tests share starts once instead of again after each of them (~6 s a start).
RAY_SHUTDOWN_FIXTURES = {"two_nodes", "no_ray_in_this_process"}


def pytest_configure(config):
    """Under pytest-xdist (`make test`: two workers on the 2 cores), each worker gets one torch
    thread (two workers with two threads each only contend) and a Ray temp folder of its own
    (two local Ray instances side by side; a short path: Ray's sockets live under it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        import torch

        torch.set_num_threads(1)
        os.environ["RAY_TMPDIR"] = f"/tmp/ray-{worker}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    shutting = {item.module.__name__ for item in items
                if RAY_SHUTDOWN_FIXTURES & set(getattr(item, "fixturenames", ()))}
    items.sort(key=lambda item: item.module.__name__ in shutting)  # stable: order kept within


class S3Server(NamedTuple):
    endpoint: str
    bucket: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """A test may pin torch to one thread (deterministic training, golden figures): give the
    next test the count it had, so one test's setting never slows every test after it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on (a server that is down)."""
    return _free_port()


@pytest.fixture
def unreachable_s3(monkeypatch, closed_port) -> str:
    """s3:// URIs point at a loopback port nobody listens on (an object store that is down),
    with the retries cut to one attempt so the outage is seen at once. Returns the endpoint."""
    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("XRAY_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("XRAY_STORAGE_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return endpoint


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer on 127.0.0.1 with one bucket; XRAY_S3_ENDPOINT_URL and AWS_*
    point at it for the whole session. Yields (endpoint, bucket); use a unique key prefix."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = pytest.MonkeyPatch()
    env.setenv("XRAY_S3_ENDPOINT_URL", endpoint)
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.delenv("AWS_SESSION_TOKEN", raising=False)
    env.delenv("AWS_PROFILE", raising=False)
    bucket = "xray-test"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield S3Server(endpoint, bucket)
    finally:
        env.undo()
        server.stop()


def pytest_sessionfinish(session, exitstatus):
    import sys

    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
