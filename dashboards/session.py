"""What the dashboard shows, as plain data: one analyst's session over a committed run.

No Panel here: every view of :mod:`netloupe.dashboards.app` asks a :class:`RunSession` for numbers
and draws them, so the numbers are tested headless (``tests/test_dashboard_session.py``).
Everything is read through the run's catalog (:func:`netloupe.storage.catalog.open_catalog`), with
the explanation operators of ``storage/sql/operators.sql`` doing the work.

Subsets are the dashboard's currency (ActiVis): a class, a predicted class, correct or
not, a SQL predicate typed by the analyst, or the points selected in the scatter, each
kept under a name for the session and usable in every view.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from netloupe.contract.errors import NetloupeError, did_you_mean
from netloupe.storage.catalog import (
    QueryError,
    catalog_manifest,
    feature_attributions_view,
    has_feature_values,
    open_catalog,
    run_query,
    write_point_columns_of,
)
from netloupe.storage.instance import InstanceRecord, NoSuchInstance, read_instance
from netloupe.storage.layout import RunLayout
from netloupe.storage.location import cache_root
from netloupe.storage.point_columns import PointColumns, read_point_columns

_POINTS: dict[tuple, PointColumns] = {}
"""Each run's mapped point columns by :func:`run_key`, shared by every session of the process
(read-only; the pages are the operating system's to keep or drop)."""

_DISTRIBUTIONS: dict[tuple, pd.DataFrame] = {}
"""Each column's slices by (run, column, bins), shared like the points: read-only, and a
million rows take a quarter of a second per column."""
TOKEN_GROUPINGS = ("prediction", "label", "correct")
"""The class groupings of the tokens and features views (``top_tokens_by``'s, from precomputed sums)."""
DEPENDENCE_POINTS = 20_000
"""Most instances a feature's dependence plot reads (a fixed sample beyond): a scatter's shape
shows at that size, and a million would cost the browser for nothing."""
SESSION_SQL_MEMORY_MIB = 256
"""What each session's DuckDB may hold (a session has one; by default DuckDB keeps what it
read up to most of the machine's memory: 200 MB more per metadata column read at 10M). Every
view's query over ten million instances runs within it, as fast (benchmarks/RESULTS.md)."""
SUBSET_NAME = re.compile(r"^[\w .:=<>!-]{1,60}$")
LINK_KEYS = ("tab", "layer", "projection", "algorithm", "color", "instance")
"""What a link to the dashboard holds (its URL query's keys) besides its subsets, in order."""
LINK_SUBSET, LINK_SUBSET_SEPARATOR = "subset", "~"
"""A kept predicate subset in a link: ``subset=NAME~PREDICATE``, one per subset (``~`` is
never in a name, :data:`SUBSET_NAME`; the predicate after the first is kept whole)."""


def run_key(run_dir) -> tuple[str, int]:
    """What the process-wide caches know a run by: its directory and its catalog's time. A run
    rebuilt in place (--force) gets a new catalog file, so what was cached of it goes stale."""
    catalog = Path(run_dir).resolve() / "catalog.duckdb"
    return str(catalog.parent), catalog.stat().st_mtime_ns


class SessionError(NetloupeError):
    """An analyst's request the dashboard cannot serve (shown in the page, not raised to Panel)."""


@dataclass(frozen=True)
class Subset:
    """A named set of instances: by a SQL predicate over ``instances``, or by explicit ids."""

    name: str
    predicate: str | None = None
    ids: tuple | np.ndarray | None = None
    size: int = 0


@dataclass
class ViewLink:
    """The view a dashboard URL's query names: ``values`` by :data:`LINK_KEYS` (as text, not
    yet checked against any run), the predicate ``subsets`` as (name, predicate), and a note
    per part of the query that could not be read."""

    values: dict[str, str] = field(default_factory=dict)
    subsets: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_view_link(search: str) -> ViewLink:
    """The view named by a URL's query (``?tab=instance&layer=relu3&subset=thin~stroke = 'thin'``);
    unknown keys and malformed subsets are noted and left out, the last of a repeated key wins."""
    link = ViewLink()
    for key, value in urllib.parse.parse_qsl(search.lstrip("?"), keep_blank_values=True):
        if key == LINK_SUBSET:
            name, separator, predicate = value.partition(LINK_SUBSET_SEPARATOR)
            if separator and name.strip() and predicate.strip():
                link.subsets.append((name.strip(), predicate.strip()))
            else:
                link.notes.append(f"subset {value!r} (not NAME{LINK_SUBSET_SEPARATOR}PREDICATE)")
        elif key in LINK_KEYS:
            if value.strip():
                link.values[key] = value.strip()
        else:
            link.notes.append(f"{key!r} (not part of a view)")
    return link


def write_view_link(values: dict[str, str | None], subsets: list[Subset]) -> str:
    """The URL query of a view: ``values`` by :data:`LINK_KEYS` (empty ones left out), then
    every subset kept by a predicate (a selection's ids would not fit in a URL)."""
    pairs = [(key, values[key]) for key in LINK_KEYS if values.get(key)]
    pairs += [(LINK_SUBSET, f"{s.name}{LINK_SUBSET_SEPARATOR}{s.predicate}") for s in subsets if s.predicate is not None]
    return "?" + urllib.parse.urlencode(pairs) if pairs else ""


class RunSession:
    """One analyst's view of a run: the catalog connection, the run's facts, named subsets."""

    def __init__(self, run_dir):
        self.con = open_catalog(run_dir, SESSION_SQL_MEMORY_MIB)
        self.layout = RunLayout(Path(run_dir).resolve())
        self.run_key = run_key(run_dir)
        self.manifest = catalog_manifest(self.con)
        self.subsets: dict[str, Subset] = {}

    # -- the run's facts ---------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        return list(self.manifest.model.layer_neurons)

    @property
    def methods(self) -> list[str]:
        return list(self.manifest.model.attribution_shapes)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def metadata_columns(self) -> list[str]:
        return list(self.manifest.dataset.metadata_columns)

    @property
    def colour_columns(self) -> list[str]:
        """The metadata columns the scatter can be coloured by: all but a text column of too
        many values (:data:`netloupe.storage.point_columns.CATEGORY_LIMIT`)."""
        return [c for c in self.metadata_columns if c in self.point_columns.columns]

    @property
    def projections(self) -> list[tuple[str, str]]:
        """``(kind, source)`` of every projected table, layers first."""
        rows = run_query(self.con, "SELECT kind, source FROM projection_models ORDER BY kind, source").to_pylist()
        return [(r["kind"], r["source"]) for r in rows]

    @property
    def model_graph(self) -> dict | None:
        """The model's graph recorded at run time (:func:`netloupe.pipeline.model_graph.model_graph`);
        None for a handmade run."""
        return self.manifest.model_graph

    def graph_layout(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Nodes placed for drawing (``x`` = longest path from an input, ``y`` = order among
        the nodes at that depth) and the edges between them, recorded layers flagged."""
        graph = self.model_graph
        if graph is None:
            raise SessionError("this run has no model graph (it was made before netloupe recorded one); "
                               "rerun the job to get it")
        recorded = set(self.layers)
        depth: dict[str, int] = {}
        for node in graph["nodes"]:  # execution (topological) order
            depth[node["id"]] = 1 + max((depth[i] for i in node["inputs"] if i in depth), default=-1)
        rows, at_depth = [], {}
        for node in graph["nodes"]:
            x = depth[node["id"]]
            y = at_depth.get(x, 0)
            at_depth[x] = y + 1
            rows.append({"id": node["id"], "x": float(x), "y": -float(y), "type": node["type"], "op": node["op"],
                         "module": node["module"] or "", "recorded": node["module"] in recorded})
        nodes = pd.DataFrame(rows)
        where = {row["id"]: (row["x"], row["y"]) for row in rows}
        edges = pd.DataFrame([{"x0": where[i][0], "y0": where[i][1], "x1": where[n["id"]][0], "y1": where[n["id"]][1]}
                              for n in graph["nodes"] for i in n["inputs"] if i in where],
                             columns=["x0", "y0", "x1", "y1"])
        return nodes, edges

    def algorithms(self, kind: str, source: str) -> list[str]:
        rows = run_query(self.con, "SELECT algorithms FROM projection_models WHERE kind = ? AND source = ?",
                         [kind, source]).to_pylist()
        return rows[0]["algorithms"] if rows else []

    # -- the instance view -------------------------------------------------------------------

    def points(self, kind: str, source: str, algorithm: str = "pca") -> pd.DataFrame:
        """Every instance of a projection: ``instance_id, x, y`` and what it can be colored by
        (label, prediction, outcome, confidence, metadata), over the run's memory-mapped point
        columns (:mod:`netloupe.storage.point_columns`): nothing of it is copied into memory.
        An instance whose vector was not finite has NaN coordinates, which no view draws."""
        if algorithm not in self.algorithms(kind, source):
            raise SessionError(f"no {algorithm} projection of {kind} {source!r}; projected: "
                               f"{self.projections} with {self.algorithms(kind, source) or 'nothing'}")
        return self.point_columns.frame(kind, source, algorithm)

    @property
    def point_columns(self) -> PointColumns:
        """The run's mapped point columns, opened once per run and process. A run whose catalog
        predates them gets them written once into the local cache (the run is never written)."""
        if self.run_key not in _POINTS:
            columns = read_point_columns(self.layout.points_dir)
            if columns is None:
                cached = cache_root() / "points" / hashlib.blake2b(repr(self.run_key).encode(),
                                                                   digest_size=8).hexdigest()
                columns = read_point_columns(cached)
                if columns is None:
                    write_point_columns_of(self.layout, cached, self.class_names)
                    columns = read_point_columns(cached)
            _POINTS[self.run_key] = columns
        return _POINTS[self.run_key]

    @staticmethod
    def ids_in_box(points: pd.DataFrame, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Ids of the points inside a box (corners in any order)."""
        xs, ys = sorted((x0, x1)), sorted((y0, y1))
        inside = points["x"].between(*xs) & points["y"].between(*ys)
        return points["instance_id"][inside.to_numpy()].to_numpy()

    @staticmethod
    def points_in_view(points: pd.DataFrame, x_range, y_range, limit: int) -> pd.DataFrame | None:
        """The points inside the visible ranges when there are at most ``limit`` of them
        (zoomed in far enough to tell them apart), else None."""
        x, y = points["x"].to_numpy(), points["y"].to_numpy()
        inside = (x >= x_range[0]) & (x <= x_range[1]) & (y >= y_range[0]) & (y <= y_range[1])
        if np.count_nonzero(inside) > limit:
            return None
        return points[inside]

    @staticmethod
    def ids_in_polygon(points: pd.DataFrame, xs, ys) -> np.ndarray:
        """Ids of the points inside a lasso polygon (even-odd rule)."""
        px, py = points["x"].to_numpy(), points["y"].to_numpy()
        vx, vy = np.asarray(xs, float), np.asarray(ys, float)
        inside = np.zeros(len(px), bool)
        for i in range(len(vx)):
            j = i - 1
            crosses = (vy[i] > py) != (vy[j] > py)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_cross = (vx[j] - vx[i]) * (py - vy[i]) / (vy[j] - vy[i]) + vx[i]
            inside ^= crosses & (px < x_cross)
        return points["instance_id"][inside].to_numpy()

    @staticmethod
    def nearest(points: pd.DataFrame, x: float, y: float, within: float):
        """The id of the point nearest ``(x, y)`` if it lies within ``within``, else None."""
        distance = np.hypot(points["x"].to_numpy() - x, points["y"].to_numpy() - y)
        if not np.isfinite(distance).any():  # no points, or none with coordinates
            return None
        best = int(np.nanargmin(distance))
        return points["instance_id"].iloc[best] if distance[best] <= within else None

    # -- subsets -----------------------------------------------------------------------------

    def class_subsets(self, by: str = "label") -> list[Subset]:
        """One subset per class (``label``/``prediction``), or ``correct``/``incorrect``."""
        if by == "correct":
            return [self._counted("correct", "correct"), self._counted("incorrect", "NOT correct")]
        if by not in ("label", "prediction"):
            raise SessionError(f"class subsets are by 'label', 'prediction' or 'correct', got {by!r}")
        return [self._counted(f"{by}={name}", f"{by} = {i}") for i, name in enumerate(self.class_names)]

    def _counted(self, name: str, predicate: str) -> Subset:
        size = run_query(self.con, f"SELECT count(*) AS n FROM instances WHERE {predicate}")["n"][0].as_py()
        return Subset(name, predicate=predicate, size=size)

    def add_predicate_subset(self, name: str, predicate: str) -> Subset:
        """Keep the instances where ``predicate`` (SQL over ``instances``) holds as ``name``."""
        self._check_name(name)
        try:
            size = run_query(self.con, "SELECT size FROM subset_summary(?)", [predicate])["size"][0].as_py()
        except QueryError as error:
            columns = run_query(self.con, "SELECT * FROM instances LIMIT 0").column_names
            raise SessionError(f"the predicate {predicate!r} is not valid SQL over instances ({error}); "
                               f"columns: {columns}") from None
        subset = Subset(name, predicate=predicate, size=size)
        self.subsets[name] = subset
        return subset

    def membership(self, points: pd.DataFrame, name: str) -> pd.Categorical:
        """Per point, whether it is in the subset ``name`` ("in <name>" or "other"): the
        scatter colored by a subset."""
        subset = self.subset(name)
        if subset.ids is not None:
            ids = np.asarray(subset.ids)
        else:
            ids = run_query(self.con, "SELECT unnest(subset_ids(?)) AS instance_id",
                            [subset.predicate])["instance_id"].to_numpy()
        # Series.isin: text ids are Arrow's, and to_numpy would make ten million Python strings.
        inside = points["instance_id"].isin(ids).to_numpy()
        return pd.Categorical.from_codes(inside.astype(np.int8), categories=["other", f"in {name}"])

    def add_ids_subset(self, name: str, ids) -> Subset:
        """Keep explicit instance ids (a scatter selection) as ``name``."""
        self._check_name(name)
        ids = tuple(np.asarray(ids).tolist())
        if not ids:
            raise SessionError("the selection is empty: drag a box or lasso over some points first")
        subset = Subset(name, ids=ids, size=len(ids))
        self.subsets[name] = subset
        return subset

    def remove_subset(self, name: str) -> None:
        self.subsets.pop(name, None)

    def subset(self, name: str) -> Subset:
        if name in self.subsets:
            return self.subsets[name]
        for by in ("label", "prediction", "correct"):
            for subset in self.class_subsets(by):
                if subset.name == name:
                    return subset
        raise SessionError(f"no subset named {name!r}; {did_you_mean(name, list(self.subsets))}")

    @staticmethod
    def _check_name(name: str) -> None:
        if not SUBSET_NAME.match(name or ""):
            raise SessionError(f"subset name {name!r}: use 1-60 letters, digits, spaces or . : = < > ! -")

    # -- the neuron activation matrix (ActiVis) ----------------------------------------------

    def neuron_matrix(self, layer: str, subsets: list[Subset]) -> pd.DataFrame:
        """One row per (subset, neuron): ``size, mean, std, frac_active``."""
        self._check_layer(layer)
        frames = []
        for subset in subsets:
            if subset.ids is not None:
                ids = np.asarray(subset.ids).tolist()
                table = run_query(self.con, "SELECT * FROM neuron_matrix_ids(?, ?)", [layer, ids])
            else:
                table = run_query(self.con, "SELECT * FROM neuron_matrix(?, ?)", [layer, subset.predicate])
            frame = table.to_pandas()
            frame.insert(0, "subset", subset.name)
            frames.append(frame)
        if not frames:
            return pd.DataFrame(columns=["subset", "neuron", "size", "mean", "std", "frac_active"])
        return pd.concat(frames, ignore_index=True)

    def class_matrix(self, layer: str, by: str) -> pd.DataFrame:
        """The matrix rows of every class subset (``label``, ``prediction`` or ``correct``),
        from the sums stored at catalog build (no scan); named as :meth:`class_subsets` names them."""
        self._check_layer(layer)
        if by not in ("label", "prediction", "correct"):
            raise SessionError(f"class rows are by 'label', 'prediction' or 'correct', got {by!r}")
        frame = run_query(self.con, "SELECT * FROM neuron_matrix_by(?, subsets := ?)", [layer, by]).to_pandas()
        if by != "correct":
            names = self.class_names
            frame["subset"] = [f"{by}={names[int(c)]}" if 0 <= int(c) < len(names) else f"{by}={int(c)}"
                               for c in frame["class"]]
        return frame[["subset", "neuron", "size", "mean", "std", "frac_active"]]

    @staticmethod
    def neuron_order(matrix: pd.DataFrame, subset_a: str | None = None, subset_b: str | None = None) -> list[int]:
        """Neurons in display order: by the difference of means A - B (largest first) when two
        subsets are given, else by index."""
        neurons = sorted(matrix["neuron"].unique().tolist())
        if subset_a is None or subset_b is None or subset_a == subset_b:
            return neurons
        wide = matrix.pivot(index="neuron", columns="subset", values="mean")
        if subset_a not in wide or subset_b not in wide:
            return neurons
        difference = (wide[subset_a] - wide[subset_b]).fillna(0)
        return difference.sort_values(ascending=False, kind="stable").index.tolist()

    def exemplars(self, layer: str, neuron: int, k: int = 8) -> pd.DataFrame:
        """The ``k`` instances that activate ``neuron`` most, with their labels and predictions."""
        self._check_layer(layer)
        return run_query(self.con, """
            SELECT t.rank, t.instance_id, t.activation, i.label, i.prediction
            FROM top_instances(?, ?, k := ?) t JOIN instances i USING (instance_id) ORDER BY t.rank
        """, [layer, int(neuron), int(k)]).to_pandas()

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise SessionError(f"no recorded layer {layer!r}; {did_you_mean(layer, self.layers)}")

    # -- fidelity ------------------------------------------------------------------------------

    def fidelity_summary(self) -> pd.DataFrame:
        """Per method, its fidelity checks averaged over the run (the catalog's
        ``fidelity_summary``); empty for a run made before the table existed."""
        exists = run_query(self.con, "SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'fidelity_summary'")
        if not exists["n"][0].as_py():
            return pd.DataFrame()
        return run_query(self.con, "SELECT * FROM fidelity_summary ORDER BY method").to_pandas()

    # -- instance detail ---------------------------------------------------------------------

    def typed_id(self, text: str):
        """An id typed, clicked or read from a link, as the run's id type."""
        return typed_id(text, self.manifest.dataset.id_type)

    def has_instance(self, instance_id) -> bool:
        rows = run_query(self.con, "SELECT count(*) AS n FROM instances WHERE instance_id = ?", [instance_id])
        return rows["n"][0].as_py() > 0

    def opening_instance(self) -> tuple[object, str]:
        """The instance the Instance tab opens on, and why: the most confident mistake (the
        model's surest wrong answer is the one most worth explaining); with none (every
        prediction right, or no labels), the least confident prediction."""
        names = self.class_names
        found = run_query(self.con, """
            SELECT instance_id, label, prediction, confidence FROM instances WHERE NOT correct
            ORDER BY confidence DESC, instance_id LIMIT 1""").to_pylist()
        if found:
            row = found[0]
            return row["instance_id"], (f"the most confident mistake: labelled {_class_name(row['label'], names)}, "
                                        f"predicted {_class_name(row['prediction'], names)} at "
                                        f"{row['confidence']:.3f}")
        found = run_query(self.con, """
            SELECT instance_id, prediction, confidence FROM instances
            ORDER BY confidence ASC NULLS LAST, instance_id LIMIT 1""").to_pylist()
        if not found:
            raise SessionError("this run has no instances")
        row = found[0]
        return row["instance_id"], (f"no prediction is a known mistake; the least confident one: "
                                    f"{_class_name(row['prediction'], names)} at {row['confidence']:.3f}")

    def instance(self, instance_id) -> InstanceRecord:
        """Everything about one instance (:func:`netloupe.storage.instance.read_instance`)."""
        try:
            return read_instance(self.con, self.manifest, instance_id)
        except NoSuchInstance as error:
            raise SessionError(str(error)) from None

    # -- subgroups (FairVis) -----------------------------------------------------------------

    def distribution(self, column: str, bins: int | None = None) -> pd.DataFrame:
        """Size and accuracy per slice of a metadata (or label/prediction) column, in the
        slices' order (``value, size, accuracy, predicate``): a column of many values comes in
        bins or its most frequent values, never a bar per value (``subgroup_metrics``).
        Computed once per run and process (the Subgroups tab opens on them)."""
        key = (self.run_key, column, bins)
        if key not in _DISTRIBUTIONS:
            _DISTRIBUTIONS[key] = self._distribution(column, bins)
        return _DISTRIBUTIONS[key].copy()

    def _distribution(self, column: str, bins: int | None) -> pd.DataFrame:
        frame = self.subgroups([self.slice_spec(column, bins)]).rename(columns={column: "value"})
        frame = frame.iloc[sorted(range(len(frame)), key=lambda i: slice_order(frame["value"].iloc[i]))]
        return frame[["value", "size", "accuracy", "predicate"]].reset_index(drop=True)

    def slice_spec(self, column: str, bins: int | None = None, cuts: str | None = None) -> str:
        """How ``column`` is sliced, as the subgroup operators read it: by itself (its values, or
        for many of them 5 quantile bins or the 11 most frequent), ``column:N`` (a number in at
        most ``bins`` quantile bins) or ``column:a,b,c`` (bins between the cut points ``cuts``)."""
        self._check_column(column)
        if cuts:
            values = [v.strip() for v in cuts.split(",") if v.strip()]
            try:
                [float(v) for v in values]
            except ValueError:
                raise SessionError(f"cut points of {column!r} are numbers separated by commas (-10, 0, 10); "
                                   f"got {cuts!r}") from None
            return f"{column}:{','.join(values)}"
        return f"{column}:{int(bins)}" if bins and column in self.numeric_columns else column

    @property
    def numeric_columns(self) -> list[str]:
        """The instances columns that hold numbers (binned, where they have many values)."""
        schema = run_query(self.con, "SELECT * FROM instances LIMIT 0").schema
        return [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]

    def subgroups(self, columns: list[str], positive: int = 0) -> pd.DataFrame:
        """FairVis' subgroups of 1-3 columns (each a :meth:`slice_spec`), with each one's
        predicate over instances."""
        for column in columns:
            self._check_column(column.split(":", 1)[0])
        return run_query(self.con, "SELECT * FROM subgroup_metrics(?, ?)", [columns, positive]).to_pandas()

    def suggested_subgroups(self, columns: list[str], metric: str = "accuracy", positive: int = 0,
                            min_size: int = 30, k: int = 10) -> pd.DataFrame:
        for column in columns:
            self._check_column(column.split(":", 1)[0])
        return run_query(self.con, "SELECT * FROM suggested_subgroups(?, ?, positive := ?, min_size := ?, k := ?)",
                         [columns, metric, positive, min_size, k]).to_pandas()

    def compare_subgroups(self, predicates: dict[str, str], positive: int = 0) -> pd.DataFrame:
        """FairVis' side-by-side view: one row per metric, one column per named predicate."""
        columns = {}
        for name, predicate in predicates.items():
            try:
                row = run_query(self.con, "SELECT * FROM subset_metrics(?, ?)", [predicate, int(positive)]).to_pylist()[0]
            except QueryError as error:
                raise SessionError(f"subgroup {name!r}: {predicate!r} is not a valid predicate ({error})") from None
            columns[name] = row
        return pd.DataFrame(columns)

    def _check_column(self, column: str) -> None:
        valid = self.metadata_columns + ["label", "prediction"]
        if column not in valid:
            raise SessionError(f"no instances column {column!r} to group by; {did_you_mean(column, valid)}")

    # -- tokens (text runs) ------------------------------------------------------------------

    @property
    def reads_text(self) -> bool:
        return self.manifest.model.input_kind == "tokens"

    def top_tokens(self, method: str, by: str = "prediction", min_count: int = 5, top: int = 12) -> pd.DataFrame:
        """Per subset, the ``top`` words with the most positive mean attribution (those that push
        most toward the explained class there): ``subset, token, mean, occurrences, instances``;
        the tokenizer's special tokens ([CLS], [SEP]) are not words and are left out.

        ``by`` is a class grouping (``prediction``, ``label``, ``correct``: from the run's
        precomputed per-token sums, any run size) or a kept predicate subset (a scan of its tokens).
        """
        if method not in self.methods:
            raise SessionError(f"no attribution method {method!r} in this run; {did_you_mean(method, self.methods)}")
        special = list(self.manifest.model.special_tokens)
        if by in TOKEN_GROUPINGS:
            frame = run_query(self.con, """
                SELECT subset, class, token, mean, occurrences, instances
                FROM top_tokens_by(?, subsets := ?, min_count := ?)
                WHERE NOT list_contains(?, token)
                QUALIFY row_number() OVER (PARTITION BY subset ORDER BY mean DESC, token) <= ?
                ORDER BY subset, mean DESC, token
            """, [method, by, int(min_count), special, int(top)]).to_pandas()
            return self._class_names_in(frame, by)
        subset = self._predicate_subset(by)
        frame = run_query(self.con, "SELECT token, mean, occurrences, instances FROM top_tokens(?, ?, min_count := ?) "
                                    "WHERE NOT list_contains(?, token) LIMIT ?",
                          [method, subset.predicate, int(min_count), special, int(top)]).to_pandas()
        return frame.assign(subset=by)[["subset", "token", "mean", "occurrences", "instances"]]

    def instances_with_token(self, token: str, limit: int = 200) -> pd.DataFrame:
        """The first ``limit`` instances whose tokens include ``token``, with their label,
        prediction and the token's occurrences."""
        return run_query(self.con, """
            SELECT w.instance_id, i.label, i.prediction, w.occurrences
            FROM instances_with_token(?) w JOIN instances i USING (instance_id) ORDER BY w.instance_id LIMIT ?
        """, [token, int(limit)]).to_pandas()

    @staticmethod
    def token_predicate(token: str) -> str:
        """The SQL predicate over ``instances`` of the texts whose tokens include ``token`` (a
        predicate, not a list of ids: "the" is in most of a million texts)."""
        return "instance_id IN (SELECT instance_id FROM instances_with_token('" + token.replace("'", "''") + "'))"

    @staticmethod
    def token_subset_name(token: str) -> str:
        """A subset name for the instances containing ``token`` (word pieces' ``##`` and
        quotes are not name characters)."""
        return ("token " + re.sub(r"[^\w .:=<>!-]", "_", token))[:60]

    # -- features (tabular runs) -------------------------------------------------------------

    @cached_property
    def features(self) -> pd.DataFrame:
        """A tabular run's features in model order (``feature``, ``kind``, ``categories``);
        empty for other runs, and for a run that stored no per-feature values (summary storage)."""
        if (not self.manifest.dataset.feature_columns or self.manifest.spec["storage"]["attributions"] == "summary"
                or not has_feature_values(self.con)):
            return pd.DataFrame({"feature": [], "kind": [], "categories": []})
        return run_query(self.con, "SELECT feature, kind, categories FROM features ORDER BY position").to_pandas()

    @property
    def reads_features(self) -> bool:
        return not self.features.empty

    def feature_contributions(self, instance_id, method: str) -> pd.DataFrame:
        """One instance's value per feature for ``method`` (its first target), largest |value|
        first: ``feature``, ``shown`` (``sex = Female``, ``age = 39``: the original value) and
        ``attribution``."""
        self._check_method(method)
        frame = run_query(self.con, f"""
            SELECT feature, kind, value, category, attribution FROM {feature_attributions_view(method)}
            WHERE instance_id = ? AND target_rank = 0 ORDER BY abs(attribution) DESC, feature
        """, [instance_id]).to_pandas()
        shown = [f"{f} = {c}" if k == "categorical" and c is not None
                 else f"{f} = {v:.4g}" if k == "numeric" and v == v and v is not None else f
                 for f, k, v, c in zip(frame["feature"], frame["kind"], frame["value"], frame["category"])]
        return frame.assign(shown=shown)[["feature", "shown", "attribution"]]

    def feature_importance(self, method: str, by: str = "prediction") -> pd.DataFrame:
        """Per subset, every feature's mean |attribution| and mean: ``subset, feature, mean_abs,
        mean, instances``, most important first. ``by``: a class grouping (``prediction``,
        ``label``, ``correct``) or a kept predicate subset."""
        self._check_method(method)
        if by in TOKEN_GROUPINGS:
            frame = run_query(self.con, "SELECT subset, class, feature, mean_abs, mean, instances "
                                        "FROM feature_importance_by(?, subsets := ?)", [method, by]).to_pandas()
            return self._class_names_in(frame, by)
        subset = self._predicate_subset(by)
        frame = run_query(self.con, "SELECT feature, mean_abs, mean, instances FROM feature_importance(?, ?)",
                          [method, subset.predicate]).to_pandas()
        return frame.assign(subset=by)[["subset", "feature", "mean_abs", "mean", "instances"]]

    def feature_dependence(self, method: str, feature: str, limit: int = DEPENDENCE_POINTS) -> pd.DataFrame:
        """One feature's value (or category) and attribution per instance, at most ``limit``
        of them (a fixed sample): ``instance_id, value, category, attribution``."""
        self._check_method(method)
        known = self.features["feature"].tolist()
        if feature not in known:
            raise SessionError(f"no feature {feature!r} in this run; {did_you_mean(feature, known)}")
        return run_query(self.con, "SELECT * FROM feature_dependence(?, ?, k := ?)",
                         [method, feature, int(limit)]).to_pandas()

    def _class_names_in(self, frame: pd.DataFrame, by: str) -> pd.DataFrame:
        """A ``*_by`` operator's rows with each class subset named by its class name
        (``prediction=<=50K``), the ``class`` column dropped."""
        named = frame["class"].notna()
        names = np.array(self.class_names, dtype=object)
        frame.loc[named, "subset"] = [f"{by}={names[int(c)]}" if 0 <= c < len(names) else s
                                      for s, c in zip(frame.loc[named, "subset"], frame.loc[named, "class"])]
        return frame.drop(columns="class")

    def _predicate_subset(self, name: str) -> Subset:
        """The kept subset ``name``, which the tokens and features views scan by its predicate."""
        subset = self.subset(name)
        if subset.predicate is None:
            raise SessionError(f"subset {name!r} was kept from a selection; this view takes class groupings "
                               f"{list(TOKEN_GROUPINGS)} or a subset kept by a SQL predicate")
        return subset

    def _check_method(self, method: str) -> None:
        if method not in self.methods:
            raise SessionError(f"no attribution method {method!r} in this run; {did_you_mean(method, self.methods)}")

    # -- the SQL console ---------------------------------------------------------------------

    def sql(self, query: str) -> pa.Table:
        """An analyst's read-only query (SELECT/EXPLAIN only; refused otherwise)."""
        return run_query(self.con, query)


def typed_id(text: str, id_type: str):
    """An instance id given as text, as ``id_type`` (``int64`` or ``string``) has it."""
    if id_type == "int64":
        try:
            return int(text)
        except ValueError:
            raise SessionError(f"instance ids here are integers, got {text!r}") from None
    return text


def map_image(values: np.ndarray) -> np.ndarray:
    """An attribution map (or input) in its stored shape as a 2-D image: channels summed
    (a ``(C, H, W)`` map), a vector as one row."""
    array = np.asarray(values, np.float32)
    if array.ndim == 3:
        return array.sum(axis=0)
    if array.ndim == 2:
        return array
    return array.reshape(1, -1)


TOWARD, AGAINST = np.array([178, 24, 43]), np.array([33, 102, 172])
"""The colours of a value toward the explained class (red) and against it (blue), as in every view."""
MAX_OPACITY = 0.85
"""A map's opacity over its input where its value is largest (the input still shows through)."""


BOUNDARY = np.array([255, 215, 0])
"""The colour of superpixel boundaries over a map (yellow, as scikit-image's ``mark_boundaries``)."""


def blended_map(image: np.ndarray, values: np.ndarray, bound: float, segments: np.ndarray | None = None) -> np.ndarray:
    """An attribution map over its input image, as Captum's blended heat map: the input in gray,
    the map resized to it (bilinear: a 2x2 patch map or a 7x7 Grad-CAM covers the whole image)
    in red toward the class and blue against, opaque in proportion to ``|value| / bound``;
    with ``segments`` (the image's superpixel numbers), their boundaries drawn over it.
    ``(H, W)`` image and ``(h, w)`` map → ``(H, W, 3)`` uint8."""
    image = np.asarray(image, np.float64)
    span = image.max() - image.min()
    gray = (image - image.min()) / span if span > 0 else np.zeros_like(image)
    resized = resize_bilinear(np.asarray(values, np.float64), image.shape)
    alpha = (MAX_OPACITY * np.clip(np.abs(resized) / (bound or 1.0), 0, 1))[..., None]
    colour = np.where(resized[..., None] > 0, TOWARD, AGAINST)
    blended = np.round((1 - alpha) * 255 * gray[..., None] + alpha * colour).astype(np.uint8)
    if segments is not None:
        blended[segment_boundaries(segments)] = BOUNDARY
    return blended


def segment_boundaries(segments: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: the pixels whose right or lower neighbour lies in another segment (a
    one-pixel line between any two superpixels, none around the image's edge)."""
    segments = np.asarray(segments)
    edge = np.zeros(segments.shape, bool)
    edge[:, :-1] |= segments[:, :-1] != segments[:, 1:]
    edge[:-1, :] |= segments[:-1, :] != segments[1:, :]
    return edge


def resize_bilinear(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``values`` resampled to ``shape`` by bilinear interpolation between cell centres (the
    edges hold their cell's value), as image resizers do; unchanged when the shapes agree."""
    if values.shape == tuple(shape):
        return values

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centres = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        low = np.floor(centres).astype(int)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, centres - low

    (r0, r1, fr), (c0, c1, fc) = axis(values.shape[0], shape[0]), axis(values.shape[1], shape[1])
    rows = values[r0] * (1 - fr)[:, None] + values[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


def slice_order(label) -> tuple:
    """Where a slice's label (``subgroup_metrics``' column value) goes among its column's:
    ``< a`` first, then ``[a, b)`` by ``a``, then ``>= z``; values in order, missing last."""
    if label is None or (isinstance(label, float) and np.isnan(label)):
        return (3, 0.0, "")
    text = str(label)
    if text.startswith("< "):
        return (0, -np.inf, text)
    if text.startswith("[") and "," in text:
        try:
            return (1, float(text[1:text.index(",")]), text)
        except ValueError:
            pass
    if text.startswith(">= ") or text == "other":
        return (2, np.inf, text)
    try:
        return (1, float(text), text)
    except ValueError:
        return (1, np.inf, text)


def _class_name(code, names: list[str]) -> str:
    """A class index as its name (the index itself beyond the names, "none" when missing)."""
    if code is None:
        return "none"
    return names[int(code)] if 0 <= int(code) < len(names) else str(code)

