"""The dashboard in a real browser: ``netloupe dashboard`` served as its own process and
driven by Playwright in Debian's headless Chromium (``make test`` installs it).

Screenshots are kept in ``test-artifacts/dashboard/`` (or ``$NETLOUPE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.dashboard_run import make_dashboard_run
from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("NETLOUPE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
STARTUP_SECONDS = 90


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
    return make_dashboard_run(tmp_path_factory.mktemp("browser"))


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
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Everything must come from the server on loopback (no CDN: there is no internet).
    page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url}"))
    page.goto(server, wait_until="networkidle")
    page.errors = errors
    page.locator(".scatter canvas").first.wait_for(timeout=60_000)
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def colored(png: bytes) -> int:
    """Number of clearly colored (not gray) pixels."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return int((pixels.max(axis=2) - pixels.min(axis=2) > 60).sum())


def wait_for_plot(page, selector: str, timeout: float = 30.0, differs_from: bytes | None = None,
                  min_colored: int = 400) -> bytes:
    """A screenshot of the plot at ``selector`` once it has something drawn in it (and, with
    ``differs_from``, once it was redrawn); the test fails if that does not happen in time."""
    def drawn() -> bytes | None:
        shot = page.locator(selector).first.screenshot()
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


def test_page_loads_without_console_errors_and_the_scatter_is_drawn(page):
    assert re.fullmatch(r"netloupe: \S+ \(240 instances\)", page.title()), page.title()
    shot = wait_for_plot(page, ".scatter")
    (ARTIFACTS / "scatter.png").parent.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "scatter.png").write_bytes(shot)
    assert colored(shot) > 400, "the scatter has (almost) no colored points"
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
    assert 0 < count < 240, selected
    # The matrix shows the selection at once (ActiVis), as a row of its own.
    wait_for_text(page, ".matrix-rows", "(current selection)")
    wait_for_plot(page, ".matrix", differs_from=matrix_before)  # the heat map redraws after its rows text
    page.get_by_role("button", name="Keep selection as subset").click()
    page.get_by_text(f"subset 'selection 1': {count} instances").wait_for(timeout=15_000)
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
  const figures = [];
  const walk = (view) => {
    if (view.model && view.model.type === "Figure" && view.frame) figures.push(view);
    for (const child of (view.child_views || [])) walk(child);
  };
  for (const root of Object.values(Bokeh.index)) walk(root);
  for (const figure of figures) {
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
    # 240 points: all hoverable at once.
    point = wait_until(lambda: page.evaluate(FIRST_HOVERABLE), 30, "hoverable points", interval=0.25)
    page.mouse.move(point["x"], point["y"])

    def tooltip() -> str | None:
        text = page.evaluate(TOOLTIP_TEXT)
        return text if f"instance_id: {point['id']}" in text else None

    shown = wait_until(tooltip, 10, f"the tooltip of instance {point['id']}", interval=0.2)
    assert "label_name:" in shown and "prediction_name:" in shown


def test_instance_detail_shows_heatmaps(page):
    open_tab(page, "Instance")
    box = page.get_by_label("Instance id")
    box.fill("107")
    box.press("Enter")
    page.get_by_text("Instance 107").wait_for(timeout=30_000)
    page.locator(".heatmaps canvas").first.wait_for(timeout=30_000)
    shot = wait_for_plot(page, ".heatmaps")
    # RdBu maps: red and blue cells, not only the gray input image.
    assert colored(shot) > 2000
    text = text_of(page, ".instance-facts")
    assert "prediction" in text and "group = " in text
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
        "Instance": lambda: page.get_by_text("Click a point in the scatter").wait_for(timeout=30_000),
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
    choice = page.locator(".choices__input--cloned").first
    choice.click()
    choice.press_sequentially("rotation")  # typed, so that the choices are searched
    choice.press("Enter")
    shown = wait_for_text(page, ".subgroups", "rotation in [")
    assert "rotation <" in shown and "rotation >=" in shown
    # Five bins crossed with the other columns' values: a table of tens of rows, not hundreds.
    assert page.locator(".subgroups .tabulator-row").count() < 60
    assert page.errors == [], page.errors


def test_with_a_password_the_dashboard_asks_to_sign_in_first(browser, run_dir, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("open sesame\n")
    process, url = start_dashboard(run_dir, tmp_path, "--password-file", str(secret), "--user", "ana")
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
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
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url}"))
        page.goto(url, wait_until="networkidle")
        page.locator(".scatter canvas").first.wait_for(timeout=60_000)
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
        assert errors == [], errors
        context.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
