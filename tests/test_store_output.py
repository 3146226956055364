"""Runs written to an object store through a pyarrow filesystem URI.

The store is a real S3 server (moto's, speaking the S3 HTTP API) on 127.0.0.1, reached by
pyarrow's own S3 client exactly as a bucket in the cloud would be; ``gs://`` goes through
the same code (pyarrow's GcsFileSystem behind the same interface).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import netloupe
from netloupe.pipeline.cli import main
from netloupe.pipeline.driver import run_job
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.layout import RunExistsError, RunStaging, worker_layout, write_part
from netloupe.storage.location import MANIFEST, cached_run_dir, local_run_dir
from netloupe.storage.reader import RunReader
from tests.helpers import free_port, tabular_spec, tabular_table, wait_until

pytestmark = pytest.mark.store

BUCKET = "netloupe-test"


@pytest.fixture(scope="module")
def s3_root(tmp_path_factory):
    """``s3://netloupe-test/runs?...`` on a moto S3 server on loopback, credentials in the
    environment before Ray starts (so the workers have them, as on a cluster)."""
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "netloupe", "AWS_SECRET_ACCESS_KEY": "netloupe-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            assert server.poll() is None, "the moto S3 server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, 60, "the moto S3 server to listen", interval=0.2)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        filesystem, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?{query}&allow_bucket_creation=true")
        filesystem.create_dir(BUCKET)
        yield f"s3://{BUCKET}/runs?{query}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def store_env(s3_root, tmp_path_factory):
    """A local cache of this module's own, so each test sees what it downloaded."""
    saved = os.environ.get("NETLOUPE_CACHE")
    os.environ["NETLOUPE_CACHE"] = str(tmp_path_factory.mktemp("store-cache"))
    yield s3_root
    os.environ["NETLOUPE_CACHE"] = saved


@pytest.fixture(scope="module")
def ray_store(store_env, fresh_ray_local):
    return store_env


def _objects(root_uri: str) -> list[str]:
    filesystem, path = pafs.FileSystem.from_uri(root_uri)
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


def _uri(root: str, *parts: str) -> str:
    base, _, query = root.partition("?")
    return "/".join([base, *parts]) + "?" + query


def test_run_to_s3_is_published_whole_and_equals_a_local_run(ray_store, tmp_path):
    pq.write_table(tabular_table(60), tmp_path / "data.parquet")
    changes = dict(attributions=[{"method": "saliency"}, {"method": "integrated_gradients", "params": {"n_steps": 8}}],
                   execution={"batch_size": 16, "num_workers": 2, "threads_per_worker": 1})
    stored = run_job(tabular_spec(tmp_path / "data.parquet", ray_store, output__run_name="s3run", **changes))
    local = run_job(tabular_spec(tmp_path / "data.parquet", tmp_path / "runs", output__run_name="s3run", **changes))

    assert stored.location == _uri(ray_store, "s3run")
    objects = _objects(ray_store)
    # Everything is under the run (no staging prefix left), the manifest and catalog included,
    # and the run holds the same files as the local run of the same spec.
    assert all(o.startswith("s3run/") for o in objects), objects
    local_files = sorted(p.relative_to(local.layout.root).as_posix() for p in local.layout.root.rglob("*")
                         if p.is_file())
    assert [o[len("s3run/"):] for o in objects] == local_files
    assert {MANIFEST, "catalog.duckdb"} <= set(local_files)
    # The driver's work directory is gone: what it held became the start of the read cache.
    assert not any((stored.layout.root.parents[2] / "work").iterdir())
    assert stored.layout.root == cached_run_dir(stored.location)
    # The driver never held the bulk: its views bound to empty parts with a part's columns,
    # gone before publishing; the parts went from the staging to the run inside the store.
    held = stored.layout.root
    for table in ("activations/fc", "wide/fc", "attributions/saliency", "attributions/integrated_gradients"):
        assert not list((held / table).glob("part-*")) and any(o.startswith(f"s3run/{table}/part-") for o in objects)
    assert not (held / "index" / "layers").exists()
    # The statistics were added up where the workers wrote them, as they arrived.
    assert not (held / "stats").exists() and "statistics" not in stored.manifest.timings["catalog"]

    # Read back from the store into a fresh cache: the same rows as the local run.
    os.environ["NETLOUPE_CACHE"] = str(tmp_path / "reader-cache")
    fetched = local_run_dir(stored.location)
    assert fetched.is_relative_to(tmp_path / "reader-cache")
    remote, here = RunReader(fetched), RunReader(local.layout.root)
    assert remote.instances().drop_columns(["node_id"]).equals(here.instances().drop_columns(["node_id"]))
    for method in ("saliency", "integrated_gradients"):
        assert remote.attributions(method).equals(here.attributions(method))
    assert remote._read(remote.layout.projections_dir("activations", "fc"), ["instance_id"]).equals(
        here._read(here.layout.projections_dir("activations", "fc"), ["instance_id"]))
    query = "SELECT label, count(*) AS n, avg(confidence) AS c FROM instances GROUP BY 1 ORDER BY 1"
    assert run_query(open_catalog(fetched), query).equals(run_query(open_catalog(local.layout.root), query))
    # The views read the parts published from the store, not the driver's empty stand-ins.
    wide = "SELECT * FROM activations_fc ORDER BY instance_id"
    got = run_query(open_catalog(fetched), wide)
    assert got.num_rows == 60 and got.equals(run_query(open_catalog(local.layout.root), wide))
    # The Python API opens the run by its URI, as a notebook would.
    assert netloupe.open_run(stored.location).sql(query).equals(netloupe.open_run(local.location).sql(query))
    # A second open reuses the cache (same manifest): nothing is downloaded again.
    before = (fetched / "catalog.duckdb").stat().st_mtime_ns
    assert local_run_dir(stored.location) == fetched
    assert (fetched / "catalog.duckdb").stat().st_mtime_ns == before


def test_existing_run_in_the_store_needs_force_and_is_replaced_whole(ray_store, tmp_path, capsys):
    pq.write_table(tabular_table(20), tmp_path / "a.parquet")
    pq.write_table(tabular_table(30, seed=1), tmp_path / "b.parquet")
    spec = tabular_spec(tmp_path / "a.parquet", ray_store, output__run_name="again")
    run_job(spec)
    with pytest.raises(RunExistsError, match="already exists.*--force"):
        run_job(spec)
    os.environ["NETLOUPE_CACHE"] = str(tmp_path / "cache")
    first = local_run_dir(_uri(ray_store, "again"))
    assert RunReader(first).instances().num_rows == 20

    run_job(tabular_spec(tmp_path / "b.parquet", ray_store, output__run_name="again"), force=True)
    assert [o for o in _objects(ray_store) if o.startswith(".staging")] == []
    # The CLI reads the replaced run: the cache notices the new manifest and downloads again.
    assert main(["sql", _uri(ray_store, "again"), "SELECT count(*) AS n FROM instances", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "30"
    # Only the new run's parts are in the store (the old run's were removed, not mixed in).
    filesystem, path = pafs.FileSystem.from_uri(_uri(ray_store, "again", "instances"))
    rows = sum(pq.read_metadata(f"{path}/{name}", filesystem=filesystem).num_rows
               for name in (o.rsplit("/", 1)[-1] for o in _objects(ray_store) if o.startswith("again/instances/")))
    assert rows == 30


def test_an_aborted_run_leaves_nothing_in_the_store(store_env, tmp_path):
    staging = RunStaging.open(store_env, "aborted")
    layout = staging.create()
    worker, filesystem = worker_layout(staging.worker_root)
    write_part(worker.instances_dir, "k1", pa.table({"instance_id": [1, 2]}), filesystem)
    assert staging.pull("instances") > 0
    assert pq.read_table(layout.instances_dir / "part-k1.parquet")["instance_id"].to_pylist() == [1, 2]
    assert [o for o in _objects(store_env) if o.startswith(".staging/aborted-")] != []
    staging.abort()
    assert [o for o in _objects(store_env) if "aborted" in o] == []
    assert not layout.root.exists()


def test_a_store_run_publishes_each_table_s_listed_parts_only(store_env):
    # A wide table's parts are the part pass's segments (named after their first batch): a
    # file named after another batch there is a late write of an interrupted attempt's task.
    staging = RunStaging.open(store_env, "listed")
    layout = staging.create()
    worker, filesystem = worker_layout(staging.worker_root)
    for key in ("k1", "k2"):
        write_part(worker.instances_dir, key, pa.table({"instance_id": [1, 2]}), filesystem)
        write_part(worker.wide_activations_dir("fc"), key, pa.table({"instance_id": [1, 2]}), filesystem)
    staging.remove_unlisted_parts([layout.instances_dir], {"k1", "k2"})
    staging.remove_unlisted_parts([layout.wide_activations_dir("fc")], {"k1"})
    assert sorted(staging._published_parts()) == [
        "instances/part-k1.parquet", "instances/part-k2.parquet", "wide/fc/part-k1.parquet"]
    staging.abort()


def test_a_text_run_to_the_store_is_published_whole(ray_store, tmp_path):
    """A text run's tokens table and token views work from the store as from local disk."""
    from netloupe.contract.spec import parse_spec
    from tests.helpers import text_table, tiny_bert_checkpoint

    pq.write_table(text_table(), tmp_path / "texts.parquet")
    spec = {"model": {"huggingface": str(tiny_bert_checkpoint(tmp_path / "bert"))},
            "dataset": {"source": str(tmp_path / "texts.parquet"), "text_column": "text", "id_column": "key"},
            "layers": [{"name": "bert.pooler"}], "attributions": [{"method": "saliency"}],
            "execution": {"batch_size": 5, "num_workers": 2, "threads_per_worker": 1}}
    local = run_job(parse_spec({**spec, "output": {"root": str(tmp_path / "runs"), "run_name": "texts"}}))
    run_job(parse_spec({**spec, "output": {"root": ray_store, "run_name": "texts"}}))
    stored = RunReader(local_run_dir(_uri(ray_store, "texts")))
    assert stored.tokens().equals(RunReader(local.layout.root).tokens())
    assert stored.attributions("saliency").equals(RunReader(local.layout.root).attributions("saliency"))
    rows = run_query(open_catalog(stored.layout.root), "SELECT count(*) AS n FROM token_attributions_saliency")
    assert rows["n"][0].as_py() == sum(stored.tokens()["length"].to_pylist())
    assert any(o.startswith("texts/tokens/part-") for o in _objects(ray_store))


def test_a_killed_driver_of_a_store_run_is_resumed_from_the_store(ray_store, tmp_path, capsys, stop_afterwards):
    from tests.helpers import kill_driver_mid_run, slow_run_spec

    spec_path = slow_run_spec(tmp_path / "data.parquet", ray_store, tmp_path)
    def finished() -> int:
        return sum(o.startswith(".staging/t-") and "/instances/part-" in o for o in _objects(ray_store))

    stop_afterwards.append(kill_driver_mid_run(spec_path, finished))
    assert not any(o.startswith("t/") for o in _objects(ray_store))  # nothing published
    seen = finished()

    # Resumed at once, from another machine's point of view: only the store holds the staging.
    assert main(["run", "--resume", _uri(ray_store, "t"), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    reader = RunReader(local_run_dir(_uri(ray_store, "t")))
    ids = list(range(1000, 1160))
    assert reader.instances()["instance_id"].to_pylist() == ids
    assert reader.attributions("saliency")["instance_id"].to_pylist() == ids
    timings = reader.manifest.timings
    assert seen <= timings["resumed_parts"] < 10
    assert 0 < timings["resumed_rows"] < 160
    # The kept batches' sizes were read from the store: the run's bytes are all its parts'.
    explained = [p for d in ("instances", "activations", "attributions", "fidelity", "stats", "wide", "index")
                 for p in (reader.layout.root / d).rglob("part-*")]
    assert reader.manifest.counts.bytes == sum(p.stat().st_size for p in explained)
    objects = _objects(ray_store)
    assert "t/job.json" not in objects and f"t/{MANIFEST}" in objects
    # Nothing is left to resume (a late write of the killed driver's workers may still leave
    # a part under .staging/, never a job.json).
    assert [o for o in objects if o.startswith(".staging/t-") and o.endswith("/job.json")] == []


def test_ctrl_c_on_a_store_run_keeps_only_its_staging_in_the_store(ray_store, tmp_path, monkeypatch):
    import netloupe.pipeline.driver as driver
    from netloupe.contract.spec import parse_spec
    from netloupe.storage.location import cache_root

    pq.write_table(tabular_table(40), tmp_path / "data.parquet")
    spec = tabular_spec(tmp_path / "data.parquet", ray_store, output__run_name="stopped")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "build_catalog", interrupted)  # Ctrl-C after every batch is done
    with pytest.raises(KeyboardInterrupt):
        run_job(spec)
    assert not list((cache_root() / "work").glob("stopped-*"))  # the local work directory went
    staged = [o for o in _objects(ray_store) if o.startswith(".staging/stopped-")]
    assert sum(o.endswith("/job.json") for o in staged) == 1
    assert sum("/instances/part-" in o for o in staged) == 3
    assert not any(o.startswith("stopped/") for o in _objects(ray_store))

    monkeypatch.undo()
    resumed, spec_data = RunStaging.resume(_uri(ray_store, "stopped"))
    result = run_job(parse_spec(spec_data), resume=resumed)
    assert result.manifest.timings["resumed_rows"] == 40
    assert RunReader(local_run_dir(_uri(ray_store, "stopped"))).instances().num_rows == 40
    assert [o for o in _objects(ray_store) if o.startswith(".staging/")] == []


def test_resume_of_a_store_run_without_one_says_so(store_env, capsys):
    assert main(["run", "--resume", _uri(store_env, "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_reading_something_that_is_not_a_run_says_so(store_env):
    from netloupe.contract.errors import RunError

    with pytest.raises(RunError, match="is not a committed netloupe run"):
        local_run_dir(_uri(store_env, "no-such-run"))
    with pytest.raises(RunError, match="cannot open the filesystem of 'nosuch://x/runs'.*s3://bucket/path"):
        RunStaging.open("nosuch://x/runs", "r")


def test_a_store_run_of_another_version_is_refused_before_its_tables_are_downloaded(store_env):
    from netloupe.contract.errors import RunError
    from netloupe.storage.location import cached_run_dir

    filesystem, path = pafs.FileSystem.from_uri(_uri(store_env, "old"))
    with filesystem.open_output_stream(f"{path}/manifest.json") as stream:
        stream.write(json.dumps({"netloupe_manifest": 1, "versions": {"netloupe": "0.1.0"}}).encode())
    with filesystem.open_output_stream(f"{path}/instances/part-a.parquet") as stream:
        stream.write(b"PAR1" * 1000)
    with pytest.raises(RunError, match=r"made by netloupe 0.1.0 \(manifest format 1\)"):
        local_run_dir(_uri(store_env, "old"))
    assert not cached_run_dir(_uri(store_env, "old")).exists()
    assert not any(cached_run_dir(_uri(store_env, "old")).parent.glob(".incoming-*"))
