"""Shared fixtures: a real local Ray per test module, small Parquet datasets, spec builders."""

from __future__ import annotations

import os

from netloupe.pipeline.ray_cluster import local_ray_environment, start_local_ray

# Before anything imports ray: token auth on, every Ray process on 127.0.0.1.
local_ray_environment()

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from netloupe.contract.spec import parse_spec


@pytest.fixture(scope="session", autouse=True)
def netloupe_cache(tmp_path_factory):
    """Built-in datasets and zoo weights go to a fresh cache, as on a new machine."""
    cache = os.environ.get("NETLOUPE_TEST_CACHE") or str(tmp_path_factory.mktemp("netloupe-cache"))
    os.environ["NETLOUPE_CACHE"] = cache
    return cache


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray cluster for the whole test module (start-up costs seconds)."""
    import ray

    # As the driver starts one: a cluster of its own even when `ray start` runs here.
    start_local_ray(log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def tabular_table(n: int = 50, seed: int = 0) -> pa.Table:
    """Three numeric features, an integer id, a label and a categorical metadata column."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return pa.table({
        "row_id": pa.array(np.arange(1000, 1000 + n, dtype=np.int64)),
        "x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2],
        "label": pa.array(rng.integers(0, 2, n).astype(np.int64)),
        "group": pa.array(np.where(np.arange(n) % 3 == 0, "a", "b").astype(object)),
    })


def image_table(n: int = 40, seed: int = 0) -> pa.Table:
    """1×4×4 float images in a list column, string ids, labels."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, size=(n, 16)).astype(np.float32)
    return pa.table({
        "key": pa.array([f"img-{i:03d}" for i in range(n)]),
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 16),
        "label": pa.array(rng.integers(0, 2, n).astype(np.int64)),
    })


@pytest.fixture
def tabular_parquet(tmp_path):
    path = tmp_path / "tabular.parquet"
    pq.write_table(tabular_table(), path)
    return path


@pytest.fixture
def image_parquet(tmp_path):
    path = tmp_path / "images.parquet"
    pq.write_table(image_table(), path)
    return path


def tabular_spec_data(data_path, out_root, **changes) -> dict:
    """A spec for :func:`tests.tiny_models.linear` over :func:`tabular_table`."""
    data = {
        "model": {"factory": "tests.tiny_models:linear"},
        "dataset": {"source": str(data_path), "feature_columns": ["x0", "x1", "x2"],
                    "id_column": "row_id", "metadata_columns": ["group"]},
        "layers": [{"name": "fc"}],
        "attributions": [{"method": "saliency"}],
        "execution": {"batch_size": 16, "num_workers": 1},
        "output": {"root": str(out_root), "run_name": "t"},
    }
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def tabular_spec(data_path, out_root, **changes):
    return parse_spec(tabular_spec_data(data_path, out_root, **changes))


def slow_run_spec(data_path, out_root, tmp_path) -> "Path":
    """A spec file for a run of 160 rows in 10 batches slow enough (0.3 s each) to kill mid-way."""
    import yaml

    pq.write_table(tabular_table(160), data_path)
    data = tabular_spec_data(data_path, out_root,
                             model={"factory": "tests.tiny_models:slow_linear", "kwargs": {"delay": 0.3}},
                             execution={"batch_size": 16, "num_workers": 1, "threads_per_worker": 1,
                                        "chunk_rows": 64})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    return spec_path


def kill_driver_mid_run(spec_path, finished_batches, at_least: int = 3, timeout: float = 240) -> None:
    """Run ``netloupe run spec_path`` in a process and SIGKILL it, with its local Ray, once
    ``finished_batches()`` counts ``at_least`` batches."""
    import signal
    import subprocess
    import sys
    import time

    # The driver in a session of its own, so that killing its group takes its local Ray too.
    driver = subprocess.Popen([sys.executable, "-m", "netloupe.pipeline.cli", "run", str(spec_path), "--no-progress"],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while finished_batches() < at_least:
            assert driver.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no batch finished in time"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
