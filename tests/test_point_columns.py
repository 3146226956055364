"""The scatter's memory-mapped point columns (storage/point_columns.py): written at the catalog
build, equal to what SQL over the run says, and mapped, never copied, by the dashboard's session."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from netloupe.dashboards.session import SESSION_SQL_MEMORY_MIB, RunSession
from netloupe.storage import schema as S
from netloupe.storage.catalog import build_catalog, open_catalog, run_query
from netloupe.storage.handmade import write_handmade_run
from netloupe.storage.layout import RunLayout
from netloupe.storage.point_columns import read_point_columns

ROWS = 1000


def _instances(ids) -> tuple[pa.Table, np.ndarray]:
    """Rows in a shuffled id order, nullable labels, text/integer/float metadata with nulls."""
    rng = np.random.default_rng(0)
    prediction = np.arange(ROWS) % 3
    table = pa.table({
        "instance_id": ids,
        "label": pa.array([None if i % 7 == 0 else (i + (i % 10 == 1)) % 3 for i in range(ROWS)], pa.int64()),
        "prediction": prediction,
        "probabilities": S.fixed_vectors(np.eye(3, dtype=np.float32)[prediction] * 0.9 + 0.05, 3),
        "group": pa.array([None if i % 11 == 0 else f"g{i % 4}" for i in range(ROWS)]),
        "count": pa.array([None if i % 5 == 0 else i for i in range(ROWS)], pa.int64()),
        "score": rng.normal(size=ROWS),
        "x": np.zeros(ROWS),  # a metadata column named as a coordinate: left out of the points
    })
    xy = rng.normal(size=(ROWS, 2)).astype(np.float32)
    xy[3] = np.nan  # vectors that were not finite
    xy[17] = np.inf
    return table, xy


@pytest.fixture(scope="module", params=["int64", "string"])
def run_dir(request, tmp_path_factory):
    order = np.random.default_rng(1).permutation(ROWS)
    ids = order.astype(np.int64) if request.param == "int64" else pa.array([f"id-{i:04d}" for i in order])
    table, xy = _instances(ids)
    layout = write_handmade_run(tmp_path_factory.mktemp("points"), "points", table, {"layer": xy},
                                projections={"layer": xy}, rows_per_part=300)
    return layout.root


def _by_sql(run_dir) -> pd.DataFrame:
    """The scatter's frame as SQL over the run reads it (what the dashboard read before)."""
    con = open_catalog(run_dir)
    frame = run_query(con, """
        SELECT i.instance_id, p.pca_x AS x, p.pca_y AS y, i.label, i.prediction, i.confidence, i."group",
               i."count", i.score, i.correct
        FROM instances i JOIN projections p USING (instance_id) ORDER BY instance_id""").to_pandas()
    con.close()
    return frame


def test_every_column_equals_what_sql_says(run_dir):
    session = RunSession(run_dir)
    points = session.points("activations", "layer")
    expected = _by_sql(run_dir)
    assert len(points) == ROWS
    assert points["instance_id"].tolist() == expected["instance_id"].tolist()  # instance_id order
    for axis in "xy":  # NaN and Inf alike become NaN: kept, with no coordinates, drawn nowhere
        stored = expected[axis].to_numpy(np.float32)
        np.testing.assert_array_equal(points[axis].to_numpy(), np.where(np.isfinite(stored), stored, np.nan))
    assert int(points["x"].isna().sum()) == 2 and np.isinf(expected["x"]).sum() == 1
    for column in ("label", "prediction", "confidence", "count", "score"):
        np.testing.assert_array_equal(points[column].to_numpy(float), expected[column].to_numpy(float), err_msg=column)
    assert points["label"].dtype == np.float64 and points["prediction"].dtype == np.int64  # nulls → NaN, as pandas
    assert isinstance(points["group"].dtype, pd.CategoricalDtype)
    assert list(points["group"].cat.categories) == ["g0", "g1", "g2", "g3"]
    assert points["group"].astype(object).where(points["group"].notna(), None).tolist() == \
        expected["group"].astype(object).where(expected["group"].notna(), None).tolist()
    names = {0: "0", 1: "1", 2: "2"}
    assert points["label_name"].astype(object).tolist() == \
        [names[int(v)] if v == v else np.nan for v in expected["label"]]
    assert list(points["label_name"].cat.categories) == session.class_names
    outcome = np.where(expected["correct"].isna(), "unlabeled",
                       np.where(expected["correct"].fillna(False).astype(bool), "correct", "incorrect"))
    assert points["outcome"].astype(str).tolist() == outcome.tolist()
    assert set(points["outcome"].cat.categories) == {"correct", "incorrect", "unlabeled"}


def test_the_frame_maps_the_files_and_copies_nothing(run_dir):
    session = RunSession(run_dir)
    points = session.points("activations", "layer")
    columns = session.point_columns
    x, y = columns.projections[("activations", "layer", "pca")]
    mapped = {"x": x, "y": y, **{name: columns.columns[name] for name in ("confidence", "score", "prediction")}}
    for name, array in mapped.items():
        assert isinstance(array, np.memmap) and np.shares_memory(points[name].to_numpy(), array), name
    codes = columns.columns["group"].codes
    assert isinstance(codes, np.memmap) and np.shares_memory(points["group"].array.codes, codes)
    if isinstance(columns.ids, np.ndarray):
        assert isinstance(columns.ids, np.memmap) and np.shares_memory(points["instance_id"].to_numpy(), columns.ids)
    # Another session of the process maps the same columns (one set of pages).
    assert RunSession(run_dir).point_columns is columns


def test_a_kept_subset_colours_the_points_by_their_ids(run_dir):
    session = RunSession(run_dir)
    points = session.points("activations", "layer")
    session.add_predicate_subset("second group", "\"group\" = 'g1'")
    inside = session.membership(points, "second group")
    assert (inside == "in second group").tolist() == (points["group"] == "g1").fillna(False).tolist()


def test_box_lasso_and_nearest_skip_points_without_coordinates(run_dir):
    session = RunSession(run_dir)
    points = session.points("activations", "layer")
    everything = RunSession.ids_in_box(points, -1e9, -1e9, 1e9, 1e9)
    assert len(everything) == ROWS - 2
    assert set(points["instance_id"][points["x"].isna()]).isdisjoint(everything)
    lasso = RunSession.ids_in_polygon(points, [-1e9, 1e9, 1e9, -1e9], [-1e9, -1e9, 1e9, 1e9])
    assert sorted(lasso.tolist()) == sorted(everything.tolist())
    row = int(np.flatnonzero(points["x"].notna().to_numpy())[5])
    found = RunSession.nearest(points, float(points["x"].iloc[row]), float(points["y"].iloc[row]), 1e-6)
    assert found == points["instance_id"].iloc[row]


def test_a_rebuilt_catalog_replaces_them_and_an_older_run_gets_them_in_the_cache(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    layout = RunLayout(copy)
    before = read_point_columns(layout.points_dir)
    build_catalog(layout, layout.read_manifest())  # `netloupe catalog RUN`
    after = read_point_columns(layout.points_dir)
    assert [p.name for p in copy.iterdir() if p.name.startswith(".points")] == []  # nothing half-written left
    np.testing.assert_array_equal(np.asarray(after.ids), np.asarray(before.ids))
    # A run whose catalog an older netloupe built has no point columns: the session writes
    # them once into the local cache, never into the run.
    shutil.rmtree(layout.points_dir)
    points = RunSession(copy).points("activations", "layer")
    assert not layout.points_dir.exists()
    np.testing.assert_array_equal(points["x"].to_numpy(), np.asarray(before.projections[("activations", "layer", "pca")][0]))


def test_a_text_column_of_too_many_values_is_left_out_of_the_colours(tmp_path, monkeypatch):
    """One colour per value: a free-text column would be a count per pixel and value."""
    import netloupe.storage.point_columns as point_columns

    monkeypatch.setattr(point_columns, "CATEGORY_LIMIT", 3)  # 'group' has 4 values
    table, xy = _instances(np.arange(ROWS, dtype=np.int64))
    layout = write_handmade_run(tmp_path, "many", table, {"layer": xy}, projections={"layer": xy})
    session = RunSession(layout.root)
    assert "group" not in session.point_columns.columns
    assert session.colour_columns == ["count", "score"] and "group" in session.metadata_columns
    assert "x" in session.metadata_columns and "x" not in session.point_columns.columns


def test_a_session_s_duckdb_holds_a_bounded_amount(run_dir):
    session = RunSession(run_dir)
    limit = session.con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    assert limit == f"{SESSION_SQL_MEMORY_MIB}.0 MiB"


def test_the_sorted_ids_are_read_when_first_searched_and_shared_by_sessions(run_dir):
    """A dashboard opens a DuckDB per session: the activation index's sorted ids (160 MB at
    10M) are read by the first selection, once for every session of the process."""
    from netloupe.storage import activation_index

    activation_index._ID_INDEXES.clear()
    a, b = RunSession(run_dir), RunSession(run_dir)
    assert not activation_index._ID_INDEXES  # opening a session reads none
    ids = a.points("activations", "layer")["instance_id"][:5].tolist()
    query = "SELECT * FROM neuron_matrix_ids('layer', ?) ORDER BY neuron"
    first, second = run_query(a.con, query, [ids]), run_query(b.con, query, [ids])
    assert first == second and first["size"].to_pylist() == [5, 5]
    assert len(activation_index._ID_INDEXES) == 1


def test_the_report_counts_and_tallies_only_the_points_it_draws(run_dir):
    """The frame keeps instances without coordinates (NaN); the report's scatter counts those it draws."""
    from netloupe.dashboards.report import scatter_section

    body = scatter_section(RunSession(run_dir), "layer").body
    assert f"Every one of the {ROWS - 2:,} projected instances" in body
    assert "2 instances without a finite projection are left out" in body
