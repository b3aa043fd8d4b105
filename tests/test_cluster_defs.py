"""The cluster definitions parse and carry the fields Ray's launcher and KubeRay require; the
cluster image (cluster/Dockerfile) holds every path their commands name, and runs the Ray
version they declare. (tests/test_cluster_job.py submits the documented job to a real head.)"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
JOBS = REPO / "jobs"
KUBE = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "nightly-cronjob.yaml")


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
    # nothing installed when a job starts (no network needed): the image has the dependencies
    assert set(doc) <= {"working_dir", "excludes", "env_vars"}
    assert doc["working_dir"] == "."
    # the nodes' own object-storage settings must reach the driver unchanged
    assert not {k for k in doc.get("env_vars", {}) if k.startswith(("AWS_", "XRAY_S3"))}


def _dockerfile() -> tuple[str, list[str]]:
    """(WORKDIR, sources COPY'd under it) of cluster/Dockerfile."""
    workdir, sources = None, []
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["WORKDIR"]:
            workdir = words[1]
        elif words[:1] == ["COPY"] and not any(w.startswith("--") for w in words):
            *srcs, dest = words[1:]
            if dest in ("./", "."):
                sources += srcs
            else:
                assert len(srcs) == 1 and dest.rstrip("/") == "./" + srcs[0].rstrip("/"), line
                sources.append(srcs[0].rstrip("/"))
    assert workdir, "cluster/Dockerfile has no WORKDIR"
    return workdir, sources


def _commands() -> dict[str, tuple[str, list[str]]]:
    """Where each job-running definition runs its command -> (that directory, argv)."""
    job = _load("kuberay-rayjob.yaml")["spec"]
    cron = _load("nightly-cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [submit] = cron["containers"]
    return {
        "RayJob": (yaml.safe_load(job["runtimeEnvYAML"])["working_dir"],
                   shlex.split(job["entrypoint"])),
        "CronJob": (submit["workingDir"], [*submit["command"], *submit["args"]]),
    }


def _repo_paths(argv: list[str]) -> list[str]:
    """The arguments (or --option=values) that name a file of this repository."""
    values = [a.split("=", 1)[-1] for a in argv]
    return [v for v in values if "/" in v and "://" not in v and not v.startswith("/")
            and (REPO / v.split("/")[0]).exists()]


def test_the_image_holds_what_the_jobs_run():
    workdir, copied = _dockerfile()
    for where, (cwd, argv) in _commands().items():
        assert cwd == workdir, f"{where} runs in {cwd}, the image's code is in {workdir}"
        paths = _repo_paths(argv)
        assert any(p.startswith("jobs/") for p in paths), (where, argv)
        for path in paths:
            assert (REPO / path).exists(), f"{where} names {path}, not in the repository"
            assert any(path == c or path.startswith(c + "/") for c in copied), \
                f"{where} names {path}; cluster/Dockerfile does not copy it"
    for name in KUBE:  # every Ray container runs the cluster image
        images = re.findall(r"image: (\S+)", (CLUSTER / name).read_text())
        assert images and all(i.split("/")[-1].startswith("xray-cluster:") for i in images), name


def test_ray_is_pinned_to_the_clusters_ray_version():
    import ray
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [ray_req] = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    versions = {_load("kuberay-raycluster.yaml")["spec"]["rayVersion"],
                _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"]}
    [version] = versions
    major, minor, _ = version.split(".")
    assert ray_req.specifier.contains(version), (str(ray_req), version)
    assert not ray_req.specifier.contains(f"{major}.{int(minor) + 1}.0"), str(ray_req)
    assert not ray_req.specifier.contains(f"{major}.{int(minor) - 1}.0"), str(ray_req)
    assert ray_req.specifier.contains(ray.__version__), "this environment runs another Ray"


def test_token_authentication_is_configured():
    """Ray 2.60 refuses clients without the cluster's token; KubeRay makes and shares it."""
    cluster = _load("kuberay-raycluster.yaml")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    job = _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]
    assert job["authOptions"]["mode"] == "token"
    cron = _load("nightly-cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in cron["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": cluster["metadata"]["name"], "key": "auth_token"}


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.py")))
def test_job_entrypoints_answer_help(job):
    result = subprocess.run([sys.executable, str(JOBS / job), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout or "--help" in result.stdout
