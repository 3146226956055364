"""The dashboard's numbers, without Panel: :class:`netloupe.dashboards.session.RunSession` over a run
whose answers are known (``tests/dashboard_run.py``) or over frames written by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from netloupe.dashboards.session import (
    AGAINST,
    MAX_OPACITY,
    TOWARD,
    RunSession,
    SessionError,
    Subset,
    blended_map,
    map_image,
    read_view_link,
    resize_bilinear,
    write_view_link,
)
from netloupe.storage.catalog import QueryError
from tests.dashboard_run import ROWS, dashboard_images, make_dashboard_run
from tests.tiny_models import tiny_cnn


@pytest.fixture(scope="module")
def run_dir(ray_local, tmp_path_factory):
    return make_dashboard_run(tmp_path_factory.mktemp("dashboard"))


@pytest.fixture(scope="module")
def session(run_dir):
    return RunSession(run_dir)


@pytest.fixture(scope="module")
def truth():
    """Ids, images, and the model's conv means computed directly."""
    table, predictions = dashboard_images()
    images = table["pixels"].combine_chunks().flatten().to_numpy().reshape(ROWS, 1, 4, 4)
    with torch.no_grad():
        conv_means = tiny_cnn().eval().conv(torch.from_numpy(images)).mean(dim=(2, 3)).numpy()
    return {"ids": table["id"].to_numpy(), "images": images, "conv": conv_means,
            "group": np.asarray(table["group"].to_pylist()), "predictions": predictions}


def test_points_are_every_instance_with_its_coordinates(session, run_dir):
    points = session.points("activations", "relu")
    assert len(points) == ROWS
    stored = pq.read_table(run_dir / "projections" / "activations" / "relu").to_pandas()
    merged = points.merge(stored, on="instance_id")
    np.testing.assert_allclose(merged["x"], merged["pca_x"])
    np.testing.assert_allclose(merged["y"], merged["pca_y"])
    assert list(points["label_name"].cat.categories) == ["left", "right"]
    assert set(points["outcome"]) == {"correct", "incorrect"}
    with pytest.raises(SessionError, match="no umap projection"):
        session.points("activations", "relu", "umap")


def test_box_lasso_and_nearest_by_hand():
    points = pd.DataFrame({"instance_id": [1, 2, 3, 4], "x": [0.0, 1.0, 2.0, 0.5], "y": [0.0, 1.0, 0.0, 3.0]})
    assert RunSession.ids_in_box(points, 1.5, -1, -0.5, 1.5).tolist() == [1, 2]  # corners in any order
    # A triangle around (1, 1) and (0.5, 3) but not the bottom corners.
    assert sorted(RunSession.ids_in_polygon(points, [0.2, 1.8, 0.5], [0.5, 0.5, 3.5]).tolist()) == [2, 4]
    assert RunSession.nearest(points, 1.9, 0.1, within=0.2) == 3
    assert RunSession.nearest(points, 5, 5, within=0.2) is None


def test_a_selection_subset_gives_the_mean_activations_of_its_instances(session, truth):
    chosen = truth["ids"][:30]
    subset = session.add_ids_subset("first 30", chosen)
    assert subset.size == 30
    matrix = session.neuron_matrix("conv", [subset])
    np.testing.assert_allclose(matrix.sort_values("neuron")["mean"], truth["conv"][:30].mean(axis=0), rtol=1e-5)
    assert (matrix["subset"] == "first 30").all()
    with pytest.raises(SessionError, match="selection is empty"):
        session.add_ids_subset("empty", [])
    with pytest.raises(SessionError, match="subset name"):
        session.add_ids_subset("bad;name", chosen)


def test_a_predicate_subset_and_its_errors(session, truth):
    subset = session.add_predicate_subset("group b", "\"group\" = 'b'")
    assert subset.size == ROWS // 2
    matrix = session.neuron_matrix("conv", [subset])
    np.testing.assert_allclose(matrix["mean"], truth["conv"][truth["group"] == "b"].mean(axis=0), rtol=1e-5)
    with pytest.raises(SessionError, match="not valid SQL over instances"):
        session.add_predicate_subset("broken", "no_such_column = 1")


def test_class_rows_from_the_stored_sums(session, truth):
    by_correct = session.class_matrix("conv", "correct").set_index(["subset", "neuron"])
    # Group a is all correct, group b all wrong, by construction.
    correct = truth["group"] == "a"
    for neuron in (0, 1):
        assert by_correct.loc[("correct", neuron), "size"] == correct.sum()
        np.testing.assert_allclose(by_correct.loc[("correct", neuron), "mean"],
                                   truth["conv"][correct, neuron].mean(), rtol=1e-5)
    by_prediction = session.class_matrix("conv", "prediction")
    assert set(by_prediction["subset"]) <= {"prediction=left", "prediction=right"}
    with pytest.raises(SessionError, match="no recorded layer 'convv'.*did you mean 'conv'"):
        session.class_matrix("convv", "label")


def test_neuron_order_by_difference_by_hand():
    matrix = pd.DataFrame({"subset": ["A"] * 3 + ["B"] * 3, "neuron": [0, 1, 2] * 2,
                           "mean": [1.0, 5.0, 2.0, 1.0, 1.0, 3.0]})
    assert RunSession.neuron_order(matrix, "A", "B") == [1, 0, 2]  # differences 0, 4, -1
    assert RunSession.neuron_order(matrix, "B", "A") == [2, 0, 1]
    assert RunSession.neuron_order(matrix) == [0, 1, 2]


def test_exemplars_are_the_most_activating_instances(session, truth):
    exemplars = session.exemplars("conv", 1, k=3)
    expected = truth["ids"][np.argsort(-truth["conv"][:, 1], kind="stable")[:3]]
    assert exemplars["instance_id"].tolist() == expected.tolist()


def test_instance_detail(session, truth):
    instance_id = int(truth["ids"][7])
    detail = session.instance(instance_id)
    assert detail.row["prediction"] == truth["predictions"][7]
    assert set(detail.maps) == {"saliency", "integrated_gradients"}
    assert detail.maps["saliency"].shape == (1, 4, 4)
    np.testing.assert_allclose(detail.input, truth["images"][7])
    np.testing.assert_allclose(detail.activations["conv"], truth["conv"][7], rtol=1e-5)
    assert map_image(detail.maps["saliency"]).shape == (4, 4)
    with pytest.raises(SessionError, match="no instance with id 99999"):
        session.instance(99999)


def test_a_map_is_resized_bilinearly_and_blended_over_its_input_by_hand():
    # 2x2 → 4x4: the corners keep their cells; (1, 1) lies a quarter of a cell from cell (0, 0)
    # toward each neighbour: 0·9/16 + 1·3/16 + 2·3/16 + 3·1/16 = 0.75.
    resized = resize_bilinear(np.array([[0.0, 1.0], [2.0, 3.0]]), (4, 4))
    assert resized[0, 0] == 0 and resized[3, 3] == 3 and resized[1, 1] == pytest.approx(0.75)
    np.testing.assert_allclose(resized[0], [0, 0.25, 0.75, 1])
    image = np.array([[0.0, 2.0], [4.0, 4.0]])  # gray 0, 0.5, 1, 1
    blended = blended_map(image, np.array([[0.0, 0.5], [-1.0, 2.0]]), bound=1.0)
    assert blended.shape == (2, 2, 3) and blended.dtype == np.uint8
    np.testing.assert_array_equal(blended[0, 0], [0, 0, 0])  # no value: the input's own gray (black)
    half = 0.5 * MAX_OPACITY
    np.testing.assert_array_equal(blended[0, 1], np.round((1 - half) * 127.5 + half * TOWARD))
    np.testing.assert_array_equal(blended[1, 0], np.round((1 - MAX_OPACITY) * 255 + MAX_OPACITY * AGAINST))
    # Beyond the bound (2 against 1): full colour, not more.
    np.testing.assert_array_equal(blended[1, 1], np.round((1 - MAX_OPACITY) * 255 + MAX_OPACITY * TOWARD))


def test_the_instance_view_draws_every_map_at_one_size_over_its_input(session, truth):
    import holoviews as hv
    import holoviews.plotting.bokeh  # noqa: F401 - the dashboard's plotting extension, as serve() loads it

    from netloupe.dashboards.app import MAP_SIZE, Dashboard, InstanceView

    view = InstanceView(Dashboard(session))
    instance_id = str(int(truth["ids"][7]))

    def plots(over: bool, shared: bool) -> list:
        panel = view._detail(instance_id, over, shared)
        rows = next(p for p in panel.objects if "heatmaps" in (p.css_classes or []))
        return [pane.object for row in rows for pane in row]

    def frame(element) -> tuple:
        options = hv.Store.lookup_options("bokeh", element, "plot").kwargs
        return options["frame_width"], options["frame_height"]

    over = plots(True, False)
    assert [type(e).__name__ for e in over] == ["Image", "RGB", "RGB"]  # the input, then each map over it
    assert {frame(e) for e in over} == {(MAP_SIZE, MAP_SIZE)}  # one size, whatever the titles and bars
    detail = session.instance(int(truth["ids"][7]))
    bounds = {m: float(np.abs(v).max()) for m, v in detail.maps.items()}
    titles = [e.opts.get().kwargs["title"] for e in over[1:]]
    assert titles == [f"{m} ±{bounds[m]:.2g}" for m in detail.maps]
    shared = [e.opts.get().kwargs["title"] for e in plots(True, True)[1:]]
    assert all(t.endswith(f"±{max(bounds.values()):.2g}") for t in shared)
    alone = plots(False, False)
    assert [type(e).__name__ for e in alone] == ["Image", "Image", "Image"]
    assert {frame(e) for e in alone} == {(MAP_SIZE, MAP_SIZE)}
    # Each map on a symmetric scale: its own largest |value| at full colour, either sign.
    assert [e.opts.get().kwargs["clim"] for e in alone[1:]] == [(-bounds[m], bounds[m]) for m in detail.maps]


def test_a_coarse_map_without_its_input_covers_the_input_s_extent():
    """A 7x7 Grad-CAM beside a 28x28 input: drawn over the same 28x28 extent (filling its
    frame), not on its own 7x7 cells in a corner of shared axes."""
    from netloupe.dashboards.app import InstanceView

    coarse = np.arange(49, dtype=np.float32).reshape(7, 7)
    element = InstanceView._map("grad_cam", coarse, 48.0, None, extent=(28, 28))
    assert element.bounds.lbrt() == (0, 0, 28, 28)
    over = InstanceView._map("grad_cam", coarse, 48.0, np.zeros((28, 28), np.float32))
    assert over.data.shape[:2] == (28, 28)  # resized over the whole image


def test_the_instance_tab_opens_on_the_most_confident_mistake(session, truth):
    from netloupe.dashboards.app import Dashboard, InstanceView

    rows = session.sql("SELECT instance_id, confidence, correct FROM instances").to_pandas()
    wrong = rows[~rows["correct"]]
    expected = wrong.sort_values(["confidence", "instance_id"], ascending=[False, True])["instance_id"].iloc[0]
    instance_id, reason = session.opening_instance()
    assert instance_id == expected
    assert truth["group"][list(truth["ids"]).index(instance_id)] == "b"  # group b: every answer wrong
    assert reason.startswith("the most confident mistake: labelled ")
    dashboard = Dashboard(session)
    view = InstanceView(dashboard)
    assert dashboard.instance_id == str(expected) and view.id_input.value == str(expected)

    def notes() -> list[str]:
        return [p.object for p in view._detail(dashboard.instance_id).objects if "instance-note" in p.css_classes]

    [note] = notes()
    assert note.startswith("Showing the most confident mistake") and f"{wrong['confidence'].max():.3f}" in note
    dashboard.show_instance(int(truth["ids"][3]))  # chosen: the box follows, the note goes
    assert view.id_input.value == str(int(truth["ids"][3])) and notes() == []


def test_a_view_link_is_written_and_read_back():
    subsets = [Subset("thin wrong", predicate="stroke = 'thin' AND NOT correct"),
               Subset("picked", ids=(1, 2, 3), size=3),  # a selection's ids stay out of the link
               Subset("a~b?", predicate="x = '&~#'")]
    query = write_view_link({"tab": "instance", "layer": "relu3", "projection": "activations/relu3",
                             "algorithm": "pca", "color": "subset: thin wrong", "instance": "42"}, subsets)
    assert query.startswith("?tab=instance&layer=relu3&projection=activations%2Frelu3&")
    link = read_view_link(query)
    assert link.values == {"tab": "instance", "layer": "relu3", "projection": "activations/relu3",
                           "algorithm": "pca", "color": "subset: thin wrong", "instance": "42"}
    # The name ends at the first ~ (never in a name), the predicate is kept whole.
    assert link.subsets == [("thin wrong", "stroke = 'thin' AND NOT correct"), ("a", "b?~x = '&~#'")]
    assert link.notes == []
    assert write_view_link({"instance": None}, []) == ""
    odd = read_view_link("?layer=&who=me&subset=nothing")
    assert odd.values == {} and odd.subsets == []
    assert odd.notes == ["'who' (not part of a view)", "subset 'nothing' (not NAME~PREDICATE)"]


def test_a_link_s_view_is_restored_and_what_the_run_lacks_is_noted(session, truth):
    from netloupe.dashboards.app import Dashboard

    dashboard = Dashboard(session)
    wanted = {"layer": "conv", "projection": "activations/relu", "color": "subset: wrong",
              "instance": str(int(truth["ids"][5]))}
    link = read_view_link(write_view_link(wanted, [Subset("wrong", predicate="NOT correct")]))
    try:
        assert dashboard.restore(link) == []
        assert dashboard.link_values() == {**wanted, "algorithm": "pca"}
        assert session.subset("wrong").size == int((truth["group"] == "b").sum())
    finally:
        session.remove_subset("wrong")
    fresh = Dashboard(session)
    defaults = fresh.link_values()
    bad = read_view_link("?layer=nope&color=zzz&instance=99999&projection=activations/nope&subset=bad~no_such = 1")
    notes = fresh.restore(bad)
    assert notes == ["subset 'bad' (its name or its SQL predicate over instances is not valid)",
                     f"layer 'nope' (showing {defaults['layer']})",
                     f"projection 'activations/nope' (showing {defaults['projection']})",
                     "color 'zzz' (showing label_name)", "instance '99999'"]
    assert fresh.link_values() == defaults and "bad" not in session.subsets
    assert fresh.restore(read_view_link("?instance=not-a-number")) == ["instance 'not-a-number'"]


def test_fidelity_of_an_instance_and_of_the_run(session, truth):
    from netloupe.workers.fidelity import in_sample

    ids = [int(i) for i in truth["ids"]]
    sampled = [i for i, chosen in zip(ids, in_sample(ids, 0, 24 / len(ids))) if chosen]
    outside = next(i for i in ids if i not in sampled)
    for instance_id, has_sample in ((sampled[0], True), (outside, False)):
        checks = session.instance(instance_id).fidelity
        assert set(checks) == {"saliency", "integrated_gradients"}
        ig = checks["integrated_gradients"]
        assert len(ig["deletion_curve"]) == 5 and 0 <= ig["deletion_auc"] <= 1
        # The deletion curve starts at the model's own probability of the explained class.
        row = session.instance(instance_id).row
        assert ig["deletion_curve"][0] == pytest.approx(row["confidence"], rel=1e-5)
        assert ("randomization_spearman" in ig) is has_sample
    summary = session.fidelity_summary().set_index("method")
    assert list(summary.index) == ["integrated_gradients", "saliency"]
    assert (summary["sampled"] == len(sampled)).all()
    assert summary.loc["saliency", "mean_abs_convergence_delta"] is None or np.isnan(
        summary.loc["saliency", "mean_abs_convergence_delta"])
    assert summary.loc["integrated_gradients", "mean_abs_convergence_delta"] < 0.05


def test_subgroups_find_the_group_the_model_gets_wrong(session):
    overview = session.subgroups(["group", "noise"]).set_index("subgroup")
    assert overview.loc["group=a", "accuracy"] == 1.0
    assert overview.loc["group=b", "accuracy"] == 0.0
    worst = session.suggested_subgroups(["group", "noise"], "accuracy", min_size=30)
    assert worst["subgroup"].iloc[0] == "group=b"  # accuracy 0, and the largest such subgroup
    distribution = session.distribution("noise").set_index("value")
    assert distribution.loc["high", "size"] == len(range(0, ROWS, 3))
    with pytest.raises(SessionError, match="did you mean 'noise'"):
        session.distribution("nosie")


def test_two_subgroups_side_by_side(session):
    rows = session.subgroups(["group"]).to_dict("records")
    predicates = {row["subgroup"]: row["predicate"] for row in rows}
    assert predicates["group=a"] == "\"group\" = 'a'"
    table = session.compare_subgroups(predicates)
    assert table.loc["accuracy", "group=a"] == 1.0 and table.loc["accuracy", "group=b"] == 0.0
    assert table.loc["size", "group=a"] == ROWS // 2


def test_a_continuous_column_is_binned_in_every_subgroup_view(session):
    """``rotation`` has a value per instance: its distribution, subgroups and suggestions come
    in quantile bins (or the bins asked for), each with the predicate that selects it."""
    distribution = session.distribution("rotation")
    assert len(distribution) == 5 and distribution["size"].sum() == ROWS
    assert distribution["value"].iloc[0].startswith("< ") and distribution["value"].iloc[-1].startswith(">= ")
    for row in distribution.to_dict("records"):
        assert session.sql(f"SELECT count(*) AS n FROM instances WHERE {row['predicate']}")["n"][0].as_py() == row["size"]
    assert len(session.distribution("rotation", bins=3)) == 3
    spec = session.slice_spec("rotation", cuts="-10, 0, 10")
    assert spec == "rotation:-10,0,10" and len(session.subgroups([spec])) == 4
    assert session.slice_spec("group", bins=3) == "group"  # a text column is not binned
    with pytest.raises(SessionError, match="cut points of 'rotation' are numbers"):
        session.slice_spec("rotation", cuts="ten, twenty")
    both = session.subgroups(["group", "rotation"])
    assert len(both) == 2 + 5 + 2 * 5
    worst = session.suggested_subgroups(["group", "rotation"], "accuracy", min_size=10)
    assert worst["subgroup"].iloc[0].startswith("group=b")


def test_no_subgroup_view_ships_more_than_a_bounded_number_of_marks(tmp_path):
    """A million instances whose ``score`` and ``name`` columns have a value each: the
    distribution is 5 bars and 12, the subgroups table at most MAX_SUBGROUP_ROWS rows."""
    import holoviews as hv
    import holoviews.plotting.bokeh  # noqa: F401 - the dashboard's plotting extension

    from netloupe.dashboards.app import MAX_SUBGROUP_ROWS, Dashboard, SubgroupsView
    from netloupe.storage import schema as S
    from netloupe.storage.handmade import write_handmade_run

    n = 1_000_000
    rng = np.random.default_rng(3)
    label = rng.integers(0, 2, n)
    instances = pa.table({
        "instance_id": np.arange(n, dtype=np.int64), "label": label, "prediction": np.where(rng.uniform(size=n) < 0.9, label, 1 - label),
        "probabilities": S.fixed_vectors(np.full((n, 2), 0.5, np.float32), 2),
        "score": rng.normal(size=n), "name": pa.array([f"n{i}" for i in range(n)]),
    })
    run = write_handmade_run(tmp_path, "million", instances, {"fc": np.zeros((n, 1), np.float32)}, {}).root
    big = RunSession(run)
    assert len(big.distribution("score")) == 5 and len(big.distribution("name")) == 12
    view = SubgroupsView(Dashboard(big))
    charts = view._distributions()
    assert [len(pane.object.data) for pane in charts.objects] == [5, 12]
    overview = view._overview(["score", "name"], "accuracy", 0, 5, "")
    assert len(view.table.value) <= MAX_SUBGROUP_ROWS and len(overview.data) <= 40
    assert isinstance(overview, hv.Bars)
    assert len(view._suggested(["score", "name"], "accuracy", 0, 5, "")) <= 10


def test_model_graph_highlights_the_recorded_layers(session):
    nodes, edges = session.graph_layout()
    chain = ["x", "conv", "relu", "pool", "flatten", "head", "output"]
    assert nodes["id"].tolist() == chain
    assert nodes["x"].tolist() == list(range(len(chain)))  # a chain: each node one step further
    assert nodes.loc[nodes["recorded"], "module"].tolist() == ["conv", "relu", "head"]
    assert len(edges) == len(chain) - 1


def test_the_sql_console_reads_and_refuses_writes(session):
    assert session.sql("SELECT count(*) AS n FROM instances")["n"][0].as_py() == ROWS
    with pytest.raises(QueryError):
        session.sql("DROP TABLE instances")
    with pytest.raises(QueryError):
        session.sql("COPY instances TO '/tmp/out.csv'")


def test_a_handmade_run_shows_the_coordinates_it_was_given(tmp_path):
    from netloupe.storage import schema as S
    from netloupe.storage.handmade import write_handmade_run

    ids = np.array([5, 3, 9, 1])
    instances = pa.table({"instance_id": ids, "label": [0, 1, 1, 0], "prediction": [0, 1, 0, 0],
                          "probabilities": S.fixed_vectors(np.full((4, 2), 0.5, np.float32), 2),
                          "site": ["n", "s", "s", "n"]})
    coordinates = np.array([[0, 1], [2, 3], [4, 5], [6, 7]], np.float32)
    layout = write_handmade_run(tmp_path, "given", instances, {"l": np.eye(4, 3, dtype=np.float32)},
                                projections={"l": coordinates})
    session = RunSession(layout.root)
    assert session.projections == [("activations", "l")]
    points = session.points("activations", "l").set_index("instance_id").loc[ids]
    np.testing.assert_array_equal(points[["x", "y"]].to_numpy(), coordinates)
    assert points["site"].tolist() == ["n", "s", "s", "n"]
    with pytest.raises(ValueError, match="recorded layers"):
        write_handmade_run(tmp_path, "wrong", instances, {"l": np.eye(4, 3, dtype=np.float32)},
                           projections={"m": coordinates})


# -- the scatter's raster, without a browser ------------------------------------------------

def _scatter_points() -> pd.DataFrame:
    """Three instances: two of class a at the left and bottom-left, one of b at the right."""
    return pd.DataFrame({"instance_id": [1, 2, 3], "x": [0.0, 0.0, 10.0], "y": [0.0, 10.0, 5.0],
                         "label_name": pd.Categorical(["a", "a", "b"]), "confidence": [0.2, 0.4, 0.9]})


def test_the_scatter_raster_puts_each_point_in_its_pixel_with_its_class_color():
    from netloupe.dashboards.scatter import RASTER_SIZE, InstanceScatter

    points = _scatter_points()
    scatter = InstanceScatter(points, "label_name", "t", on_select=lambda *a: None, on_tap=lambda *a: None)
    data = scatter.render((-1.0, 11.0), (-1.0, 11.0))
    image = data["image"][0]
    assert image.shape == (RASTER_SIZE[1], RASTER_SIZE[0]) and image.dtype == np.uint32
    assert (data["x"][0], data["y"][0], data["dw"][0], data["dh"][0]) == (-1.0, -1.0, 12.0, 12.0)
    rgba = image.view(np.uint8).reshape(*image.shape, 4)
    drawn = rgba[..., 3] > 0
    rows, columns = np.nonzero(drawn)
    # Row 0 is the lowest y (as Bokeh draws images): the point at y=0 is near the bottom row.
    def near(x, y):
        column = (x + 1) / 12 * RASTER_SIZE[0]
        row = (y + 1) / 12 * RASTER_SIZE[1]
        close = (np.abs(columns - column) <= 4) & (np.abs(rows - row) <= 4)
        return rgba[rows[close], columns[close], :3]
    a_color = tuple(int(scatter.colors["a"][i:i + 2], 16) for i in (1, 3, 5))
    b_color = tuple(int(scatter.colors["b"][i:i + 2], 16) for i in (1, 3, 5))
    for x, y, color in [(0, 0, a_color), (0, 10, a_color), (10, 5, b_color)]:
        found = near(x, y)
        assert len(found) > 0 and (found == color).all(axis=1).any(), (x, y)
    assert drawn.sum() <= 3 * 21  # three points, each a disc of 21 pixels (radius 2), nothing else
    # Zoomed on the right-hand point only: the a points leave the picture.
    zoomed = scatter.render((9.0, 11.0), (4.0, 6.0))["image"][0].view(np.uint8).reshape(*image.shape, 4)
    colors = {tuple(c) for c in zoomed[zoomed[..., 3] > 0][:, :3]}
    assert colors == {b_color}


def test_the_scatter_colors_a_number_on_one_scale_and_hovers_only_when_few():
    from netloupe.dashboards.scatter import InstanceScatter

    points = _scatter_points()
    scatter = InstanceScatter(points, "confidence", "t", on_select=lambda *a: None, on_tap=lambda *a: None)
    assert scatter.span == (0.2, 0.9)
    assert sorted(scatter._hoverable((-1, 11), (-1, 11))["instance_id"].tolist()) == [1, 2, 3]
    assert scatter._hoverable((9, 11), (4, 6))["label_name"].tolist() == ["b"]
    assert RunSession.points_in_view(points, (-1, 11), (-1, 11), limit=2) is None


def test_scatter_selections_and_taps_come_back_as_ids():
    from bokeh.events import SelectionGeometry, Tap

    from netloupe.dashboards.scatter import InstanceScatter

    picked, tapped = [], []
    scatter = InstanceScatter(_scatter_points(), "label_name", "t", on_select=lambda ids, tool: picked.append(
        (sorted(ids.tolist()), tool)), on_tap=tapped.append)
    figure = scatter.figure
    scatter._on_selection(SelectionGeometry(figure, geometry={"type": "rect", "x0": -1, "x1": 1, "y0": -1, "y1": 11},
                                            final=False))
    assert picked == []  # only a finished drag counts
    scatter._on_selection(SelectionGeometry(figure, geometry={"type": "rect", "x0": -1, "x1": 1, "y0": -1, "y1": 11},
                                            final=True))
    scatter._on_selection(SelectionGeometry(figure, geometry={"type": "poly", "x": [5, 12, 12], "y": [5, 0, 10]},
                                            final=True))
    assert picked == [([1, 2], "box"), ([3], "lasso")]
    scatter._on_tap(Tap(figure, x=9.9, y=5.1))
    scatter._on_tap(Tap(figure, x=5.0, y=5.0))  # nothing within 2% of the view's width
    assert tapped == [3]


def test_the_scatter_can_be_colored_by_a_kept_subset(session):
    from netloupe.dashboards.app import Dashboard

    dashboard = Dashboard(session)
    session.add_predicate_subset("wrong ones", "\"group\" = 'b'")
    session.add_ids_subset("three", [100, 101, 102])
    dashboard.added_subset()
    assert {"subset: wrong ones", "subset: three"} <= set(dashboard.param.color_by.objects)
    dashboard.color_by = "subset: three"
    points = dashboard.colored_points()
    inside = points.loc[points["subset: three"] == "in three", "instance_id"]
    assert sorted(inside.tolist()) == [100, 101, 102]
    assert "subset: three" not in dashboard.points()  # the shared cache is left alone
    wrong = session.membership(points, "wrong ones")
    assert (np.asarray(wrong == "in wrong ones") == (points["group"] == "b").to_numpy()).all()
    session.remove_subset("wrong ones")
    session.remove_subset("three")


def test_choosing_a_layer_switches_the_projection(session):
    from netloupe.dashboards.app import Dashboard

    dashboard = Dashboard(session)
    for layer in session.layers:
        dashboard.layer = layer
        assert dashboard.projection == f"activations/{layer}"


def test_lone_points_are_drawn_as_discs_and_a_crowd_stays_exact():
    from netloupe.dashboards.scatter import LONE_CROWD, LONE_RADIUS, spread_lone_points

    opaque = np.uint32(0xFF0000FF)  # alpha in the top byte
    empty = np.uint32(0x00FFFFFF)  # Datashader's empty pixels keep a colour, with alpha 0
    image = np.full((40, 40), empty, np.uint32)
    image[10:20, 10:20] = np.uint32(0x80000000) | np.arange(100, dtype=np.uint32).reshape(10, 10)  # a crowd
    image[30, 30] = opaque  # alone
    image[30, 5], image[31, 5] = opaque, opaque  # a pair: neighbours, not lone
    spread = spread_lone_points(image, LONE_RADIUS, LONE_CROWD)
    occupied = (image >> 24) != 0
    np.testing.assert_array_equal(spread[occupied], image[occupied])  # every drawn pixel exact
    grown = ((spread >> 24) != 0) & ~occupied
    rows, columns = np.nonzero(grown)
    # Only the lone point grew: a disc of radius 2 (21 pixels with it) around it, in its colour.
    assert set(zip(rows.tolist(), columns.tolist())) == {
        (30 + dy, 30 + dx) for dy in range(-2, 3) for dx in range(-2, 3) if 0 < dy * dy + dx * dx <= 6}
    assert (spread[grown] == opaque).all()
    # A crowd's edge stays where it was: nothing is added around it.
    assert not grown[8:22, 8:22].any() and not grown[28:34, 3:8].any()


def test_the_scatter_colours_a_text_column_one_colour_per_value(session):
    """A metadata column of texts (pandas' string dtype, as DuckDB hands it over) is a category,
    whatever pandas calls texts: one colour per value, not a scale of numbers."""
    from netloupe.dashboards.scatter import InstanceScatter

    points = session.points("activations", session.layers[-1])
    assert isinstance(points["noise"].dtype, pd.CategoricalDtype)
    scatter = InstanceScatter(points, "noise", "t", on_select=lambda *a: None, on_tap=lambda *a: None)
    assert set(scatter.colors) == {"high", "low"}
