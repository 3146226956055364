"""Every SQL operator against a hand-made run whose answers numpy and pandas compute.

The run is written without a model or Ray (storage.handmade), so every number is known.
Each neuron operator is checked twice: through ``open_catalog`` (the fast path over the
activation index) and through a plain read-only DuckDB connection to ``catalog.duckdb``
(the pure-SQL path the stock duckdb CLI takes).
"""

from __future__ import annotations

import itertools
import os
import shutil

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from netloupe.storage import schema as S
from netloupe.storage.catalog import QueryError, open_catalog, run_query
from netloupe.storage.handmade import write_handmade_run
from netloupe.storage.part_statistics import NEURON_TOP_KEPT

N, CLASSES = 90, 3
STROKES = ["thin", "heavy"]
JITTERS = ["none", "low", "high"]


def _data():
    rng = np.random.default_rng(7)
    label = rng.integers(0, CLASSES, N)
    prediction = np.where(rng.random(N) < 0.7, label, rng.integers(0, CLASSES, N))
    probabilities = rng.dirichlet(np.ones(CLASSES), N).astype(np.float32)
    stroke = np.array(STROKES)[rng.integers(0, 2, N)]
    jitter = np.array(JITTERS)[rng.integers(0, 3, N)]
    instances = pa.table({
        "instance_id": np.arange(100, 100 + N, dtype=np.int64), "label": label, "prediction": prediction,
        "probabilities": S.fixed_vectors(probabilities, CLASSES), "stroke": stroke, "jitter": jitter,
    })
    # Continuous values (no ties), some negative and some exactly zero: "active" means > 0.
    fc = rng.normal(size=(N, 4)).astype(np.float32)
    fc[::5, 1] = 0.0
    conv = np.maximum(rng.normal(size=(N, 3)), 0).astype(np.float32)
    saliency = rng.normal(size=(N, 1, 2, 2)).astype(np.float32)
    return instances, {"fc": fc, "conv.1": conv}, {"saliency": saliency}


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    instances, activations, attributions = _data()
    root = tmp_path_factory.mktemp("handmade")
    # Small parts: the catalog and the index are assembled from several parts.
    layout = write_handmade_run(root, "h", instances, activations, attributions, rows_per_part=25)
    frame = instances.select(["instance_id", "label", "prediction", "stroke", "jitter"]).to_pandas()
    frame["correct"] = frame["label"] == frame["prediction"]
    return layout.root, frame, activations, attributions


def stock_connection(run_dir):
    """What a user of the stock duckdb CLI gets: the file, read-only, paths from the run."""
    con = duckdb.connect(str(run_dir / "catalog.duckdb"), read_only=True)
    con.execute("SET file_search_path = ?", [str(run_dir)])
    return con


@pytest.fixture(params=["fast", "stock"])
def query(request, handmade):
    """Run SQL on the handmade run through one of the two paths; returns a DataFrame."""
    run_dir = handmade[0]
    con = open_catalog(run_dir) if request.param == "fast" else stock_connection(run_dir)

    def run(sql, parameters=None):
        if request.param == "fast":
            return run_query(con, sql, parameters).to_pandas()
        return con.sql(sql, params=parameters).to_arrow_table().to_pandas()

    yield run
    con.close()


def _moments(matrix):
    return (len(matrix), matrix.mean(axis=0), matrix.std(axis=0, ddof=1) if len(matrix) > 1 else None,
            (matrix > 0).mean(axis=0))


@pytest.mark.parametrize("predicate, mask", [
    ("label = 1", lambda f: f["label"] == 1),
    ("stroke = 'thin' AND NOT correct", lambda f: (f["stroke"] == "thin") & ~f["correct"]),
    ("label <> 0", lambda f: f["label"] != 0),   # more than half: answered by complement
    ("true", lambda f: f["label"] >= 0),
])
def test_neuron_matrix_of_a_predicate(query, handmade, predicate, mask):
    _, frame, activations, _ = handmade
    rows = mask(frame).to_numpy()
    got = query("SELECT * FROM neuron_matrix(?, ?)", ["fc", predicate])
    size, mean, std, active = _moments(activations["fc"][rows])
    assert got["neuron"].tolist() == [0, 1, 2, 3]
    assert (got["size"] == size).all()
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["std"], std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["frac_active"], active)


def test_neuron_matrix_of_ids_ignores_unknown_and_repeated_ids(query, handmade):
    _, frame, activations, _ = handmade
    ids = [100, 105, 105, 150, 999_999]
    got = query("SELECT * FROM neuron_matrix_ids(?, ?::BIGINT[])", ["conv.1", ids])
    size, mean, std, active = _moments(activations["conv.1"][[0, 5, 50]])
    assert (got["size"] == 3).all()
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(got["std"], std, rtol=1e-5)
    np.testing.assert_allclose(got["frac_active"], active)


def test_neuron_matrix_of_an_empty_subset_is_null(query):
    got = query("SELECT * FROM neuron_matrix('fc', 'false')")
    assert (got["size"] == 0).all()
    assert got["mean"].isna().all() and got["frac_active"].isna().all()


@pytest.mark.parametrize("subsets", ["label", "prediction", "correct", "cell"])
def test_neuron_matrix_by_class_subsets(query, handmade, subsets):
    _, frame, activations, _ = handmade
    keys = {
        "label": frame["label"].map(lambda v: f"label={v}"),
        "prediction": frame["prediction"].map(lambda v: f"prediction={v}"),
        "correct": frame["correct"].map({True: "correct", False: "incorrect"}),
        "cell": frame["label"].astype(str).radd("label=") + frame["prediction"].astype(str).radd(" prediction="),
    }[subsets]
    got = query("SELECT * FROM neuron_matrix_by('fc', ?)", [subsets])
    assert set(got["subset"]) == set(keys)
    for subset, part in got.groupby("subset"):
        size, mean, std, active = _moments(activations["fc"][(keys == subset).to_numpy()])
        assert (part["size"] == size).all(), subset
        np.testing.assert_allclose(part["mean"], mean, rtol=1e-5, atol=1e-6)
        if std is not None:
            np.testing.assert_allclose(part["std"], std, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(part["frac_active"], active)


def test_neuron_matrix_by_rejects_an_unknown_grouping(query):
    with pytest.raises(Exception, match="subsets must be 'label', 'prediction', 'correct' or 'cell'"):
        query("SELECT * FROM neuron_matrix_by('fc', 'colour')")


def test_compare_subsets_ranks_by_effect_size(query, handmade):
    _, frame, activations, _ = handmade
    a = activations["fc"][(frame["stroke"] == "thin").to_numpy()]
    b = activations["fc"][(frame["stroke"] == "heavy").to_numpy()]
    pooled = np.sqrt(((len(a) - 1) * a.var(axis=0, ddof=1) + (len(b) - 1) * b.var(axis=0, ddof=1)) / (len(a) + len(b) - 2))
    d = (a.mean(axis=0) - b.mean(axis=0)) / pooled
    got = query("SELECT * FROM compare_subsets('fc', 'stroke = ''thin''', 'stroke = ''heavy''')")
    assert got["neuron"].tolist() == np.argsort(-np.abs(d), kind="stable").tolist()
    by_neuron = got.set_index("neuron").sort_index()
    np.testing.assert_allclose(by_neuron["effect_size"], d, rtol=1e-4)
    np.testing.assert_allclose(by_neuron["difference"], a.mean(axis=0) - b.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert (by_neuron["size_a"] == len(a)).all() and (by_neuron["size_b"] == len(b)).all()


def test_exemplars_and_top_neurons(query, handmade):
    _, frame, activations, _ = handmade
    fc, ids = activations["fc"], frame["instance_id"].to_numpy()
    got = query("SELECT * FROM top_instances('fc', 2, k := 4)")
    order = np.argsort(-fc[:, 2])[:4]
    assert got["instance_id"].tolist() == ids[order].tolist()
    assert got["rank"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(got["activation"], fc[order, 2])
    every = query("SELECT * FROM neuron_exemplars('fc', 3)")
    for neuron in range(4):
        part = every[every["neuron"] == neuron]
        assert part["instance_id"].tolist() == ids[np.argsort(-fc[:, neuron])[:3]].tolist()
    tops = query("SELECT * FROM top_neurons('fc', 117, k := 2)")
    row = fc[17]
    assert tops["neuron"].tolist() == np.argsort(-row)[:2].tolist()
    np.testing.assert_allclose(tops["activation"], np.sort(row)[::-1][:2])
    assert query("SELECT * FROM top_neurons('fc', 99999, k := 2)").empty  # no such instance


@pytest.mark.parametrize("k", [NEURON_TOP_KEPT, NEURON_TOP_KEPT + 1, N])
def test_exemplars_from_the_kept_tops_and_from_a_scan_agree_with_numpy(query, handmade, k):
    """Up to NEURON_TOP_KEPT from the merged per-part lists (parts of 25 rows: each part's
    own top rows are not the run's), beyond it from a scan of the layer."""
    _, frame, activations, _ = handmade
    ids = frame["instance_id"].to_numpy()
    for layer in ("fc", "conv.1"):
        matrix = activations[layer]
        for neuron in range(matrix.shape[1]):
            order = np.lexsort((ids, -matrix[:, neuron]))[:k]  # ties (the zeros) by id
            got = query(f"SELECT * FROM top_instances('{layer}', {neuron}, k := {k})")
            assert got["instance_id"].tolist() == ids[order].tolist()
            np.testing.assert_array_equal(got["activation"].to_numpy(), matrix[order, neuron])
    every = query(f"SELECT * FROM neuron_exemplars('fc', {k})")
    for neuron in range(4):
        values = every[every["neuron"] == neuron]["activation"].to_numpy()
        np.testing.assert_array_equal(values, np.sort(activations["fc"][:, neuron])[::-1][:k])


def test_neurons_view_summarises_every_neuron(query, handmade):
    activations = handmade[2]
    got = query("SELECT * FROM neurons ORDER BY layer, neuron")
    for layer, matrix in activations.items():
        part = got[got["layer"] == layer]
        np.testing.assert_allclose(part["mean"], matrix.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(part["std"], matrix.std(axis=0, ddof=1), rtol=1e-5)
        np.testing.assert_allclose(part["frac_active"], (matrix > 0).mean(axis=0))
        np.testing.assert_allclose(part["maximum"], matrix.max(axis=0))


def _pandas_subgroups(frame, columns, positive):
    """Every value combination of every non-empty subset of ``columns``, as FairVis lists them."""
    rows = []
    for level in range(1, len(columns) + 1):
        for chosen in itertools.combinations(columns, level):
            for values, part in frame.groupby(list(chosen)):
                values = values if isinstance(values, tuple) else (values,)
                pos, pred = part["label"] == positive, part["prediction"] == positive
                tp, fp = int((pos & pred).sum()), int((~pos & pred).sum())
                fn, tn = int((pos & ~pred).sum()), int((~pos & ~pred).sum())
                rows.append({
                    "key": dict(zip(chosen, values)), "level": level, "size": len(part),
                    "accuracy": part["correct"].mean(),
                    "fpr": fp / (fp + tn) if fp + tn else None, "fnr": fn / (fn + tp) if fn + tp else None,
                    "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
                    "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                })
    return rows


def _subgroup_text(key, columns):
    return " AND ".join(f"{c}={key[c]}" for c in columns if c in key)


def test_subgroup_metrics_cover_columns_and_intersections(query, handmade):
    frame = handmade[1]
    got = query("SELECT * FROM subgroup_metrics(['stroke', 'jitter'], 2)")
    expected = {_subgroup_text(r["key"], ["stroke", "jitter"]): r for r in _pandas_subgroups(frame, ["stroke", "jitter"], 2)}
    assert set(got["subgroup"]) == set(expected)
    assert len(got) == 2 + 3 + 6
    for row in got.to_dict("records"):
        want = expected[row["subgroup"]]
        assert (row["level"], row["size"], row["tp"], row["fp"], row["fn"], row["tn"]) == (
            want["level"], want["size"], want["tp"], want["fp"], want["fn"], want["tn"])
        assert row["accuracy"] == pytest.approx(want["accuracy"])
        for metric in ("fpr", "fnr", "precision", "recall"):
            assert (row[metric] if not pd.isna(row[metric]) else None) == pytest.approx(want[metric])
    assert got["level"].tolist() == sorted(got["level"], reverse=True)  # most specific first


def test_subset_metrics_use_the_subgroups_formulas(query, handmade):
    """The side-by-side view's numbers for a predicate equal that subgroup's row, and the
    suggested subgroups' baseline is subset_metrics over everything."""
    frame = handmade[1]
    [thin] = [r for r in _pandas_subgroups(frame, ["stroke"], 1) if r["key"] == {"stroke": "thin"}]
    got = query("SELECT * FROM subset_metrics(?, 1)", ["stroke = 'thin'"]).iloc[0]
    assert (got["size"], got["tp"], got["fp"], got["fn"], got["tn"]) == (
        thin["size"], thin["tp"], thin["fp"], thin["fn"], thin["tn"])
    for metric in ("accuracy", "fpr", "fnr", "precision", "recall"):
        assert got[metric] == pytest.approx(thin[metric])
    confidence = _data()[0].to_pandas()["probabilities"].map(max)
    assert got["mean_confidence"] == pytest.approx(confidence[(frame["stroke"] == "thin").to_numpy()].mean())
    # The suggestions' baseline is every labeled instance, as pandas counts it.
    positive, predicted = frame["label"] == 1, frame["prediction"] == 1
    overall_fnr = (positive & ~predicted).sum() / positive.sum()
    suggested = query("SELECT * FROM suggested_subgroups(['stroke'], 'fnr', positive := 1, min_size := 1)")
    assert suggested["overall"].iloc[0] == pytest.approx(overall_fnr)
    assert query("SELECT * FROM subset_metrics('true', 1)")["fnr"].iloc[0] == pytest.approx(overall_fnr)
    with pytest.raises(Exception, match="metric must be accuracy, fpr, fnr, precision or recall, got 'f1'"):
        query("SELECT * FROM suggested_subgroups(['stroke'], 'f1')")


def test_unlabeled_instances_are_left_out_of_every_fairvis_metric(tmp_path):
    """Instances without a label have no outcome to judge: subgroups, subsets and the
    suggestions' baseline count the labeled ones only."""
    instances = pa.table({
        "instance_id": np.arange(6, dtype=np.int64), "label": pa.array([1, 1, 0, None, None, 0], pa.int64()),
        "prediction": np.array([1, 0, 0, 1, 1, 1]),
        "probabilities": S.fixed_vectors(np.full((6, 2), 0.5, np.float32), 2),
        "stroke": ["thin", "thin", "thin", "thin", "heavy", "heavy"],
    })
    run = write_handmade_run(tmp_path, "u", instances, {"fc": np.zeros((6, 2), np.float32)}, {}).root
    con = open_catalog(run)
    thin = run_query(con, "SELECT * FROM subset_metrics('stroke = ''thin''', 1)").to_pylist()[0]
    assert (thin["size"], thin["tp"], thin["fn"], thin["tn"], thin["fp"]) == (3, 1, 1, 1, 0)
    assert thin["recall"] == 0.5 and thin["accuracy"] == pytest.approx(2 / 3)
    rows = {r["subgroup"]: r for r in run_query(con, "SELECT * FROM subgroup_metrics(['stroke'], 1)").to_pylist()}
    assert rows["stroke=thin"]["size"] == 3 and rows["stroke=heavy"]["size"] == 1
    worst = run_query(con, "SELECT * FROM suggested_subgroups(['stroke'], 'accuracy', positive := 1, min_size := 1)")
    assert worst["overall"][0].as_py() == pytest.approx(2 / 4)  # 2 of the 4 labeled are right


def test_subgroup_metrics_take_one_to_three_columns(query):
    with pytest.raises(Exception, match="one to three columns"):
        query("SELECT * FROM subgroup_metrics(['stroke', 'jitter', 'label', 'prediction'], 1)")


@pytest.mark.parametrize("metric, worse", [("fnr", max), ("accuracy", min), ("recall", min)])
def test_suggested_subgroups_are_the_worst_big_enough(query, handmade, metric, worse):
    frame = handmade[1]
    candidates = [r for r in _pandas_subgroups(frame, ["stroke", "jitter"], 1)
                  if r["size"] >= 12 and r[metric] is not None]
    got = query("SELECT * FROM suggested_subgroups(['stroke', 'jitter'], ?, positive := 1, min_size := 12, k := 3)",
                [metric])
    assert len(got) == 3 and (got["size"] >= 12).all()
    best = worse(candidates, key=lambda r: (r[metric], r["size"]))
    assert got["value"].iloc[0] == pytest.approx(best[metric])
    values = [r[metric] for r in candidates]
    expected_top = sorted(values, reverse=worse is max)[:3]
    np.testing.assert_allclose(got["value"], expected_top)
    assert (got["gap"].diff().dropna() <= 1e-12).all()  # worst first


def test_attribution_maps_per_class_and_per_predicate(query, handmade):
    _, frame, _, attributions = handmade
    maps = attributions["saliency"].reshape(N, -1)
    by_label = query("SELECT * FROM attribution_map_by('saliency', 'label')")
    for row in by_label.to_dict("records"):
        rows = (frame["label"] == row["class"]).to_numpy()
        assert row["size"] == rows.sum()
        np.testing.assert_allclose(row["mean_abs"], np.abs(maps[rows]).mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(row["mean"], maps[rows].mean(axis=0), rtol=1e-5, atol=1e-6)
    chosen = query("SELECT * FROM attribution_map('saliency', 'jitter = ''high''')").iloc[0]
    rows = (frame["jitter"] == "high").to_numpy()
    assert chosen["size"] == rows.sum()
    np.testing.assert_allclose(chosen["mean_abs"], np.abs(maps[rows]).mean(axis=0), rtol=1e-5)


def test_unknown_layer_is_a_clear_error(handmade):
    con = open_catalog(handmade[0])
    with pytest.raises(QueryError, match=r"^no neuron statistics for layer 'fc2' in this run; did you mean 'fc'\?"):
        run_query(con, "SELECT * FROM neuron_matrix('fc2', 'true')")
    with pytest.raises(duckdb.CatalogException, match="activations_fc2"):  # the stock CLI's path
        stock_connection(handmade[0]).execute("SELECT * FROM neuron_matrix('fc2', 'true')")


def test_a_moved_run_queries_through_both_paths(handmade, tmp_path):
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(handmade[0], moved)
    frame, activations, attributions = handmade[1], handmade[2], handmade[3]
    con = open_catalog(moved)
    got = run_query(con, "SELECT mean FROM neuron_matrix('fc', 'label = 2')")["mean"].to_numpy()
    np.testing.assert_allclose(got, activations["fc"][(frame["label"] == 2).to_numpy()].mean(axis=0), rtol=1e-5)
    sums = run_query(con, "SELECT instance_id, attr_sum FROM attributions_saliency ORDER BY 1")["attr_sum"].to_numpy()
    np.testing.assert_allclose(sums, attributions["saliency"].reshape(N, -1).sum(axis=1), rtol=1e-5, atol=1e-6)
    # The stock CLI from another directory: native tables need nothing, Parquet views the run's path.
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        stock = duckdb.connect(str(moved / "catalog.duckdb"), read_only=True)
        assert stock.execute("SELECT count(*) FROM instances").fetchall() == [(N,)]
        assert stock.execute("SELECT count(*) FROM neuron_matrix_by('fc')").fetchall() == [(CLASSES * 4,)]
        for view in ("activations_fc", "attributions_saliency"):
            with pytest.raises(duckdb.IOException):
                stock.execute(f"SELECT count(*) FROM {view}").fetchall()
        stock.execute("SET file_search_path = ?", [str(moved)])
        for view in ("activations_fc", "attributions_saliency"):
            assert stock.execute(f"SELECT count(*) FROM {view}").fetchall() == [(N,)]
        stock.close()
    finally:
        os.chdir(cwd)


def test_native_activation_tables_for_the_stock_cli(handmade, tmp_path):
    """`netloupe catalog RUN --native-activations` copies the wide parts into the catalog:
    the stock CLI's operators then scan native tables, with the same answers."""
    from netloupe.pipeline.cli import main as cli_main

    copy = tmp_path / "copy"
    shutil.copytree(handmade[0], copy)
    assert cli_main(["catalog", str(copy), "--native-activations"]) == 0
    stock = stock_connection(copy)
    tables = {row[0] for row in stock.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert {"activations_fc", "activations_conv_1"} <= tables
    frame, activations = handmade[1], handmade[2]
    got = stock.sql("SELECT mean FROM neuron_matrix('fc', 'label = 2') ORDER BY neuron").df()["mean"]
    np.testing.assert_allclose(got, activations["fc"][(frame["label"] == 2).to_numpy()].mean(axis=0), rtol=1e-5)
    fast = run_query(open_catalog(copy), "SELECT mean FROM neuron_matrix('fc', 'label = 2')")["mean"].to_numpy()
    np.testing.assert_allclose(fast, got, rtol=1e-6)


def test_catalog_holds_no_absolute_path(handmade):
    """What makes a copied run valid: nothing in the catalog names where it was built."""
    data = (handmade[0] / "catalog.duckdb").read_bytes()
    assert str(handmade[0]).encode() not in data


def test_string_ids_and_a_layer_too_wide_for_neuron_columns(tmp_path):
    n = 12
    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet(np.ones(2), n).astype(np.float32)
    instances = pa.table({
        "instance_id": [f"img-{i}" for i in range(n)], "label": rng.integers(0, 2, n),
        "prediction": probabilities.argmax(axis=1), "probabilities": S.fixed_vectors(probabilities, 2),
    })
    small = rng.normal(size=(n, 3)).astype(np.float32)
    huge = rng.normal(size=(n, 4097)).astype(np.float32)
    layout = write_handmade_run(tmp_path, "s", instances, {"small": small, "huge": huge}, rows_per_part=5)
    con = open_catalog(layout.root)
    # 'img-1x' must not match 'img-1' (a cast to the stored string width would truncate it)
    got = run_query(con, "SELECT * FROM neuron_matrix_ids('small', ['img-3', 'img-10', 'img-1x'])").to_pandas()
    assert (got["size"] == 2).all()
    np.testing.assert_allclose(got["mean"], small[[3, 10]].mean(axis=0), rtol=1e-5)
    assert run_query(con, "SELECT view FROM layers WHERE layer = 'huge'")["view"].to_pylist() == [None]
    vectors = run_query(con, "SELECT activation FROM activation_vectors_huge ORDER BY instance_id LIMIT 1")
    assert len(vectors["activation"][0]) == 4097
    with pytest.raises(QueryError, match="up to 4,096 neurons"):
        run_query(con, "SELECT * FROM neuron_matrix('huge', 'true')")


def test_the_stock_duckdb_cli_runs_the_operators(handmade):
    """The real `duckdb` command-line shell (PyPI's duckdb-cli, an older DuckDB than the
    library that wrote the catalog) opens catalog.duckdb from inside the run."""
    import subprocess
    import sys
    from pathlib import Path

    run_dir, frame, activations, _ = handmade
    cli = Path(sys.executable).with_name("duckdb")
    sql = ("SELECT round(mean, 6) AS mean FROM neuron_matrix('fc', 'label = 2') ORDER BY neuron;"
           "SELECT count(*) AS n FROM attributions_saliency;")
    done = subprocess.run([str(cli), "-readonly", "-csv", "catalog.duckdb", "-c", sql],
                          cwd=run_dir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    expected = activations["fc"][(frame["label"] == 2).to_numpy()].mean(axis=0)
    np.testing.assert_allclose([float(v) for v in lines[1:5]], expected, atol=2e-6)
    assert lines[5:] == ["n", str(N)]


def test_both_paths_agree_far_from_zero_and_around_nan(tmp_path):
    """Values 100 ± 0.01 (squares in float32 would lose the spread) and one NaN row (which
    must not leak into subsets without it, nor count as active)."""
    n = 400
    rng = np.random.default_rng(11)
    probabilities = rng.dirichlet(np.ones(2), n).astype(np.float32)
    instances = pa.table({
        "instance_id": np.arange(n, dtype=np.int64), "label": rng.integers(0, 2, n),
        "prediction": probabilities.argmax(axis=1), "probabilities": S.fixed_vectors(probabilities, 2),
    })
    values = (100 + 0.01 * rng.normal(size=(n, 3))).astype(np.float32)
    values[7] = np.nan
    layout = write_handmade_run(tmp_path, "far", instances, {"fc": values}, rows_per_part=64)
    fast, stock = open_catalog(layout.root), stock_connection(layout.root)
    for predicate, rows in (("instance_id < 150", np.arange(150) != 7),     # small, holds the NaN row
                            ("instance_id >= 8", np.arange(8, n)),         # over half, without it
                            ("instance_id <> 7", np.flatnonzero(np.arange(n) != 7))):
        sql = f"SELECT * FROM neuron_matrix('fc', '{predicate}')"
        got_fast = run_query(fast, sql).to_pandas()
        got_stock = stock.sql(sql).to_arrow_table().to_pandas()
        if predicate == "instance_id < 150":
            assert got_fast["mean"].isna().all() and got_stock["mean"].isna().all()
            np.testing.assert_allclose(got_fast["frac_active"], 149 / 150)
            np.testing.assert_allclose(got_stock["frac_active"], 149 / 150)
            continue
        chosen = values[rows]
        for got in (got_fast, got_stock):
            np.testing.assert_allclose(got["mean"], chosen.mean(axis=0, dtype=np.float64), rtol=1e-9)
            np.testing.assert_allclose(got["std"], chosen.astype(np.float64).std(axis=0, ddof=1), rtol=1e-3)
            np.testing.assert_allclose(got["frac_active"], 1.0)


def test_unlabeled_instances_count_for_predicted_classes_only(tmp_path):
    """Instances without a label are in the 'prediction' subsets of attribution_map_by and
    neuron_matrix_by, and in no 'label' subset."""
    instances, activations, attributions = _data()
    labels = instances["label"].to_pylist()
    labels = [None if i % 4 == 0 else label for i, label in enumerate(labels)]
    instances = instances.set_column(instances.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    run = write_handmade_run(tmp_path, "unlabeled", instances, activations, attributions, rows_per_part=25).root
    con = open_catalog(run)
    maps = attributions["saliency"].reshape(N, -1)
    prediction = instances["prediction"].to_numpy()
    labelled = np.array([label is not None for label in labels])
    for row in run_query(con, "SELECT * FROM attribution_map_by('saliency', 'prediction')").to_pylist():
        rows = prediction == row["class"]
        assert row["size"] == rows.sum()
        np.testing.assert_allclose(row["mean"], maps[rows].mean(axis=0), rtol=1e-5, atol=1e-6)
    by_label = run_query(con, "SELECT * FROM attribution_map_by('saliency', 'label')").to_pylist()
    assert sum(row["size"] for row in by_label) == labelled.sum()
    by_prediction = run_query(con, "SELECT subset, size FROM neuron_matrix_by('fc', 'prediction') WHERE neuron = 0")
    assert sum(by_prediction["size"].to_pylist()) == N


def _sliced_run(tmp_path, n: int = 2000):
    """A run whose instances carry a continuous column (every value distinct), a text column
    of 30 values of unequal frequency, and a few-valued one: FairVis on real data's shape."""
    rng = np.random.default_rng(5)
    label = rng.integers(0, 2, n)
    instances = pa.table({
        "instance_id": np.arange(n, dtype=np.int64), "label": label,
        "prediction": np.where(rng.uniform(size=n) < 0.8, label, 1 - label),
        "probabilities": S.fixed_vectors(np.full((n, 2), 0.5, np.float32), 2),
        "rotation": pa.array(rng.uniform(-45, 45, n).astype(np.float32)),
        "movie": [f"m{int(k):02d}" for k in np.minimum(rng.geometric(0.15, n), 30)],
        "stroke": rng.choice(["thin", "thick"], n).tolist(),
    })
    run = write_handmade_run(tmp_path, "sliced", instances, {"fc": np.zeros((n, 2), np.float32)}, {}).root
    return open_catalog(run), instances.to_pandas()


def test_a_continuous_column_is_sliced_into_quantile_bins_whose_predicates_select_them(tmp_path):
    con, frame = _sliced_run(tmp_path)
    rows = run_query(con, "SELECT * FROM subgroup_metrics(['rotation'], 1)").to_pylist()
    assert len(rows) == 5  # quintiles, not 2,000 one-instance subgroups
    cuts = np.quantile(frame["rotation"].astype(np.float64), [0.2, 0.4, 0.6, 0.8])
    assert sorted(r["size"] for r in rows) == [400] * 5
    names = {r["subgroup"] for r in rows}
    assert f"rotation < {cuts[0]:.4g}" in names and f"rotation >= {cuts[3]:.4g}" in names
    assert f"rotation in [{cuts[1]:.4g}, {cuts[2]:.4g})" in names
    for row in rows:
        # The predicate selects exactly the subgroup, and its metrics are pandas' on those rows.
        chosen = run_query(con, f"SELECT instance_id FROM instances WHERE {row['predicate']}")["instance_id"].to_numpy()
        assert len(chosen) == row["size"]
        part = frame.set_index("instance_id").loc[chosen]
        assert row["accuracy"] == pytest.approx((part["label"] == part["prediction"]).mean())
    # Ten bins asked for, and cut points given.
    assert len(run_query(con, "SELECT * FROM subgroup_metrics(['rotation:10'], 1)")) == 10
    given = {r["subgroup"]: r["size"] for r in run_query(con, "SELECT * FROM subgroup_metrics(['rotation:-10,0,10'], 1)").to_pylist()}
    r = frame["rotation"]
    assert given == {"rotation < -10": (r < -10).sum(), "rotation in [-10, 0)": ((r >= -10) & (r < 0)).sum(),
                     "rotation in [0, 10)": ((r >= 0) & (r < 10)).sum(), "rotation >= 10": (r >= 10).sum()}


def test_a_many_valued_text_column_keeps_its_most_frequent_values_and_other(tmp_path):
    con, frame = _sliced_run(tmp_path)
    counts = frame["movie"].value_counts()
    assert len(counts) > 12
    rows = {r["subgroup"]: r for r in run_query(con, "SELECT * FROM subgroup_metrics(['movie'], 1)").to_pylist()}
    top = counts.sort_values(ascending=False, kind="stable").index[:11]
    assert set(rows) == {f"movie={m}" for m in top} | {"movie=other"}
    assert rows["movie=other"]["size"] == counts.drop(top).sum()
    other = run_query(con, f"SELECT count(*) AS n FROM instances WHERE {rows['movie=other']['predicate']}")
    assert other["n"][0].as_py() == rows["movie=other"]["size"]
    assert len(run_query(con, "SELECT * FROM subgroup_metrics(['movie:4'], 1)")) == 4  # 3 values and other


def test_sliced_columns_intersect_and_the_suggestions_carry_their_predicates(tmp_path):
    con, frame = _sliced_run(tmp_path)
    rows = run_query(con, "SELECT * FROM subgroup_metrics(['rotation', 'movie', 'stroke'], 1)").to_pylist()
    assert len(rows) <= (5 + 1) * (12 + 1) * (2 + 1)  # bounded whatever the values
    for row in rows:
        n = run_query(con, f"SELECT count(*) AS n FROM instances WHERE {row['predicate']}")["n"][0].as_py()
        assert n == row["size"], row["subgroup"]
    worst = run_query(con, "SELECT * FROM suggested_subgroups(['rotation', 'stroke'], 'accuracy', min_size := 50)")
    assert worst.num_rows > 0
    for row in worst.to_pylist():  # each suggestion's predicate selects exactly its subgroup
        n = run_query(con, f"SELECT count(*) AS n FROM instances WHERE {row['predicate']}")["n"][0].as_py()
        assert n == row["size"] >= 50, row["subgroup"]
