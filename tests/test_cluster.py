"""Cluster behaviour on a simulated two-node Ray cluster (ray.cluster_utils.Cluster), and fault
tolerance: a worker killed mid-scan, a model past its time limit (the driver killed and re-run:
test_resume.py)."""
import os
import signal
import pytest
import ray
from ray.cluster_utils import Cluster

from xray.config import parse_config
from xray.results.sink import read_table
from xray.results.schema import SCORE_KEY
from xray.runner import run_scan
from xray.runner.scan_run import ScanActor

# Enough work per model (~1 s on one core) that a kill lands while models are in flight.
CONFIG = parse_config({"seed": 0, "detectors": {"modelxray": {
    "params": {"num_planes": 6, "resolution": 48}}}})


@pytest.fixture(scope="module")
def two_nodes():
    """Head node with 1 CPU, second node with 1 CPU and 1 (logical) GPU."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _gpu_node(cluster):
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))


def test_gpu_actor_lands_on_the_gpu_node(two_nodes):
    actor = ScanActor.options(num_cpus=0, num_gpus=1).remote(CONFIG, 1)
    where = ray.get(actor.where.remote())
    assert where["node"] == _gpu_node(two_nodes)
    assert len(where["gpus"]) == 1
    ray.kill(actor)


def test_scan_spreads_over_both_nodes(two_nodes, tiny_round, tmp_path):
    round_dir, _ = tiny_round
    summary = run_scan(str(round_dir / "manifest.csv"), str(tmp_path / "out"), CONFIG,
                       num_cpus_per_actor=1, show_progress=False)
    scores = read_table(str(tmp_path / "out"), "scores")
    assert summary.models_scanned == len(scores) and (scores["status"] == "ok").all()
    nodes = {w.split(":")[0] for w in scores["worker"]}
    assert len(nodes) == 2, f"all models ran on {nodes}"


def _one_row_per_key(scores):
    assert not scores.duplicated(SCORE_KEY).any()


def _kill_once(killed: list[int]):
    """An on_result callback that SIGKILLs the worker of the first result it sees: that actor
    is then busy with its next model. The pid goes into `killed`."""
    def kill(result):
        if not killed:
            pid = int(result["scores"][0]["worker"].split(":")[-1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return kill


def _first_models(round_dir, tmp_path, n: int) -> str:
    """A manifest of the round's first n models, URIs made absolute (they are relative to the
    round's own manifest)."""
    import pandas as pd

    manifest = tmp_path / f"first-{n}.csv"
    rows = pd.read_csv(round_dir / "manifest.csv").head(n)
    for column in ("uri", "examples_uri"):
        rows[column] = [str(round_dir / v) for v in rows[column]]
    rows.to_csv(manifest, index=False)
    return str(manifest)


def test_killed_worker_loses_and_duplicates_nothing(two_nodes, tiny_round, tmp_path):
    round_dir, _ = tiny_round
    killed: list[int] = []
    kill_a_worker = _kill_once(killed)

    out = str(tmp_path / "out")
    summary = run_scan(str(round_dir / "manifest.csv"), out, CONFIG, num_cpus_per_actor=1,
                       show_progress=False, on_result=kill_a_worker)
    assert killed
    raw = read_table(out, "scores", dedupe=False)
    n_models = summary.models_total
    assert len(raw) == n_models, "a model was lost or written twice"
    _one_row_per_key(raw)
    assert (raw["status"] == "ok").all()


def test_time_limit_gives_timeout_rows(two_nodes, tiny_round, tmp_path):
    round_dir, _ = tiny_round
    slow = parse_config({"seed": 0, "model_time_limit_s": 0.5, "detectors": {"modelxray": {
        "params": {"num_planes": 40, "resolution": 100}}}})
    out = str(tmp_path / "out")
    # two models: each timeout restarts the actor, and the next model waits for it
    summary = run_scan(_first_models(round_dir, tmp_path, 2), out, slow, num_actors=1,
                       show_progress=False)
    scores = read_table(out, "scores", dedupe=False)
    assert len(scores) == summary.models_total
    _one_row_per_key(scores)
    assert (scores["status"] == "timeout").all()
    assert scores["error"].str.contains("time limit").all()


def test_time_limit_reaches_detectors_and_counts_from_the_actors_start(two_nodes, tiny_round,
                                                                      tmp_path):
    """The runner's per-model time limit is the detectors' ctx.deadline (less a stop margin):
    an NC with a budget far past the limit stops at it with what it has (an ok row that says
    stopped_early, with its steps) instead of being killed into a timeout row. And with one
    actor, killed while it works on the second model, the retried model and the third wait for
    the actor's restart (a new process imports torch and builds the detectors), which is not
    charged to them: each NC still stops at its own deadline (limit 5 s less the margin,
    counted from its start); charged from the hand-over, the restart pushed them past the limit
    into timeout rows. (Limit 5 s: NC stops 1 s before it, so the three models cost ~12 s.)"""
    import json

    round_dir, _ = tiny_round
    manifest = _first_models(round_dir, tmp_path, 3)
    limited = parse_config({"seed": 0, "model_time_limit_s": 5.0, "detectors": {"nc": {
        "params": {"steps": 100000, "early_stop_patience": 100000}}}})
    killed: list[int] = []

    out = str(tmp_path / "out")
    run_scan(manifest, out, limited, num_actors=1, show_progress=False,
             on_result=_kill_once(killed))
    assert killed
    scores = read_table(out, "scores", dedupe=False)
    assert len(scores) == 3 and (scores["status"] == "ok").all(), scores["error"].tolist()
    assert len(set(scores["worker"])) == 2  # the first model before the kill, two after
    for stats in map(json.loads, scores["stats_json"]):
        assert stats["stopped_early"] is True and stats["steps"] > 0
    assert (scores["seconds"] < 5.0).all()
