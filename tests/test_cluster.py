"""Cluster submission with real processes on loopback: a head started by ``ray start --head``
declaring two logical GPUs, a second node joined by ``ray start --address …`` with two more,
token authentication on, and jobs submitted over HTTP by ``netloupe submit`` / ``jobs``.

The job's working directory is a fresh directory holding the spec and a model module; the
data (eight Parquet files: eight blocks, so that every worker gets some) and the run are in
directories both nodes share.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from netloupe.pipeline.ray_cluster import LOCAL_RAY_ENVIRONMENT
from netloupe.storage.layout import RunLayout
from tests.helpers import (
    free_port,
    private_ray_dir,
    processes_of,
    stop_processes_of,
    tabular_spec_data,
    tabular_table,
    wait_until,
)

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARTS, ROWS_PER_PART = 8, 2000  # ~12 blocks of 64 KiB: work for every worker

# `ray start --address` refuses to join a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# and with it =1 the new node's services listen on every interface and it rewrites
# 127.0.0.1 to the machine's address. The joining `ray start` runs with those two checks
# lifted in its own process only; the node it starts keeps =0, so every listener stays on
# 127.0.0.1 (checked below).
JOIN = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv = ["ray"] + sys.argv[1:]
main()
"""

MODEL = """
import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 0.5, 2.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x)


def linear():
    return Linear()
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on 127.0.0.1 (2 logical GPUs each), token auth on; the job server's URL."""
    env = {**os.environ, **LOCAL_RAY_ENVIRONMENT, "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    ray = [str(BIN / "ray")]
    # Every process of this cluster names this fresh directory: the teardown stops those, and
    # only those (stopping Ray wholesale would take a user's own runs on this machine with it).
    ray_dir = private_ray_dir()
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--num-gpus=2", f"--temp-dir={ray_dir}"]
    # Ports of its own too: Ray's defaults (10001, and 52365 for each node's agent, which serves
    # the job API) may be held by another Ray on this machine, a user's local run say.
    subprocess.run(ray + ["start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                          f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                          f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=3", *common],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        subprocess.run([sys.executable, "-c", JOIN, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                        f"--dashboard-agent-listen-port={free_port()}", *common],
                       env=env, check=True, capture_output=True, timeout=180)

        def both_nodes() -> bool:
            status = subprocess.run(ray + ["status", f"--address=127.0.0.1:{gcs}"], env=env,
                                    capture_output=True, text=True, timeout=60).stdout
            return status.count(" node_") >= 2

        wait_until(both_nodes, 60, "the second node to join", interval=1)
        yield {"url": f"http://127.0.0.1:{dashboard}", "env": env, "gcs": gcs, "ray_dir": ray_dir}
    finally:
        stop_processes_of(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """A job's working directory (spec, model module) and the shared storage: the data in
    eight files, and where runs go."""
    directory = tmp_path_factory.mktemp("job")
    (directory / "cluster_model.py").write_text(MODEL)
    data = tmp_path_factory.mktemp("shared-data")
    table = tabular_table(PARTS * ROWS_PER_PART, seed=3)
    for i in range(PARTS):
        pq.write_table(table.slice(i * ROWS_PER_PART, ROWS_PER_PART), data / f"part-{i}.parquet")
    shared = tmp_path_factory.mktemp("shared-runs")
    spec = tabular_spec_data(str(data), shared, model={"factory": "cluster_model:linear"},
                             execution__num_workers=4, execution__gpus_per_worker=1,
                             execution__cpus_per_worker=0.5, execution__threads_per_worker=1,
                             execution__batch_size=500, output__run_name="on-cluster")
    (directory / "job.yaml").write_text(yaml.safe_dump(spec))
    spec["layers"] = [{"name": "fc_typo"}]
    spec["output"]["run_name"] = "never"
    (directory / "wrong-layer.yaml").write_text(yaml.safe_dump(spec))
    return directory, shared


def netloupe(cluster, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "netloupe"), *args], env=cluster["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def submission_id(out: str) -> str:
    return out.split("submitted ", 1)[1].split(";", 1)[0]


def test_a_job_spreads_over_both_nodes_and_every_instance_lands_once(cluster, job_dir):
    directory, shared = job_dir
    done = netloupe(cluster, "submit", str(directory / "job.yaml"), "--address", cluster["url"], "--wait")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = submission_id(done.stdout)
    assert "run 'on-cluster' committed" in done.stdout and f"job {job}: SUCCEEDED" in done.stdout

    listed = netloupe(cluster, "jobs", "list", "--address", cluster["url"])
    assert any(line.startswith(job) and "SUCCEEDED" in line for line in listed.stdout.splitlines()), listed.stdout
    status = netloupe(cluster, "jobs", "status", job, "--address", cluster["url"])
    assert status.stdout.startswith(f"{job}: SUCCEEDED")
    logs = netloupe(cluster, "jobs", "logs", job, "--address", cluster["url"])
    assert "run 'on-cluster' committed" in logs.stdout
    # A job's log is not a terminal: the run's own stage lines, not Ray Data's reports.
    assert "] explaining " in logs.stdout and "logging_progress" not in logs.stdout

    run = shared / "on-cluster"
    instances = pads.dataset(run / "instances").to_table(columns=["instance_id", "node_id", "device"])
    ids = instances["instance_id"].to_pylist()
    assert sorted(ids) == list(range(1000, 1000 + PARTS * ROWS_PER_PART))  # every instance, once
    manifest = RunLayout(run).read_manifest()
    assert len(set(instances["node_id"].to_pylist())) == 2, manifest.workers  # both nodes produced rows
    manifest = RunLayout(run).read_manifest()
    workers = [(worker.node_id, worker.gpu_ids) for worker in manifest.workers]
    assert {node for node, _ in workers} == set(instances["node_id"].to_pylist())
    # Each GPU-requesting worker got a GPU of its own: no (node, GPU id) pair twice.
    assert all(gpus != "" for _, gpus in workers) and len(set(workers)) == len(workers)


def test_a_job_with_a_wrong_layer_fails_with_the_clear_error_in_its_logs(cluster, job_dir):
    directory, shared = job_dir
    done = netloupe(cluster, "submit", str(directory / "wrong-layer.yaml"), "--address", cluster["url"], "--wait")
    assert done.returncode == 1
    job = submission_id(done.stdout)
    status = netloupe(cluster, "jobs", "status", job, "--address", cluster["url"])
    assert status.stdout.startswith(f"{job}: FAILED")
    logs = netloupe(cluster, "jobs", "logs", job, "--address", cluster["url"]).stdout
    assert "fc_typo" in logs and "'fc'" in logs, logs[-2000:]
    assert not (shared / "never").exists()


def test_a_job_can_be_stopped(cluster, job_dir):
    directory, _shared = job_dir
    started = netloupe(cluster, "submit", str(directory / "job.yaml"), "--address", cluster["url"],
                       "--set", "output.run_name=stopped")
    job = submission_id(started.stdout)
    stopped = netloupe(cluster, "jobs", "stop", job, "--address", cluster["url"])
    assert stopped.returncode == 0 and job in stopped.stdout
    wait_until(lambda: "STOPPED" in netloupe(cluster, "jobs", "status", job, "--address", cluster["url"]).stdout,
               120, f"job {job} to stop", interval=1)


def test_every_listener_of_the_cluster_is_on_loopback(cluster):
    """Every process of this cluster (they all name its directory) listens on 127.0.0.1 only."""
    import psutil

    ours = {p.pid for p in processes_of(cluster["ray_dir"])}
    ours |= {child.pid for pid in list(ours) if psutil.pid_exists(pid)
             for child in psutil.Process(pid).children(recursive=True)}
    listening = [(c.pid, c.laddr) for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert len(listening) >= 4, listening  # GCS, dashboard, raylets, agents...
    exposed = [(pid, address) for pid, address in listening if address.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert exposed == [], exposed
