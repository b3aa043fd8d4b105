"""The documented cluster path, end to end: the `ray job submit` line of cluster/README.md, with
cluster/runtime_env.yaml, sent to a Ray head started by `ray start --head` with token
authentication on (a token available and RAY_AUTH_MODE unset: Ray 2.60 then enables it), on
127.0.0.1. The job scores the tiny round; the test reads its scores.

Isolation: Ray's files under a fresh --temp-dir, every port chosen free, RAY_ADDRESS and the
token only in the subprocesses' environments. Teardown ends the head (`ray start --block` drains
and stops the processes it started), then kills by pid whatever still carries this head's marker
variable (workers, a job's driver): never `ray stop`, which ends every Ray instance on the machine.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from xray.results.sink import read_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "XRAY_TEST_RAY_HEAD"  # set in the head's environment, inherited by all it starts


class RayHead(NamedTuple):
    dashboard: str  # http://127.0.0.1:PORT, what `ray job submit --address` takes
    token: str
    temp_dir: Path


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries MARKER=marker (this head and its descendants)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{MARKER}={marker}".encode() in environ:
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    # Short: Ray's Unix socket paths under the temp dir must stay within 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="xr", dir="/tmp"))
    token = secrets.token_hex(32)
    (temp / "auth_token").write_text(token)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update({
        # the node's `python` is this environment's (on a cluster: the image's)
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_TOKEN_PATH": str(temp / "auth_token"),
        # node address 127.0.0.1 (Ray otherwise picks the host's outward address)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        MARKER: str(temp),
    })
    names = ["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
             "node-manager-port", "object-manager-port"]
    ports = dict(zip(names, _free_ports(len(names))))
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--temp-dir", str(temp),
               "--disable-usage-stats", *[a for n, p in ports.items() for a in (f"--{n}", str(p))]]
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (temp / "head.log").read_text()[-4000:]
            try:
                if _get(f"{dashboard}/api/jobs/", token)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (temp / "head.log").read_text()[-4000:]
            time.sleep(1)
        yield RayHead(dashboard, token, temp)
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # drains, then stops the node's processes
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait(10)
        for pid in _marked_pids(str(temp)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _documented_submit(readme: Path) -> list[str]:
    """The `ray job submit ... jobs/score_round.py ...` command of `readme`, as argv."""
    text = readme.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines()
                if "ray job submit" in line and "jobs/score_round.py" in line)
    return shlex.split(line[line.index("ray job submit"):])


def _with(argv: list[str], **values: str) -> list[str]:
    """argv with the value after each --OPTION replaced (option names with _ for -)."""
    out = list(argv)
    for name, value in values.items():
        out[out.index("--" + name.replace("_", "-")) + 1] = value
    return out


def _submit(head: RayHead, argv: list[str], *, token: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    if token:  # what cluster/README.md tells a client to set
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token})
    return subprocess.run([str(BIN / "ray"), *argv[1:]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=420)


def test_documented_ray_job_submit_scores_a_round(ray_head, tiny_round, tmp_path):
    round_dir, build = tiny_round
    out = tmp_path / "scan"
    documented = _documented_submit(REPO / "cluster" / "README.md")
    assert documented[:3] == ["ray", "job", "submit"]
    assert documented[documented.index("--runtime-env") + 1] == "cluster/runtime_env.yaml"
    argv = _with(documented, address=ray_head.dashboard, manifest=str(round_dir),
                 out=str(out))
    job_id = f"xray-test-{secrets.token_hex(4)}"
    argv[3:3] = ["--submission-id", job_id]
    argv += ["--detectors", "mmbd", "--preset", "small", "--quiet"]

    # token authentication is on: without the token the cluster refuses the job
    assert _get(f"{ray_head.dashboard}/api/jobs/")[0] == 401
    refused = _submit(ray_head, argv, token=False)
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr

    started = time.monotonic()
    result = _submit(ray_head, argv, token=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    status, body = _get(f"{ray_head.dashboard}/api/jobs/{job_id}", ray_head.token)
    assert status == 200, body
    job = json.loads(body)
    assert job["status"] == "SUCCEEDED", job
    # nothing installed at job start: the uploaded checkout and env_vars only
    assert set(job["runtime_env"]) <= {"working_dir", "excludes", "env_vars"}, job["runtime_env"]
    assert job["runtime_env"]["working_dir"].startswith("gcs://")  # the uploaded checkout
    logs = _get(f"{ray_head.dashboard}/api/jobs/{job_id}/logs", ray_head.token)[1]
    n = len(build.records)
    assert re.search(rf"{n} of {n} models scanned \(0 already scored\), 0 with errors", logs), logs

    scores = read_table(str(out), "scores")
    assert sorted(scores["model_id"]) == sorted(r.model_id for r in build.records)
    assert (scores["detector"] == "mmbd").all() and (scores["status"] == "ok").all()
    assert scores["score"].notna().all()
    print(f"job {job_id}: {n} models in {time.monotonic() - started:.0f} s")
