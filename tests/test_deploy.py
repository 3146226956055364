"""The deployment files parse, name the image and the entrypoint, and give the job spec they
carry the GPUs, CPUs, storage and token authentication it needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from netloupe.contract.spec import load_spec, parse_spec

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROOT = DEPLOY.parent
IMAGE = "netloupe:cuda"
SPEC_FILE = DEPLOY / "jobs" / "mnist-cluster.yaml"


def documents(path: Path) -> dict:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text())}


def quantity(value) -> float:
    return float(str(value))


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC_FILE)


def cluster_specs():
    """(name, RayCluster spec) of every KubeRay manifest."""
    return [("raycluster", documents(DEPLOY / "kuberay" / "raycluster.yaml")["RayCluster"]["spec"]),
            ("rayjob", documents(DEPLOY / "kuberay" / "rayjob.yaml")["RayJob"]["spec"]["rayClusterSpec"])]


def containers(cluster: dict) -> list[dict]:
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_the_spec_the_manifests_carry_is_valid_and_writes_to_shared_storage(spec):
    assert spec.output.root.startswith("/shared/")
    assert spec.execution.gpus_per_worker >= 1 and spec.execution.num_workers >= 2
    carried = documents(DEPLOY / "kuberay" / "rayjob.yaml")["ConfigMap"]["data"]["job.yaml"]
    assert parse_spec(yaml.safe_load(carried)) == spec  # the ConfigMap is the spec file


@pytest.mark.parametrize("name, cluster", cluster_specs())
def test_kuberay_clusters_run_the_image_with_token_auth_and_shared_storage(name, cluster):
    for container in containers(cluster):
        assert container["image"] == IMAGE, name
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "netloupe-ray-token"
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]


@pytest.mark.parametrize("name, cluster", cluster_specs())
def test_kuberay_worker_groups_fit_the_spec(name, cluster, spec):
    execution = spec.execution
    placed = started = 0
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus = quantity(limits["nvidia.com/gpu"])
        # Ray is told exactly what the pod got, and the pod fits at least one worker.
        assert quantity(group["rayStartParams"]["num-gpus"]) == gpus
        assert quantity(group["rayStartParams"]["num-cpus"]) == quantity(limits["cpu"])
        assert gpus >= execution.gpus_per_worker and quantity(limits["cpu"]) >= execution.cpus_per_worker
        per_pod = min(gpus // execution.gpus_per_worker, quantity(limits["cpu"]) // execution.cpus_per_worker)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        placed += per_pod * group["maxReplicas"]
        started += per_pod * group["minReplicas"]
    # The driver checks that num_workers fit the cluster as it is; the pool grows to max_workers.
    assert started >= execution.num_workers, f"{name}: room for {started} workers at start"
    assert placed >= (execution.max_workers or execution.num_workers), f"{name}: room for {placed} at most"


def test_the_rayjob_runs_netloupe_on_the_spec_it_mounts():
    docs = documents(DEPLOY / "kuberay" / "rayjob.yaml")
    job = docs["RayJob"]["spec"]
    assert job["entrypoint"].startswith("netloupe run /etc/netloupe/job.yaml")
    assert "execution.ray_address=auto" in job["entrypoint"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert mounts["job"] == "/etc/netloupe"
    assert volumes["job"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert job["submitterPodTemplate"]["spec"]["containers"][0]["image"] == IMAGE


def test_the_cluster_launcher_config_fits_the_spec(spec):
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    assert config["docker"]["image"] == IMAGE
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "-v /shared:/shared" in config["docker"]["run_options"]
    worker = config["available_node_types"]["gpu_worker"]
    gpus, cpus = worker["resources"]["GPU"], worker["resources"]["CPU"]
    execution = spec.execution
    per_node = min(gpus // execution.gpus_per_worker, cpus // execution.cpus_per_worker)
    assert per_node >= 1 and per_node * worker["min_workers"] >= execution.num_workers
    assert per_node * worker["max_workers"] >= (execution.max_workers or execution.num_workers)
    assert worker["max_workers"] <= config["max_workers"]
    assert all("RAY_AUTH_MODE=token" in command for command in
               config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:])


def test_the_dockerfile_builds_both_variants_with_the_pinned_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "cpu)" in text and "cuda)" in text
    pinned = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pinned)}$", text, re.M)
    # Every package the project installs is copied into the image.
    import tomllib

    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for folder in folders:
        assert f"COPY {folder} ./{folder}" in text, folder
    assert "ENV RAY_AUTH_MODE=token" in text


def test_the_rayjob_is_generated_from_the_cluster_and_the_job_spec():
    """rayjob.yaml copies neither by hand: it is rendered from raycluster.yaml and the spec."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(DEPLOY / "render_rayjob.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job_cluster = documents(DEPLOY / "kuberay" / "rayjob.yaml")["RayJob"]["spec"]["rayClusterSpec"]
    cluster = documents(DEPLOY / "kuberay" / "raycluster.yaml")["RayCluster"]["spec"]
    assert job_cluster["workerGroupSpecs"] == cluster["workerGroupSpecs"]
