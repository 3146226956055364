"""The analyst dashboard: Panel views over one run, each drawing what :class:`RunSession` computes.

``netloupe dashboard RUN`` serves :func:`build_dashboard` (one session per browser tab).
Given several runs of the same instances (a run group, or ``NAME=RUN ...``), the single-run
tabs show one of them and an "Across runs" tab compares them (:class:`AcrossRunsView`).
The instance view is a Datashader raster of every projected instance, no sampling
(:mod:`netloupe.dashboards.scatter`); box and lasso selections become id subsets on the server.

Views share one :class:`Dashboard` (the layer, the instance in detail, the subsets), so a
choice made in one (a layer in the model graph, a point in the scatter, an exemplar in the
matrix) shows in the others.
"""

from __future__ import annotations

import functools
import html
import io
import time
from pathlib import Path

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
from panel.custom import JSComponent

from netloupe.contract.errors import RunError
from netloupe.dashboards.comparison import (
    AGREEMENT,
    AGREEMENT_COLORS,
    ALL,
    METRICS_BY_RUN,
    RANK_CORRELATION,
    ComparisonSession,
)
from netloupe.dashboards.scatter import CATEGORY_COLORS, InstanceScatter
from netloupe.dashboards.session import (
    DEPENDENCE_POINTS,
    TOKEN_GROUPINGS,
    RunSession,
    SessionError,
    Subset,
    ViewLink,
    blended_map,
    map_image,
    read_view_link,
    segment_boundaries,
    write_view_link,
)
from netloupe.storage.catalog import QueryError

COLOR_FIELDS = ("label_name", "prediction_name", "outcome", "confidence")
"""What the scatter can be colored by, besides the metadata columns and kept subsets."""
SUBSET_COLOR = "subset: "
"""Prefix of the scatter's color choices that color by membership of a kept subset."""
MATRIX_ROWS = {"classes (label)": "label", "predicted classes": "prediction", "correct / incorrect": "correct",
               "my subsets only": None}
"""The class rows the matrix can show beside the analyst's own subsets: the column they group by."""
METRICS = ("accuracy", "fpr", "fnr", "precision", "recall")
"""The subgroup metrics (FairVis), named as the SQL operators name them."""
MATRIX_VALUES = ("mean", "neuron", "size", "frac_active")
"""What each cell of the neuron matrix holds (colored by the first, the rest on hover)."""
MAP_SIZE = 240
"""Pixels per side of every map in the instance view (and of its input), whatever its cells."""
MAPS_PER_ROW = 5
"""Maps (the input first) per row of the instance view: five of MAP_SIZE fit a 1600-pixel page."""
TOKENS_SHOWN, MAX_TOKENS_SHOWN = 12, 50
"""Bars per subset in the tokens view: by default, and at most (a bounded number of marks)."""
MAX_TOKEN_SUBSETS = 12
"""Most class subsets the tokens and features views draw (a model of a thousand classes: the first twelve)."""
BARS_PER_ROW = 3
"""Bar charts side by side in the features view and a tabular instance's detail."""
FEATURES_SHOWN = 12
"""Features per method in a tabular instance's detail (the largest |values|)."""
DATASHADE_ABOVE = 5_000
"""Points beyond which a dependence plot is rasterised by Datashader instead of drawn one by one."""
SLICE_BINS, MAX_SLICE_BINS = 5, 20
"""Quantile bins of a many-valued numeric column in the subgroups: by default (as the SQL
operators), and at most."""
DISTRIBUTION_COLUMNS = 6
"""Metadata columns whose distributions the Subgroups tab draws (the first ones)."""
MAX_SUBGROUP_ROWS = 200
"""Most rows of the subgroups table (worst first): a bounded number of marks in the browser."""
CURRENT_SELECTION = "(current selection)"
"""The matrix row of the scatter's selection before it is kept (parentheses: a name no kept subset can take)."""
NO_SPLIT = "(nothing: one line)"
"""The choice of no split of the lines over the runs (a text: a Select shows None as blank)."""
ACROSS_ROW_PIXELS = 1440
"""Pixels one row of an instance's maps across runs shares (each map at most MAP_SIZE): a
1600-pixel-wide page holds the row without scrolling sideways."""
MAX_MAPS_PER_ROW = 8
"""Images in a row of one method's maps across runs (the input, then a map per run); more runs
wrap to the next row (a map stays 180 px or more)."""
AGREEMENT_MIN_ALPHA = 200
"""The agreement scatter's opacity of a pixel of one point (:class:`InstanceScatter`): nearly
opaque, so that one disagreement among thousands of agreements shows."""


class Dashboard(param.Parameterized):
    """Shared state of one page: what is looked at, the instance in detail, the subsets."""

    projection = param.Selector(doc="The projected table the scatter shows (kind/source)")
    algorithm = param.Selector(default="pca", objects=["pca"], doc="The projection's algorithm")
    color_by = param.Selector(default="label_name", doc="What colors the scatter's points")
    layer = param.Selector(doc="The layer of the neuron matrix (and, when projected, of the scatter)")
    matrix_rows = param.Selector(default="classes (label)", objects=list(MATRIX_ROWS),
                                 doc="Which class subsets the matrix shows besides the analyst's own")
    compare_a = param.Selector(default=None, allow_None=True, doc="Subset A of the neuron ordering")
    compare_b = param.Selector(default=None, allow_None=True, doc="Subset B of the neuron ordering")
    instance_id = param.String(default="", doc="The instance shown in detail (its id as text)")
    subsets_version = param.Integer(default=0, doc="Bumped whenever a subset is added or removed")
    selection = param.Array(default=None, allow_None=True,
                            doc="Ids of the scatter's current box or lasso selection, not yet kept as a subset")
    message = param.String(default="", doc="The last error or notice shown to the analyst")

    def __init__(self, session: RunSession, **params):
        super().__init__(**params)
        self.session = session
        sources = [f"{kind}/{source}" for kind, source in session.projections]
        self.param.projection.objects = sources
        self.param.color_by.objects = self._color_choices()
        self.param.layer.objects = session.layers
        self.layer = session.layers[-1] if session.layers else None
        preferred = f"activations/{self.layer}"
        self.projection = preferred if preferred in sources else (sources[0] if sources else None)
        self._refresh_algorithms()
        self._refresh_subset_choices()

    @param.depends("layer", watch=True)
    def _follow_layer(self) -> None:
        """ActiVis: choosing a layer switches the projection to that layer's, when it has one."""
        candidate = f"activations/{self.layer}"
        if candidate in self.param.projection.objects and candidate != self.projection:
            self.projection = candidate

    @param.depends("projection", watch=True)
    def _refresh_algorithms(self) -> None:
        if self.projection is None:
            return
        algorithms = self.session.algorithms(*self.projection.split("/", 1)) or ["pca"]
        self.param.algorithm.objects = algorithms
        if self.algorithm not in algorithms:
            self.algorithm = algorithms[0]

    def subset_names(self) -> list[str]:
        classes = [s.name for s in self.session.class_subsets("label")]
        return list(self.session.subsets) + ["correct", "incorrect"] + classes

    def _refresh_subset_choices(self) -> None:
        names = self.subset_names()
        self.param.compare_a.objects = [None] + names
        self.param.compare_b.objects = [None] + names

    def added_subset(self) -> None:
        self._refresh_subset_choices()
        self.param.color_by.objects = self._color_choices()
        self.subsets_version += 1

    def _color_choices(self) -> list[str]:
        """What the scatter can be colored by: the instance's facts, metadata, kept subsets."""
        return (list(COLOR_FIELDS) + self.session.colour_columns
                + [SUBSET_COLOR + name for name in self.session.subsets])

    def points(self) -> pd.DataFrame:
        kind, source = self.projection.split("/", 1)
        return self.session.points(kind, source, self.algorithm)

    def colored_points(self) -> pd.DataFrame:
        """The points, with a membership column when colored by a kept subset."""
        points = self.points()
        if self.color_by.startswith(SUBSET_COLOR):
            name = self.color_by[len(SUBSET_COLOR):]
            # A new frame sharing the cached one's columns: the cache is never written to.
            return points.assign(**{self.color_by: self.session.membership(points, name)})
        return points

    def show_instance(self, instance_id) -> None:
        self.instance_id = str(instance_id)

    def show_row(self, frame: pd.DataFrame | None, row: int) -> None:
        """Open the instance of a clicked table row (``frame`` has ``instance_id``)."""
        if frame is not None and 0 <= row < len(frame):
            self.show_instance(frame["instance_id"].iloc[row])

    def report(self, text: str) -> None:
        self.message = text

    def restore(self, link: ViewLink) -> list[str]:
        """Show the view a link names (subsets, layer, projection, algorithm, colour, instance;
        the tab is the page's); each value this run does not have is left at its default, and a
        note per such value says so."""
        notes = list(link.notes)
        for name, predicate in link.subsets:
            try:
                self.session.add_predicate_subset(name, predicate)
            except SessionError:
                notes.append(f"subset {name!r} (its name or its SQL predicate over instances is not valid)")
        if link.subsets:
            self.added_subset()
        # In this order: a layer switches the projection, a projection its algorithms, and the
        # colours include the subsets.
        for key, name in (("layer", "layer"), ("projection", "projection"), ("algorithm", "algorithm"),
                          ("color", "color_by")):
            value, choices = link.values.get(key), self.param[name].objects
            if value is None:
                continue
            if value in choices:
                setattr(self, name, value)
            else:
                notes.append(f"{key} {value!r} (showing {getattr(self, name)})")
        text = link.values.get("instance")
        if text is not None:
            try:
                found = self.session.has_instance(self.session.typed_id(text))
            except SessionError:  # not even of the run's id type
                found = False
            if found:
                self.instance_id = text
            else:
                notes.append(f"instance {text!r}")
        return notes

    def link_values(self) -> dict[str, str | None]:
        """What a link to this view holds (besides the tab and the subsets)."""
        return {"layer": self.layer, "projection": self.projection, "algorithm": self.algorithm,
                "color": self.color_by, "instance": self.instance_id or None}


class InstancesView(pn.viewable.Viewer):
    """Every instance as a point of the 2-D projection (Datashader), colorable, selectable.

    A box or lasso selection shows in the matrix at once and can be kept as a named subset;
    a click opens the nearest instance; zoomed in far enough, hovering names the instance.
    Subsets can also be made by a SQL predicate over ``instances``.
    """

    def __init__(self, dashboard: Dashboard, **params):
        super().__init__(**params)
        self.dashboard = dashboard
        self.name_input = pn.widgets.TextInput(name="Subset name", value="selection 1", width=180)
        self.keep = pn.widgets.Button(name="Keep selection as subset", button_type="primary", width=200)
        self.keep.on_click(self._keep_selection)
        self.predicate = pn.widgets.TextInput(name="SQL predicate over instances", width=340,
                                              placeholder="noise = 'high' AND NOT correct")
        self.predicate_name = pn.widgets.TextInput(name="Subset name", value="predicate 1", width=180)
        self.add_predicate = pn.widgets.Button(name="Add predicate subset", width=200)
        self.add_predicate.on_click(self._keep_predicate)
        self.selected = pn.pane.Markdown("No selection yet: use the box or lasso tool.", css_classes=["selection-info"])
        self._pending: np.ndarray = np.empty(0)

    def _plot(self, projection, algorithm, color_by):
        if projection is None:
            return pn.pane.Markdown("This run has no projections (projection.layers was empty).")
        try:
            points = self.dashboard.colored_points()
        except (SessionError, QueryError) as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        scatter = InstanceScatter(points, color_by, f"{projection} ({algorithm}), colored by {color_by}",
                                  on_select=self._selected, on_tap=self._tapped)
        return pn.pane.Bokeh(scatter.figure, sizing_mode="stretch_width", min_height=520)

    def _selected(self, ids: np.ndarray, tool: str) -> None:
        self._pending = ids
        self.selected.object = f"**{len(ids):,} instances selected** ({tool})"
        # ActiVis: the matrix shows the selection at once, before it is kept under a name.
        self.dashboard.selection = ids if len(ids) else None

    def _tapped(self, instance_id) -> None:
        self.dashboard.show_instance(instance_id)
        self.dashboard.report(f"instance {instance_id} is in the Instance tab")

    def _keep_selection(self, _event) -> None:
        try:
            subset = self.dashboard.session.add_ids_subset(self.name_input.value, self._pending)
        except SessionError as error:
            self.dashboard.report(str(error))
            return
        self.dashboard.report(f"subset {subset.name!r}: {subset.size:,} instances")
        self.name_input.value = f"selection {len(self.dashboard.session.subsets) + 1}"
        self._pending = np.empty(0)
        self.dashboard.selection = None
        self.dashboard.added_subset()

    def _keep_predicate(self, _event) -> None:
        try:
            subset = self.dashboard.session.add_predicate_subset(self.predicate_name.value, self.predicate.value)
        except SessionError as error:
            self.dashboard.report(str(error))
            return
        self.dashboard.report(f"subset {subset.name!r}: {subset.size:,} instances")
        self.predicate_name.value = f"predicate {len(self.dashboard.session.subsets) + 1}"
        self.dashboard.added_subset()

    def __panel__(self):
        d = self.dashboard
        plot = pn.bind(self._plot, d.param.projection, d.param.algorithm, d.param.color_by)
        return pn.Column(
            pn.Row(pn.widgets.Select.from_param(d.param.projection, name="Projection", width=220),
                   pn.widgets.Select.from_param(d.param.algorithm, name="Algorithm", width=100),
                   pn.widgets.Select.from_param(d.param.color_by, name="Color by", width=180)),
            pn.panel(plot, sizing_mode="stretch_width", min_height=520, css_classes=["scatter"]),
            self.selected,
            pn.Row(self.name_input, self.keep),
            pn.Row(self.predicate, self.predicate_name, self.add_predicate),
            sizing_mode="stretch_width",
        )


class MatrixView(pn.viewable.Viewer):
    """ActiVis' neuron activation matrix: subsets × neurons, colored by mean activation."""

    def __init__(self, dashboard: Dashboard, **params):
        super().__init__(**params)
        self.dashboard = dashboard
        self.exemplars = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, width=520, height=260,
                                              css_classes=["exemplars"], show_index=False)
        self.exemplars.on_click(self._on_exemplar)
        self.rows_info = pn.pane.Markdown("", css_classes=["matrix-rows"])
        self._matrix = pd.DataFrame()

    def matrix_frame(self, layer, rows, a, b, selection=None) -> pd.DataFrame:
        session = self.dashboard.session
        own = [session.subset(name) for name in session.subsets]
        if selection is not None and len(selection):
            own.append(Subset(CURRENT_SELECTION, ids=selection, size=len(selection)))
        frames = [session.neuron_matrix(layer, own)] if own else []
        if MATRIX_ROWS[rows] is not None:
            frames.append(session.class_matrix(layer, MATRIX_ROWS[rows]))
        for name in (a, b):  # subsets being compared are always rows
            if name is not None and not any((f["subset"] == name).any() for f in frames):
                frames.append(session.neuron_matrix(layer, [session.subset(name)]))
        matrix = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["subset", "neuron", "size", "mean", "std", "frac_active"])
        order = session.neuron_order(matrix, a, b)
        matrix["position"] = matrix["neuron"].map({neuron: i for i, neuron in enumerate(order)})
        return matrix

    def _heatmap(self, layer, rows, a, b, _version, selection) -> hv.HeatMap:
        """The matrix as a heat map (its title in the label); an empty one when there is none."""
        matrix, title = None, "no layer was recorded in this run"
        if layer is not None:
            try:
                matrix = self.matrix_frame(layer, rows, a, b, selection)
                order = "" if a is None or b is None else f", neurons ordered by mean({a}) - mean({b})"
                title = f"{layer}: mean activation per subset{order}"
            except SessionError as error:
                self.dashboard.report(str(error))
                title = str(error)
        if matrix is None or matrix.empty:
            matrix = pd.DataFrame({"subset": ["-"], "position": [0], "mean": [np.nan], "neuron": [0], "size": [0],
                                   "frac_active": [np.nan]})
        self._matrix = matrix
        names = list(dict.fromkeys(matrix["subset"]))
        self.rows_info.object = f"Rows ({len(names)}): " + ", ".join(f"`{n}`" for n in names)
        positions = np.arange(int(matrix["position"].max()) + 1)
        wide = matrix.pivot(index="subset", columns="position").reindex(index=names)
        # Gridded, the heat map skips HoloViews' regridding of long rows (4x faster to draw).
        return hv.HeatMap({"position": positions, "subset": np.array(names, dtype=object),
                           **{v: wide[v].reindex(columns=positions).to_numpy() for v in MATRIX_VALUES}},
                          kdims=["position", "subset"], vdims=list(MATRIX_VALUES), label=title)

    def _on_tap(self, matrix: pd.DataFrame, x) -> None:
        if x is None:
            return
        neuron = matrix.loc[matrix["position"] == int(round(x)), "neuron"]
        if neuron.empty:
            return
        self.exemplars.value = self.dashboard.session.exemplars(self.dashboard.layer, int(neuron.iloc[0]))
        self.dashboard.report(f"top exemplars of neuron {int(neuron.iloc[0])} of {self.dashboard.layer}")

    def _on_exemplar(self, event) -> None:
        self.dashboard.show_row(self.exemplars.value, event.row)

    def __panel__(self):
        d = self.dashboard
        # One plot whose data is swapped when anything changes (a new selection redraws
        # cells, not a new figure).
        heat = hv.DynamicMap(pn.bind(self._heatmap, d.param.layer, d.param.matrix_rows, d.param.compare_a,
                                     d.param.compare_b, d.param.subsets_version, d.param.selection))
        tap = hv.streams.Tap(source=heat)
        tap.param.watch(lambda event: self._on_tap(self._matrix, event.new), "x")
        heat = heat.opts(cmap="Blues", colorbar=True, tools=["hover", "tap"], responsive=True, min_height=320,
                         framewise=True, xlabel="neuron (display order)", title="{label}")
        return pn.Column(
            pn.Row(pn.widgets.Select.from_param(d.param.layer, name="Layer", width=180),
                   pn.widgets.Select.from_param(d.param.matrix_rows, name="Class rows", width=200)),
            pn.Row(pn.widgets.Select.from_param(d.param.compare_a, name="Order neurons by A", width=200),
                   pn.widgets.Select.from_param(d.param.compare_b, name="minus B", width=200)),
            pn.pane.HoloViews(heat, sizing_mode="stretch_width", css_classes=["matrix"]),
            self.rows_info,
            pn.pane.Markdown("Click a neuron for its top exemplars; click an exemplar for its detail:"),
            self.exemplars,
            sizing_mode="stretch_width",
        )


class InstanceView(pn.viewable.Viewer):
    """One instance: its input, label, prediction, probabilities, attribution maps, activations.

    Opened before the analyst chose one, it shows the run's most confident mistake
    (:meth:`RunSession.opening_instance`) and says so."""

    def __init__(self, dashboard: Dashboard, **params):
        super().__init__(**params)
        self.dashboard = dashboard
        self.id_input = pn.widgets.TextInput(name="Instance id", width=200)
        self.id_input.param.watch(lambda e: self.dashboard.show_instance(e.new.strip()), "value")
        self.over_input = pn.widgets.Checkbox(name="Maps over the input", value=True, width=180)
        self.shared_scale = pn.widgets.Checkbox(name="One colour scale for every map", value=False, width=240)
        self.opening, self.opening_reason = None, ""
        if not dashboard.instance_id:
            try:
                self.opening, self.opening_reason = dashboard.session.opening_instance()
            except SessionError as error:
                dashboard.report(str(error))
        # The box shows the instance however it was chosen (a click, a link, the opening one).
        dashboard.param.watch(lambda e: setattr(self.id_input, "value", e.new), "instance_id")
        if self.opening is not None:
            dashboard.show_instance(self.opening)
        self.id_input.value = dashboard.instance_id

    def _detail(self, instance_id, over_input: bool = True, shared_scale: bool = False):
        if not instance_id:
            return pn.pane.Markdown("Click a point in the scatter, an exemplar, or type an id.")
        session = self.dashboard.session
        try:
            detail = session.instance(session.typed_id(instance_id))
        except (SessionError, QueryError) as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        row, names = detail.row, session.class_names
        label = "none" if row["label"] is None else names[row["label"]]
        panels = []
        if self.opening is not None and instance_id == str(self.opening):
            panels.append(pn.pane.Markdown(
                f"Showing {self.opening_reason}. Click a point in the scatter, an exemplar, or type an id for "
                "another.", css_classes=["instance-note"]))
        facts = pn.pane.Markdown(
            f"### Instance {row['instance_id']}\n\nlabel **{label}**, prediction **{names[row['prediction']]}** "
            f"(confidence {row['confidence']:.3f}), {'correct' if row['correct'] else 'incorrect'}"
            + "".join(f"; {c} = {row[c]}" for c in session.metadata_columns),
            css_classes=["instance-facts"])
        probabilities = hv.Bars(pd.DataFrame({"class": names, "probability": row["probabilities"]}),
                                "class", "probability").opts(title="probabilities", ylim=(0, 1), frame_width=360,
                                                             frame_height=160, xrotation=90 if len(names) > 12 else 0)
        if session.reads_features:
            panels.append(facts)  # its probabilities head the grid of its features' bars, below
        else:
            # The probabilities beside the facts, not in the maps' grid: a grid's column is as
            # wide as its widest plot's frame and axis, and squeezed the maps below it.
            panels.append(pn.Row(facts, pn.pane.HoloViews(probabilities.opts(toolbar=None), linked_axes=False)))
        inputs = detail.input
        images = []
        picture = None
        if isinstance(inputs, np.ndarray):
            picture = map_image(inputs)
            images.append(hv.Image(picture[::-1], bounds=(0, 0, picture.shape[1], picture.shape[0])).opts(
                cmap="gray", title="input", frame_width=MAP_SIZE, frame_height=MAP_SIZE, xaxis=None, yaxis=None,
                fontsize={"title": "10pt"}))
        elif isinstance(inputs, dict) and not session.reads_features:
            panels.append(pn.widgets.Tabulator(pd.DataFrame({"feature": list(inputs), "value": list(inputs.values())}),
                                               disabled=True, height=240, width=320, show_index=False))
        if detail.tokens is not None:
            panels += [pn.pane.HTML(colored_text(inputs if isinstance(inputs, str) else None, detail.tokens, values,
                                                 method), css_classes=["token-attributions"])
                       for method, values in detail.token_values.items()]
        contributions = ([pn.pane.Bokeh(self._contributions(row["instance_id"], method)) for method in session.methods]
                         if session.reads_features else [])
        maps = {} if session.reads_features else {method: map_image(v) for method, v in detail.maps.items()}
        bounds = map_bounds(maps, shared_scale)
        for method, image in maps.items():
            if image.shape[0] == 1 and image.ndim == 2:  # a vector: one bar per feature
                images.append(hv.Bars(pd.DataFrame({"feature": range(image.shape[1]), "attribution": image[0]}),
                                      "feature", "attribution").opts(title=method, width=360, height=240))
                continue
            images.append(self._map(method, image, bounds[method], picture if over_input else None,
                                    detail.segments.get(method),
                                    extent=None if picture is None else picture.shape))
        profile = [hv.Curve(pd.DataFrame({"neuron": np.arange(len(v)), "activation": v}), "neuron", "activation")
                   .opts(title=f"{layer} activations", width=360, height=200, shared_axes=False)
                   for layer, v in detail.activations.items()]
        if contributions:  # a tabular instance: its probabilities beside each method's bars
            panels.append(pn.GridBox(pn.pane.HoloViews(probabilities.opts(frame_height=220)), *contributions,
                                     ncols=BARS_PER_ROW, css_classes=["feature-contributions"]))
        elif images:
            if picture is not None and bounds:
                scale = (f"one colour scale for every map, full colour at ±{max(bounds.values()):.3g}" if shared_scale
                         else "each map on its own scale, full colour at the ± in its title")
                panels.append(pn.pane.Markdown(f"Red: toward the explained class; blue: against; {scale}.",
                                               css_classes=["map-scale"]))
            # Each map a plot of its own (its own axes: a 7x7 Grad-CAM shares none with the
            # 28x28 input, nor is drawn in its corner), every one at the same frame size.
            panels.append(plot_rows(images, MAPS_PER_ROW, "heatmaps"))
        panels += fidelity_panels(detail.fidelity)
        if profile:
            # Grids and rows of plots do not mix in one column of a tab built on opening: one of
            # them draws collapsed into its corner (Panel 1.9). A tabular instance's charts are a
            # grid, so its profiles are too; every other instance's, rows.
            panels.append(pn.GridBox(*[pn.pane.HoloViews(p) for p in profile], ncols=3, css_classes=["activation-profiles"])
                          if contributions else plot_rows(profile, 3, "activation-profiles"))
        return pn.Column(*panels)

    def _contributions(self, instance_id, method: str):
        """A tabular instance's largest values for ``method``, each feature with its original value."""
        frame = self.dashboard.session.feature_contributions(instance_id, method).head(FEATURES_SHOWN)
        return signed_bars(frame["shown"].tolist(), frame["attribution"].to_numpy(), method, method)

    @staticmethod
    def _map(method: str, values: np.ndarray, bound: float, picture: np.ndarray | None,
             segments: np.ndarray | None = None, size: int = MAP_SIZE, title: str | None = None,
             extent: tuple[int, int] | None = None):
        """One map in a square frame of ``size`` pixels, as every other: over the input image
        when given (Captum's blended heat map: a patch map or a Grad-CAM resized over the whole
        image), else its own cells spread over the input's ``extent`` (rows, columns; a 7x7
        Grad-CAM covers the 28x28 image) with a colour bar. ``bound`` is the value drawn at full
        colour, either sign (a symmetric scale); a method over the image's own superpixels draws
        their boundaries."""
        title = title or f"{method} ±{bound:.2g}"
        square = dict(title=title, frame_width=size, frame_height=size, xaxis=None, yaxis=None,
                      fontsize={"title": "10pt"})
        if picture is not None:
            blended = blended_map(picture, values, bound, segments)
            return hv.RGB(blended[::-1], bounds=(0, 0, blended.shape[1], blended.shape[0])).opts(**square)
        rows, columns = extent or values.shape
        bounds = (0, 0, columns, rows)
        heat = hv.Image(values[::-1], bounds=bounds).opts(cmap="RdBu_r", clim=(-bound, bound), colorbar=True,
                                                          tools=["hover"], **square)
        if segments is None:
            return heat
        lines = np.where(segment_boundaries(segments), 1.0, np.nan)[::-1]
        return heat * hv.Image(lines, bounds=bounds).opts(cmap=["#ffd700"], clipping_colors={"NaN": "transparent"})

    def __panel__(self):
        detail = pn.bind(self._detail, self.dashboard.param.instance_id, self.over_input, self.shared_scale)
        # A tabular run has no maps to lay over an input.
        choices = [] if self.dashboard.session.reads_features else [self.over_input, self.shared_scale]
        return pn.Column(pn.Row(self.id_input, *choices), pn.panel(detail),
                         sizing_mode="stretch_width")


def map_bounds(maps: dict[str, np.ndarray], shared: bool) -> dict[str, float]:
    """The value each map is drawn at full colour (either sign): its own largest |value|, or
    with ``shared`` the largest of every map's (one symmetric scale for the instance)."""
    own = {method: float(np.nanmax(np.abs(image))) if image.size else 0.0 for method, image in maps.items()}
    if shared:
        largest = max(own.values(), default=0.0) or 1.0
        return {method: largest for method in own}
    return {method: bound or 1.0 for method, bound in own.items()}


def colored_text(text: str | None, tokens: dict, values: np.ndarray, method: str) -> str:
    """HTML of a text with each token's characters coloured by its value (red toward the
    explained class, blue against, as the image maps), its value in the tooltip; the tokens
    themselves, space-separated, when the text is not at hand (the dataset moved)."""
    bound = float(np.max(np.abs(values))) if len(values) else 0.0
    bound = bound or 1.0

    def span(content: str, value: float, token: str) -> str:
        alpha = min(1.0, abs(value) / bound)
        colour = f"rgba(178,24,43,{alpha:.2f})" if value > 0 else f"rgba(33,102,172,{alpha:.2f})"
        return (f'<span style="background:{colour}" title="{html.escape(token)}: {value:.4g}">'
                f"{html.escape(content)}</span>")

    pieces, position = [], 0
    if text is None:
        pieces = [span(token, value, token) for token, value in zip(tokens["tokens"], values)]
        body = " ".join(pieces)
    else:
        for token, start, end, value in zip(tokens["tokens"], tokens["token_start"], tokens["token_end"], values):
            start = max(start, position)  # spans that overlap (some SentencePiece tokenizers): once
            if end <= start:
                continue  # a special token: no characters of the text
            pieces += [html.escape(text[position:start]), span(text[start:end], float(value), token)]
            position = end
        body = "".join(pieces) + html.escape(text[position:])
    cut = " (truncated: the rest was not seen)" if tokens.get("truncated") else ""
    return f"<div><b>{html.escape(method)}</b>{cut}<p style='line-height:1.8'>{body}</p></div>"


def class_and_predicate_groupings(session: RunSession) -> list[str]:
    """What the tokens and features views group by: the class groupings, then the subsets kept
    by a SQL predicate (a selection's ids have no predicate to scan by)."""
    return list(TOKEN_GROUPINGS) + [name for name, s in session.subsets.items() if s.predicate is not None]


class TokensView(pn.viewable.Viewer):
    """A text run's tokens: per class (or kept subset), the tokens that push most toward the
    explained class, as bars. A click on a bar keeps the instances that contain the token as a
    subset (by a predicate: a row of the neuron matrix, a colour of the scatter, a choice here)
    and lists the first of them; a click on one opens it."""

    def __init__(self, dashboard: Dashboard, **params):
        super().__init__(**params)
        self.dashboard = dashboard
        methods = dashboard.session.methods
        self.method = pn.widgets.Select(name="Method", options=methods, value=methods[0] if methods else None,
                                        width=200)
        self.by = pn.widgets.Select(name="Per", options=class_and_predicate_groupings(dashboard.session),
                                    value="prediction", width=200)
        self.min_count = pn.widgets.IntInput(name="Seen at least", value=5, start=1, width=120)
        self.top = pn.widgets.IntInput(name="Tokens per subset", value=TOKENS_SHOWN, start=1, end=MAX_TOKENS_SHOWN,
                                       width=140)
        self.instances = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, height=260, show_index=False,
                                              sizing_mode="stretch_width", css_classes=["token-instances"])
        self.instances.on_click(self._on_instance)
        self.picked = pn.pane.Markdown("Click a token's bar to select the instances that contain it.",
                                       css_classes=["token-picked"])
        dashboard.param.watch(lambda _e: setattr(self.by, "options", class_and_predicate_groupings(dashboard.session)),
                              "subsets_version")

    def _bars(self, method, by, min_count, top):
        if method is None:
            return pn.pane.Markdown("This run has no attribution methods.")
        try:
            frame = self.dashboard.session.top_tokens(method, by, min_count or 1, min(top or 1, MAX_TOKENS_SHOWN))
        except (SessionError, QueryError) as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        if frame.empty:
            return pn.pane.Markdown(f"No token is seen {min_count} times in any subset: lower 'Seen at least'.")
        subsets = list(frame.groupby("subset", sort=True))
        figures = [self._figure(name, rows, method) for name, rows in subsets[:MAX_TOKEN_SUBSETS]]
        return pn.FlexBox(*[pn.pane.Bokeh(f) for f in figures], css_classes=["token-bars"])

    def _figure(self, subset: str, rows: pd.DataFrame, method: str):
        from bokeh.models import ColumnDataSource
        from bokeh.plotting import figure

        rows = rows.iloc[::-1].reset_index(drop=True)  # the largest on top
        source = ColumnDataSource({"token": rows["token"].tolist(), "mean": rows["mean"].to_numpy(),
                                   "occurrences": rows["occurrences"].to_numpy(),
                                   "colour": np.where(rows["mean"].to_numpy() > 0, "#b2182b", "#2166ac")})
        plot = figure(y_range=rows["token"].tolist(), width=320, height=60 + 22 * len(rows), title=subset,
                      tools="tap,hover", toolbar_location=None, x_axis_label=f"mean {method}",
                      tooltips=[("token", "@token"), ("mean", "@mean{0.0000}"), ("seen", "@occurrences")])
        plot.hbar(y="token", right="mean", height=0.8, source=source, color="colour")
        source.selected.on_change("indices", lambda _a, _old, new: new and self.pick(source.data["token"][new[0]]))
        return plot

    def pick(self, token: str) -> None:
        """Select the instances whose tokens include ``token``: kept as a subset, listed."""
        session = self.dashboard.session
        try:
            subset = session.add_predicate_subset(session.token_subset_name(token), session.token_predicate(token))
            shown = session.instances_with_token(token)
        except (SessionError, QueryError) as error:
            self.dashboard.report(str(error))
            return
        names = session.class_names
        self.instances.value = shown.assign(label=[None if v is None or v != v else names[int(v)] for v in shown["label"]],
                                            prediction=[names[int(v)] for v in shown["prediction"]])
        self.picked.object = (f"**{subset.size:,} instances contain `{token}`**, kept as subset `{subset.name}`"
                              f"{f' (the first {len(shown)} listed)' if len(shown) < subset.size else ''}")
        self.dashboard.added_subset()
        self.dashboard.report(f"subset {subset.name!r}: {subset.size:,} instances contain {token!r}")

    def _on_instance(self, event) -> None:
        self.dashboard.show_row(self.instances.value, event.row)

    def __panel__(self):
        args = (self.method, self.by, self.min_count, self.top)
        return pn.Column(
            pn.pane.Markdown("#### The tokens that push most toward the explained class (mean attribution)"),
            pn.Row(*args),
            pn.panel(pn.bind(self._bars, *args), sizing_mode="stretch_width"),
            self.picked,
            self.instances,
            sizing_mode="stretch_width",
        )


BAR_ROOM = 240
"""Pixels a bar chart keeps for its bars whatever its labels' length."""
LABEL_PIXELS_PER_CHARACTER = 6
"""A little over the width of a character of Bokeh's axis labels (5.2 px measured on the census
run's 46-character labels): three charts of such labels still fit a 1600 px window."""


def signed_bars(labels: list[str], values: np.ndarray, title: str, axis_label: str, colour_by: np.ndarray | None = None,
                width: int = 360):
    """Horizontal bars, the first label on top, red where ``colour_by`` (default the values)
    is positive (toward the explained class) and blue where negative, as every view colours."""
    from bokeh.models import ColumnDataSource
    from bokeh.plotting import figure

    signs = np.asarray(values if colour_by is None else colour_by, dtype=float)[::-1]
    # Copies: Bokeh sends a reversed numpy view (negative strides) to the browser as garbage.
    source = ColumnDataSource({"label": labels[::-1], "value": np.array(values, float)[::-1].copy(),
                               "colour": np.where(signs > 0, "#b2182b", "#2166ac").tolist()})
    # Long labels ("education = Some-college, 10") take their room from the bars otherwise.
    width = max(width, BAR_ROOM + LABEL_PIXELS_PER_CHARACTER * max((len(str(v)) for v in labels), default=0))
    plot = figure(y_range=labels[::-1], width=width, height=60 + 22 * len(labels), title=title, tools="hover",
                  toolbar_location=None, x_axis_label=axis_label, tooltips=[("", "@label"), ("value", "@value{0.0000}")])
    plot.hbar(y="label", right="value", height=0.8, source=source, color="colour")
    return plot


class FeaturesView(pn.viewable.Viewer):
    """A tabular run's features: per class (or kept subset) each feature's mean |attribution|
    (how far it moves the explained output, either way; red where it pushes toward the class on
    balance), and one feature's dependence: its value against its attribution per instance (a
    categorical: the mean per category)."""

    def __init__(self, dashboard: Dashboard, **params):
        super().__init__(**params)
        self.dashboard = dashboard
        session = dashboard.session
        methods = session.methods
        self.method = pn.widgets.Select(name="Method", options=methods, value=methods[0] if methods else None,
                                        width=200)
        self.by = pn.widgets.Select(name="Per", options=class_and_predicate_groupings(session), value="prediction",
                                    width=200)
        features = session.features["feature"].tolist()
        self.feature = pn.widgets.Select(name="Dependence of", options=features,
                                         value=features[0] if features else None, width=200,
                                         css_classes=["dependence-feature"])
        dashboard.param.watch(lambda _e: setattr(self.by, "options", class_and_predicate_groupings(session)),
                              "subsets_version")

    def _bars(self, method, by):
        if method is None:
            return pn.pane.Markdown("This run has no attribution methods.")
        try:
            frame = self.dashboard.session.feature_importance(method, by)
        except (SessionError, QueryError) as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        figures = [signed_bars(rows["feature"].tolist(), rows["mean_abs"].to_numpy(), str(name),
                               f"mean |{method}|", rows["mean"].to_numpy())
                   for name, rows in list(frame.groupby("subset", sort=True))[:MAX_TOKEN_SUBSETS]]
        # A grid, not a FlexBox: Bokeh figures in a FlexBox built in a tab opened later draw
        # collapsed to their corner (Panel 1.9; a GridBox or Row lays them out).
        return pn.GridBox(*[pn.pane.Bokeh(f) for f in figures], ncols=BARS_PER_ROW, css_classes=["feature-bars"])

    def _dependence(self, method, feature):
        if method is None or feature is None:
            return pn.pane.Markdown("")
        session = self.dashboard.session
        try:
            frame = session.feature_dependence(method, feature)
        except (SessionError, QueryError) as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        kind = session.features.set_index("feature").loc[feature, "kind"]
        title = f"{feature} and its {method} ({len(frame):,} instances{', a sample' if len(frame) == DEPENDENCE_POINTS else ''})"
        if kind != "numeric":
            means = (frame.groupby("category", dropna=False)["attribution"].agg(["mean", "count"])
                     .sort_values("mean", ascending=False))
            labels = [f"{c} ({n:,})" for c, n in zip(means.index.astype(str), means["count"])]
            bars = signed_bars(labels, means["mean"].to_numpy(), title, f"mean {method} per category", width=640)
            return pn.Column(pn.pane.Bokeh(bars), css_classes=["feature-dependence"])
        points = hv.Points(frame, ["value", "attribution"]).opts(title=title, width=640, height=360)
        if len(frame) > DATASHADE_ABOVE:
            from holoviews.operation.datashader import datashade, dynspread

            points = dynspread(datashade(points, cmap=["#9ecae1", "#08306b"])).opts(width=640, height=360)
        else:
            points = points.opts(size=3, alpha=0.5, color="#08519c", tools=["hover"])
        return pn.Column(pn.pane.HoloViews(points), css_classes=["feature-dependence"])

    def __panel__(self):
        return pn.Column(
            pn.pane.Markdown("#### How far each feature moves the explained output (mean |attribution|)"),
            pn.Row(self.method, self.by),
            pn.panel(pn.bind(self._bars, self.method, self.by), sizing_mode="stretch_width"),
            pn.Row(self.feature),
            pn.panel(pn.bind(self._dependence, self.method, self.feature)),
            sizing_mode="stretch_width",
        )


def fidelity_panels(checks: dict[str, dict]) -> list:
    """The instance's fidelity per method: a table of the numbers, and its deletion and
    insertion curves when the run stored them."""
    if not any(checks.values()):
        return []
    numbers = pd.DataFrame([{"method": method, **{k: v for k, v in values.items() if not k.endswith("_curve")}}
                            for method, values in checks.items()])
    panels = [pn.pane.Markdown("#### Fidelity of each explanation"),
              pn.widgets.Tabulator(numbers, disabled=True, show_index=False, sizing_mode="stretch_width",
                                   css_classes=["instance-fidelity"])]
    overlays = []
    for method, values in checks.items():
        curves = [hv.Curve((np.linspace(0, 1, len(values[f"{kind}_curve"])), values[f"{kind}_curve"]),
                           "fraction of features", "target probability", label=kind)
                  for kind in ("deletion", "insertion") if values.get(f"{kind}_curve") is not None]
        if curves:
            overlays.append(hv.Overlay(curves).opts(title=method, width=320, height=220, legend_position="top_right"))
    if overlays:
        panels.append(plot_rows(overlays, 4, "fidelity-curves"))
    return panels


def plot_rows(plots: list, per_row: int, css_class: str) -> pn.Column:
    """Plots in rows of ``per_row``, each a pane of its own, not one HoloViews layout: in a tab
    built on opening, a layout below another plot draws blank, and a layout's grid makes each
    column as wide as its widest plot (Panel 1.9). Axes unlinked: Panel links the axes of
    panes that share a dimension's name (every image's x and y)."""
    rows = [pn.Row(*[pn.pane.HoloViews(plot.opts(toolbar=None), linked_axes=False) for plot in plots[i:i + per_row]])
            for i in range(0, len(plots), per_row)]
    return pn.Column(*rows, css_classes=[css_class])


class FidelityView(pn.viewable.Viewer):
    """How faithful each method's explanations are, over the whole run."""

    def __init__(self, dashboard: Dashboard, **params):
        super().__init__(**params)
        self.dashboard = dashboard

    def __panel__(self):
        summary = self.dashboard.session.fidelity_summary()
        if summary.empty:
            return pn.pane.Markdown("This run has no fidelity table (it was made by an older netloupe).")
        return pn.Column(
            pn.pane.Markdown(
                "### Fidelity of each method\n\nConvergence delta: Integrated Gradients' and DeepLift's "
                "completeness error (0 is exact). Deletion AUC: the target's probability as the most attributed "
                "features are removed (lower is better); insertion AUC: as they are put back (higher is better). "
                "On the sampled instances: infidelity and sensitivity-max (lower is better), and the rank "
                "correlation with the maps of a randomly re-initialised model (near 0 passes the "
                "model-randomization check; near 1 means the map does not depend on what the model learned). "
                "Per instance: `SELECT * FROM fidelity_<method>` and the attributions views."),
            pn.widgets.Tabulator(summary, disabled=True, show_index=False, sizing_mode="stretch_width",
                                 css_classes=["fidelity-summary"]),
            sizing_mode="stretch_width")


class SubgroupsView(pn.viewable.Viewer):
    """FairVis: metadata distributions, subgroup metrics, two subgroups side by side, the worst."""

    def __init__(self, dashboard: Dashboard, **params):
        super().__init__(**params)
        self.dashboard = dashboard
        columns = dashboard.session.metadata_columns
        self.columns = pn.widgets.MultiChoice(name="Subgroup columns (1-3)", options=columns + ["label"],
                                              value=columns[:2] or ["label"], max_items=3, width=420)
        self.metric = pn.widgets.Select(name="Metric", options=list(METRICS), value="accuracy", width=140)
        self.positive = pn.widgets.Select(name="Positive class (FPR, FNR, precision, recall)",
                                          options={n: i for i, n in enumerate(dashboard.session.class_names)},
                                          width=200)
        self.bins = pn.widgets.IntInput(name="Bins of a numeric column", value=SLICE_BINS, start=2, end=MAX_SLICE_BINS,
                                        width=170)
        self.cuts = pn.widgets.TextInput(name="Or cut points (column: a, b, c)", placeholder="age: 25, 40, 60",
                                         width=260)
        self.table = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, height=300, sizing_mode="stretch_width",
                                          show_index=False, selectable="checkbox", css_classes=["subgroups"],
                                          hidden_columns=["predicate"])
        self.compare = pn.pane.DataFrame(pd.DataFrame(), css_classes=["subgroup-compare"])
        self.table.param.watch(self._on_pick, "selection")
        self.keep = pn.widgets.Button(name="Keep picked subgroups as subsets", width=260)
        self.keep.on_click(self._keep)

    def _specs(self, columns, bins, cuts) -> list[str]:
        """The chosen columns as the subgroup operators slice them (bins, or the cut points
        typed for one of them)."""
        named, _, points = (cuts or "").partition(":")
        session = self.dashboard.session
        return [session.slice_spec(c, bins, points if points and c == named.strip() else None) for c in columns]

    def _subgroups(self, columns, metric, positive, bins, cuts):
        if not columns:
            return pd.DataFrame()
        try:
            frame = self.dashboard.session.subgroups(self._specs(columns, bins, cuts), positive)
        except (SessionError, QueryError) as error:
            self.dashboard.report(str(error))
            return pd.DataFrame()
        worst_first = frame.sort_values(metric, ascending=metric in ("accuracy", "precision", "recall"),
                                        na_position="last")
        return worst_first.head(MAX_SUBGROUP_ROWS)  # a bounded table, whatever the columns

    def _overview(self, columns, metric, positive, bins, cuts):
        frame = self._subgroups(columns, metric, positive, bins, cuts)
        self.table.value = frame
        if frame.empty:
            return hv.Div("<p>Choose one to three columns.</p>")
        shown = frame.head(40).iloc[::-1]  # inverted axes draw the first row at the bottom: the worst on top
        return hv.Bars(shown, "subgroup", [metric, "size"]).opts(
            invert_axes=True, height=max(240, 18 * len(shown) + 60), responsive=True, tools=["hover"],
            color=metric, cmap="RdYlGn" if metric in ("accuracy", "precision", "recall") else "RdYlGn_r",
            title=f"{metric} per subgroup (worst first)")

    def _distributions(self) -> pn.GridBox:
        """One bar chart per metadata column (its slices), each a plot of its own that fills
        its cell: fixed-size plots built as the tab opened were drawn blank, their labels
        piled at the left edge."""
        session, plots = self.dashboard.session, []
        for column in session.metadata_columns[:DISTRIBUTION_COLUMNS]:
            frame = session.distribution(column)
            frame["value"] = frame["value"].fillna("NULL").astype(str)
            bars = hv.Bars(frame, "value", ["size", "accuracy"]).opts(
                title=column, responsive=True, height=280, tools=["hover"], color="accuracy", cmap="RdYlGn",
                clim=(0, 1), colorbar=False, xrotation=30 if len(frame) > 4 else 0, xlabel="", ylabel="instances",
                shared_axes=False)  # each column its own values
            plots.append(pn.pane.HoloViews(bars, sizing_mode="stretch_width", min_width=300, height=280,
                                           css_classes=["distribution"]))
        if not plots:
            return pn.GridBox(pn.pane.Markdown("This run has no metadata columns."), ncols=1)
        return pn.GridBox(*plots, ncols=min(3, len(plots)), sizing_mode="stretch_width", css_classes=["distributions"])

    def _suggested(self, columns, metric, positive, bins, cuts):
        if not columns:
            return pd.DataFrame()
        try:
            return self.dashboard.session.suggested_subgroups(self._specs(columns, bins, cuts), metric, positive)
        except (SessionError, QueryError) as error:
            self.dashboard.report(str(error))
            return pd.DataFrame()

    def _picked(self) -> dict[str, str]:
        frame = self.table.value
        rows = [frame.iloc[i].to_dict() for i in self.table.selection[:2] if 0 <= i < len(frame)]
        return {row["subgroup"]: row["predicate"] for row in rows}

    def _on_pick(self, _event) -> None:
        picked = self._picked()
        if len(picked) == 2:
            self.compare.object = self.dashboard.session.compare_subgroups(picked, self.positive.value)

    def _keep(self, _event) -> None:
        for name, predicate in self._picked().items():
            try:
                self.dashboard.session.add_predicate_subset(name[:60], predicate)
            except SessionError as error:
                self.dashboard.report(str(error))
                return
        self.dashboard.added_subset()
        self.dashboard.report("subgroups kept as subsets: they are rows of the neuron matrix now")

    def __panel__(self):
        args = (self.columns, self.metric, self.positive, self.bins, self.cuts)
        return pn.Column(
            pn.pane.Markdown("#### Distributions of the metadata columns (bars colored by accuracy)"),
            self._distributions(),
            pn.Row(*args[:3]),
            pn.Row(*args[3:]),
            pn.panel(pn.bind(self._overview, *args), sizing_mode="stretch_width", css_classes=["subgroup-overview"]),
            pn.pane.Markdown("Pick two subgroups to compare them side by side:"),
            self.table,
            pn.Row(self.keep),
            self.compare,
            pn.pane.Markdown("#### Suggested worst subgroups (at least 30 instances)"),
            pn.widgets.Tabulator(pn.bind(self._suggested, *args), disabled=True, height=260, show_index=False,
                                 sizing_mode="stretch_width", css_classes=["suggested"]),
            sizing_mode="stretch_width",
        )


class ModelGraphView(pn.viewable.Viewer):
    """The model's graph, recorded layers highlighted; clicking one makes it the current layer."""

    def __init__(self, dashboard: Dashboard, **params):
        super().__init__(**params)
        self.dashboard = dashboard

    def _plot(self, layer):
        try:
            nodes, edges = self.dashboard.session.graph_layout()
        except SessionError as error:
            return hv.Div(f"<p>{error}</p>")
        nodes = nodes.assign(state=np.where(nodes["module"] == (layer or ""), "current layer",
                                            np.where(nodes["recorded"], "recorded", "other")))
        colors = {"current layer": "#d62728", "recorded": "#ff7f0e", "other": "#9e9e9e"}
        segments = hv.Segments(edges, ["x0", "y0", "x1", "y1"]).opts(color="#bbbbbb", line_width=1.5)
        dots = hv.Points(nodes, ["x", "y"], ["id", "type", "module", "state"]).opts(
            color="state", cmap=colors, size=14, tools=["hover", "tap"], legend_position="top_right")
        labels = hv.Labels(nodes, ["x", "y"], "id").opts(yoffset=-0.3, text_font_size="8pt")
        tap = hv.streams.Tap(source=dots)
        tap.param.watch(lambda event: self._on_tap(nodes, event.obj.x, event.obj.y), "x")
        graph = self.dashboard.session.model_graph
        title = "model graph (torch.fx)" if graph["kind"] == "fx" else f"module tree ({graph['reason']})"
        return (segments * dots * labels).opts(responsive=True, min_height=360, xaxis=None, yaxis=None,
                                               title=title + ": click a recorded layer")

    def _on_tap(self, nodes: pd.DataFrame, x, y) -> None:
        if x is None or y is None:
            return
        distance = np.hypot(nodes["x"] - x, nodes["y"] - y)
        node = nodes.iloc[int(np.argmin(distance))]
        if distance.min() > 0.5:
            return
        if node["recorded"]:
            self.dashboard.layer = node["module"]
            self.dashboard.report(f"layer {node['module']}: the matrix and the scatter show it now")
        else:
            self.dashboard.report(f"{node['id']} ({node['type']}) was not recorded; add it to the job's layers")

    def __panel__(self):
        return pn.Column(pn.panel(pn.bind(self._plot, self.dashboard.param.layer), sizing_mode="stretch_width"),
                         css_classes=["model-graph"], sizing_mode="stretch_width")


class SqlConsole(pn.viewable.Viewer):
    """Read-only SQL over the run's catalog: a table of results and a CSV download."""

    def __init__(self, dashboard: Dashboard, **params):
        super().__init__(**params)
        self.dashboard = dashboard
        self.editor = pn.widgets.TextAreaInput(value="SELECT * FROM class_metrics()", height=100,
                                               sizing_mode="stretch_width", name="SQL", css_classes=["sql-editor"])
        self.run = pn.widgets.Button(name="Run", button_type="primary", width=100)
        self.result = pn.widgets.Tabulator(pd.DataFrame(), pagination="remote", page_size=20,
                                           sizing_mode="stretch_width", disabled=True, css_classes=["sql-result"])
        self.status = pn.pane.Alert("Only SELECT queries run here.", alert_type="light", css_classes=["sql-status"])
        self.download = pn.widgets.FileDownload(callback=self._csv, filename="netloupe-query.csv",
                                                label="Download CSV", width=160)
        self.run.on_click(self._run)

    def _run(self, _event) -> None:
        try:
            table = self.dashboard.session.sql(self.editor.value)
        except QueryError as error:
            self.status.object, self.status.alert_type = f"Refused: {error}", "danger"
            return
        self.result.value = table.to_pandas()
        self.status.object, self.status.alert_type = f"{table.num_rows:,} rows", "success"

    def _csv(self):
        buffer = io.StringIO()
        self.result.value.to_csv(buffer, index=False)
        buffer.seek(0)
        return buffer

    def __panel__(self):
        return pn.Column(self.editor, pn.Row(self.run, self.download), self.status, self.result,
                         sizing_mode="stretch_width")


class AcrossRunsView(pn.viewable.Viewer):
    """Several runs of the same instances (a run group's checkpoints, a model's versions), two
    at a time (A and B): where their predictions (or maps) agree over the instance scatter, a
    subset's metric over every run as lines, one instance in every run side by side, and the
    training examples that influenced it most. Its numbers come from :class:`ComparisonSession`."""

    def __init__(self, dashboard: Dashboard, compared: dict, shown: str, **params):
        super().__init__(**params)
        self.dashboard = dashboard
        self.comparison = ComparisonSession(compared)
        close_with_session(self.comparison.close)
        self.shown = shown
        names = self.comparison.names
        self.run_a = pn.widgets.Select(name="Run A", options=names, value=names[0], width=170)
        self.run_b = pn.widgets.Select(name="Run B", options=names, value=names[-1], width=170)
        self.placed_by = pn.widgets.Select(name="Points placed by run", options=names, value=shown, width=180)
        self.projection = pn.widgets.Select(name="Projection", width=220)
        self.colour = pn.widgets.Select(name="Colour by", options=self.comparison.colour_choices(), value=AGREEMENT,
                                        width=300)
        self.counts = pn.pane.Markdown("", css_classes=["agreement-counts"], width=480)
        self.disagreement_list = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, height=380, width=480,
                                                      show_index=False, layout="fit_columns",
                                                      # no sort arrows: they cut the headers short
                                                      configuration={"columnDefaults": {"headerSort": False}},
                                                      css_classes=["disagreements"])
        self.disagreement_header = pn.pane.Markdown("", width=480)
        self.disagreement_list.on_click(self._on_disagreement)
        self._disagreements = pd.DataFrame()
        self.predicate = pn.widgets.TextInput(name="SQL predicate over instances (empty: every instance)", width=360,
                                              placeholder="stroke = 'thin'")
        self.grouping = pn.widgets.Select(name="One line per", width=180, value=NO_SPLIT,
                                          options=[NO_SPLIT] + self.comparison.groupings())
        self.metric = pn.widgets.Select(name="Metric", options=list(METRICS_BY_RUN), value="accuracy", width=160)
        self.positive = pn.widgets.Select(name="Positive class (FPR, FNR, precision, recall)", width=220,
                                          options={n: i for i, n in enumerate(self.comparison.class_names)})
        self.instance_input = pn.widgets.TextInput(name="Instance id", width=200)
        self.over_input = pn.widgets.Checkbox(name="Maps over the input", value=True, width=180)
        self.own_scale = pn.widgets.Checkbox(name="Each run's map on its own scale", value=False, width=260)
        self.instance_note = pn.pane.Markdown("", css_classes=["across-instance-note"])
        self._chosen = False
        """Whether the analyst chose the instance (a click, an id typed): then a new A or B keeps it."""
        self._defaulting = False
        self._refresh_projections()
        self.placed_by.param.watch(lambda _e: self._refresh_projections(), "value")
        self.instance_input.param.watch(self._on_instance_typed, "value")
        for widget in (self.run_a, self.run_b):
            widget.param.watch(lambda _e: self._pair_changed(), "value")
        self._pair_changed()

    # -- A and B -----------------------------------------------------------------------------

    def _refresh_projections(self) -> None:
        session = self.comparison.run_session(self.placed_by.value)
        sources = [f"{kind}/{source}" for kind, source in session.projections]
        current = self.projection.value or self.dashboard.projection
        self.projection.options = sources
        self.projection.value = current if current in sources else (sources[0] if sources else None)

    def _pair_changed(self) -> None:
        a, b = self.run_a.value, self.run_b.value
        frame = self.comparison.disagreements(a, b)
        self._disagreements = frame
        names = self.comparison.class_names
        shown = pd.DataFrame({
            "id": frame["instance_id"],
            "label": [None if v is None or v != v else names[int(v)] for v in frame["label"]],
            "A": [names[int(v)] for v in frame["prediction_a"]],
            "p(A)": frame["confidence_a"].round(3),
            "B": [names[int(v)] for v in frame["prediction_b"]],
            "p(B)": frame["confidence_b"].round(3)})
        self.disagreement_list.value = shown
        self.disagreement_header.object = (f"Disagreements: what A ({a}) and B ({b}) predict and how sure each is, "
                                           "the most confident first; click one to open it below.")
        if not self._chosen:
            instance_id, why = self.comparison.default_instance(a, b)
            self._show(instance_id, f"Showing {why}; click a point or a disagreement, or type an id, for another.")

    def _show(self, instance_id, note: str) -> None:
        """Open ``instance_id`` below, saying why it is the one shown."""
        self._defaulting = True
        try:
            self.instance_input.value = str(instance_id)
        finally:
            self._defaulting = False
        self.instance_note.object = note

    def _on_instance_typed(self, event) -> None:
        if not self._defaulting:
            self._chosen = True
            self.instance_note.object = f"Instance {event.new.strip()}, as chosen."

    def _on_disagreement(self, event) -> None:
        frame = self._disagreements
        if 0 <= event.row < len(frame):
            self._chosen = True
            self._show(_plain_id(frame["instance_id"].iloc[event.row]),
                       f"Instance {frame['instance_id'].iloc[event.row]}, from the list of disagreements.")

    def _tapped(self, instance_id) -> None:
        self._chosen = True
        self._show(_plain_id(instance_id), f"Instance {instance_id}, clicked in the scatter.")

    def _selected(self, ids: np.ndarray, tool: str) -> None:
        if len(ids):
            differ = np.isin(ids, self.comparison.disagreements(self.run_a.value, self.run_b.value, limit=None)
                             ["instance_id"].to_numpy()).sum()
            self.dashboard.report(f"{len(ids):,} instances selected ({tool}); {differ:,} of them predicted "
                                  f"differently by {self.run_a.value} and {self.run_b.value}")

    # -- the agreement scatter ------------------------------------------------------------------

    def _scatter(self, a, b, placed_by, projection, colour):
        if projection is None:
            return pn.pane.Markdown(f"Run {placed_by} has no projections to place the instances by.")
        try:
            session = self.comparison.run_session(placed_by)
            points = session.points(*projection.split("/", 1))
            coloured = self.comparison.agreement_points(points, a, b, colour)
            self.counts.object = self._counts_text(a, b, colour)
        except (SessionError, QueryError) as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        title = f"{projection} of {placed_by}, coloured by {colour} ({a} vs {b})"
        # Every lone disagreement must show: opaque single points, spread on a sparse raster.
        scatter = InstanceScatter(coloured, colour, title, on_select=self._selected, on_tap=self._tapped,
                                  colors=AGREEMENT_COLORS, min_alpha=AGREEMENT_MIN_ALPHA)
        return pn.pane.Bokeh(scatter.figure, sizing_mode="stretch_width", min_height=520)

    def _counts_text(self, a: str, b: str, colour: str) -> str:
        counts = self.comparison.agreement(a, b)
        n = counts["instances"]
        text = (f"**{a} and {b} predict {counts['disagreements']:,} of {n:,} instances differently** "
                f"({counts['disagreements'] / n:.1%}).\n\n"
                f"Both right {counts['both_correct']:,}; only {a} right {counts['only_a_correct']:,}; "
                f"only {b} right {counts['only_b_correct']:,}; both wrong {counts['both_wrong']:,}.")
        if colour != AGREEMENT:
            method = colour[: -len(RANK_CORRELATION)]
            maps = self.comparison.map_agreement(a, b, method)
            constant = int(maps["rank_correlation"].isna().sum())
            text += (f"\n\n{method} maps: mean rank correlation {maps['rank_correlation'].mean():.3f}, "
                     f"mean top-10 overlap {maps['top_k_overlap'].mean():.2f}"
                     + (f"; {constant:,} constant maps have none (not drawn)" if constant else "") + ".")
        return text

    # -- the metric over the runs ---------------------------------------------------------------

    def _lines(self, predicate, grouping, metric, positive):
        grouping = None if grouping == NO_SPLIT else grouping
        try:
            frame = self.comparison.metric_by_run(predicate or "", grouping, positive)
        except SessionError as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        names = self.comparison.names
        layers = []
        for index, (subgroup, rows) in enumerate(frame.groupby("subgroup", sort=False)):
            rows = rows.assign(**{metric: rows[metric].astype(float)})
            colour = "#000000" if subgroup == ALL else CATEGORY_COLORS[(index - 1) % len(CATEGORY_COLORS)]
            vdims = [metric, "run", "size"] if metric != "size" else [metric, "run"]
            layers.append(hv.Curve(rows, "position", vdims, label=subgroup).opts(
                color=colour, line_width=3 if subgroup == ALL else 1.5))
            layers.append(hv.Scatter(rows, "position", vdims, label=subgroup).opts(
                color=colour, size=7, tools=["hover"]))
        where = f"where {predicate}" if (predicate or "").strip() else "every instance"
        split = f", a line per {grouping}" if grouping else ""
        lines = hv.Overlay(layers).opts(
            responsive=True, height=380, xticks=list(enumerate(names)), xlabel="run", ylabel=metric,
            legend_position="right", show_grid=True, title=f"{metric} per run: {where}{split}",
            padding=0.05)
        # Unlinked (as every plot of this tab): Panel links the axes of a page's HoloViews panes that
        # share a dimension's name, and these run positions took the neuron matrix's 128 neuron
        # positions, the maps' x and y other images' (drawn blank).
        return pn.pane.HoloViews(lines, linked_axes=False, sizing_mode="stretch_width", height=380)

    # -- one instance across the runs -----------------------------------------------------------

    def _instance(self, text, reference, over_input, own_scale):
        if not (text or "").strip():
            return pn.pane.Markdown("Click a point or a disagreement, or type an id.")
        comparison = self.comparison
        try:
            across = comparison.instance_across_runs(comparison.typed_id(text.strip()), reference)
        except (SessionError, QueryError) as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        facts = across.facts.copy()
        for column in facts.columns[2:]:  # numbers to 3 places; a constant map has no rank correlation
            facts[column] = [v if isinstance(v, (bool, np.bool_)) else "none (constant map)" if v is None or v != v
                             else f"{v:.3f}" for v in facts[column]]
        header = pn.pane.Markdown(f"### Instance {across.instance_id}: label **{across.label or 'none'}**",
                                  css_classes=["across-instance-facts"])
        table = pn.pane.DataFrame(facts, index=False, css_classes=["across-facts"])
        per_row = min(len(across.records) + 1, MAX_MAPS_PER_ROW)  # the input, then a map per run
        size = max(120, min(MAP_SIZE, ACROSS_ROW_PIXELS // per_row))
        # The input heads each method's row of maps.
        picture = None if across.input is None else hv.Image(
            across.input[::-1], bounds=(0, 0, across.input.shape[1], across.input.shape[0])).opts(
            cmap="gray", title="input", frame_width=size, frame_height=size, xaxis=None, yaxis=None)
        panels = [header, table]
        if not across.maps:
            panels.append(pn.pane.Markdown("These runs stored no maps to draw side by side (summary storage, or "
                                           "texts: each run's words are coloured in its Instance tab)."))
        for method, images in across.maps.items():
            bound = across.bounds[method]
            scale = ("each run's map on its own scale (full colour at its largest |value|)" if own_scale
                     else f"one colour scale for every run: full colour at ±{bound:.3g} (a faint run's values are "
                          "small: its own scale shows their shape)")
            plots = [] if picture is None else [picture]
            for run, image in images.items():
                row = across.records[run].row
                run_bound = (across.own_bounds[method][run] or 1.0) if own_scale else bound
                title = f"{run}: {comparison.class_name(row['prediction'])} ({row['confidence']:.2f})"
                if own_scale:
                    title += f" ±{run_bound:.2g}"
                if image.ndim == 2 and image.shape[0] == 1:  # a vector: one bar per feature
                    plots.append(hv.Bars(pd.DataFrame({"feature": range(image.shape[1]), "attribution": image[0]}),
                                         "feature", "attribution").opts(title=title, width=size, height=size,
                                                                        ylim=(-run_bound, run_bound)))
                    continue
                plots.append(InstanceView._map(method, image, run_bound, across.input if over_input else None,
                                               across.records[run].segments.get(method), size=size, title=title,
                                               extent=None if across.input is None else across.input.shape))
            panels.append(pn.pane.Markdown(f"**{method}**: {scale}"))
            # A row of panes, not one HoloViews layout: a layout below another plot of a tab built
            # on opening draws blank (Panel 1.9; the tab's scatter and lines are above it).
            for start in range(0, len(plots), per_row):
                panels.append(pn.Row(*[pn.pane.HoloViews(plot.opts(toolbar=None), linked_axes=False)
                                       for plot in plots[start:start + per_row]], css_classes=["across-maps"]))
        return pn.Column(*panels, sizing_mode="stretch_width")

    def _influence(self, text, reference):
        source = self.comparison.influence_source(reference)
        if source is None:
            return pn.pane.Markdown(
                "No run here computed influence: runs explained with an `influence:` section (a run group's "
                "sums over its checkpoints) list each instance's most influential training examples "
                "(TracIn's proponents and opponents) here.", css_classes=["influence-note"])
        if not (text or "").strip():
            return pn.pane.Markdown("Choose an instance above.")
        try:
            frame = self.comparison.influential_examples(source, self.comparison.typed_id(text.strip()))
        except (SessionError, RunError) as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        info = source.info
        intro = pn.pane.Markdown(
            f"TracIn over {source.what}, of the loss at the {'label' if info.target == 'label' else 'predicted class'}, "
            f"against {info.training_rows:,} training examples ({info.training_path}): **proponents** pushed the model "
            "towards this answer, **opponents** away from it; each with its label and score.",
            css_classes=["influence-note"])
        if frame.empty:
            return pn.Column(intro, pn.pane.Markdown(f"No influence rows for instance {text.strip()}."))
        if "picture" not in frame or frame["picture"].isna().any():  # features, or the training set moved
            shown = frame.drop(columns=["picture"], errors="ignore")
            return pn.Column(intro, pn.widgets.Tabulator(shown, disabled=True, show_index=False, height=320,
                                                         sizing_mode="stretch_width"))
        rows = [intro]
        # One grey scale for every example shown, as their stored values compare.
        low = min(float(p.min()) for p in frame["picture"])
        high = max(max(float(p.max()) for p in frame["picture"]), low + 1e-6)
        for sign in ("proponent", "opponent"):
            chosen = frame[frame["sign"] == sign]
            rows.append(pn.pane.Markdown(f"**{sign}s**"))
            # A row of panes, not one HoloViews layout (see _instance).
            rows.append(pn.Row(*[pn.Column(pn.pane.HoloViews(self._example(row, (low, high)), linked_axes=False),
                                           pn.pane.Markdown(f"#{row.rank}: {row.train_label} · {row.score:.3g}",
                                                            css_classes=["influence-caption"], margin=(0, 10)))
                                 for row in chosen.itertuples()], css_classes=[f"influence-{sign}s"]))
        return pn.Column(*rows, sizing_mode="stretch_width")

    @staticmethod
    def _example(row, scale: tuple[float, float]) -> hv.Image:
        picture = row.picture
        return hv.Image(picture[::-1], bounds=(0, 0, picture.shape[1], picture.shape[0])).opts(
            cmap="gray", clim=scale, width=120, height=120, xaxis=None, yaxis=None, toolbar=None,
            tools=[], title=f"train id {row.train_id}", fontsize={"title": 9})

    def __panel__(self):
        comparison = self.comparison
        names = comparison.names
        instances = comparison.manifests[names[0]].counts.instances
        scatter = pn.bind(self._scatter, self.run_a, self.run_b, self.placed_by, self.projection, self.colour)
        lines = pn.bind(self._lines, self.predicate, self.grouping, self.metric, self.positive)
        instance = pn.bind(self._instance, self.instance_input, self.run_b, self.over_input, self.own_scale)
        influence = pn.bind(self._influence, self.instance_input, self.run_b)
        return pn.Column(
            pn.pane.Markdown(f"**{len(names)} runs of the same {instances:,} instances**, in order: "
                             f"{', '.join(names)}. The other tabs show run **{self.shown}** "
                             "(`netloupe dashboard ... --run NAME` shows another).", css_classes=["across-runs-intro"]),
            pn.Row(self.run_a, self.run_b),
            pn.pane.Markdown("#### Where A and B agree"),
            pn.Row(self.placed_by, self.projection, self.colour),
            pn.Row(pn.panel(scatter, sizing_mode="stretch_width", min_height=520, css_classes=["agreement-scatter"]),
                   pn.Column(self.counts,
                             self.disagreement_header, self.disagreement_list, width=500),
                   sizing_mode="stretch_width"),
            pn.pane.Markdown("#### A subset's metric over the runs"),
            pn.Row(self.predicate, self.grouping, self.metric, self.positive),
            pn.panel(lines, sizing_mode="stretch_width", css_classes=["metric-lines"]),
            pn.pane.Markdown("#### One instance in every run (map rank correlations against run B)"),
            pn.Row(self.instance_input, self.over_input, self.own_scale),
            self.instance_note,
            pn.panel(instance, sizing_mode="stretch_width", css_classes=["instance-across-runs"]),
            pn.pane.Markdown("#### Its most influential training examples"),
            pn.panel(influence, sizing_mode="stretch_width", css_classes=["influence"]),
            sizing_mode="stretch_width",
        )


def _plain_id(value):
    """A numpy scalar id as the Python value it holds (it is shown and typed back as text)."""
    return value.item() if isinstance(value, np.generic) else value


LATER_TABS = {"Instance": InstanceView, "Subgroups": SubgroupsView, "Fidelity": FidelityView,
              "Model": ModelGraphView, "SQL": SqlConsole}
"""The tabs after the first, in order, and the view each shows."""
TEXT_TABS = {"Tokens": TokensView}
FEATURE_TABS = {"Features": FeaturesView}
"""The tabs a text run adds."""


ACROSS_RUNS_TAB = "Across runs"


def later_tabs(session: RunSession, compared: dict | None = None, shown: str | None = None) -> dict:
    """The tabs after the first for this run: a text run's after the instance's (which stays
    second: a click on a point opens it); with several runs ``compared`` (name → directory),
    the Across-runs tab right after the instance's, ``shown`` being the run the others show."""
    tabs = list(LATER_TABS.items())
    if session.reads_text:
        tabs[1:1] = TEXT_TABS.items()
    if session.reads_features:
        tabs[1:1] = FEATURE_TABS.items()
    if compared:
        tabs[1:1] = [(ACROSS_RUNS_TAB, functools.partial(AcrossRunsView, compared=compared, shown=shown))]
    return dict(tabs)


def build_dashboard(run_dir, compared: dict | None = None) -> pn.template.BaseTemplate:
    """The page for one browser session over the run at ``run_dir``; with ``compared`` (name →
    directory of several runs of the same instances, ``run_dir`` one of them), comparing them too.
    The view is read from the page's URL and kept in it (:func:`link_to_url`)."""
    session, views = dashboard_views(run_dir, compared, location=pn.state.location)
    close_with_session(session.con.close)
    title = f"netloupe: {session.manifest.run_name} ({session.manifest.counts.instances:,} instances)"
    if compared:
        title = f"netloupe: {shown_name(run_dir, compared)} of {len(compared)} runs ({session.manifest.counts.instances:,} instances)"
    return pn.template.BootstrapTemplate(title=title, main=list(views))


def close_with_session(close) -> None:
    """Call ``close`` when Panel destroys the browser session (its DuckDB connections would
    otherwise outlive every page a user opened); nothing outside a served session."""
    document = pn.state.curdoc
    if document is not None and document.session_context is not None:
        pn.state.on_session_destroyed(lambda _context: close())


def shown_name(run_dir, compared: dict) -> str:
    """The name among ``compared`` of the run at ``run_dir``."""
    target = Path(run_dir).resolve()
    return next(name for name, directory in compared.items() if Path(directory).resolve() == target)


def notebook_dashboard(run_dir) -> pn.Column:
    """The dashboard's views as one Panel object, shown inline by Jupyter (Panel's notebook
    extension, loaded here from the installed Panel: no CDN)."""
    from bokeh.settings import settings

    settings.resources = "inline"
    hv.extension("bokeh", inline=True)
    pn.extension("tabulator", inline=True)
    _, views = dashboard_views(run_dir)
    return views


def tab_key(name: str) -> str:
    """A tab as a link names it: ``Instances and neurons`` → ``instances-and-neurons``."""
    return name.lower().replace(" ", "-")


def tab_index(tabs: pn.Tabs, key: str | None) -> int | None:
    """The position of the tab a link names by :func:`tab_key`; None for no such tab."""
    keys = [tab_key(name) for name in tabs._names]
    return keys.index(key) if key in keys else None


def dashboard_views(run_dir, compared: dict | None = None, location=None) -> tuple[RunSession, pn.Column]:
    """The message line and the tabs, over one session of the run at ``run_dir`` (and of the
    runs ``compared``, when given); with the page's ``location``, opened on the view its URL
    names and kept in it."""
    session = RunSession(run_dir)
    dashboard = Dashboard(session)
    link = read_view_link(location.search) if location is not None else ViewLink()
    notes = dashboard.restore(link)
    message = pn.pane.Alert(pn.bind(lambda m: m or "Ready.", dashboard.param.message), alert_type="info",
                            css_classes=["message"])
    # ActiVis' two linked views side by side: what is selected in one shows in the other.
    later = later_tabs(session, compared, shown_name(run_dir, compared) if compared else None)
    instances_and_neurons = pn.Row(InstancesView(dashboard), pn.Column(MatrixView(dashboard), width=620),
                                   sizing_mode="stretch_width")
    tabs = pn.Tabs(
        ("Instances and neurons", instances_and_neurons),
        *[(name, pn.Column(sizing_mode="stretch_width")) for name in later],
        dynamic=True,
    )

    def build_when_opened(event) -> None:
        """A tab's view is built the first time the tab is shown: views compute their first
        numbers when built (FairVis' subgroups over a million rows take seconds), and most
        pages are opened for the instances."""
        if event.new > 0 and not tabs[event.new].objects:
            tabs[event.new].objects = [later[tabs._names[event.new]](dashboard)]

    tabs.param.watch(build_when_opened, "active")
    # A click on a point or an exemplar opens the instance.
    dashboard.param.watch(lambda _e: setattr(tabs, "active", 1), "instance_id")
    if location is not None:
        wanted = link.values.get("tab")
        if tab_index(tabs, wanted) is not None:
            tabs.active = tab_index(tabs, wanted)
        elif wanted is not None:
            notes.append(f"tab {wanted!r} (one of {', '.join(tab_key(name) for name in tabs._names)})")
        history = link_to_url(dashboard, tabs)
    if notes:
        dashboard.report("Not in this run, so left out of the link's view: " + "; ".join(notes) + ".")
    page = [message, tabs] + ([history] if location is not None else [])
    return session, pn.Column(*page, sizing_mode="stretch_width")


class BrowserHistory(JSComponent):
    """The page's URL query, kept by the server (``query``), and where the browser's Back or
    Forward went (``popped``). Panel's own location is not used to write: it pushes a page of
    history for every value it is given (the opening view's too), and knows nothing of Back and
    Forward (told the URL they went to, it pushes it again, and Forward has nowhere to go)."""

    query = param.String(default=None, allow_None=True,
                         doc="The view's URL query (``?tab=…``): the first replaces the page's URL, "
                             "each later one is a new page of the browser's history")
    popped = param.String(default="", doc="``<time>|<query>`` of the last Back or Forward: with the time, "
                                          "a return to the query of the one before is a change too")
    answers = param.String(default="", doc="The ``popped`` that ``query`` answers (the view restored): "
                                           "it replaces the URL, and is dropped if the browser has gone "
                                           "on since; empty for a change the analyst made")
    _esm = """
    export function render({ model }) {
      let written = false
      let latest = ""
      const write = () => {
        if (model.query == null) return
        if (model.answers !== "" && model.answers !== latest) return  // Back pressed again meanwhile
        if (model.query !== window.location.search) {
          const url = window.location.pathname + model.query + window.location.hash
          // A new page per change; the page opened, or one Back/Forward went to, keeps its place.
          if (written && model.answers === "") window.history.pushState({}, "", url)
          else window.history.replaceState({}, "", url)
        }
        written = true
      }
      const listener = () => {
        latest = `${Date.now()}|${window.location.search}`
        model.popped = latest
      }
      window.addEventListener("popstate", listener)
      model.on("query", write)
      model.on("answers", write)
      model.on("remove", () => window.removeEventListener("popstate", listener))
      write()
      const element = document.createElement("div")
      element.style.display = "none"
      return element
    }
    """


def link_to_url(dashboard: Dashboard, tabs: pn.Tabs) -> BrowserHistory:
    """Keep the view in the page's URL query (:func:`write_view_link`): the tab, layer,
    projection, algorithm, colour, instance and predicate subsets, so that a link opens the
    same view for a colleague. The view shown when the page opens replaces the page's URL (a
    link's values this run lacks give way to the defaults shown); every later change is a page
    of the browser's history, one per change however many values it moved (a layer moves the
    projection too), which Back and Forward restore. The returned component does it, placed in
    the page."""
    history = BrowserHistory()
    pending, restoring, answering = [False], [False], [""]

    def write() -> None:
        pending[0] = False
        values = {"tab": tab_key(tabs._names[tabs.active]), **dashboard.link_values()}
        history.param.update(query=write_view_link(values, list(dashboard.session.subsets.values())),
                             answers=answering[0])
        answering[0] = ""

    def changed(*_events) -> None:
        if restoring[0] or pending[0]:
            return
        pending[0] = True
        # Once all of this change's values have moved (watchers run in one go).
        pn.state.curdoc.add_next_tick_callback(write)

    def went_back_or_forward(event) -> None:
        link = read_view_link(event.new.partition("|")[2])
        restoring[0] = True
        try:
            dashboard.restore(link)
            if "instance" not in link.values:
                dashboard.instance_id = ""
            tabs.active = tab_index(tabs, link.values.get("tab")) or 0
        finally:
            restoring[0] = False
        answering[0] = event.new
        changed()

    dashboard.param.watch(changed, ["layer", "projection", "algorithm", "color_by", "instance_id", "subsets_version"])
    tabs.param.watch(changed, "active")
    history.param.watch(went_back_or_forward, "popped")
    write()
    return history


def _keep_panel_stylesheets_local() -> None:
    """Make Panel link its own stylesheets from this server, never from its CDN.

    Panel 1.9 re-renders a pane whose model has left the page (a hidden dynamic tab) without a
    document, and then points the pane's shared stylesheets (loading.css, markdown.css) at
    cdn.holoviz.org, which a cluster without internet cannot reach: the page loses its styles
    and logs errors. Every stylesheet Panel would send to the CDN goes to the local copy.
    """
    import panel.io.resources
    import panel.reactive
    from panel.io.resources import CDN_DIST, LOCAL_DIST

    original = panel.io.resources.patch_stylesheet
    if getattr(original, "keeps_local", False):
        return

    def patch_stylesheet(stylesheet, dist_url):
        original(stylesheet, LOCAL_DIST if dist_url == CDN_DIST else dist_url)

    patch_stylesheet.keeps_local = True
    panel.io.resources.patch_stylesheet = panel.reactive.patch_stylesheet = patch_stylesheet


def warm_up(run_dir) -> float:
    """Render the first tab once, off any page, and return the seconds it took.

    The first render in a process imports HoloViews' plotting modules and has numba compile
    Datashader's aggregations for these columns' types (over ten seconds here); done before
    the server listens, the first analyst's page is as fast as every later one. It also loads
    the projected points and the metadata columns' distributions into the process-wide caches
    the sessions share.
    """
    from bokeh.document import Document

    started = time.perf_counter()
    session = RunSession(run_dir)
    dashboard = Dashboard(session)
    for view in (InstancesView(dashboard), MatrixView(dashboard)):
        pn.panel(view).get_root(Document())
    for column in session.metadata_columns[:DISTRIBUTION_COLUMNS]:
        session.distribution(column)  # into the process-wide cache the Subgroups tab opens on
    return time.perf_counter() - started


def serve(run_dir, host: str = "127.0.0.1", port: int = 5006, show: bool = False,
          users: dict[str, str] | None = None, compared: dict | None = None, **kwargs):
    """Serve the dashboard (blocking); bound to ``host`` only. With ``users`` (name →
    password), every page asks to sign in first (Panel's basic authentication). With
    ``compared`` (name → directory of several runs of the same instances, ``run_dir`` one of
    them), the page compares them too (the Across-runs tab)."""
    import secrets

    from bokeh.settings import settings

    # Every script and stylesheet from this server: components made in callbacks would
    # otherwise link Panel's CDN, which a cluster without internet cannot reach.
    settings.resources = "server"
    _keep_panel_stylesheets_local()
    hv.extension("bokeh")
    pn.extension("tabulator")
    RunSession(run_dir)  # fail here, with the run's error, before the server starts
    if compared:
        ComparisonSession(compared).close()  # runs of other data are refused here too
    warm_up(run_dir)
    origins = [f"{host}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]
    if users:
        kwargs.update(basic_auth=dict(users), cookie_secret=secrets.token_hex(32),
                      basic_login_template=str(Path(__file__).with_name("login.html")))
    return pn.serve({"/": lambda: build_dashboard(run_dir, compared)}, address=host, port=port, show=show,
                    websocket_origin=origins, title="netloupe", **kwargs)
