"""The SQL face of a run: ``catalog.duckdb`` (built once, at commit) and the sandbox analysts query.

:func:`build_catalog` is the one place the run's tables become SQL. It writes
``<run>/catalog.duckdb`` holding:

* ``instances``: a native copy of the instances table (predicates join against it);
* ``projections``: every instance's 2-D coordinates per projected table (``kind``,
  ``source``, ``pca_x``, ``pca_y``, ``umap_x``, ``umap_y``), and ``projection_models``;
* ``neuron_cells`` / ``attribution_cells``: sums per (label, prediction) cell, so class
  subsets (ActiVis' default rows) and per-class attribution maps need no scan at all;
  ``neuron_top`` (each neuron's top instances) and ``fidelity_summary``: all four the
  workers' per-part statistics added up (:mod:`netloupe.storage.part_statistics`), so the
  build reads no activation or attribution;
* ``activation_index_parts``: where each part's rows lie in the activation index (whose
  sorted ids it writes beside the catalog, ``index/``);
* views over the Parquet parts (``activations_<layer>``: the part pass's *wide* segments, one
  uncompressed FLOAT column per neuron, many parts each; ``activation_vectors_<layer>``,
  ``attributions_<method>``, ``fidelity_<method>``), by paths relative to the run, so a
  moved or copied run keeps working; ``layers``, ``methods``, ``neurons``, ``parquet_views``;
* the explanation operators of ``storage/sql/operators.sql`` as table macros.

:func:`open_catalog` attaches that file read-only in an in-memory DuckDB that can read
this run and nothing else: only SELECT/EXPLAIN statements run (:func:`run_query`), file
access outside the run is off, extensions cannot be installed or loaded, and settings are
locked. The stock ``duckdb`` CLI can open ``catalog.duckdb`` directly (docs/sql.md).

View names: layer and method names with non-identifier characters as ``_``
(``features.3`` → ``activations_features_3``), the rule :func:`sql_identifier` and the
SQL macro ``_activations_view`` share.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from netloupe.contract.errors import NetloupeError, RunError
from netloupe.contract.names import PROJECTION_ALGORITHMS
from netloupe.contract.spec import DRIVER_SQL_MEMORY_MIB
from netloupe.storage import schema as S
from netloupe.storage.activation_index import ActivationIndex, write_id_index
from netloupe.storage.features import features_of
from netloupe.storage.layout import RunLayout
from netloupe.storage.manifest import DatasetInfo, ProjectionTable, RunManifest
from netloupe.storage.part_statistics import NEURON_TOP_KEPT, WIDE_NEURON_LIMIT, statistics_of
from netloupe.storage.point_columns import write_point_columns
from netloupe.storage.schema import ID_SQL_TYPES, ID_TYPES
from netloupe.storage.statistics_merge import StatisticsMerge


class QueryError(NetloupeError):
    """A user's SQL was refused or failed."""


ALLOWED_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
"""Statement kinds an analyst may run (SELECT covers DESCRIBE, SHOW and SUMMARIZE; EXPLAIN
without ANALYZE, which would run what it explains)."""
_EXPLAIN_ANALYZE = re.compile(r"^\s*EXPLAIN\s+(\(.*?\)\s*)?ANALY[SZ]E\b", re.IGNORECASE | re.DOTALL)

SQL_DIR = Path(__file__).with_name("sql")
BUILDING_BLOCKS_SQL = SQL_DIR / "building_blocks.sql"
"""Macros of no table (view names, quoting, FairVis' metric formulas): the operators' and the
comparison operators' (:mod:`netloupe.storage.compare`)."""
OPERATORS_SQL = SQL_DIR / "operators.sql"
"""The explanation operators (table macros); SQL lives in these files, not in Python."""
CURRENT_OPERATORS, FAST_OPERATORS = "memory.operators", "memory.fast"
"""Where :func:`open_catalog` creates this netloupe's operators, ahead of the run's own, and
the memory-mapped moments ahead of those."""
TABLES_SQL = SQL_DIR / "tables.sql"
"""The statistics tables the operators read."""
BUILD_SQL = SQL_DIR / "build.sql"
"""Build-time helpers and the views over the statistics tables."""
TOKEN_VIEW_SQL = (SQL_DIR / "token_view.sql").read_text()
FEATURE_VIEW_SQL = (SQL_DIR / "feature_view.sql").read_text()
INFLUENCE_SQL = SQL_DIR / "influence.sql"
"""The influence operators, for a run with an ``influence`` table."""
"""A text run's long token view of one method (filled in with its names)."""
FAST_SQL = SQL_DIR / "fast.sql"
"""The analyst connection's override of ``_neuron_moments`` (storage/activation_index.py)."""

ATTACHED = "run"
"""The name the catalog file is attached under in an analyst's connection."""
BUILDING = "netloupe_catalog"
"""The name the catalog file is attached under while it is built."""
CATALOG_STORAGE_VERSION = "v1.0.0"
"""DuckDB storage format of catalog.duckdb: readable by the DuckDB 1.x CLIs as well as 2.x."""


def sql_identifier(name: str) -> str:
    """A layer or method name as part of a view name."""
    return re.sub(r"\W", "_", name)


def activations_view(layer: str) -> str:
    return f"activations_{sql_identifier(layer)}"


def activation_vectors_view(layer: str) -> str:
    return f"activation_vectors_{sql_identifier(layer)}"


def attributions_view(method: str) -> str:
    return f"attributions_{sql_identifier(method)}"


def feature_attributions_view(method: str) -> str:
    return f"feature_attributions_{sql_identifier(method)}"


def fidelity_view(method: str) -> str:
    return f"fidelity_{sql_identifier(method)}"


def token_attributions_view(method: str) -> str:
    return f"token_attributions_{sql_identifier(method)}"


def _run_statements(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    for statement in duckdb.extract_statements(path.read_text()):
        con.execute(statement.query).fetchall()


# -- building ------------------------------------------------------------------------------


@contextlib.contextmanager
def driver_connection(memory_mib: int, spill_dir: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB for the driver's own work: at most ``memory_mib`` of memory,
    spilling into ``spill_dir`` (removed, with whatever spilled, when the block ends)."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET memory_limit = '{int(memory_mib)}MiB'").fetchall()
        con.execute("SET temp_directory = ?", [str(spill_dir)]).fetchall()
        yield con
    finally:
        con.close()
        shutil.rmtree(spill_dir, ignore_errors=True)


def build_catalog(layout: RunLayout, manifest: RunManifest, memory_mib: int = DRIVER_SQL_MEMORY_MIB,
                  native_activations: bool = False, statistics: StatisticsMerge | None = None) -> dict:
    """Write ``catalog.duckdb`` for the run at ``layout`` (atomically); return timings.

    Called by the driver on the staged run before its commit, so a committed run always
    has its catalog; ``netloupe catalog RUN`` rebuilds it. It reads the instances and the
    workers' per-part statistics, never the activations or attributions themselves
    (:mod:`netloupe.storage.part_statistics`). With ``native_activations`` (``netloupe catalog
    RUN --native-activations``, after the run) each ``activations_<layer>`` becomes a native
    table copied from the wide parts: what the stock CLI's pure-SQL operators scan fastest
    (about twice as fast as the Parquet view), for a copy of every activation in the file.
    """
    started = time.perf_counter()
    # Absolute: with file_search_path set, DuckDB resolves relative paths against it only.
    layout = RunLayout(layout.root.resolve())
    final = layout.catalog_path
    tmp = layout.root / f".{final.name}.{uuid.uuid4().hex}.tmp"
    model = manifest.model
    id_type = ID_TYPES[manifest.dataset.id_type]
    timings = {}

    def timed(name: str, step, *args):
        step_started = time.perf_counter()
        result = step(*args)
        timings[name] = time.perf_counter() - step_started
        return result

    try:
        with driver_connection(memory_mib, layout.root / ".duckdb-spill") as con:
            # An older storage format than this DuckDB's own, so that the duckdb CLIs users
            # already have can open the catalog (DuckDB 2.0 writes files 1.x cannot read).
            con.execute(f"ATTACH ? AS {BUILDING} (STORAGE_VERSION '{CATALOG_STORAGE_VERSION}')", [str(tmp)]).fetchall()
            con.execute(f"USE {BUILDING}").fetchall()  # everything below lands in the file, unqualified
            # Relative paths in views are resolved against this, and stored relative.
            con.execute("SET file_search_path = ?", [str(layout.root)]).fetchall()
            # Uncompressed floats scan about twice as fast as DuckDB's compressed ones
            # (benchmarks/RESULTS.md): the projections' coordinates.
            con.execute("PRAGMA force_compression = 'uncompressed'").fetchall()
            timed("instances", lambda: con.read_parquet(str(layout.instances_dir / "*.parquet")).create("instances"))
            con.execute(f"CREATE MACRO _neuron_top_kept() AS {NEURON_TOP_KEPT}").fetchall()
            for sql in (TABLES_SQL, BUILDING_BLOCKS_SQL, OPERATORS_SQL, BUILD_SQL):
                _run_statements(con, sql)
            if statistics is None:
                merged = timed("statistics", StatisticsMerge.of_run, layout, statistics_of(
                    model.layer_neurons, model.attribution_shapes,
                    model.input_kind == "tokens" and manifest.spec["storage"]["attributions"] != "summary"),
                    manifest.dataset.id_type, memory_mib)
                try:
                    timed("statistics tables", _insert_statistics, con, merged)
                finally:
                    merged.close()
            else:
                timed("statistics tables", _insert_statistics, con, statistics)
            timed("activation index", _write_index, con, layout)
            timed("projections", _build_projections, con, layout, manifest.projections.tables, id_type)
            timed("point columns", write_point_columns, con, layout.points_dir, manifest.class_names)
            parquet_views, layers, methods = [], [], []
            for layer, neurons in model.layer_neurons.items():
                wide = neurons <= WIDE_NEURON_LIMIT
                vectors = _relative_parts(layout, layout.activations_dir(layer))
                parquet_views.append((activation_vectors_view(layer), vectors))
                if wide and native_activations:
                    timed(f"layer {layer}", _copy_wide_layer, con, layout, layer)
                elif wide:
                    parquet_views.append((activations_view(layer),
                                          _relative_parts(layout, layout.wide_activations_dir(layer))))
                layers.append({"layer": layer, "view": activations_view(layer) if wide else None,
                               "vectors_view": activation_vectors_view(layer), "neurons": neurons,
                               "output_shape": json.dumps(model.layer_output_shapes.get(layer))})
            for method, shape in model.attribution_shapes.items():
                maps = _relative_parts(layout, layout.attributions_dir(method))
                parquet_views.append((attributions_view(method), maps))
                methods.append({"method": method, "view": attributions_view(method), "stored_shape": json.dumps(shape)})
            for method in manifest.tables.fidelity:
                parquet_views.append((fidelity_view(method), _relative_parts(layout, layout.fidelity_dir(method))))
            if manifest.tables.tokens:
                parquet_views.append((S.TOKENS, _relative_parts(layout, layout.tokens_dir)))
            if layout.background_path.exists():
                parquet_views.append(("background", S.BACKGROUND))
            if manifest.tables.influence:
                parquet_views.append((S.INFLUENCE, _relative_parts(layout, layout.influence_path.parent)))
            _insert_features(con, manifest)
            for view, relative in parquet_views:
                con.read_parquet(relative).create_view(view)
            _create_token_views(con, manifest)
            if manifest.tables.influence:
                _run_statements(con, INFLUENCE_SQL)
            _create_feature_views(con, manifest)
            for table, rows in (("parquet_views", [{"view": v, "path": p} for v, p in parquet_views]),
                                ("layers", layers), ("methods", methods)):
                if rows:
                    con.from_arrow(pa.Table.from_pylist(rows)).insert_into(table)
            con.execute("CHECKPOINT").fetchall()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    timings["total"] = time.perf_counter() - started
    timings["bytes"] = final.stat().st_size
    return timings


def _create_token_views(con: duckdb.DuckDBPyConnection, manifest: RunManifest) -> None:
    """A text run's long token views, ``token_attributions_<method>``, over the ``tokens``
    and ``attributions_<method>`` views of ``con``'s first schema."""
    if manifest.tables.tokens and manifest.spec["storage"]["attributions"] != "summary":
        for method in manifest.model.attribution_shapes:
            con.execute(TOKEN_VIEW_SQL.format(view=token_attributions_view(method),
                                              attributions=attributions_view(method))).fetchall()


def _insert_features(con: duckdb.DuckDBPyConnection, manifest: RunManifest) -> None:
    """The ``features`` table: a tabular run's features in model order."""
    dataset = manifest.dataset
    if dataset.feature_columns:
        rows = [{"position": i, "feature": f.name, "kind": f.kind, "columns": list(f.columns),
                 "categories": f.categories}
                for i, f in enumerate(features_of(dataset.feature_columns, dataset.feature_groups))]
        con.from_arrow(pa.Table.from_pylist(rows, schema=pa.schema([
            ("position", pa.int32()), ("feature", pa.string()), ("kind", pa.string()),
            ("columns", pa.list_(pa.string())), ("categories", pa.list_(pa.string()))]))).insert_into("features")


def has_feature_values(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the run stores values per feature (a tabular run made since they exist: older
    ones have neither the ``features`` table nor the columns, and open without the views)."""
    return bool(con.execute(
        "SELECT count(*) FROM duckdb_columns() WHERE table_name = 'instances' AND column_name = 'feature_value'"
    ).fetchall()[0][0])


def _create_feature_views(con: duckdb.DuckDBPyConnection, manifest: RunManifest) -> None:
    """A tabular run's long feature views, ``feature_attributions_<method>``, over the
    ``attributions_<method>`` and ``instances`` views of ``con``'s first schema."""
    if (manifest.dataset.feature_columns and manifest.spec["storage"]["attributions"] != "summary"
            and has_feature_values(con)):
        for method in manifest.model.attribution_shapes:
            if not con.execute("SELECT count(*) FROM duckdb_columns() WHERE table_name = ? AND column_name = "
                               "'feature_attribution'", [attributions_view(method)]).fetchall()[0][0]:
                continue  # a layer method's map (grad_cam) has no value per feature
            con.execute(FEATURE_VIEW_SQL.format(view=feature_attributions_view(method),
                                                attributions=attributions_view(method))).fetchall()


def _relative_parts(layout: RunLayout, directory: Path) -> str:
    return f"{directory.relative_to(layout.root).as_posix()}/*.parquet"


def _copy_wide_layer(con, layout: RunLayout, layer: str) -> None:
    con.execute(f"CREATE TABLE {activations_view(layer)} AS SELECT * FROM read_parquet(?)",
                [_relative_parts(layout, layout.wide_activations_dir(layer))]).fetchall()


def _insert_statistics(con, statistics: StatisticsMerge) -> None:
    """``neuron_cells``, ``neuron_top``, ``attribution_cells`` and ``fidelity_summary``: the
    workers' per-part statistics, added up."""
    for name, table in statistics.tables().items():
        con.from_arrow(table).insert_into(name)


def _write_index(con, layout: RunLayout) -> None:
    """The activation index's ids and rows, and ``activation_index_parts``: where each part's
    rows begin when the parts are numbered in key order (the workers wrote the matrices)."""
    parts = str(layout.instances_dir / "*.parquet")
    con.execute("INSERT INTO activation_index_parts SELECT * FROM _index_parts(?)", [parts]).fetchall()
    rows = con.sql("SELECT * FROM _index_rows(?)", params=[parts]).to_arrow_table()
    write_id_index(layout, rows["instance_id"].combine_chunks(), rows["row"].combine_chunks())


def _build_projections(con, layout: RunLayout, tables: list[ProjectionTable], id_type: pa.DataType) -> None:
    """The native ``projections`` table (one row per instance and projected table) and
    ``projection_models``; empty for a run without projections."""
    schema = pa.schema([("kind", pa.string()), ("source", pa.string()), ("instance_id", id_type)]
                       + [(f"{a}_{axis}", pa.float32()) for a in PROJECTION_ALGORITHMS for axis in "xy"])
    con.from_arrow(schema.empty_table()).create("projections")
    con.execute("COMMENT ON TABLE projections IS 'One row per instance and projected table: kind (activations "
                "or attributions), source (the layer or method), 2-D coordinates pca_x/pca_y, and umap_x/umap_y "
                "when UMAP was fitted (else NULL). NaN for an instance whose vector was not finite.'").fetchall()
    for fitted in tables:
        parts = str(layout.projections_dir(fitted.kind, fitted.name) / "*.parquet")
        con.execute("INSERT INTO projections BY NAME SELECT ?::VARCHAR AS kind, ?::VARCHAR AS source, * "
                    "FROM read_parquet(?)", [fitted.kind, fitted.name, parts]).fetchall()
        con.execute("INSERT INTO projection_models VALUES (?, ?, ?, ?, ?, ?)",
                    [fitted.kind, fitted.name, fitted.algorithms, fitted.dimensions,
                     fitted.sample_rows, fitted.explained_variance_ratio]).fetchall()


# -- querying ------------------------------------------------------------------------------


def catalog_manifest(con: duckdb.DuckDBPyConnection) -> RunManifest:
    """The manifest of the run an :func:`open_catalog` connection is over (its ``run_metadata``)."""
    rows = con.execute("SELECT key, value FROM run_metadata").fetchall()
    return RunManifest.model_validate({key: json.loads(value) for key, value in rows})


def checked_layout(run_dir: str | os.PathLike) -> RunLayout:
    """The layout of the committed run at ``run_dir``, which has its catalog."""
    layout = RunLayout(Path(run_dir).resolve())
    if not layout.catalog_path.exists():
        layout.read_manifest()  # no run there at all: its own error
        raise RunError(
            f"run {layout.root} has no {layout.catalog_path.name} (it was made by an older netloupe); "
            f"build it with `netloupe catalog {layout.root}`"
        )
    return layout


def open_catalog(run_dir: str | os.PathLike, memory_mib: int | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only, sandboxed DuckDB connection over the committed run at ``run_dir``.

    Every view, table and operator of the run's ``catalog.duckdb`` is reachable by its
    plain name. Run analysts' SQL through :func:`run_query`. ``memory_mib`` bounds what the
    connection's DuckDB holds (else DuckDB's default, most of the machine's memory): each
    connection is a DuckDB of its own, which keeps what it read until that bound.
    """
    layout = checked_layout(run_dir)
    manifest = layout.read_manifest()
    con = duckdb.connect(":memory:")
    if memory_mib is not None:
        con.execute(f"SET memory_limit = '{int(memory_mib)}MiB'").fetchall()
    con.execute(f"ATTACH ? AS {ATTACHED} (READ_ONLY)", [str(layout.catalog_path)]).fetchall()
    # Names resolve here first (the views and macros below), then in the run's catalog.
    con.execute(f"SET search_path = 'memory.main,{ATTACHED}.main'").fetchall()
    # The catalog's Parquet views hold paths relative to the run; here they are made
    # absolute for where the run is now, which the sandbox below allows.
    for view, relative in con.execute(f"SELECT view, path FROM {ATTACHED}.main.parquet_views").fetchall():
        con.read_parquet(str(layout.root / relative)).create_view(view)
    metadata = [{"key": key, "value": json.dumps(value)} for key, value in sorted(manifest.model_dump(mode="json").items())]
    con.from_arrow(pa.Table.from_pylist(metadata, schema=pa.schema([("key", pa.string()), ("value", pa.string())]))
                   ).create_view("run_metadata")
    _create_token_views(con, manifest)  # over the views above, not the catalog's own
    _create_feature_views(con, manifest)
    # This netloupe's operators, found before the run's own: a run committed by an older one
    # keeps its catalog, and the dashboard reads columns that older operators lack. Then the
    # fast moments ahead of both. Each in a schema of its own, first on the path as it is
    # created (a name already on the path cannot be created again).
    for schema, statements in ((CURRENT_OPERATORS, lambda: [_run_statements(con, sql)
                                                            for sql in (BUILDING_BLOCKS_SQL, OPERATORS_SQL)]),
                               (FAST_OPERATORS, lambda: _register_fast_moments(con, layout, manifest.dataset.id_type))):
        path = con.execute("SELECT current_setting('search_path')").fetchall()[0][0]
        con.execute(f"CREATE SCHEMA {schema}").fetchall()
        con.execute(f"USE {schema}").fetchall()  # (resets the path)
        con.execute(f"SET search_path = '{schema},{path}'").fetchall()
        statements()
    input_dirs, input_files = _create_inputs_view(con, manifest.dataset)
    # No spill directory: DuckDB would add it to the allowed directories, writable.
    con.execute("SET temp_directory = ''").fetchall()
    con.execute("SET allowed_directories = ?", [[str(layout.root) + os.sep] + input_dirs]).fetchall()
    if input_files:
        con.execute("SET allowed_paths = ?", [input_files]).fetchall()
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions"):
        con.execute(f"SET {setting} = false").fetchall()  # constant names, no user input
    con.execute("SET lock_configuration = true").fetchall()
    return con


def write_point_columns_of(layout: RunLayout, directory: Path, class_names: list[str]) -> None:
    """Write the point columns of the committed run at ``layout``, whose catalog an older
    netloupe built without them, into ``directory`` (a local cache; the run is not written):
    over a connection of the driver's kind, bounded and spilling to disk (the columns are
    sorted by id: an analyst's sandbox, which cannot spill, runs out of memory at millions)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with driver_connection(DRIVER_SQL_MEMORY_MIB, directory.parent / f".spill-{uuid.uuid4().hex}") as con:
        con.execute(f"ATTACH ? AS {ATTACHED} (READ_ONLY)", [str(layout.catalog_path)]).fetchall()
        con.execute(f"USE {ATTACHED}").fetchall()
        write_point_columns(con, directory, class_names)


def _create_inputs_view(con: duckdb.DuckDBPyConnection, dataset: DatasetInfo) -> tuple[list[str], list[str]]:
    """The view ``inputs`` (``instance_id`` and the model's input column or feature columns)
    over the dataset the run was made from, when it is still where the run found it; returns
    the directories and files the sandbox must then allow (read only: nothing in the sandbox
    writes)."""
    path = Path(dataset.path or "")
    columns = ([dataset.input_column] if dataset.input_column else [dataset.text_column] if dataset.text_column
               else dataset.feature_columns)
    if not dataset.path or not dataset.id_column or not columns or not path.exists():
        return [], []
    pattern = str(path / "**" / "*.parquet") if path.is_dir() else str(path)
    relation = con.read_parquet(pattern)
    missing = [c for c in [dataset.id_column, *columns] if c not in relation.columns]
    if missing:
        return [], []  # the file there now is not the run's dataset
    quoted = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)
    id_column = '"' + dataset.id_column.replace('"', '""') + '"'
    relation.select(f"{id_column} AS instance_id, {quoted}").create_view("inputs")
    con.execute("COMMENT ON VIEW inputs IS 'The model input of every instance, from the dataset the run read'").fetchall()
    return ([str(path) + os.sep], []) if path.is_dir() else ([], [str(path)])


_MOMENTS_TYPE = "STRUCT(size BIGINT, total DOUBLE[], total_sq DOUBLE[], active BIGINT[])"
_MOMENTS_ARROW = pa.struct([("size", pa.int64()), ("total", pa.list_(pa.float64())),
                            ("total_sq", pa.list_(pa.float64())), ("active", pa.list_(pa.int64()))])


def _register_fast_moments(con: duckdb.DuckDBPyConnection, layout: RunLayout, id_type: str) -> None:
    """Serve ``_neuron_moments`` and ``_instance_activations`` from the run's activation index
    (see its module)."""
    whole = con.sql("SELECT layer, neuron, sum(total) AS total, sum(total_sq) AS total_sq, "
                    "sum(active)::BIGINT AS active FROM neuron_cells GROUP BY ALL ORDER BY layer, neuron"
                    ).to_arrow_table()
    layers = np.asarray(whole["layer"].to_pylist(), dtype=object)
    totals = {layer: {key: whole[key].to_numpy()[layers == layer] for key in ("total", "total_sq", "active")}
              for layer in dict.fromkeys(layers)}
    parts = con.execute("SELECT part, first_row FROM activation_index_parts ORDER BY first_row").fetchall()
    index = ActivationIndex(layout.root, totals, parts)

    def moments(layer_names: pa.Array, id_lists: pa.Array) -> pa.Array:
        rows = []
        for layer, ids in zip(layer_names.to_pylist(), id_lists):
            # Nulls dropped first: they would turn int64 ids into float64 (and match nothing).
            values = pc.drop_null(ids.values).to_numpy(zero_copy_only=False) if ids.is_valid else np.empty(0)
            size, total, total_sq, active = index.moments(layer, values)
            rows.append({"size": size, "total": total.tolist(), "total_sq": total_sq.tolist(), "active": active.tolist()})
        return pa.array(rows, type=_MOMENTS_ARROW)

    def activations(layer_names: pa.Array, instance_ids: pa.Array) -> pa.Array:
        vectors = []
        for layer, instance in zip(layer_names.to_pylist(), instance_ids.to_pylist()):
            vector = None if instance is None else index.vector(layer, instance)
            vectors.append(None if vector is None else vector.tolist())
        return pa.array(vectors, type=pa.list_(pa.float32()))

    id_sql = ID_SQL_TYPES[id_type]
    con.create_function("_neuron_moments_fast", moments, [con.type("VARCHAR"), con.type(f"{id_sql}[]")],
                        con.type(_MOMENTS_TYPE), type="arrow", side_effects=False)
    con.create_function("_instance_activations_fast", activations, [con.type("VARCHAR"), con.type(id_sql)],
                        con.type("FLOAT[]"), type="arrow", side_effects=False,
                        null_handling="special")  # NULL for an unknown instance
    _run_statements(con, FAST_SQL)


def _read_only_statements(sql: str) -> list:
    """The statements of ``sql``, each checked to be a SELECT or EXPLAIN (nothing runs)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryError(f"cannot parse the SQL: {error}") from None
    if not statements:
        raise QueryError("no SQL statement given")
    for statement in statements:
        if statement.type == duckdb.StatementType.EXPLAIN and _EXPLAIN_ANALYZE.match(statement.query):
            # EXPLAIN ANALYZE runs the statement it explains (a COPY would write files).
            raise QueryError("EXPLAIN ANALYZE is not allowed: it runs the statement; use EXPLAIN")
        if statement.type not in ALLOWED_STATEMENTS:
            raise QueryError(
                f"{statement.type.name} statements are not allowed: run catalogs are read-only "
                "(SELECT and EXPLAIN only). To export results use `netloupe sql --format "
                "csv|json|parquet`"
            )
    return statements


def run_query(con: duckdb.DuckDBPyConnection, sql: str, parameters: list | dict | None = None) -> pa.Table:
    """Run an analyst's SQL (one or more statements); return the last statement's result.

    Statements other than SELECT/EXPLAIN are refused before anything runs. ``parameters``
    bind ``?`` / ``$name`` placeholders of the last statement (values never go into SQL text).
    """
    statements = _read_only_statements(sql)
    try:
        for i, statement in enumerate(statements):
            last = i == len(statements) - 1
            # Fetched here so that errors raised while executing are reported like the rest.
            result = con.sql(statement.query, params=parameters if last else None).to_arrow_table()
    except duckdb.PermissionException as error:
        raise QueryError(f"refused: {error}. A run's SQL can read only that run's tables") from None
    except duckdb.Error as error:
        message = str(error)
        # An error of ours raised inside the fast path reaches here wrapped by DuckDB.
        _, udf, ours = message.partition("Python exception occurred while executing the UDF: ")
        raise QueryError(ours.split(": ", 1)[-1] if udf else f"{type(error).__name__}: {message}") from None
    return result


def query_relation(con: duckdb.DuckDBPyConnection, sql: str,
                   parameters: list | dict | None = None) -> duckdb.DuckDBPyRelation:
    """One analyst's SELECT as a DuckDB relation, to build on lazily (checked as
    :func:`run_query` checks; it runs when its rows are asked for)."""
    statements = _read_only_statements(sql)
    if len(statements) != 1:
        raise QueryError(f"a relation is one SELECT; got {len(statements)} statements")
    try:
        return con.sql(statements[0].query, params=parameters)
    except duckdb.Error as error:
        raise QueryError(f"{type(error).__name__}: {error}") from None


CATALOG_CONTENTS_SQL = f"""
SELECT 'view' AS kind, view_name AS name, comment FROM duckdb_views()
    WHERE NOT internal AND database_name IN ('memory', '{ATTACHED}') AND schema_name = 'main'
UNION
SELECT 'table', table_name, comment FROM duckdb_tables()
    WHERE database_name = '{ATTACHED}' AND schema_name = 'main' AND table_name <> 'parquet_views'
ORDER BY 1, 2
"""
"""What ``netloupe sql --list`` shows besides the operators."""

OPERATORS_LIST_SQL = f"""
SELECT function_name AS operator, parameters, comment
FROM duckdb_functions()
WHERE database_name = '{ATTACHED}' AND function_type = 'table_macro' AND NOT starts_with(function_name, '_')
ORDER BY 1
"""
