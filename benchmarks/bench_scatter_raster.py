"""The instance scatter's raster (issue 19): how much of it a person sees, whether dense regions
stay exact, and what the lone-point spreading costs per redraw.

For each run, the whole projection rendered as the dashboard first shows it
(:meth:`InstanceScatter.render`, coloured by label): the share of the raster's pixels drawn
(any alpha) and clearly drawn (alpha of 120 or more: visible against white), with and without
:func:`spread_lone_points`; that every pixel Datashader drew keeps its exact value; the
median time of a render (after one to compile), and of the spreading alone.

    .venv/bin/python benchmarks/bench_scatter_raster.py --run runs/mnist-demo --million

``--million`` also writes a 1,000,000-instance run by hand from the first run's points
(repeated with jitter; ``bench_dashboard.ten_million_run``) into a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

REPEATS = 7
VISIBLE_ALPHA = 120


def measure(run: Path) -> dict:
    from netloupe.dashboards import scatter as S
    from netloupe.dashboards.session import RunSession

    session = RunSession(run)
    kind, source = session.projections[-1]
    points = session.points(kind, source)
    plot = S.InstanceScatter(points, "label_name", "bench", on_select=lambda *a: None, on_tap=lambda *a: None)
    plot.render(*plot.bounds)  # numba compiles the aggregation for these columns once
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        spread = plot.render(*plot.bounds)["image"][0]
        times.append(time.perf_counter() - started)
    # The same raster before spreading: the shading alone, as render does it.
    import datashader as ds
    import datashader.transfer_functions as tf

    (x0, x1), (y0, y1) = plot.bounds
    canvas = ds.Canvas(plot_width=S.RASTER_SIZE[0], plot_height=S.RASTER_SIZE[1], x_range=(x0, x1), y_range=(y0, y1))
    counts = canvas.points(points, "x", "y", ds.count_cat("label_name"))
    plain = np.asarray(tf.shade(counts, color_key=plot.colors, how="eq_hist", min_alpha=plot.min_alpha).data)
    spread_times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        S.spread_lone_points(plain, S.LONE_RADIUS, S.LONE_CROWD)
        spread_times.append(time.perf_counter() - started)
    old = np.asarray(tf.shade(counts, color_key=plot.colors, how="eq_hist", min_alpha=40).data)
    occupied = (plain >> 24) != 0
    return {
        "points": len(points),
        "drawn": float(occupied.mean()), "drawn_spread": float(((spread >> 24) != 0).mean()),
        "visible_before": float(((old >> 24) >= VISIBLE_ALPHA).mean()),
        "visible_after": float(((spread >> 24) >= VISIBLE_ALPHA).mean()),
        "dense_exact": bool((spread[occupied] == plain[occupied]).all()),
        "render_ms": 1000 * statistics.median(times), "spread_ms": 1000 * statistics.median(spread_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a committed run with projections")
    parser.add_argument("--million", action="store_true", help="also a 1,000,000-instance run made from it")
    args = parser.parse_args()
    runs = [args.run]
    if args.million:
        from bench_dashboard import ten_million_run

        runs.append(ten_million_run(args.run, Path(tempfile.mkdtemp(prefix="bench-scatter-")), rows=1_000_000))
    for run in runs:
        result = measure(run)
        print(f"{run}: {result['points']:,} points; pixels drawn {result['drawn']:.2%} -> {result['drawn_spread']:.2%} "
              f"spread; clearly visible (alpha >= {VISIBLE_ALPHA}) {result['visible_before']:.2%} at min_alpha 40 "
              f"-> {result['visible_after']:.2%}; every drawn pixel exact: {result['dense_exact']}; "
              f"render {result['render_ms']:.0f} ms, of which spreading {result['spread_ms']:.1f} ms")


if __name__ == "__main__":
    main()
