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
MIN_ALPHA = 150
"""Opacity (of 255) of a categorical pixel holding a single point: Datashader's default (40)
leaves a sparse run's points, most of them alone in their pixel, almost invisible."""
LONE_RADIUS = 2
"""Pixels by which a lone point is drawn bigger (a disc of radius 2: about 5 pixels across,
where a point alone in its pixel is one of the raster's 640 across)."""
LONE_CROWD = 2
"""Most other occupied pixels within :data:`LONE_RADIUS` of a pixel for it to count as lone."""


def padded_bounds(points: pd.DataFrame) -> tuple[tuple[float, float], tuple[float, float]]:
    """The points' x and y extents, 2% wider each side (so no point sits on the frame)."""
    if not len(points) or points["x"].isna().all():
        return (0.0, 1.0), (0.0, 1.0)
    extents = []
    for axis in ("x", "y"):
        low, high = float(points[axis].min()), float(points[axis].max())  # NaN skipped
        pad = 0.02 * (high - low) or 0.5
        extents.append((low - pad, high + pad))
    return extents[0], extents[1]


def spread_lone_points(image: np.ndarray, radius: int, crowd: int) -> np.ndarray:
    """A shaded raster (``uint32`` RGBA, alpha 0 where empty) with its lone points drawn as
    discs, into empty pixels only.

    A point's disc is as wide as its neighbourhood is empty: radius 1 when no other pixel within
    1 is occupied, and up to ``radius`` while at most ``crowd`` other occupied pixels lie within
    it; a pixel with an occupied neighbour is not spread. Unlike Datashader's ``dynspread``, which spreads every pixel by one
    amount chosen from the image's overall density (all or nothing: a dense core keeps its
    outliers one pixel wide, a sparse image's clusters smear), this grows only what would
    otherwise be too small to see: an occupied pixel keeps its exact value, and a crowded
    region keeps its exact shape. Where two discs meet, the nearer point's colour wins.
    """
    from scipy.ndimage import convolve

    occupied = (image >> 24) != 0  # alpha, the top byte (Datashader's empty pixels keep a colour)
    reach = np.zeros(image.shape, np.int8)  # each pixel's disc radius
    for r in range(1, radius + 1):
        window = np.ones((2 * r + 1, 2 * r + 1), np.int32)
        around = convolve(occupied.astype(np.int32), window, mode="constant") - occupied
        reach[occupied & (around <= (0 if r == 1 else crowd)) & (reach == r - 1)] = r
    if not reach.any():
        return image
    out = image.copy()
    height, width = image.shape
    offsets = sorted(((dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                      if 0 < dy * dy + dx * dx <= radius * radius + radius), key=lambda o: o[0] ** 2 + o[1] ** 2)
    for dy, dx in offsets:
        # A disc of radius r covers the offsets with dy² + dx² <= r² + r (a round 3x3 at r = 1).
        reaching = np.where(reach.astype(np.int32) ** 2 + reach >= dy * dy + dx * dx, image, 0).astype(image.dtype)
        # shifted[y, x] = reaching[y - dy, x - dx], nothing beyond the edge
        shifted = np.zeros_like(image)
        shifted[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
            reaching[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
        fill = ((out >> 24) == 0) & ((shifted >> 24) != 0)
        out[fill] = shifted[fill]
    return out


class InstanceScatter:
    """A projection's points colored by one column, with selection and tap callbacks.

    ``on_select(ids, tool)`` gets the ids inside a finished box or lasso; ``on_tap(id)`` the
    instance nearest a click (within :data:`TAP_RADIUS` of the visible width). ``colors``
    names the colour of some categories (the others take :data:`CATEGORY_COLORS` by position).
    ``min_alpha`` (of 255) is the opacity of a categorical pixel of one point (a view where each
    lone point matters, a disagreement, asks for more). Points alone in their neighbourhood are
    drawn as discs (:func:`spread_lone_points`); dense regions stay pixel-exact.
    """

    def __init__(self, points: pd.DataFrame, color_by: str, title: str,
                 on_select: Callable[[np.ndarray, str], None], on_tap: Callable[[object], None],
                 colors: dict[str, str] | None = None, min_alpha: int = MIN_ALPHA):
        self.points, self.color_by = points, color_by
        self.min_alpha = min_alpha
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
        # Lone points (a sparse run, or far zoomed in) become discs; dense regions stay exact.
        pixels = spread_lone_points(np.asarray(image.data), LONE_RADIUS, LONE_CROWD)
        # Datashader's first row is the lowest y, as Bokeh draws images: no flip.
        return {"image": [np.ascontiguousarray(pixels)], "x": [x_range[0]], "y": [y_range[0]],
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
