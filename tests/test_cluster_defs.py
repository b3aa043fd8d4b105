"""The cluster definitions parse and carry the fields Ray's launcher and KubeRay require."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
JOBS = CLUSTER.parent / "jobs"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _check_pod_template(template, where):
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: container without name/image"


def _check_ray_cluster_spec(spec, where):
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    _check_pod_template(head["template"], f"{where}.headGroupSpec")
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _check_pod_template(g["template"], f"{where}.{g['groupName']}")
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups
                  for c in g["template"]["spec"]["containers"]]
    assert any(gpu_limits), f"{where}: no worker group asks for GPUs"


def test_kuberay_raycluster():
    doc = _load("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"], "RayCluster")


def test_kuberay_rayjob():
    doc = _load("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert "jobs/score_round.py" in spec["entrypoint"]
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")


def test_cluster_launcher():
    doc = _load("ray-cluster-gpu.yaml")
    for key in ("cluster_name", "max_workers", "provider", "available_node_types",
                "head_node_type"):
        assert key in doc, key
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["provider"]["type"]
    assert any(t.get("resources", {}).get("GPU") for t in doc["available_node_types"].values())
    for node_type in doc["available_node_types"].values():
        assert "node_config" in node_type and "resources" in node_type


def test_runtime_env_keys_are_ray_runtime_env_fields():
    doc = _load("runtime_env.yaml")
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**{k: v for k, v in doc.items() if k != "working_dir"})
    assert set(doc) <= {"working_dir", "pip", "env_vars", "py_modules", "conda"}


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.py")))
def test_job_entrypoints_answer_help(job):
    result = subprocess.run([sys.executable, str(JOBS / job), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout or "--help" in result.stdout
