"""The dashboard in a real browser: ``netloupe dashboard`` served as its own process and
driven by Playwright in Debian's headless Chromium (``make test`` installs it).

The checks look at what is drawn, as a person would: the share of each plot's frame that is
not background, that maps fill their frames at one size, that axis labels do not overlap, and
that the view's state travels in the URL. Screenshots are kept in ``test-artifacts/dashboard/``
(or ``$NETLOUPE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.dashboard_run import SCREEN_ROWS, make_dashboard_run
from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("NETLOUPE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
STARTUP_SECONDS = 90
VIEWPORT = {"width": 1600, "height": 1000}
"""The window of the issue's new user (issue 19)."""


def start_dashboard(run_dir, log_dir, *extra):
    """``netloupe dashboard RUN`` as its own process on a free loopback port; (process, url)."""
    port = free_port()
    log = open(log_dir / f"server-{port}.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "netloupe.pipeline.cli", "dashboard", str(run_dir), "--port", str(port),
                                *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def listening() -> bool:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"the dashboard server exited with {process.returncode}:\n{log.read()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_until(listening, STARTUP_SECONDS, f"the dashboard to listen on 127.0.0.1:{port}", interval=0.5)
    except AssertionError:
        process.kill()
        raise
    return process, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def run_dir(ray_local, tmp_path_factory):
    return make_dashboard_run(tmp_path_factory.mktemp("browser"), rows=SCREEN_ROWS)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """The dashboard of a generated run, served by ``netloupe dashboard`` on loopback."""
    process, url = start_dashboard(run_dir, tmp_path_factory.mktemp("server-log"))
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server, request):
    """A fresh page on the dashboard (its own server session), console errors collected."""
    context, page = open_page(browser, server)
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def open_page(browser, url: str, ready: str = ".scatter canvas"):
    """``url`` in a fresh browser context (as a colleague opening a link), once ``ready`` (by
    default the scatter) is on the page; (context, page), its console errors in ``page.errors``."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Everything must come from the server on loopback (no CDN: there is no internet).
    page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url}"))
    page.goto(url, wait_until="networkidle")
    page.errors = errors
    page.locator(ready).first.wait_for(timeout=60_000)
    return context, page


def colored(png: bytes) -> int:
    """Number of clearly colored (not gray) pixels."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return int((pixels.max(axis=2) - pixels.min(axis=2) > 60).sum())


def wait_for_plot(page, selector: str, timeout: float = 30.0, differs_from: bytes | None = None,
                  min_colored: int = 400) -> bytes:
    """A screenshot of the plot at ``selector`` once it has something drawn in it (and, with
    ``differs_from``, once it was redrawn); the test fails if that does not happen in time."""
    from playwright.sync_api import Error

    def drawn() -> bytes | None:
        try:
            shot = page.locator(selector).first.screenshot()
        except Error:  # replaced by its redrawn self while photographed: look again
            return None
        return shot if colored(shot) > min_colored and shot != differs_from else None

    return wait_until(drawn, timeout, f"{selector} to be drawn" + (" anew" if differs_from else ""), interval=0.5)


def text_of(page, selector: str) -> str:
    """The text a Panel pane shows (it lives in the pane's shadow root)."""
    return page.locator(selector).first.evaluate("el => (el.shadowRoot || el).textContent")


def wait_for_text(page, selector: str, text: str, timeout: float = 30.0) -> str:
    def shown() -> str | None:
        current = text_of(page, selector)
        return current if text in current else None

    return wait_until(shown, timeout, f"{selector} to show {text!r}", interval=0.25)


def open_tab(page, name: str) -> None:
    page.locator(".bk-tab").filter(has_text=re.compile(f"^{re.escape(name)}$")).first.click()


def active_tab(page) -> str:
    return page.locator(".bk-tab.bk-active").first.text_content().strip()


FIGURE_VIEWS = """
  const figures = [];
  const walk = (view) => {
    if (view.model && view.model.type === "Figure" && view.frame) figures.push(view);
    for (const child of (view.child_views || [])) walk(child);
  };
  for (const root of Object.values(Bokeh.index)) walk(root);
"""
"""JavaScript: every Bokeh figure view on the page, in ``figures``."""

# Every Bokeh figure on the page: its title, frame (the plot area, in its canvas' pixels), the
# screen box of its first image glyph, and its element box on the page; each canvas is marked
# (data-plot) so that it can be photographed alone. Hidden tabs' figures have no size: left out.
PLOTS = """
() => {
""" + FIGURE_VIEWS + """  const out = [];
  figures.forEach((view, index) => {
    const element = view.canvas_view.el;
    const box = element.getBoundingClientRect();
    if (box.width === 0 || box.height === 0) return;
    element.dataset.plot = String(index);
    const f = view.frame.bbox;
    const item = {index, title: view.model.title ? view.model.title.text : "",
                  frame: [f.left, f.top, f.right, f.bottom], box: [box.left, box.top, box.right, box.bottom]};
    for (const [model, renderer] of view.renderer_views) {
      const glyph = renderer.glyph;
      if (model.type === "GlyphRenderer" && /Image/.test(model.glyph.type) && glyph.sx && glyph.sx.length) {
        // sy is the image's bottom edge on the screen
        item.image = [glyph.sx[0], glyph.sy[0] - glyph.sdh[0], glyph.sx[0] + glyph.sdw[0], glyph.sy[0]];
      }
    }
    out.push(item);
  });
  return out;
}
"""


def plots(page, title: str | re.Pattern) -> list[dict]:
    """The figures on the page whose title is ``title`` (or matches it)."""
    matches = (lambda t: bool(title.fullmatch(t))) if isinstance(title, re.Pattern) else (lambda t: t == title)
    return [plot for plot in page.evaluate(PLOTS) if matches(plot["title"])]


def drawn_share(page, plot: dict, name: str | None = None) -> float:
    """The share of a figure's frame drawn in something clearly not its white background (a
    faint or empty plot is near 0, one filled with colour near 1); kept as ``name``.png."""
    shot = page.locator(f'[data-plot="{plot["index"]}"]').first.screenshot()
    if name:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"{name}.png").write_bytes(shot)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.int16)
    left, top, right, bottom = (int(round(v)) for v in plot["frame"])
    frame = pixels[top:bottom, left:right]
    return float(((255 - frame).max(axis=2) > 60).mean())


# The rotated rectangle of every tick label of every axis of the figures titled as given, as
# Bokeh's own axis lays them out when it paints them (AxisView._draw_oriented_labels).
AXIS_LABELS = """
(titles) => {
  const out = {};
  const rectangles = (axis) => {
    const info = axis._get_factor_info ? axis._get_factor_info()
      : [[axis.compute_labels(axis.tick_coords.major[axis.dimension]), axis.tick_coords.major,
          axis.model.major_label_orientation, axis.visuals.major_label_text]];
    const extents = axis.extents;
    let standoff = extents.tick + axis.model.major_label_standoff;
    const found = [];
    info.forEach(([labels, coords, orient, visuals], level) => {
      const [sxs, sys] = axis.scoords(coords);
      const [nx, ny] = axis.normals;
      const {vertical_align, align} = axis.panel.get_label_text_heuristics(orient);
      labels.visuals = visuals.values();
      labels.angle = axis.panel.get_label_angle_heuristic(orient);
      labels.base_font_size = axis.plot_view.base_font_size;
      labels.items.forEach((label, i) => {
        label.position = {sx: sxs[i] + nx * standoff, sy: sys[i] + ny * standoff, x_anchor: align, y_anchor: vertical_align};
        if ("align" in label) label.align = align;
        const r = label.rect();
        found.push({text: label.text, corners: [[r.p0.x, r.p0.y], [r.p1.x, r.p1.y], [r.p2.x, r.p2.y], [r.p3.x, r.p3.y]]});
      });
      standoff += extents.tick_labels[level];
    });
    return found;
  };
  const walk = (view) => {
    if (view.model && view.model.type === "Figure" && view.model.title && titles.includes(view.model.title.text)) {
      const box = view.canvas_view.el.getBoundingClientRect();
      out[view.model.title.text] = {size: [box.width, box.height], axes: view.axis_views.map(rectangles)};
    }
    for (const child of (view.child_views || [])) walk(child);
  };
  for (const root of Object.values(Bokeh.index)) walk(root);
  return out;
}
"""


def rectangles_overlap(a, b) -> bool:
    """Whether two rotated rectangles (four corners each) overlap: no axis of their edges
    separates them (the separating axis theorem), with half a pixel of slack."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    for shape in (a, b):
        for i in range(4):
            edge = shape[(i + 1) % 4] - shape[i]
            normal = np.array([-edge[1], edge[0]]) / (np.hypot(*edge) or 1.0)
            pa, pb = a @ normal, b @ normal
            if pa.max() <= pb.min() + 0.5 or pb.max() <= pa.min() + 0.5:
                return False
    return True


def assert_labels_apart(page, titles: list[str]) -> None:
    """Every tick label of the figures ``titles`` lies inside its canvas and overlaps no other."""
    found = page.evaluate(AXIS_LABELS, titles)
    assert sorted(found) == sorted(titles), found.keys()
    for title, figure in found.items():
        width, height = figure["size"]
        for labels in figure["axes"]:
            assert labels, f"{title}: an axis without labels"
            for label in labels:
                corners = np.asarray(label["corners"])
                assert (corners >= -0.5).all() and (corners[:, 0] <= width + 0.5).all() \
                    and (corners[:, 1] <= height + 0.5).all(), f"{title}: {label['text']!r} leaves its plot"
            for i, first in enumerate(labels):
                for second in labels[i + 1:]:
                    assert not rectangles_overlap(first["corners"], second["corners"]), \
                        f"{title}: labels {first['text']!r} and {second['text']!r} overlap"


def test_page_loads_without_console_errors_and_the_scatter_is_drawn(page):
    assert page.title() == f"netloupe: look ({SCREEN_ROWS:,} instances)", page.title()
    wait_for_plot(page, ".scatter")
    # Thousands of points, most alone in their pixel, must be seen: a one-pixel point at
    # Datashader's default opacity (40/255) leaves the frame almost white (under 1% drawn).
    [scatter] = plots(page, re.compile(r"activations/\S+ \(pca\), colored by label_name"))
    share = drawn_share(page, scatter, "scatter")
    assert share > 0.08, f"the scatter of {SCREEN_ROWS:,} points is {share:.1%} drawn: its points cannot be seen"
    [matrix] = plots(page, re.compile(r".*: mean activation per subset"))
    assert drawn_share(page, matrix, "matrix") > 0.3  # a heat map: every cell coloured (the palest near white)
    assert page.errors == [], page.errors


def test_box_selection_shows_in_the_matrix_and_becomes_a_subset(page):
    page.locator(".matrix canvas").first.wait_for(timeout=30_000)
    before = wait_for_text(page, ".matrix-rows", "Rows (")
    assert "selection" not in before and "label=left" in before
    matrix_before = wait_for_plot(page, ".matrix")
    wait_for_plot(page, ".scatter")
    page.locator(".scatter .bk-tool-icon-box-select").first.click()
    canvas = page.locator(".scatter canvas").first.bounding_box()
    # From just inside the plot's top-left to its centre: a quarter of the points or so.
    start = (canvas["x"] + canvas["width"] * 0.1, canvas["y"] + canvas["height"] * 0.1)
    end = (canvas["x"] + canvas["width"] * 0.75, canvas["y"] + canvas["height"] * 0.8)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=12)
    page.mouse.up()
    selected = wait_for_text(page, ".selection-info", "instances selected")
    count = int(selected.split()[0].replace(",", ""))
    assert 0 < count < SCREEN_ROWS, selected
    # The matrix shows the selection at once (ActiVis), as a row of its own.
    wait_for_text(page, ".matrix-rows", "(current selection)")
    wait_for_plot(page, ".matrix", differs_from=matrix_before)  # the heat map redraws after its rows text
    page.get_by_role("button", name="Keep selection as subset").click()
    page.get_by_text(f"subset 'selection 1': {count:,} instances").wait_for(timeout=15_000)
    kept = wait_for_text(page, ".matrix-rows", "selection 1")
    assert "(current selection)" not in kept
    assert page.errors == [], page.errors


RASTER_HOOK = """
() => {
  window.__rasters = 0;
  Bokeh.documents[0].on_change((event) => {
    const data = event.model && event.model.type === "ColumnDataSource" ? event.model.data : null;
    if (data && data.image && data.image[0].dtype === "uint32") window.__rasters += 1;
  });
}
"""


def test_a_zoom_is_re_aggregated_by_the_server(page):
    before = wait_for_plot(page, ".scatter")
    page.evaluate(RASTER_HOOK)
    box = page.locator(".scatter canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
    page.mouse.wheel(0, -600)
    # The server sends a new raster of the zoomed ranges (not the old image stretched).
    page.wait_for_function("window.__rasters > 0", timeout=30_000)
    wait_for_plot(page, ".scatter", differs_from=before, min_colored=100)
    assert page.errors == [], page.errors


# Where the first hoverable point is on the screen, from Bokeh's own scales.
FIRST_HOVERABLE = """
() => {
""" + FIGURE_VIEWS + """  for (const figure of figures) {
    for (const [model, renderer] of figure.renderer_views) {
      const data = model.data_source ? model.data_source.data : null;
      if (data && data.instance_id && data.instance_id.length > 0) {
        const rect = figure.canvas_view.el.getBoundingClientRect();
        return {id: String(data.instance_id[0]), x: rect.left + renderer.coordinates.x_scale.compute(data.x[0]),
                y: rect.top + renderer.coordinates.y_scale.compute(data.y[0])};
      }
    }
  }
  return null;
}
"""
TOOLTIP_TEXT = """
() => {
  const texts = [];
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) {
      if (String(child.className || "").includes("tooltip")) texts.push(child.textContent);
      walk(child);
    }
  };
  walk(document.body);
  return texts.join(" ");
}
"""


def test_hovering_a_point_names_the_instance(page):
    wait_for_plot(page, ".scatter")
    # Under 5,000 points: all hoverable at once.
    point = wait_until(lambda: page.evaluate(FIRST_HOVERABLE), 30, "hoverable points", interval=0.25)
    page.mouse.move(point["x"], point["y"])

    def tooltip() -> str | None:
        text = page.evaluate(TOOLTIP_TEXT)
        return text if f"instance_id: {point['id']}" in text else None

    shown = wait_until(tooltip, 10, f"the tooltip of instance {point['id']}", interval=0.2)
    assert "label_name:" in shown and "prediction_name:" in shown


def assert_maps_fill_equal_frames(page, titles: re.Pattern, count: int) -> list[dict]:
    """The instance's maps (and its input): ``count`` of them, each frame MAP_SIZE square and
    filled by its image (not drawn in a corner of its axes), side by side without overlap."""
    from netloupe.dashboards.app import MAP_SIZE

    maps = wait_until(lambda: (found := plots(page, titles)) and len(found) == count and all("image" in m for m in found)
                      and found, 30, f"{count} maps with their images")
    for plot in maps:
        left, top, right, bottom = plot["frame"]
        assert (round(right - left), round(bottom - top)) == (MAP_SIZE, MAP_SIZE), plot
        np.testing.assert_allclose(plot["image"], plot["frame"], atol=1.0, err_msg=plot["title"])
    boxes = sorted(tuple(plot["box"]) for plot in maps)
    for (left, top, right, bottom), after in zip(boxes, boxes[1:]):
        assert after[0] >= right - 0.5 or after[1] >= bottom - 0.5, f"maps overlap: {boxes}"
    assert max(box[2] for box in boxes) <= VIEWPORT["width"], "the maps run off the page"
    return maps


def test_the_instance_tab_opens_on_the_most_confident_mistake_its_maps_filling_equal_frames(page, run_dir):
    from netloupe.dashboards.session import RunSession

    expected, reason = RunSession(run_dir).opening_instance()
    open_tab(page, "Instance")
    note = wait_for_text(page, ".instance-note", "Showing the most confident mistake")
    assert reason in note
    page.get_by_text(f"Instance {expected}").wait_for(timeout=30_000)
    assert page.get_by_label("Instance id").input_value() == str(expected)
    titles = re.compile(r"input|(saliency|integrated_gradients) ±\S+")
    maps = assert_maps_fill_equal_frames(page, titles, 3)
    for plot in maps:  # the input in gray, every map over it: the whole frame drawn
        assert drawn_share(page, plot, "map-" + plot["title"].split()[0]) > 0.5, plot["title"]
    box = page.get_by_label("Instance id")
    box.fill("107")
    box.press("Enter")
    page.get_by_text("Instance 107").wait_for(timeout=30_000)
    assert page.locator(".instance-note").count() == 0  # chosen, not opened on
    text = text_of(page, ".instance-facts")
    assert "prediction" in text and "group = " in text
    shot = wait_for_plot(page, ".heatmaps")
    assert colored(shot) > 2000  # red and blue over the gray input
    page.locator(".heatmaps").first.screenshot(path=str(ARTIFACTS / "instance-maps.png"))
    # The instance's deletion/insertion curves and its fidelity numbers per method.
    page.locator(".fidelity-curves canvas").first.wait_for(timeout=30_000)
    assert "integrated_gradients" in text_of(page, ".instance-fidelity")
    assert page.errors == [], page.errors


def test_the_fidelity_tab_shows_every_method(page):
    open_tab(page, "Fidelity")
    shown = wait_for_text(page, ".fidelity-summary", "integrated_gradients")
    assert "saliency" in shown
    assert page.errors == [], page.errors


def test_sql_console_runs_reads_and_refuses_writes(page):
    open_tab(page, "SQL")
    editor = page.locator(".sql-editor textarea")
    editor.fill("SELECT count(*) AS n FROM instances")
    page.get_by_role("button", name="Run", exact=True).click()
    wait_for_text(page, ".sql-status", "1 rows")
    editor.fill("DROP TABLE instances")
    page.get_by_role("button", name="Run", exact=True).click()
    wait_for_text(page, ".sql-status", "Refused")
    editor.fill("SELECT count(*) AS n FROM instances")
    page.get_by_role("button", name="Run", exact=True).click()
    wait_for_text(page, ".sql-status", "1 rows")  # the table is still there


def test_every_tab_draws_on_a_run_with_a_continuous_column(page):
    """The run's ``rotation`` has a value per instance (FairVis on real data: ages, scores).
    Every tab is opened in turn and must draw; the subgroups bin rotation (a few bars, not 240)."""
    drawn = {
        "Instance": lambda: wait_for_text(page, ".instance-note", "Showing the most confident mistake"),
        "Subgroups": lambda: wait_for_plot(page, ".distributions", min_colored=1500),
        "Fidelity": lambda: wait_for_text(page, ".fidelity-summary", "saliency"),
        "Model": lambda: wait_for_plot(page, ".model-graph", min_colored=200),
        "SQL": lambda: page.locator(".sql-editor textarea").wait_for(timeout=30_000),
    }
    for tab, shown in drawn.items():
        open_tab(page, tab)
        shown()
    open_tab(page, "Subgroups")
    wait_for_plot(page, ".subgroup-overview", min_colored=400)
    # Each column's distribution drawn over its whole width, its labels apart and readable.
    columns = ["group", "noise", "rotation"]
    for plot in wait_until(lambda: (found := [p for c in columns for p in plots(page, c)]) and len(found) == 3 and found,
                           30, "the three distributions"):
        assert drawn_share(page, plot, f"distribution-{plot['title']}") > 0.15, plot["title"]
    assert_labels_apart(page, columns)
    choice = page.locator(".choices__input--cloned").first
    choice.click()
    choice.press_sequentially("rotation")  # typed, so that the choices are searched
    # Enter takes the highlighted choice: once the search has narrowed it to rotation (on a busy
    # machine the keys arrive before the list is filtered).
    page.locator(".choices__item--choice.is-highlighted").filter(has_text="rotation").first.wait_for(timeout=30_000)
    choice.press("Enter")
    shown = wait_for_text(page, ".subgroups", "rotation in [")
    assert "rotation <" in shown and "rotation >=" in shown
    # Five bins crossed with the other columns' values: a table of tens of rows, not hundreds.
    assert page.locator(".subgroups .tabulator-row").count() < 60
    assert page.errors == [], page.errors


def url_of(page) -> str:
    """The address the browser shows (Playwright's ``page.url`` can miss a pushState)."""
    return page.evaluate("() => window.location.href")


def query_of(page) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(urllib.parse.urlparse(url_of(page)).query)


def test_a_link_opens_the_same_view_and_the_url_follows_the_view(browser, server):
    """The view's state lives in the URL: a link with it opens that view in a fresh browser
    (a colleague's), and changing the view changes the URL."""
    link = server + "?" + urllib.parse.urlencode([
        ("tab", "instance"), ("layer", "conv"), ("color", "subset: wrong"), ("instance", "107"),
        ("subset", "wrong~NOT correct")])
    context, page = open_page(browser, link, ready=".instance-facts")
    try:
        assert active_tab(page) == "Instance"
        page.get_by_text("Instance 107").wait_for(timeout=30_000)
        assert page.locator(".instance-note").count() == 0  # the link's instance, not the opening one
        # Once loaded, the URL names the whole view (what the link left out, at its default).
        wait_until(lambda: query_of(page).get("projection") == ["activations/conv"], 15, "the URL to be complete")
        assert query_of(page) == {"tab": ["instance"], "layer": ["conv"], "projection": ["activations/conv"],
                                      "algorithm": ["pca"], "color": ["subset: wrong"], "instance": ["107"],
                                      "subset": ["wrong~NOT correct"]}
        open_tab(page, "Instances and neurons")
        assert page.get_by_label("Layer").input_value() == "conv"
        assert page.get_by_label("Color by").input_value() == "subset: wrong"
        wait_for_text(page, ".matrix-rows", "wrong")  # the link's subset, a row of the matrix
        [scatter] = wait_until(lambda: plots(page, "activations/conv (pca), colored by subset: wrong"), 30,
                               "the scatter coloured by the link's subset")
        assert drawn_share(page, scatter) > 0.08
        # A change of the view shows in the URL at once.
        wait_until(lambda: query_of(page)["tab"] == ["instances-and-neurons"], 15, "the tab in the URL")
        page.get_by_label("Layer").select_option("relu")
        wait_until(lambda: query_of(page).get("layer") == ["relu"], 15, "the new layer in the URL")
        assert query_of(page)["projection"] == ["activations/relu"]  # the scatter followed the layer
        page.get_by_label("Color by").select_option("noise")
        wait_until(lambda: query_of(page).get("color") == ["noise"], 15, "the new colour in the URL")
        shared = url_of(page)
        page.screenshot(path=str(ARTIFACTS / "link-sender.png"), full_page=True)
    finally:
        context.close()
    context, page = open_page(browser, shared)  # the colleague's browser
    try:
        assert active_tab(page) == "Instances and neurons"
        assert page.get_by_label("Layer").input_value() == "relu"
        assert page.get_by_label("Color by").input_value() == "noise"
        wait_for_text(page, ".matrix-rows", "wrong")
        wait_until(lambda: plots(page, "activations/relu (pca), colored by noise"), 30, "the colleague's scatter")
        page.screenshot(path=str(ARTIFACTS / "link-colleague.png"), full_page=True)
        assert page.errors == [], page.errors
    finally:
        context.close()


def test_back_and_forward_restore_the_views_a_change_at_a_time(browser, server):
    """Each change of the view is one page of the browser's history (a layer moves the
    projection too, yet once), and Back and Forward show the view of that page again."""
    context, page = open_page(browser, server)
    try:
        wait_until(lambda: query_of(page).get("layer") == ["head"], 15, "the URL to name the opening view")
        opened = page.evaluate("history.length")
        page.get_by_label("Layer").select_option("conv")
        wait_until(lambda: query_of(page).get("projection") == ["activations/conv"], 15, "the layer in the URL")
        page.get_by_label("Color by").select_option("noise")
        wait_until(lambda: query_of(page).get("color") == ["noise"], 15, "the colour in the URL")
        assert page.evaluate("history.length") == opened + 2  # two changes, two pages
        page.go_back()
        wait_until(lambda: page.get_by_label("Color by").input_value() == "label_name", 15, "Back to the colour")
        assert page.get_by_label("Layer").input_value() == "conv"
        wait_until(lambda: plots(page, "activations/conv (pca), colored by label_name"), 30, "the scatter of that view")
        page.go_back()
        wait_until(lambda: page.get_by_label("Layer").input_value() == "head", 15, "Back to the first layer")
        assert query_of(page).get("projection") == ["activations/head"]
        page.go_forward()
        wait_until(lambda: page.get_by_label("Layer").input_value() == "conv", 15, "Forward to the layer")
        assert page.get_by_label("Color by").input_value() == "label_name"
        page.go_forward()
        wait_until(lambda: page.get_by_label("Color by").input_value() == "noise", 15, "Forward to the colour")
        assert page.evaluate("history.length") == opened + 2  # going back and forth added no page
        # Back twice before the server has answered the first: its answer comes late and is
        # dropped (written, it would replace the page Back went to, and Forward would be lost).
        page.go_back()
        page.go_back()
        wait_until(lambda: page.get_by_label("Layer").input_value() == "head", 15, "Back twice to the first layer")
        wait_until(lambda: query_of(page).get("layer") == ["head"], 15, "the first page's URL")
        assert page.get_by_label("Color by").input_value() == "label_name"
        page.go_forward()
        page.go_forward()
        wait_until(lambda: page.get_by_label("Color by").input_value() == "noise", 15, "Forward twice to the colour")
        assert page.get_by_label("Layer").input_value() == "conv"
        assert page.evaluate("history.length") == opened + 2
        assert page.errors == [], page.errors
    finally:
        context.close()


def test_a_link_with_what_the_run_lacks_opens_the_defaults_with_a_note(browser, server):
    context, page = open_page(browser, server + "?tab=nowhere&layer=nope&instance=99999&color=zzz")
    try:
        note = wait_for_text(page, ".message", "Not in this run")
        for part in ("layer 'nope' (showing head)", "instance '99999'", "color 'zzz' (showing label_name)",
                     "tab 'nowhere'"):
            assert part in note, note
        assert "Traceback" not in note and active_tab(page) == "Instances and neurons"
        assert page.get_by_label("Layer").input_value() == "head"
        wait_until(lambda: query_of(page).get("layer") == ["head"], 15, "the URL to name the view shown")
        assert "instance" not in query_of(page)
        open_tab(page, "Instance")  # the opening instance, not an error
        wait_for_text(page, ".instance-note", "Showing the most confident mistake")
        page.screenshot(path=str(ARTIFACTS / "link-with-bad-values.png"), full_page=True)
        assert page.errors == [], page.errors
    finally:
        context.close()


def test_with_a_password_the_dashboard_asks_to_sign_in_first(browser, run_dir, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("open sesame\n")
    process, url = start_dashboard(run_dir, tmp_path, "--password-file", str(secret), "--user", "ana")
    try:
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        failed = []
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.goto(url, wait_until="networkidle")
        assert page.locator(".scatter").count() == 0  # nothing of the run before signing in
        page.get_by_label("user").fill("ana")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Invalid username or password").wait_for(timeout=15_000)
        page.get_by_label("user").fill("ana")
        page.get_by_label("password").fill("open sesame")
        page.get_by_role("button", name="Sign in").click()
        page.locator(".scatter canvas").first.wait_for(timeout=60_000)
        assert colored(wait_for_plot(page, ".scatter")) > 400
        assert failed == [], failed
        context.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def text_run_dir(ray_local, tmp_path_factory):
    """A text run of the tiny BERT: occlusion and attention rollout per token."""
    import pyarrow.parquet as pq

    from netloupe.contract.spec import parse_spec
    from netloupe.pipeline.driver import run_job
    from tests.helpers import text_table, tiny_bert_checkpoint

    root = tmp_path_factory.mktemp("text-browser")
    pq.write_table(text_table(), root / "texts.parquet")
    return run_job(parse_spec({
        "model": {"huggingface": str(tiny_bert_checkpoint(root / "checkpoint"))},
        "dataset": {"source": str(root / "texts.parquet"), "text_column": "text", "id_column": "key"},
        "layers": [{"name": "bert.pooler"}],
        "attributions": [{"method": "occlusion"}, {"method": "attention_rollout"}],
        "output": {"root": str(root / "runs"), "run_name": "texts"},
    })).layout.root


def _red_rows(png: bytes) -> tuple[int, int, int]:
    """The first bar drawn in the tokens view's red (#b2182b): (row, first column, last column)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    red = (np.abs(pixels - np.array([178, 24, 43])).max(axis=2) < 12)
    rows = np.flatnonzero(red.sum(axis=1) > 3)
    assert len(rows), "no red bar is drawn"
    columns = np.flatnonzero(red[rows[0] + 2])
    return int(rows[0]) + 2, int(columns[0]), int(columns[-1])


def test_a_text_run_s_tokens_view_selects_the_instances_of_a_clicked_token(browser, text_run_dir, tmp_path):
    """Tokens tab: bars drawn per predicted class; a click on a bar keeps the instances that
    contain its token (listed, a row of the matrix); a click on one opens it, its words coloured."""
    process, url = start_dashboard(text_run_dir, tmp_path)
    try:
        context, page = open_page(browser, url)
        open_tab(page, "Tokens")
        page.locator(".token-bars canvas").first.wait_for(timeout=30_000)
        before = wait_for_plot(page, ".token-bars", min_colored=200)
        page.get_by_label("Seen at least").fill("1")  # 12 texts: every word
        page.get_by_label("Seen at least").press("Enter")
        shot = wait_for_plot(page, ".token-bars", min_colored=200, differs_from=before)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "token-bars.png").write_bytes(shot)
        first = page.locator(".token-bars canvas").first
        shot = first.screenshot()
        row, left, right = _red_rows(shot)
        box, size = first.bounding_box(), Image.open(io.BytesIO(shot)).size
        # The mouse, as a person clicks (Bokeh's event layer lies over the canvas).
        page.mouse.click(box["x"] + (left + right) / 2 * box["width"] / size[0], box["y"] + row * box["height"] / size[1])
        picked = wait_for_text(page, ".token-picked", "instances contain")
        found = re.search(r"([\d,]+) instances contain (\S+), kept", picked)
        count, token = int(found.group(1).replace(",", "")), found.group(2)
        assert count > 0
        page.locator(".token-instances .tabulator-row").first.wait_for(timeout=30_000)
        assert page.locator(".token-instances .tabulator-row").count() == count
        page.locator(".token-instances .tabulator-row").first.click()
        page.get_by_text("Instance t").first.wait_for(timeout=30_000)
        coloured = page.locator(".token-attributions").first
        coloured.wait_for(timeout=30_000)
        spans = coloured.evaluate("el => Array.from((el.shadowRoot || el).querySelectorAll('span[title]'))"
                                  ".map(s => [s.textContent, getComputedStyle(s).backgroundColor])")
        assert spans and any(text.lower() == token for text, _ in spans), (token, spans)
        assert any(background not in ("rgba(0, 0, 0, 0)", "transparent") for _, background in spans)
        open_tab(page, "Instances and neurons")
        wait_for_text(page, ".matrix-rows", f"token {token}")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "text-run-instance.png"), full_page=True)
        assert page.errors == [], page.errors
        context.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
