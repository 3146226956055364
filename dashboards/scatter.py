"""The instance scatter: every projected instance, re-aggregated by Datashader on each zoom.

A plain Bokeh figure holding one RGBA image. When the browser reports new ranges (a zoom or
a pan), the server aggregates every point inside them into the image's pixels and shades
them (no sampling), and the browser gets one image back. Box and lasso selections and taps
come back as geometry and are resolved to instance ids on the server.

Bokeh directly, not HoloViews: a HoloViews ``DynamicMap`` added about 0.2 s of plot
bookkeeping to every zoom of a million points, as much as Datashader's own work.
"""

from __future__ import annotations

from collections.abc import Callable

import datashader as ds
import datashader.transfer_functions as tf
import numpy as np
import pandas as pd
from bokeh.events import RangesUpdate, SelectionGeometry, Tap
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, Legend, LegendItem, LinearColorMapper, Range1d
from bokeh.palettes import Viridis256
from bokeh.plotting import figure

from netloupe.dashboards.session import RunSession

CATEGORY_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
"""Colors of categories, in category order (repeating beyond sixteen)."""
RASTER_SIZE = (640, 480)
"""Pixels of the raster; the browser scales it to the plot. Fixed, so that the first render
is the last (sized by the browser, it would be rendered again once the browser reports)."""
LEGEND_LIMIT = 20
"""Categories named in the legend."""
HOVER_LIMIT = 5000
"""Points in view at or below which they become hoverable (sent to the browser as glyphs)."""
HOVER_FIELDS = ("instance_id", "label_name", "prediction_name", "confidence")
"""What hovering over a point shows."""
TAP_RADIUS = 0.02
"""A click picks the nearest instance within this fraction of the visible x range."""
RANGE_REPORT_MS = 60
"""Milliseconds after the last wheel or drag step at which the browser reports the new ranges
(Bokeh's level-of-detail timeout, 500 ms by default, delays every redraw by that much)."""


def padded_bounds(points: pd.DataFrame) -> tuple[tuple[float, float], tuple[float, float]]:
    """The points' x and y extents, 2% wider each side (so no point sits on the frame)."""
    if not len(points):
        return (0.0, 1.0), (0.0, 1.0)
    extents = []
    for axis in ("x", "y"):
        low, high = float(points[axis].min()), float(points[axis].max())
        pad = 0.02 * (high - low) or 0.5
        extents.append((low - pad, high + pad))
    return extents[0], extents[1]


class InstanceScatter:
    """A projection's points colored by one column, with selection and tap callbacks.

    ``on_select(ids, tool)`` gets the ids inside a finished box or lasso; ``on_tap(id)`` the
    instance nearest a click (within :data:`TAP_RADIUS` of the visible width). ``colors``
    names the colour of some categories (the others take :data:`CATEGORY_COLORS` by position).
    ``min_alpha`` (of 255) is the opacity of a categorical pixel of one point, and
    ``spread_threshold`` Datashader's ``dynspread`` threshold: Datashader's defaults (40, and
    0.5, which rarely spreads) draw a sparse run's lone points almost invisible; a view where
    each lone point matters (a disagreement) asks for more of both.
    """

    def __init__(self, points: pd.DataFrame, color_by: str, title: str,
                 on_select: Callable[[np.ndarray, str], None], on_tap: Callable[[object], None],
                 colors: dict[str, str] | None = None, min_alpha: int = 40, spread_threshold: float = 0.5):
        self.points, self.color_by = points, color_by
        self.min_alpha, self.spread_threshold = min_alpha, spread_threshold
        self.on_select, self.on_tap = on_select, on_tap
        self.categorical = isinstance(points[color_by].dtype, pd.CategoricalDtype)
        if self.categorical:
            categories = [str(c) for c in points[color_by].cat.categories]
            self.colors = {c: (colors or {}).get(c, CATEGORY_COLORS[i % len(CATEGORY_COLORS)])
                           for i, c in enumerate(categories)}
        else:
            values = points[color_by].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            # One color scale for every zoom, so a color means the same value everywhere.
            self.span = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        self.bounds = padded_bounds(points)
        self.x_range = self.bounds[0]
        self.raster = ColumnDataSource(self.render(*self.bounds))
        self.near = ColumnDataSource(self._hoverable(*self.bounds))
        self.figure = self._figure(title)

    # -- what is drawn (no Bokeh events: testable headless) -----------------------------------

    def render(self, x_range, y_range) -> dict:
        """The raster of every point inside the ranges, as the image source's data."""
        # Plain floats: numba compiles Datashader's loop anew for each new type of the bounds.
        x_range, y_range = tuple(map(float, x_range)), tuple(map(float, y_range))
        canvas = ds.Canvas(plot_width=RASTER_SIZE[0], plot_height=RASTER_SIZE[1], x_range=x_range, y_range=y_range)
        if self.categorical:
            counts = canvas.points(self.points, "x", "y", ds.count_cat(self.color_by))
            image = tf.shade(counts, color_key=self.colors, how="eq_hist", min_alpha=self.min_alpha)
        else:
            means = canvas.points(self.points, "x", "y", ds.mean(self.color_by))
            image = tf.shade(means, cmap=Viridis256, how="linear", span=self.span)
        # Sparse regions (few points, or far zoomed in) get bigger points; dense ones stay exact.
        image = tf.dynspread(image, threshold=self.spread_threshold, max_px=3)
        # Datashader's first row is the lowest y, as Bokeh draws images: no flip.
        return {"image": [np.ascontiguousarray(image.data)], "x": [x_range[0]], "y": [y_range[0]],
                "dw": [x_range[1] - x_range[0]], "dh": [y_range[1] - y_range[0]]}

    def _hoverable(self, x_range, y_range) -> dict:
        """The points in view when few enough to tell apart (else none), for the hover tool."""
        shown = RunSession.points_in_view(self.points, x_range, y_range, HOVER_LIMIT)
        columns = ["x", "y"] + [c for c in HOVER_FIELDS if c in self.points]
        frame = self.points.iloc[:0] if shown is None else shown
        return {c: (frame[c].astype(str) if isinstance(frame[c].dtype, pd.CategoricalDtype) else frame[c]).to_numpy()
                for c in columns}

    # -- the figure and its events ------------------------------------------------------------

    def _figure(self, title: str):
        (x0, x1), (y0, y1) = self.bounds
        plot = figure(title=title, x_range=Range1d(x0, x1), y_range=Range1d(y0, y1),
                      tools="pan,wheel_zoom,box_select,lasso_select,tap,reset,save", active_scroll="wheel_zoom",
                      active_drag="pan", sizing_mode="stretch_width", height=520, lod_timeout=RANGE_REPORT_MS,
                      lod_interval=RANGE_REPORT_MS, output_backend="canvas")
        plot.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.raster)
        near = plot.scatter("x", "y", source=self.near, size=7, fill_alpha=0, line_alpha=0,
                            hover_fill_color="black", hover_fill_alpha=0.4, hover_line_color="black",
                            hover_line_alpha=1, selection_fill_alpha=0, selection_line_alpha=0,
                            nonselection_fill_alpha=0, nonselection_line_alpha=0)
        tooltips = [(c, f"@{c}") for c in HOVER_FIELDS if c in self.points]
        plot.add_tools(HoverTool(renderers=[near], tooltips=tooltips))
        if self.categorical:
            items = []
            for name, color in list(self.colors.items())[:LEGEND_LIMIT]:
                swatch = plot.scatter([np.nan], [np.nan], color=color, size=8)  # no data: no swatch drawn
                items.append(LegendItem(label=name, renderers=[swatch]))
            plot.add_layout(Legend(items=items, title=self.color_by), "right")
        else:
            mapper = LinearColorMapper(palette=Viridis256, low=self.span[0], high=self.span[1])
            plot.add_layout(ColorBar(color_mapper=mapper, title=self.color_by), "right")
        plot.on_event(RangesUpdate, self._on_ranges)
        plot.on_event(SelectionGeometry, self._on_selection)
        plot.on_event(Tap, self._on_tap)
        return plot

    def _on_ranges(self, event) -> None:
        if None in (event.x0, event.x1, event.y0, event.y1):
            return
        x_range, y_range = (event.x0, event.x1), (event.y0, event.y1)
        self.x_range = x_range
        self.raster.data = self.render(x_range, y_range)
        self.near.data = self._hoverable(x_range, y_range)

    def _on_selection(self, event) -> None:
        if not event.final:
            return
        geometry = event.geometry
        if geometry.get("type") == "rect":
            ids = RunSession.ids_in_box(self.points, geometry["x0"], geometry["y0"], geometry["x1"], geometry["y1"])
            self.on_select(ids, "box")
        elif geometry.get("type") == "poly" and len(geometry.get("x", [])) >= 3:
            self.on_select(RunSession.ids_in_polygon(self.points, geometry["x"], geometry["y"]), "lasso")

    def _on_tap(self, event) -> None:
        if event.x is None or event.y is None:
            return
        within = TAP_RADIUS * abs(self.x_range[1] - self.x_range[0])
        found = RunSession.nearest(self.points, event.x, event.y, within)
        if found is not None:
            self.on_tap(found)
