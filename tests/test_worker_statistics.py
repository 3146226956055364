"""A run's statistics come from its workers (issue 20): a pipeline run written in many small
parts by two workers answers every operator as numpy does over the run's own tables, through
the fast path and the stock CLI's, and the driver checks exactly-once from the reports alone.

tests/test_operators.py checks the operators on a hand-made run; this checks what the
workers write: per-part cells, top lists, method summaries, index matrices and
projection-sample candidates, added up by the driver as they arrive, and the wide segments the
part pass writes.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from netloupe.contract.errors import RunError
from netloupe.pipeline.driver import _check_exactly_once, run_job
from netloupe.pipeline.part_pass import _check_segments
from netloupe.storage import schema as S
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.layout import RunLayout, key_of_part
from netloupe.storage.manifest import BatchReport
from netloupe.storage.part_statistics import NEURON_TOP_KEPT, _neuron_top, statistics_of
from netloupe.storage.reader import RunReader, sample_instance_ids
from netloupe.storage.statistics_merge import StatisticsMerge
from netloupe.storage.wide_segments import WideSegment, WideSegmentWriter
from tests.helpers import tabular_spec

N, BATCH, SAMPLE = 150, 8, 40


def _data() -> pa.Table:
    rng = np.random.default_rng(3)
    label = rng.integers(0, 3, N).astype(object)
    label[::11] = None  # unlabeled instances: a cell of their own
    return pa.table({
        "key": pa.array([f"r-{i:03d}" for i in rng.permutation(N)]),  # string ids, not in batch order
        **{f"f{j}": rng.normal(size=N).astype(np.float32) for j in range(8)},
        "label": pa.array(label, pa.int64()),
        "group": pa.array(np.where(np.arange(N) % 3 == 0, "a", "b").astype(object)),
    })


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("statsrun")
    pq.write_table(_data(), root / "data.parquet")
    spec = tabular_spec(
        root / "data.parquet", root / "runs",
        model={"factory": "tests.tiny_models:seeded_mlp"},
        dataset={"source": str(root / "data.parquet"), "feature_columns": [f"f{j}" for j in range(8)],
                 "id_column": "key", "label_column": "label", "metadata_columns": ["group"]},
        layers=[{"name": "fc1"}, {"name": "relu"}],
        attributions=[{"method": "integrated_gradients", "params": {"n_steps": 8}}, {"method": "saliency"}],
        fidelity={"curve_steps": 4, "sample_size": 12},
        projection={"sample_size": SAMPLE, "seed": 5},
        execution={"batch_size": BATCH, "num_workers": 2},
    )
    with pytest.MonkeyPatch.context() as patch:
        # Segments of a few parts each (a small run is otherwise one segment per layer).
        patch.setattr("netloupe.pipeline.part_pass.MIN_TASK_ROWS", 16)
        result = run_job(spec)
    reader = RunReader(result.layout.root)
    instances = reader.instances().to_pandas().set_index("instance_id")
    return result, reader, instances


def _paths(run_dir):
    stock = duckdb.connect(str(run_dir / "catalog.duckdb"), read_only=True)
    stock.execute("SET file_search_path = ?", [str(run_dir)])
    fast = open_catalog(run_dir)
    return {"fast": lambda sql: run_query(fast, sql).to_pandas(), "stock": lambda sql: stock.sql(sql).df()}


def test_the_run_is_written_in_many_parts(run):
    result, reader, instances = run
    assert result.manifest.counts.parts == -(-N // BATCH) and len(instances) == N
    layout = result.layout
    parts = {p.name for p in layout.instances_dir.glob("part-*.parquet")}
    for layer in ("fc1", "relu"):
        assert len(list(layout.index_layer_dir(layer).glob("part-*.npy"))) == len(parts)
        # The wide form: one segment per part-pass task (2 workers x 4), each named after the
        # first of its run of parts in key order, together every instance once, as recorded.
        segments = sorted(layout.wide_activations_dir(layer).glob("*.parquet"))
        assert len(segments) == 8 and {p.name for p in segments} < parts
        keys = sorted(key_of_part(name) for name in parts)
        wide = pa.concat_tables([pq.read_table(p) for p in segments])
        ids = pa.concat_tables([pq.read_table(layout.instances_dir / f"part-{k}.parquet") for k in keys])["instance_id"]
        assert wide["instance_id"].to_pylist() == ids.to_pylist()  # key order, each part's own order
        recorded = reader.activations(layer).to_pandas().set_index("instance_id").loc[ids.to_pylist()]
        np.testing.assert_array_equal(wide.drop(["instance_id"]).to_pandas().to_numpy(),
                                      np.stack(recorded["activation"].to_numpy()))
    assert not (layout.root / S.PROJECTIONS / "candidates").exists()  # staging only
    timings = result.manifest.timings
    assert timings["driver_tail_seconds"] > 0
    # The catalog took the statistics the driver added up during the pass: it added none itself.
    assert "statistics_finish_seconds" in timings and "statistics" not in timings["catalog"]


def _assert_same_tables(got: dict[str, pa.Table], expected: dict[str, pa.Table]) -> None:
    """Same rows (in any order); sums to the last few bits, which their order of addition moves."""
    assert got.keys() == expected.keys()
    for name, table in expected.items():
        keys = [c for c in table.column_names if not pa.types.is_floating(table[c].type)]
        a, b = (t.to_pandas().sort_values(keys, na_position="first").reset_index(drop=True)
                for t in (got[name], table))
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12, atol=1e-12)


def test_statistics_added_as_they_arrive_equal_every_part_added_at_once(run, tmp_path):
    """What the driver adds up part by part while the pass runs (a few at a time, on a thread,
    in arrival order, some twice) is what adding every part at once gives; a merge that added
    a part the run does not have, or whose thread failed, says so instead of answering."""
    result, _, _ = run
    layout, model = result.layout, result.manifest.model
    names = statistics_of(model.layer_neurons, model.attribution_shapes)
    keys = sorted(p.name[len("part-"):-len(".parquet")] for p in layout.instances_dir.glob("part-*.parquet"))
    at_once = StatisticsMerge.of_run(layout, names, "string").tables()
    assert set(at_once) == {"neuron_cells", "neuron_top", "attribution_cells", "fidelity_summary"}
    assert at_once["fidelity_summary"]["method"].to_pylist() == ["integrated_gradients", "saliency"]
    cells = at_once["neuron_cells"].to_pandas()
    assert cells[(cells.layer == "fc1") & (cells.neuron == 0)]["size"].sum() == N

    arriving = StatisticsMerge(layout, names, "string")
    arriving.add(keys[:5])  # added, then reported again below: each part counts once
    for key in reversed(keys):
        arriving.add_soon([key])
    arriving.add_soon(keys[:3])  # a batch reported twice
    assert arriving.finish(set(keys))
    assert arriving.added == set(keys)
    _assert_same_tables(arriving.tables(), at_once)
    assert arriving.tables()["fidelity_summary"]["method"].to_pylist() == ["integrated_gradients", "saliency"]

    # A run under a directory named like a Hive partition reads as any other.
    elsewhere = RunLayout(tmp_path / "lr=0.1" / "run")
    shutil.copytree(layout.root / "stats", elsewhere.root / "stats")
    shutil.copytree(layout.instances_dir, elsewhere.instances_dir)
    _assert_same_tables(StatisticsMerge.of_run(elsewhere, names, "string").tables(), at_once)

    missing = StatisticsMerge(layout, names, "string")
    assert not missing.finish(set(keys) | {"999999999999"})  # a reported part whose statistics are not there

    too_many = StatisticsMerge(layout, names, "string")
    too_many.add(keys)
    assert not too_many.finish(set(keys[1:]))

    broken = RunLayout(tmp_path / "broken")
    shutil.copytree(layout.root / "stats", broken.root / "stats")
    (broken.statistics_dir("neuron_cells") / f"part-{keys[5]}.parquet").write_bytes(b"not parquet")
    unreadable = StatisticsMerge(broken, names, "string", pafs.LocalFileSystem())
    unreadable.add_soon(keys)
    assert not unreadable.finish(set(keys))
    assert "parquet" in str(unreadable.error).lower()
    unreadable.close()


@pytest.mark.parametrize("path", ["fast", "stock"])
def test_neuron_operators_equal_numpy(run, path):
    result, reader, instances = run
    query = _paths(result.layout.root)[path]
    for layer in ("fc1", "relu"):
        ids, matrix = reader.activation_matrix(layer)
        frame = instances.loc[ids.to_pylist()]
        for subsets, keys in (("label", frame["label"]), ("prediction", frame["prediction"])):
            got = query(f"SELECT * FROM neuron_matrix_by('{layer}', '{subsets}')")
            for value in keys.dropna().unique():
                rows = (keys == value).to_numpy()
                part = got[got["subset"] == f"{subsets}={int(value)}"].sort_values("neuron")
                assert (part["size"] == rows.sum()).all()
                np.testing.assert_allclose(part["mean"], matrix[rows].mean(axis=0), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(part["frac_active"], (matrix[rows] > 0).mean(axis=0))
                if rows.sum() > 1:
                    np.testing.assert_allclose(part["std"], matrix[rows].std(axis=0, ddof=1), rtol=1e-4, atol=1e-6)
        rows = (frame["group"] == "a").to_numpy()
        got = query(f"SELECT * FROM neuron_matrix('{layer}', '\"group\" = ''a''')").sort_values("neuron")
        np.testing.assert_allclose(got["mean"], matrix[rows].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["std"], matrix[rows].std(axis=0, ddof=1), rtol=1e-4, atol=1e-6)
        everything = query(f"SELECT * FROM neurons WHERE layer = '{layer}' ORDER BY neuron")
        np.testing.assert_allclose(everything["minimum"], matrix.min(axis=0), rtol=1e-6)
        np.testing.assert_allclose(everything["maximum"], matrix.max(axis=0), rtol=1e-6)
        id_values = np.asarray(ids.to_pylist())
        for k in (3, 20):  # from the merged per-part lists, and from a scan
            for neuron in range(matrix.shape[1]):
                order = np.lexsort((id_values, -matrix[:, neuron]))[:k]
                got = query(f"SELECT * FROM top_instances('{layer}', {neuron}, k := {k})")
                assert got["instance_id"].tolist() == id_values[order].tolist()
        one = id_values[17]
        tops = query(f"SELECT * FROM top_neurons('{layer}', '{one}', k := 6)")
        np.testing.assert_array_equal(tops["activation"].to_numpy(), np.sort(matrix[17])[::-1])


@pytest.mark.parametrize("path", ["fast", "stock"])
def test_attribution_maps_and_fidelity_equal_numpy(run, path):
    result, reader, instances = run
    query = _paths(result.layout.root)[path]
    table, maps = reader.attribution_maps("saliency")
    frame = instances.loc[table["instance_id"].to_pylist()]
    maps = maps.reshape(len(maps), -1)
    got = query("SELECT * FROM attribution_map_by('saliency', 'prediction')")
    for prediction in frame["prediction"].unique():
        rows = (frame["prediction"] == prediction).to_numpy()
        row = got[got["subset"] == f"prediction={prediction}"].iloc[0]
        assert row["size"] == rows.sum()
        np.testing.assert_allclose(row["mean_abs"], np.abs(maps[rows]).mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(row["mean"], maps[rows].mean(axis=0), rtol=1e-5, atol=1e-7)
    summary = query("SELECT * FROM fidelity_summary").set_index("method")
    assert summary.index.tolist() == ["integrated_gradients", "saliency"]  # the spec's order
    for method in summary.index:
        rows = reader.attributions(method).to_pandas()
        sampled = pd.read_parquet(result.layout.fidelity_dir(method))
        assert summary.loc[method, "instances"] == N
        assert summary.loc[method, "sampled"] == len(sampled) == result.manifest.fidelity.sampled_rows[method] > 0
        np.testing.assert_allclose(summary.loc[method, "mean_deletion_auc"], rows["deletion_auc"].mean(), rtol=1e-6)
        np.testing.assert_allclose(summary.loc[method, "mean_insertion_auc"], rows["insertion_auc"].mean(), rtol=1e-6)
        np.testing.assert_allclose(summary.loc[method, "mean_randomization_spearman"],
                                   sampled["randomization_spearman"].mean(), rtol=1e-6)
        delta = rows["convergence_delta"].abs()
        if method == "integrated_gradients":
            np.testing.assert_allclose(summary.loc[method, "mean_abs_convergence_delta"], delta.mean(), rtol=1e-6)
            np.testing.assert_allclose(summary.loc[method, "max_abs_convergence_delta"], delta.max(), rtol=1e-6)
        else:
            assert pd.isna(summary.loc[method, "mean_abs_convergence_delta"])


def test_the_projection_sample_is_the_one_drawn_from_the_tables(run):
    """The workers' candidates give exactly the sample a scan of the instances would."""
    result, _, _ = run
    layout = result.layout
    kept = pq.read_table(layout.projection_sample_path)["instance_id"].to_pylist()
    assert kept == sample_instance_ids(layout.instances_dir, SAMPLE, 5).to_pylist()
    assert result.manifest.projections.sample_rows == SAMPLE


def _reports(batches: list[list[str]]) -> list[BatchReport]:
    return [BatchReport(part=f"p{i}", rows=len(ids), bytes=0, compute_seconds=0, write_seconds=0, device="cpu",
                        gpu_ids="", node_id="n", chunk_rows=0, id_digest=S.id_digest(pa.array(ids), "string"),
                        fidelity_rows=[]) for i, ids in enumerate(batches)]


def test_exactly_once_is_checked_from_the_reports():
    ids = [f"r-{i}" for i in range(10)]
    dataset = SimpleNamespace(num_rows=10, id_digest=S.id_digest(pa.array(ids), "string"))
    _check_exactly_once(_reports([ids[:4], ids[4:]]), dataset)
    with pytest.raises(RunError, match=r"the run's 1 batches hold 6 instances, expected 10"):
        _check_exactly_once(_reports([ids[4:]]), dataset)
    # Right count, wrong instances: r-0 twice, r-9 never.
    with pytest.raises(RunError, match="some instance was explained twice and another not at all"):
        _check_exactly_once(_reports([ids[:5], ids[:1] + ids[5:9]]), dataset)


def test_a_merge_that_fails_during_the_pass_falls_back_to_adding_every_part(ray_local, tmp_path, monkeypatch):
    """A read of the merge's thread fails once (as a store read can): the run says so, the
    catalog adds every part itself, and the answers are the same."""
    pq.write_table(_data(), tmp_path / "data.parquet")
    failures = []
    read = StatisticsMerge._read

    def failing_once(self, name, keys):
        if not failures:
            failures.append(name)
            raise OSError("the store did not answer")
        return read(self, name, keys)

    monkeypatch.setattr(StatisticsMerge, "_read", failing_once)
    spec = tabular_spec(
        tmp_path / "data.parquet", tmp_path / "runs", model={"factory": "tests.tiny_models:seeded_mlp"},
        dataset={"source": str(tmp_path / "data.parquet"), "feature_columns": [f"f{j}" for j in range(8)],
                 "id_column": "key", "label_column": "label"},
        layers=[{"name": "fc1"}], execution={"batch_size": BATCH, "num_workers": 1})
    result = run_job(spec)
    timings = result.manifest.timings
    assert failures and timings["statistics_merge_error"] == "the store did not answer"
    assert "statistics" in timings["catalog"]  # the catalog added every part itself
    cells = run_query(open_catalog(result.layout.root), "SELECT sum(size) AS n FROM neuron_cells GROUP BY neuron")
    assert set(cells["n"].to_pylist()) == {N}


def test_the_wide_segments_are_checked_to_hold_every_batch_once():
    rows = {"a": 3, "b": 2, "c": 4}

    def segment(key, keys, n):
        return WideSegment("fc", key, tuple(keys), n, 0)

    _check_segments([segment("a", "ab", 5), segment("c", "c", 4)], {"fc": 4}, rows)
    for wrong in ([segment("a", "ab", 5)],  # c in no segment
                  [segment("a", "ab", 5), segment("b", "bc", 6)],  # b twice
                  [segment("a", "ab", 5), segment("c", "c", 3)]):  # a row short
        with pytest.raises(RunError, match="do not hold each of the 3 batches once"):
            _check_segments(wrong, {"fc": 4}, rows)


def test_a_wide_segment_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr("netloupe.storage.wide_segments.SEGMENT_ROW_GROUP_BYTES", 16)  # 2 rows of 2 neurons
    layout = RunLayout(tmp_path / "run")
    ids = pa.array([7, 8, 9], pa.int64())
    with pytest.raises(ValueError, match=r"expected a \(3, 2\) matrix, got \(3, 5\)"):
        with WideSegmentWriter(layout, "fc", 2, "int64", "k1") as writer:
            writer.add("k1", ids, np.ones((3, 2), np.float32))
            writer.add("k2", ids, np.ones((3, 5), np.float32))
    assert not list(layout.wide_activations_dir("fc").iterdir())  # neither the segment nor a temporary
    with WideSegmentWriter(layout, "fc", 2, "int64", "k1") as writer:
        writer.add("k1", ids, np.arange(6, dtype=np.float32).reshape(3, 2))
        writer.add("k2", pa.chunked_array([ids]), -np.arange(6, dtype=np.float64).reshape(3, 2))
    assert writer.segment.keys == ("k1", "k2") and writer.segment.rows == 6
    [path] = layout.wide_activations_dir("fc").iterdir()
    assert path.name == "part-k1.parquet" and writer.segment.bytes == path.stat().st_size
    assert pq.ParquetFile(path).num_row_groups == 2  # a group as soon as 2 rows are pending
    table = pq.read_table(path)
    assert table.schema.names == ["instance_id", "n0", "n1"] and table["n1"].type == pa.float32()
    assert table.to_pydict() == {"instance_id": [7, 8, 9] * 2, "n0": [0, 2, 4, 0, -2, -4], "n1": [1, 3, 5, -1, -3, -5]}


def test_a_committed_run_of_the_previous_format_is_refused(run, tmp_path):
    import json

    result, _, _ = run
    old = tmp_path / "old"
    shutil.copytree(result.layout.root, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["netloupe_manifest"] = 2
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match=r"manifest format 2\); this netloupe reads format 3"):
        RunLayout(old).read_manifest()


def test_a_parts_top_lists_rank_as_duckdb_does():
    """Each part's top rows per neuron, chosen by a partition rather than a sort, are DuckDB's
    `ORDER BY activation DESC, instance_id` (NaN first) whatever the ties: many equal values
    (ReLU zeros, rounded values), NaN beside +inf, -inf, int and string ids."""
    rng = np.random.default_rng(1)
    for trial in range(24):
        n, d = int(rng.integers(1, 300)), int(rng.integers(1, 12))
        values = np.round(rng.normal(size=(n, d)), 1).astype(np.float32)
        values[rng.random((n, d)) < 0.3] = 0
        if trial % 3 == 0:
            values[rng.random((n, d)) < 0.05] = np.nan
        if trial % 4 == 0:
            values[rng.random((n, d)) < 0.05] = np.inf
            values[rng.random((n, d)) < 0.05] = -np.inf
        if trial % 2:
            ids, id_type = pa.array([f"id-{i}" for i in rng.permutation(n)]), "string"
        else:
            ids, id_type = pa.array(rng.permutation(3 * n)[:n].astype(np.int64)), "int64"
        got = _neuron_top("l", pa.chunked_array([ids]), values, id_type)
        long = pa.table({"instance_id": pa.chunked_array([ids] * d), "neuron": np.repeat(np.arange(d), n),
                         "activation": values.T.ravel()})
        con = duckdb.connect()
        con.register("long", long)
        expected = con.sql(
            "SELECT neuron, instance_id FROM long QUALIFY row_number() OVER "
            f"(PARTITION BY neuron ORDER BY activation DESC, instance_id) <= {NEURON_TOP_KEPT} "
            "ORDER BY neuron, activation DESC, instance_id").to_arrow_table()
        assert got["instance_id"].to_pylist() == expected["instance_id"].to_pylist(), trial
        assert got["neuron"].to_pylist() == expected["neuron"].to_pylist()
