"""``netloupe report``: one self-contained HTML file of a run's findings, checked against a
handmade run whose answers are known (``tests/report_run.py``), and opened offline in Debian's
headless Chromium with every network request refused.

The browser's screenshots are kept in ``test-artifacts/report/`` (or ``$NETLOUPE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import base64
import io
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from netloupe.dashboards.report import Section, render_report, signed_pixels, spread_counts
from netloupe.dashboards.session import AGAINST, TOWARD, RunSession
from netloupe.pipeline.cli import main
from netloupe.storage import schema as S
from netloupe.storage.handmade import write_handmade_run
from tests.report_run import FIRST_ID, make_report_run, report_arrays
from tests.test_dashboard_browser import browser  # noqa: F401 (a fixture: Debian's Chromium)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("NETLOUPE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "report"
ROWS = 300


class Page(HTMLParser):
    """What a report's HTML holds: its images' sources and every URL it names."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.urls, self.sections, self.scripts = [], [], {}, 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "script":
            self.scripts += 1
        for name in ("src", "href", "srcset", "action", "data"):
            if attrs.get(name):
                self.urls.append(attrs[name])
        if tag == "section":
            self.sections[attrs["id"]] = len(self.images)  # images before the section starts


def png_of(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,"), uri[:40]
    data = base64.b64decode(uri.split(",", 1)[1], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_report_run(tmp_path_factory.mktemp("report"), rows=ROWS)


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    """The report of the known run, written by the CLI as a user would (5 mistakes)."""
    output = tmp_path_factory.mktemp("out") / "report.html"
    assert main(["report", str(run_dir), "--output", str(output), "--mistakes", "5"]) == 0
    return output


def test_the_report_is_one_file_that_loads_nothing_from_elsewhere(report):
    text = report.read_text()
    page = Page(text)
    assert not [u for u in page.urls if not u.startswith(("data:", "#"))], page.urls
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", text)
    assert "url(" not in text and "@import" not in text and page.scripts == 0
    assert page.images and all(png_of(image["src"]).size[0] > 0 for image in page.images)
    # Beside the one file: nothing left over (the temporary name was renamed).
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]


def test_the_report_holds_the_runs_numbers(report):
    text = report.read_text()
    values = report_arrays(ROWS)
    right = int((values["label"] == values["prediction"]).sum())
    assert right == int(0.6 * ROWS)
    assert f"{right / ROWS:.4f} ({right} of {ROWS} labeled instances correct)" in text
    # The worst subgroup: the south site, all wrong, the larger of the subgroups tied at accuracy 0.
    worst = re.search(r"<h3>The worst subgroups.*?<tr><td>(.*?)</td><td class='number'>(\d+)</td>"
                      r"<td class='number'>(\d+)</td><td class='number'>(.*?)</td>", text, re.DOTALL)
    assert worst.groups() == ("site=south", "1", str(ROWS - right), "0")  # name, level, size, accuracy
    # The most confident mistakes: by confidence, then id.
    confidence = values["probabilities"].max(axis=1)
    wrong = np.flatnonzero(values["label"] != values["prediction"])
    expected = wrong[np.lexsort((values["ids"][wrong], -confidence[wrong]))][:5] + 0
    shown = [int(i) for i in re.findall(r'<div class="mistake" id="instance-(\d+)"', text)]
    assert shown == (FIRST_ID + expected).tolist()
    assert f"with confidence {confidence[expected[0]]:.4f}" in text
    # Each class's own neuron (2 x its label) leads the matrix's table.
    for label in range(3):
        assert re.search(rf"<td>label={label}</td><td class='number'>100</td><td>{2 * label} \(mean 3\.", text)


def test_each_mistake_has_its_input_and_its_map_over_it(report, run_dir):
    page = Page(report.read_text())
    mistakes = [image for image in page.images[page.sections["mistakes"]:]]
    assert [image["alt"] for image in mistakes[0::2]] == ["input"] * 5 and len(mistakes) == 10
    assert all(image["alt"].startswith("saliency (±") for image in mistakes[1::2])
    session = RunSession(run_dir)
    first = session.instance(int(re.search(r'id="instance-(\d+)"', report.read_text()).group(1)))
    # The map drawn is the instance's own blended over its own input (enlarged by whole pixels).
    drawn = np.asarray(png_of(mistakes[1]["src"]).convert("RGB"))
    factor = drawn.shape[0] // 4
    from netloupe.dashboards.session import blended_map, map_image

    picture = map_image(first.input)
    bound = float(np.abs(first.maps["saliency"]).max())
    np.testing.assert_array_equal(drawn[::factor, ::factor], blended_map(picture, first.maps["saliency"], bound))
    gray = np.asarray(png_of(mistakes[0]["src"]).convert("L"))[::factor, ::factor].astype(float)
    assert np.corrcoef(gray.ravel(), picture.ravel())[0, 1] > 0.99


def test_a_run_with_influence_shows_each_mistake_s_strongest_training_examples(tmp_path):
    """A run whose influence table gives its most confident mistake two proponents and one
    opponent among four training images: the card shows the three, in order, with their
    labels and scores, each image the training example's own pixels."""
    import pyarrow.parquet as pq

    from netloupe.storage.layout import RunLayout
    from tests.report_run import add_influence

    run_dir = make_report_run(tmp_path, rows=30)
    first = int(re.search(r'id="instance-(\d+)"', render_report(RunSession(run_dir), mistakes=1)).group(1))
    training = tmp_path / "training.parquet"
    pixels = np.arange(4 * 16, dtype=np.float32).reshape(4, 16) / 64
    pq.write_table(pa.table({"id": pa.array([7, 8, 9, 10], pa.int64()), "label": pa.array([0, 1, 2, 1], pa.int64()),
                             "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 16)}), training)
    add_influence(RunLayout(run_dir), training, [(first, 9, 0.75, 1, "proponent"), (first, 7, 0.5, 2, "proponent"),
                                                 (first, 10, -0.25, 1, "opponent"), (first + 1, 8, 1.0, 1, "proponent")])
    text = render_report(RunSession(run_dir), mistakes=1)
    card = text[text.index(f'id="instance-{first}"'):]
    captions = re.findall(r"<figcaption>((?:proponent|opponent)[^<]*)</figcaption>", card)
    assert captions == ["proponent #1: 2 (0.75)", "proponent #2: 0 (0.5)", "opponent #1: 1 (-0.25)"]
    shown = Page(card).images[-3:]
    for image, row in zip(shown, (2, 0, 3)):
        image = np.asarray(png_of(image["src"]).convert("L"), np.float64)
        expected = pixels[row].reshape(4, 4)
        expected = np.round(255 * (expected - expected.min()) / (expected.max() - expected.min()))
        np.testing.assert_array_equal(image[::image.shape[0] // 4, ::image.shape[1] // 4], expected)


def test_the_scatter_is_every_point_coloured_by_class(report):
    page = Page(report.read_text())
    scatter = page.images[page.sections["scatter"]]
    pixels = np.asarray(png_of(scatter["src"]).convert("RGB")).astype(int)
    drawn = (pixels != 255).any(axis=2)
    assert 0.01 < drawn.mean() < 0.5
    # The three clouds are three colours: label 1's (orange) lies right of label 0's (blue).
    blue = (np.abs(pixels - [31, 119, 180]).sum(axis=2) < 60)
    orange = (np.abs(pixels - [255, 127, 14]).sum(axis=2) < 60)
    assert blue.sum() > 100 and orange.sum() > 100
    assert np.nonzero(orange)[1].mean() > np.nonzero(blue)[1].mean() + 100


def test_sections_the_run_lacks_are_one_line_notes(tmp_path):
    """No labels' mistakes, no metadata, no projection, no fidelity: a note each, no error."""
    n = 40
    instances = pa.table({"instance_id": np.arange(n, dtype=np.int64), "label": pa.nulls(n, pa.int64()),
                          "prediction": np.arange(n) % 2,
                          "probabilities": S.fixed_vectors(np.full((n, 2), 0.5, np.float32), 2)})
    run = write_handmade_run(tmp_path, "bare", instances, {"fc": np.ones((n, 3), np.float32)}).root
    text = render_report(RunSession(run))
    for absent in ("no fidelity table", "no metadata columns", "no 2-D projection", "made no mistake",
                   "no labeled instances"):
        assert absent in text.replace("No fidelity check", "no fidelity table"), absent
    assert "<h2>Neuron activation matrix per class: fc</h2>" in text  # by prediction, as nothing is labeled


def test_the_fidelity_table_shows_the_checks_the_run_made(run_dir, monkeypatch):
    summary = pd.DataFrame({"method": ["saliency"], "instances": [ROWS], "mean_abs_convergence_delta": [None],
                            "mean_deletion_auc": [0.123456], "sampled": [24], "mean_infidelity": [7.5]})
    session = RunSession(run_dir)
    monkeypatch.setattr(session, "fidelity_summary", lambda: summary)
    text = render_report(session, mistakes=0)
    body = re.search(r'<section id="fidelity">(.*?)</section>', text, re.DOTALL).group(1)
    assert "mean_deletion_auc" in body and "0.1235" in body and "7.5" in body
    assert "convergence_delta" not in body.split("</table>")[0]  # a check not made is not a column


def test_bad_runs_layers_and_outputs_are_one_line_errors(run_dir, tmp_path, capsys):
    output = tmp_path / "r.html"
    cases = [
        (["report", str(tmp_path / "nothing"), "--output", str(output)], "not a committed netloupe run"),
        (["report", str(run_dir), "--output", str(tmp_path / "missing" / "r.html")], "does not exist"),
        (["report", str(run_dir), "--output", str(tmp_path)], "is a directory"),
        (["report", str(run_dir), "--output", str(output), "--layer", "fcc"], "did you mean 'fc'"),
        (["report", str(run_dir), "--output", str(output), "--mistakes", "-1"], "give 0 to"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("netloupe: error:") and message in error and error.count("\n") == 1, error
    # Where nobody may create a file, whoever runs the tests (root included): refused before any work.
    assert main(["report", str(run_dir), "--output", "/proc/report.html"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("netloupe: error: cannot write the report to /proc/report.html") and error.count("\n") == 1
    assert not output.exists()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(run_dir, tmp_path, monkeypatch, capsys):
    """The rename fails (as on a full disk or a vanished directory): the previous report stays
    whole, and nothing else is left beside it."""
    output = tmp_path / "r.html"
    output.write_text("the previous report")

    def failing_rename(source, target):
        assert Path(source).read_text().startswith("<!DOCTYPE html>")  # the whole report was written first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("netloupe.dashboards.report.os.replace", failing_rename)
    assert main(["report", str(run_dir), "--output", str(output), "--mistakes", "0"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert output.read_text() == "the previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_spreading_grows_lone_points_and_keeps_their_counts_apart():
    counts = np.zeros((20, 20, 2), np.uint32)
    counts[5, 5, 0] = 1
    counts[15, 14, 1] = 2
    spread = spread_counts(counts, threshold=0.9, max_px=2)
    assert spread[3:8, 5, 0].tolist() == [1] * 5 and spread[5, 3:8, 0].tolist() == [1] * 5
    assert spread[3, 3, 0] == 0  # a disc, not a square
    assert spread[..., 1].max() == 2 and spread[..., 1].astype(bool).sum() == 21  # Datashader's disc of radius 2
    crowded = np.ones((20, 20, 1), np.uint32)  # every pixel has neighbours: left as it is
    np.testing.assert_array_equal(spread_counts(crowded, 0.9, 3), crowded)


def test_a_map_without_its_input_is_drawn_on_white():
    pixels = signed_pixels(np.array([[2.0, -2.0, 0.0, 1.0]]), bound=2.0)
    assert pixels[0, 0].tolist() == TOWARD.tolist() and pixels[0, 1].tolist() == AGAINST.tolist()
    assert pixels[0, 2].tolist() == [255, 255, 255]
    assert pixels[0, 3].tolist() == np.round((255 + TOWARD) / 2).astype(int).tolist()


def test_a_section_title_is_escaped():
    from netloupe.dashboards.report import page

    class Facts:
        class manifest:
            run_name = "<b>run</b>"

    text = page(Facts, [Section("x", "a < b", "<p>body</p>")])
    assert "<h2>a &lt; b</h2>" in text and "&lt;b&gt;run&lt;/b&gt;" in text


# -- in a real browser, offline ---------------------------------------------------------------

@pytest.mark.browser
def test_the_report_renders_offline_in_a_browser(browser, report):  # noqa: F811
    from tests.helpers import wait_until

    context = browser.new_context(viewport={"width": 1300, "height": 1000}, offline=True)
    page = context.new_page()
    url = report.resolve().as_uri()
    refused, errors = [], []

    def only_the_file(route):
        if route.request.url == url:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_file)
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url, wait_until="load")
    try:
        def every_image_loaded():
            sizes = page.eval_on_selector_all("img", "all => all.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            return sizes if sizes and all(done and width > 0 and height > 0 for done, width, height in sizes) else None

        sizes = wait_until(every_image_loaded, 10, "every image to load")
        assert len(sizes) == len(Page(report.read_text()).images)
        scatter = page.locator("figure.scatter img").first
        scatter.scroll_into_view_if_needed()
        shot = np.asarray(Image.open(io.BytesIO(scatter.screenshot())).convert("RGB")).astype(int)
        coloured = (shot.max(axis=2) - shot.min(axis=2)) > 60
        assert coloured.mean() > 0.01, coloured.mean()
        assert not refused and not errors, (refused, errors)
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        page.locator("figure.scatter img").first.screenshot(path=str(ARTIFACTS / "report-scatter.png"))
        context.close()
