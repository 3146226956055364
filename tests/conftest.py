"""Shared fixtures: a fresh cache, a real local Ray shared by the test modules, small Parquet files.
Everything else the tests share is in :mod:`tests.helpers`."""

from __future__ import annotations

import os

from netloupe.pipeline.ray_cluster import local_ray_environment, start_local_ray

# Before anything imports ray: token auth on, every Ray process on 127.0.0.1.
local_ray_environment()

import pyarrow.parquet as pq
import pytest

from tests.helpers import image_table, stop_processes_of, tabular_table


@pytest.fixture(scope="session", autouse=True)
def netloupe_cache(tmp_path_factory):
    """Built-in datasets and zoo weights go to a fresh cache, as on a new machine."""
    cache = os.environ.get("NETLOUPE_TEST_CACHE") or str(tmp_path_factory.mktemp("netloupe-cache"))
    os.environ["NETLOUPE_CACHE"] = cache
    return cache


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for the test module: started by the first module that asks (start-up
    costs seconds, twenty modules ask) and left running for the next, stopped at the end."""
    import ray

    if not ray.is_initialized():
        # As the driver starts one: a cluster of its own even when `ray start` runs here.
        start_local_ray(log_to_driver=False, configure_logging=False)
    yield ray


@pytest.fixture(scope="module")
def fresh_ray_local():
    """A local Ray started anew for the test module, after the module's fixtures have set the
    environment its workers need (they inherit the environment of the Ray that starts them:
    an object store's credentials, say); stopped after it."""
    import ray

    ray.shutdown()
    start_local_ray(log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()  # its workers keep the module's environment: not for the next modules


@pytest.fixture(scope="session", autouse=True)
def stop_local_ray_at_the_end():
    yield
    import ray

    ray.shutdown()


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


@pytest.fixture
def stop_afterwards():
    """A list of private directories (:func:`tests.helpers.private_ray_dir`): when the test
    ends, however it ends, the processes naming them are stopped and the directories removed."""
    import shutil

    markers = []
    yield markers
    for marker in markers:
        stop_processes_of(marker)
        shutil.rmtree(marker, ignore_errors=True)
