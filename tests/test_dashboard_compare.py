"""The dashboard's compare mode (issue 18): :class:`netloupe.dashboards.comparison.ComparisonSession`
against answers worked out by hand, ``netloupe dashboard`` given a run group or several runs,
and the Across-runs tab in a real browser.

The runs are a group of three checkpoints written directly (:mod:`netloupe.storage.handmade`,
no model, no Ray), so that every prediction, confidence and map is chosen here:

- 600 instances, ids 0..599; label ``i % 2``; ``stroke`` thin where ``i % 3 == 0``.
- ``c0`` predicts 0 everywhere: right on the 300 even ids. ``c1`` is right except on the thin
  1s (``i % 6 == 3``, 100 of them), which it calls 0. ``c2`` is right everywhere.
- Confidences: ``c0`` 0.6 + 0.3 ``i`` / 599, ``c1`` 0.9, ``c2`` 0.9 - 0.3 ``i`` / 599.
- Saliency maps, 2×2: ``c0``'s all zero; ``c2``'s [1, 2, 3, 4]; ``c1``'s [8, 6, 4, 2] on even
  ids and [2, 4, 6, 8] on odd ones (against ``c2``: rank correlation -1 and 1).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from netloupe.contract.errors import RunError
from netloupe.dashboards.comparison import (
    _MAP_AGREEMENT,
    AGREE,
    AGREEMENT,
    ALL,
    DISAGREE,
    MAP_AGREEMENT_KEPT,
    RANK_CORRELATION,
    ComparisonSession,
)
from netloupe.dashboards.session import SessionError, run_key
from netloupe.pipeline.cli import dashboard_runs
from netloupe.pipeline.cli import main as cli_main
from netloupe.storage import schema as S
from netloupe.storage.handmade import write_handmade_run
from netloupe.storage.manifest import InfluenceInfo
from netloupe.storage.run_group import GroupMember, RunGroupRecord, influence_path, write_group
from tests.helpers import wait_until
from tests.test_dashboard_browser import (  # noqa: F401 (browser: a fixture)
    ARTIFACTS,
    browser,
    colored,
    open_page,
    open_tab,
    start_dashboard,
    text_of,
    wait_for_text,
)

N = 600
IDS = np.arange(N)
LABELS = IDS % 2
THIN = IDS % 3 == 0
PREDICTIONS = {"c0": np.zeros(N, int), "c1": np.where(IDS % 6 == 3, 0, LABELS), "c2": LABELS.copy()}
CONFIDENCES = {"c0": 0.6 + 0.3 * IDS / (N - 1), "c1": np.full(N, 0.9), "c2": 0.9 - 0.3 * IDS / (N - 1)}
C2_MAP = np.array([1.0, 2.0, 3.0, 4.0])
MAPS = {"c0": np.zeros((N, 4)), "c2": np.tile(C2_MAP, (N, 1)),
        "c1": np.where((IDS % 2 == 0)[:, None], [8.0, 6.0, 4.0, 2.0], [2.0, 4.0, 6.0, 8.0])}


def _instances(name: str) -> pa.Table:
    predictions, confidence = PREDICTIONS[name], CONFIDENCES[name]
    probabilities = np.empty((N, 2), np.float32)
    probabilities[IDS, predictions] = confidence
    probabilities[IDS, 1 - predictions] = 1 - confidence
    return pa.table({"instance_id": IDS.astype(np.int64), "label": LABELS.astype(np.int64),
                     "prediction": predictions.astype(np.int64), "probabilities": S.fixed_vectors(probabilities, 2),
                     "stroke": np.where(THIN, "thin", "heavy").astype(object)})


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> Path:
    """The three checkpoints as a run group (``group.json`` lists them in order). Every run is
    placed on one grid of 30 × 20 points, so that the scatter covers its plot."""
    directory = tmp_path_factory.mktemp("compare-dashboard") / "steps"
    grid = np.stack([IDS % 30, IDS // 30], axis=1).astype(np.float32)
    for name in PREDICTIONS:
        activations = np.random.default_rng(len(name)).normal(size=(N, 3)).astype(np.float32)
        write_handmade_run(directory, name, _instances(name), {"fc": activations},
                           attributions={"saliency": MAPS[name].reshape(N, 1, 2, 2).astype(np.float32)},
                           projections={"fc": grid})
    write_group(directory, RunGroupRecord(run_name="steps", influence=_group_influence(directory), members=[
        GroupMember(name=name, checkpoint=f"/checkpoints/{name}.safetensors") for name in PREDICTIONS]))
    return directory


TRAINING_IDS = np.arange(1000, 1008)
INFLUENCE_OF_299 = [("proponent", 1, 1003, 0.5), ("proponent", 2, 1001, 0.2),
                    ("opponent", 1, 1006, -0.4), ("opponent", 2, 1002, -0.1)]
"""The group's influence: instance 299's two proponents and two opponents, among eight training
examples whose 2×2 images are all ``(id - 1000) / 8`` and whose labels are ``id % 2``."""


def _group_influence(directory: Path) -> InfluenceInfo:
    training = pa.table({"tid": pa.array(TRAINING_IDS, pa.int64()),
                         "pixels": pa.array([[float(i - 1000) / 8] * 4 for i in TRAINING_IDS], pa.list_(pa.float32())),
                         "y": pa.array(TRAINING_IDS % 2, pa.int64())})
    pq.write_table(training, directory.parent / "training.parquet")
    rows = pa.table({"instance_id": [299] * 4, "train_id": [r[2] for r in INFLUENCE_OF_299],
                     "score": [r[3] for r in INFLUENCE_OF_299], "rank": [r[1] for r in INFLUENCE_OF_299],
                     "sign": [r[0] for r in INFLUENCE_OF_299]}).cast(S.influence_schema())
    influence_path(directory).parent.mkdir(parents=True)
    pq.write_table(rows, influence_path(directory))
    return InfluenceInfo(training_path=str(directory.parent / "training.parquet"), training_id_column="tid",
                         training_input_columns=["pixels"], training_label_column="y", training_rows=8, layer="fc",
                         k=2, checkpoints=[f"/checkpoints/{name}.safetensors" for name in PREDICTIONS],
                         learning_rates=[1.0] * 3, target="predicted", seconds=0.0)


@pytest.fixture(scope="module")
def comparison(group):
    session = ComparisonSession({name: group / name for name in PREDICTIONS})
    yield session
    session.close()


def test_agreement_counts_and_disagreements_most_confident_first(comparison):
    # c0 says 0 everywhere, c2 the label: they differ on the 300 odd ids; c0 is right on the even ones.
    assert comparison.agreement("c0", "c2") == {
        "instances": 600, "same_prediction": 300, "agreement": 0.5, "both_correct": 300, "only_a_correct": 0,
        "only_b_correct": 300, "both_wrong": 0, "disagreements": 300}
    # c1 and c2 differ on the thin 1s (i % 6 == 3), where only c2 is right.
    counts = comparison.agreement("c1", "c2")
    assert (counts["disagreements"], counts["only_b_correct"], counts["both_correct"]) == (100, 100, 500)
    # Most confident first: the lower of the two confidences. c0's grows with the id and c2's
    # falls as fast from 0.9, so they cross at id 299.5: the odd ids nearest come first, 299
    # (0.74975, c0's) before 301 (0.74925, c2's), then 297 and 303.
    listed = comparison.disagreements("c0", "c2")
    assert len(listed) == 200  # the list is capped; all 300 without a limit
    assert listed["instance_id"].tolist()[:4] == [299, 301, 297, 303]
    assert len(comparison.disagreements("c0", "c2", limit=None)) == 300
    instance_id, why = comparison.default_instance("c0", "c2")
    assert instance_id == 299 and type(instance_id) is int
    assert "where both are most confident" in why and "c0: 0 at" in why and "c2: 1 at" in why
    # Runs that agree everywhere: the first instance, and said so.
    assert comparison.default_instance("c2", "c2") == (0, "c2 and c2 predict every instance alike; the first instance")


def test_the_scatter_is_coloured_by_agreement_or_by_map_rank_correlation(comparison):
    points = comparison.run_session("c2").points("activations", "fc")
    coloured = comparison.agreement_points(points, "c1", "c2", AGREEMENT)
    expected = np.where(points["instance_id"].to_numpy() % 6 == 3, DISAGREE, AGREE)
    assert coloured[AGREEMENT].astype(str).tolist() == expected.tolist()
    assert AGREEMENT not in points  # the shared cache of points is never written to
    assert comparison.colour_choices() == [AGREEMENT, "saliency" + RANK_CORRELATION]
    by_maps = comparison.agreement_points(points, "c1", "c2", "saliency" + RANK_CORRELATION)
    rho = by_maps["saliency" + RANK_CORRELATION].to_numpy()
    np.testing.assert_allclose(rho, np.where(points["instance_id"].to_numpy() % 2 == 0, -1.0, 1.0))
    # c0's maps are constant: no rank correlation at all.
    assert comparison.map_agreement("c0", "c2", "saliency")["rank_correlation"].isna().all()
    with pytest.raises(SessionError, match="no map of 'gradcam'"):
        comparison.map_agreement("c0", "c2", "gradcam")
    # The process keeps the last few pairs only: a group of K runs has K² of them.
    pairs = [(a, b) for a in ("c0", "c1", "c2") for b in ("c0", "c1", "c2") if a != b]
    for a, b in pairs:
        comparison.map_agreement(a, b, "saliency")
    assert list(_MAP_AGREEMENT) == [(run_key(comparison.runs[a]), run_key(comparison.runs[b]), "saliency")
                                    for a, b in pairs[-MAP_AGREEMENT_KEPT:]]


def test_a_subset_s_metric_over_the_runs_has_a_line_per_slice_and_all(comparison):
    frame = comparison.metric_by_run("", "stroke")
    accuracy = frame.pivot(index="subgroup", columns="run", values="accuracy")
    assert list(frame["run"].iloc[:3]) == ["c0", "c1", "c2"]  # the group's order
    assert sorted(accuracy.index) == [ALL, "stroke = heavy", "stroke = thin"]
    # c1 misses the 100 thin 1s: 500 of 600 overall, 100 of the 200 thin, all 400 heavy.
    assert accuracy.loc[ALL].tolist() == pytest.approx([0.5, 500 / 600, 1.0])
    assert accuracy.loc["stroke = thin"].tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert accuracy.loc["stroke = heavy"].tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert frame.loc[frame["subgroup"] == "stroke = thin", "size"].tolist() == [200, 200, 200]
    # A predicate and the label: the lines are within it; class 1's recall by hand.
    within = comparison.metric_by_run("stroke = 'thin'", "label", positive=1)
    recall = within.pivot(index="subgroup", columns="run", values="recall")
    assert sorted(recall.index) == [ALL, "label = 0", "label = 1"]
    assert recall.loc[ALL].tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert within.loc[within["subgroup"] == "label = 1", "size"].tolist() == [100, 100, 100]
    with pytest.raises(SessionError, match="not valid SQL over instances"):
        comparison.metric_by_run("strok = 1")
    with pytest.raises(SessionError, match="split by"):
        comparison.metric_by_run("", "prediction")


def test_one_instance_across_runs_shares_each_method_s_colour_scale(comparison):
    across = comparison.instance_across_runs(4)  # even: c1's map is c2's reversed
    assert list(across.records) == ["c0", "c1", "c2"]
    facts = across.facts.set_index("run")
    assert facts["prediction"].tolist() == ["0", "0", "0"] and across.label == "0"
    assert facts["confidence"].tolist() == pytest.approx([0.6 + 0.3 * 4 / 599, 0.9, 0.9 - 0.3 * 4 / 599])
    assert facts["saliency ρ with c2"].tolist()[1:] == pytest.approx([-1.0, 1.0])
    assert np.isnan(facts["saliency ρ with c2"].iloc[0])  # c0's map is constant: no ranking
    # One scale per method: the largest |value| of any run's map (c1's 8); each run's own beside it.
    assert across.bounds == {"saliency": 8.0}
    assert across.own_bounds == {"saliency": {"c0": 0.0, "c1": 8.0, "c2": 4.0}}
    np.testing.assert_array_equal(across.maps["saliency"]["c2"], C2_MAP.reshape(2, 2))
    assert across.input is None  # a handmade run has no dataset to show
    # Against another reference: c1's own map correlates 1 with itself.
    assert comparison.instance_across_runs(4, "c1").facts.set_index("run").loc["c1", "saliency ρ with c1"] == 1.0
    with pytest.raises(SessionError, match="no instance with id 9999"):
        comparison.instance_across_runs(9999)
    with pytest.raises(SessionError, match="integers"):
        comparison.typed_id("four")



def test_an_instance_s_influential_examples_come_with_their_images_and_labels(comparison, tmp_path):
    source = comparison.influence_source("c2")
    assert source.what == "the group's 3 checkpoints"
    frame = comparison.influential_examples(source, 299)
    assert list(zip(frame["sign"], frame["rank"], frame["train_id"], frame["score"])) == INFLUENCE_OF_299
    assert frame["train_label"].tolist() == [comparison.class_name(t % 2) for t in frame["train_id"]]
    for train_id, picture in zip(frame["train_id"], frame["picture"]):
        np.testing.assert_array_equal(picture, np.full((2, 2), (train_id - 1000) / 8, np.float32))
    assert comparison.influential_examples(source, 4).empty
    # Runs that are no group with influence: none to show.
    apart = ComparisonSession({"c0": comparison.runs["c0"], "c2": comparison.runs["c2"]})
    try:
        assert apart.influence_source("c2") is None
    finally:
        apart.close()


def test_the_cli_takes_a_group_or_several_runs_and_refuses_unclear_ones(group, capsys):
    shown, compared = dashboard_runs([str(group)], None)
    assert shown == group / "c2" and list(compared) == ["c0", "c1", "c2"]  # the last checkpoint shown
    assert dashboard_runs([str(group)], "c0")[0] == group / "c0"
    shown, compared = dashboard_runs([f"a={group / 'c1'}", str(group / "c0")], None)
    assert list(compared) == ["a", "c0"] and shown == group / "c0"
    assert dashboard_runs([str(group / "c1")], None) == (group / "c1", None)  # one run: today's dashboard
    with pytest.raises(RunError, match="no run of that name here; the runs are c0, c1, c2"):
        dashboard_runs([str(group)], "c9")
    with pytest.raises(RunError, match="--run picks one of several runs"):
        dashboard_runs([str(group / "c1")], "c1")
    # Bad input is one line on stderr, no traceback, before any server starts.
    assert cli_main(["dashboard", str(group / "c1"), f"c1={group / 'c2'}"]) != 0
    (group.parent / "nothing").mkdir(exist_ok=True)
    assert cli_main(["dashboard", str(group / "c1"), str(group.parent / "nothing")]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errors) == 2 and all(line.startswith("netloupe: error: ") for line in errors), errors
    assert "two runs are named 'c1'" in errors[0]
    assert "nothing is not a committed netloupe run" in errors[1]


@pytest.mark.browser
def test_the_across_runs_tab_draws_agreement_lines_and_one_map_per_run(browser, group, tmp_path):  # noqa: F811
    process, url = start_dashboard(group, tmp_path)
    try:
        context, page = open_page(browser, url)
        assert page.title() == "netloupe: c2 of 3 runs (600 instances)"
        open_tab(page, "Across runs")
        page.locator(".agreement-scatter canvas").first.wait_for(timeout=30_000)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        # c0 and c2 (first and last) differ on the 300 odd ids: half the points red.
        wait_for_text(page, ".agreement-counts", "predict 300 of 600 instances differently")
        scatter = page.locator(".agreement-scatter canvas").first

        def covered():
            shot = scatter.screenshot()
            share = _drawn_share(shot)
            return (shot, share) if share > 0.05 and _red_share(shot) > 0.01 else None

        shot, share = wait_until(covered, 30, "the agreement scatter to be drawn", interval=0.5)
        (ARTIFACTS / "across-runs-scatter.png").write_bytes(shot)
        lines = page.locator(".metric-lines canvas").first
        lines.scroll_into_view_if_needed()
        wait_until(lambda: colored(lines.screenshot()) > 0 or _dark_share(lines.screenshot()) > 0.002, 30,
                   "the lines over the runs to be drawn", interval=0.5)
        (ARTIFACTS / "across-runs-lines.png").write_bytes(lines.screenshot())
        # The default instance: the most confident disagreement of c0 and c2 (id 299), a map per run.
        wait_for_text(page, ".across-instance-note", "where both are most confident")
        maps = page.locator(".across-maps canvas")
        maps.first.scroll_into_view_if_needed()
        boxes = wait_until(lambda: _plot_boxes(page), 30, "one map per run")
        assert len(boxes) == 3, boxes
        assert len({(round(b["width"]), round(b["height"])) for b in boxes}) == 1, boxes  # equal sizes
        assert boxes[0]["width"] > 100
        assert len({round(b["y"]) for b in boxes}) == 1  # side by side
        # c1's and c2's maps are drawn in colour (c0's are zero: blank, on the shared scale).
        row = page.locator(".across-maps").first
        wait_until(lambda: colored(row.screenshot()) > 2000, 30, "the maps to be drawn in colour", interval=0.5)
        page.screenshot(path=str(ARTIFACTS / "across-runs-instance.png"))
        # Its influential training examples: two proponents and two opponents, drawn.
        page.locator(".influence").first.scroll_into_view_if_needed()
        wait_for_text(page, ".influence-note", "TracIn over the group's 3 checkpoints")
        captions = page.locator(".influence-caption")
        wait_until(lambda: captions.count() == 4, 30, "four influential examples")
        shown = [text_of(page, f".influence-caption >> nth={i}").strip() for i in range(4)]  # (after the pane's styles)
        for caption, expected in zip(shown, ["#1: 1 · 0.5", "#2: 1 · 0.2", "#1: 0 · -0.4", "#2: 0 · -0.1"]):
            assert caption.endswith(expected), (caption[-40:], expected)
        for sign in ("proponents", "opponents"):
            row = page.locator(f".influence-{sign}").first
            # Two grey images on one scale (1/8 to 6/8 of the stored range): well over a tenth of the row drawn.
            wait_until(lambda: _drawn_share(row.screenshot()) > 0.1, 30, f"the {sign}' images drawn", interval=0.5)
        page.screenshot(path=str(ARTIFACTS / "across-runs-influence.png"))
        assert page.errors == [], page.errors
        context.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=np.int16)


def _drawn_share(png: bytes) -> float:
    """The share of a plot's pixels that are not its white background."""
    return float((_pixels(png).min(axis=2) < 235).mean())


def _red_share(png: bytes) -> float:
    """The share of pixels in the disagreements' red (#e45756), however faded by the raster's alpha."""
    pixels = _pixels(png)
    return float(((pixels[..., 0] - pixels[..., 2] > 60) & (pixels[..., 0] > 150)).mean())


def _dark_share(png: bytes) -> float:
    """The share of near-black pixels (the "all" line is black)."""
    return float((_pixels(png).max(axis=2) < 60).mean())


def _plot_boxes(page) -> list[dict] | None:
    """The boxes of the plots in the first method's row of maps, left to right."""
    boxes = [canvas.bounding_box() for canvas in page.locator(".across-maps").first.locator("canvas").all()]
    # Bokeh draws a plot in stacked canvases (the plot, its events layer): one box per place.
    distinct = {(round(b["x"]), round(b["y"])): b for b in boxes if b and b["width"] > 0}
    return sorted(distinct.values(), key=lambda b: b["x"]) or None
