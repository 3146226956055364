"""Dashboard speed in a real browser (issue 5): Debian's headless Chromium driven by Playwright
against ``netloupe dashboard`` serving a real run, as an analyst would use it.

Measured per run:

* **first paint**: from the page being requested until the scatter shows its points
  (screenshots of the scatter polled until most of its pixels are drawn);
* **zoom re-render**: from a wheel-zoom over the scatter until the new Datashader image has
  arrived from the server and been painted (a hook on the page's Bokeh document times the
  image's data change, then two animation frames); the median of several zooms in and out;
* **selection to matrix**: from releasing a box selection until the neuron matrix has painted
  the selection as a row of its own (the same hook on the matrix's data);
* **every tab** (issue 21): from the click on a tab until its content is drawn (the Instance
  tab opened on an instance; Subgroups: the distributions and the subgroup bars, with the
  default columns, then again with a continuous column, ``rotation``, chosen);
* **server peak RSS** of the dashboard process (``VmHWM``), after all of the above.

Beside each zoom time, the same aggregation and shading done by Datashader alone in this
process (the points, the plot's pixel size, the zoomed ranges): the dashboard's overhead over
the library it stands on is the ratio of the two.

    .venv/bin/python benchmarks/bench_dashboard.py --run /work/bench-runs/mnist-scale --ten-million

``--run`` is a committed run with projections (``make demo ROWS=1000000`` writes one);
``--ten-million`` also writes a 10,000,000-instance run by hand (the 1M run's coordinates,
labels and metadata repeated with jitter; ``storage.handmade``) and measures its zoom.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from netloupe.pipeline.ray_cluster import local_ray_environment
from netloupe.storage.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1400, "height": 1000}
ZOOMS = 6

# Times every change the server makes to the data of the scatter's raster and of the neuron
# matrix (both images), then two animation frames (painted).
HOOK = """
() => {
  window.__rasters = [];
  window.__matrices = [];
  const doc = Bokeh.documents[0];
  doc.on_change((event) => {
    const model = event.model;
    if (!model || model.type !== "ColumnDataSource" || !model.data) return;
    // The scatter's raster is RGBA (uint32); the matrix is drawn as a float image.
    const image = model.data.image ? model.data.image[0] : null;
    const list = image == null ? null : image.dtype === "uint32" ? window.__rasters : window.__matrices;
    if (list === null) return;
    const arrived = performance.now();
    requestAnimationFrame(() => requestAnimationFrame(() => list.push({arrived, painted: performance.now()})));
  });
  return true;
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM")


def drawn_fraction(png: bytes) -> float:
    """The fraction of the image's pixels that are not white (points, axes, text)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return float(((pixels.max(axis=2) - pixels.min(axis=2)) > 60).mean())


def start_server(run_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "netloupe.pipeline.cli", "dashboard", str(run_dir), "--port", str(port)],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the dashboard exited: {log_path.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the dashboard did not listen within 120 s")


def first_paint(page, url: str, timeout: float = 120.0) -> float:
    """Seconds from requesting the page until the scatter holds most of its points."""
    started = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.locator(".scatter canvas").first.wait_for(timeout=timeout * 1000)
    previous = -1.0
    while time.perf_counter() - started < timeout:
        fraction = drawn_fraction(page.locator(".scatter").first.screenshot())
        # Painted once points cover a good part of the plot and the next look adds nothing.
        if fraction > 0.02 and abs(fraction - previous) < 0.002:
            return time.perf_counter() - started
        previous = fraction
    raise RuntimeError("the scatter was not painted")


def zoom_times(page, count: int = ZOOMS) -> list[dict]:
    """Wheel-zoom in and out over the scatter; per zoom, seconds until the new raster is painted."""
    box = page.locator(".scatter canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5)
    results = []
    for i in range(count):
        time.sleep(1.5)  # let the previous render settle
        seen = page.evaluate("window.__rasters.length")
        sent = page.evaluate("performance.now()")
        page.mouse.wheel(0, -300 if i % 2 == 0 else 300)
        page.wait_for_function(f"window.__rasters.length > {seen}", timeout=30_000)
        time.sleep(0.3)  # a throttled second render, if any, counts too
        rasters = page.evaluate(f"window.__rasters.slice({seen})")
        results.append({"seconds": (rasters[-1]["painted"] - sent) / 1000, "renders": len(rasters)})
    return results


def selection_to_matrix(page, timeout: float = 60.0) -> dict:
    """Seconds from releasing a box selection until the neuron matrix has painted its row."""
    page.locator(".scatter .bk-tool-icon-box-select").first.click()
    box = page.locator(".scatter canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.7, steps=8)
    time.sleep(0.5)
    seen = page.evaluate("window.__matrices.length")
    released = page.evaluate("performance.now()")
    page.mouse.up()
    page.wait_for_function(f"window.__matrices.length > {seen}", timeout=timeout * 1000)
    painted = page.evaluate(f"window.__matrices[{seen}].painted")
    selected = page.locator(".selection-info").first.evaluate("el => (el.shadowRoot || el).textContent")
    rows = page.locator(".matrix-rows").first.evaluate("el => (el.shadowRoot || el).textContent")
    assert "(current selection)" in rows, rows
    return {"seconds": (painted - released) / 1000, "selected": selected.split("\n")[0].strip()}


def _drawn(page, selector: str, timeout: float = 120.0, min_fraction: float = 0.01) -> None:
    """Wait until the element at ``selector`` has something drawn in it."""
    page.locator(selector).first.wait_for(timeout=timeout * 1000)
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if drawn_fraction(page.locator(selector).first.screenshot()) > min_fraction:
            return
    raise RuntimeError(f"{selector} was not drawn")


def _text_shown(page, selector: str, text: str, timeout: float = 120.0) -> None:
    """Wait until the pane at ``selector`` (inside Panel's shadow roots) shows ``text``."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if text in page.locator(selector).first.evaluate("el => (el.shadowRoot || el).textContent"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{selector} did not show {text!r}")


def tab_times(page) -> dict:
    """Seconds from each tab's click until its content is drawn (issue 21), in the order an
    analyst would go; Subgroups once with its default columns, once with ``rotation`` chosen."""
    def click(name: str) -> float:
        page.locator(".bk-tab").filter(has_text=re.compile(f"^{re.escape(name)}$")).first.click()
        return time.perf_counter()

    times = {}
    started = click("Instance")
    page.get_by_label("Instance id").wait_for(timeout=120_000)
    times["Instance (empty)"] = time.perf_counter() - started
    box = page.get_by_label("Instance id")
    started = time.perf_counter()
    box.fill("0")  # the scale runs' ids are 0..n-1
    box.press("Enter")
    _drawn(page, ".heatmaps")
    times["Instance (an instance)"] = time.perf_counter() - started
    started = click("Subgroups")
    _drawn(page, ".distributions")
    _drawn(page, ".subgroup-overview")
    times["Subgroups (default columns)"] = time.perf_counter() - started
    choice = page.locator(".choices__input--cloned").first
    choice.click()
    choice.press_sequentially("rotation")  # typed, so that the choices are searched
    started = time.perf_counter()
    choice.press("Enter")
    _text_shown(page, ".subgroups", "rotation in [")
    times["Subgroups (rotation chosen)"] = time.perf_counter() - started
    started = click("Fidelity")
    _text_shown(page, ".fidelity-summary", "saliency")  # a table: its method's row
    times["Fidelity"] = time.perf_counter() - started
    started = click("Model")
    _drawn(page, ".model-graph", min_fraction=0.001)  # a few nodes on white
    times["Model"] = time.perf_counter() - started
    started = click("SQL")
    page.locator(".sql-editor textarea").wait_for(timeout=120_000)
    times["SQL"] = time.perf_counter() - started
    return times


def datashader_alone(run_dir: Path, ranges: list[tuple], width: int, height: int) -> list[float]:
    """Seconds Datashader takes to aggregate and shade the run's points per range, in this process."""
    import datashader as ds
    import datashader.transfer_functions as tf

    from netloupe.dashboards.session import RunSession

    session = RunSession(run_dir)
    kind, source = session.projections[-1]
    points = session.points(kind, source)
    times = []
    for x_range, y_range in ranges:
        started = time.perf_counter()
        canvas = ds.Canvas(plot_width=width, plot_height=height, x_range=x_range, y_range=y_range)
        tf.shade(canvas.points(points, "x", "y", ds.count_cat("label_name")))
        times.append(time.perf_counter() - started)
    return times


def measure(run_dir: Path, work: Path, tabs: bool = True) -> dict:
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = start_server(run_dir, port, work / f"server-{port}.log")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu",
                                                       "--disable-background-networking"])
            page = browser.new_page(viewport=VIEWPORT)
            paint = first_paint(page, f"http://127.0.0.1:{port}/")
            size = page.locator(".scatter canvas").first.bounding_box()
            page.evaluate(HOOK)
            zooms = zoom_times(page)
            ranges = page.evaluate("""() => {
                const plots = Bokeh.documents[0].all_models;
                for (const m of plots) if (m.type === "Figure" || m.type === "Plot") {
                    if (m.x_range && m.x_range.start !== undefined) return [[m.x_range.start, m.x_range.end],
                                                                            [m.y_range.start, m.y_range.end]];
                }
                return null;
            }""")
            picked = selection_to_matrix(page)
            page.screenshot(path=str(work / f"dashboard-{run_dir.name}.png"))
            tabs = tab_times(page) if tabs else None
            page.screenshot(path=str(work / f"dashboard-{run_dir.name}-tabs.png"), full_page=True)
            browser.close()
        rss = peak_rss_gib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    alone = datashader_alone(run_dir, [tuple(map(tuple, ranges))] * 3, int(size["width"]), int(size["height"])) \
        if ranges else [float("nan")]
    return {"first_paint_s": paint, "zooms": zooms, "zoom_median_s": statistics.median(z["seconds"] for z in zooms),
            "datashader_alone_s": statistics.median(alone), "selection": picked, "tabs": tabs,
            "server_peak_rss_gib": rss}


def ten_million_run(source_run: Path, root: Path, rows: int = 10_000_000) -> Path:
    """A run of ``rows`` instances made by hand from the source run's points, with jitter."""
    import pandas as pd
    import pyarrow as pa

    from netloupe.dashboards.session import RunSession
    from netloupe.storage import schema as S
    from netloupe.storage.handmade import write_handmade_run

    session = RunSession(source_run)
    kind, source = session.projections[-1]
    points = session.points(kind, source)
    repeat = -(-rows // len(points))
    take = np.tile(np.arange(len(points)), repeat)[:rows]
    rng = np.random.default_rng(0)
    spread = float(points["x"].std()) * 0.02
    xy = np.stack([points["x"].to_numpy()[take], points["y"].to_numpy()[take]], axis=1)
    xy = (xy + rng.normal(0, spread, size=xy.shape)).astype(np.float32)
    classes = len(session.class_names)
    label = points["label"].to_numpy()[take]
    prediction = points["prediction"].to_numpy()[take]
    probabilities = np.full((rows, classes), 0.0, np.float32)
    probabilities[np.arange(rows), prediction] = 1.0
    columns = {"instance_id": np.arange(rows, dtype=np.int64), "label": label, "prediction": prediction,
               "probabilities": S.fixed_vectors(probabilities, classes)}
    for column in session.metadata_columns:
        values = points[column]
        # Texts stay texts, numbers numbers (as text, a continuous column would be ten million
        # values of one category each).
        columns[column] = pa.array(values.astype(str).to_numpy()[take] if isinstance(values.dtype, pd.CategoricalDtype)
                                   else values.to_numpy()[take])
    del probabilities
    activations = {"relu": xy}  # the catalog wants a layer; the coordinates serve as one
    write_handmade_run(root, "ten-million", pa.table(columns), activations, projections={"relu": xy},
                       rows_per_part=1 << 20)
    return root / "ten-million"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "mnist-scale")
    parser.add_argument("--ten-million", action="store_true", help="also measure a 10M-point run")
    parser.add_argument("--work", type=Path, default=None, help="where the 10M run and logs go")
    parser.add_argument("--keep", action="store_true", help="keep the 10M run in --work (and use one kept there)")
    args = parser.parse_args()
    if not (args.run / "manifest.json").exists():
        sys.exit(f"{args.run} is not a committed run: make one with `make demo ROWS=1000000` "
                 "(or netloupe run examples/mnist-scale.yaml --set dataset.rows=1000000)")
    work = Path(args.work or tempfile.mkdtemp(prefix="netloupe-bench-dashboard-", dir=ROOT.parent))
    work.mkdir(parents=True, exist_ok=True)
    instances = RunLayout(args.run).read_manifest().counts.instances
    results = {f"{instances:,}": measure(args.run, work)}
    if args.ten_million:
        big = work / "ten-million"
        if not (big / "manifest.json").exists() or not args.keep:
            started = time.perf_counter()
            big = ten_million_run(args.run, work)
            print(f"wrote the 10M run in {time.perf_counter() - started:.0f} s", flush=True)
        # Not the tabs: the 10M run is made by hand, with no fidelity checks or model graph.
        results["10,000,000"] = measure(big, work, tabs=False)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(big)], check=True)
    print(json.dumps(results, indent=1))
    print()
    print("| instances | first paint s | zoom re-render s (median) | Datashader alone s | ratio | "
          "selection → matrix s | server peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for n, r in results.items():
        picked = f"{r['selection']['seconds']:.2f}" if r["selection"] else "-"
        print(f"| {n} | {r['first_paint_s']:.2f} | {r['zoom_median_s']:.3f} | {r['datashader_alone_s']:.3f} | "
              f"{r['zoom_median_s'] / r['datashader_alone_s']:.1f}x | {picked} | {r['server_peak_rss_gib']:.2f} |")
    for n, r in results.items():
        if r["tabs"]:
            print(f"\nTabs at {n} instances (seconds from the click until drawn):")
            print("| " + " | ".join(r["tabs"]) + " |")
            print("|" + "---|" * len(r["tabs"]))
            print("| " + " | ".join(f"{v:.2f}" for v in r["tabs"].values()) + " |")


if __name__ == "__main__":
    local_ray_environment()
    main()
