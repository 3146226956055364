"""The SQL face of a run: ``catalog.duckdb`` (built once, at commit) and the sandbox analysts query.

:func:`build_catalog` is the one place the run's tables become SQL. It writes
``<run>/catalog.duckdb`` holding:

* ``instances``: a native copy of the instances table (predicates join against it);
* ``activations_<layer>``: a native *wide* table per layer, ``instance_id, n0 .. n<d-1>``,
  one FLOAT column per neuron, stored uncompressed. Measured (``benchmarks/bench_sql.py``):
  a subset's mean over every neuron scans this in a third of the time the same query takes
  over DuckDB's compressed columns, and many times faster than the Parquet vectors.
* ``projections``: every instance's 2-D coordinates per projected table (``kind``,
  ``source``, ``pca_x``, ``pca_y``, ``umap_x``, ``umap_y``), and ``projection_models``;
* ``neuron_cells`` / ``attribution_cells``: sums per (label, prediction) cell, so class
  subsets (ActiVis' default rows) and per-class attribution maps need no scan at all;
* views over the Parquet parts that stay Parquet (``attributions_<method>``,
  ``activation_vectors_<layer>``), by paths relative to the run, so a moved or copied run
  keeps working; ``layers``, ``methods``, ``neurons``, ``parquet_views``;
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
import pyarrow.parquet as pq

from netloupe.contract.errors import NetloupeError, RunError
from netloupe.contract.names import PROJECTION_ALGORITHMS
from netloupe.contract.spec import DRIVER_SQL_MEMORY_MIB
from netloupe.storage.activation_index import WIDE_NEURON_LIMIT, ActivationIndex, write_activation_index
from netloupe.storage.layout import RunLayout
from netloupe.storage.manifest import DatasetInfo, ProjectionTable, RunManifest
from netloupe.storage.schema import ID_TYPES, vectors_to_numpy


class QueryError(NetloupeError):
    """A user's SQL was refused or failed."""


ALLOWED_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
"""Statement kinds an analyst may run (SELECT covers DESCRIBE, SHOW and SUMMARIZE; EXPLAIN
without ANALYZE, which would run what it explains)."""
_EXPLAIN_ANALYZE = re.compile(r"^\s*EXPLAIN\s+(\(.*?\)\s*)?ANALY[SZ]E\b", re.IGNORECASE | re.DOTALL)

SQL_DIR = Path(__file__).with_name("sql")
OPERATORS_SQL = SQL_DIR / "operators.sql"
"""The explanation operators (table macros); SQL lives in these files, not in Python."""
TABLES_SQL = SQL_DIR / "tables.sql"
"""The statistics tables the operators read."""
BUILD_SQL = SQL_DIR / "build.sql"
"""Build-time helpers and the views over the statistics tables."""
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


def fidelity_view(method: str) -> str:
    return f"fidelity_{sql_identifier(method)}"


def _run_statements(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    for statement in duckdb.extract_statements(path.read_text()):
        con.execute(statement.query).fetchall()


def _parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


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


def build_catalog(layout: RunLayout, manifest: RunManifest, memory_mib: int = DRIVER_SQL_MEMORY_MIB) -> dict:
    """Write ``catalog.duckdb`` for the run at ``layout`` (atomically); return timings.

    Called by the driver on the staged run before its commit, so a committed run always
    has its catalog; ``netloupe catalog RUN`` rebuilds it.
    """
    started = time.perf_counter()
    # Absolute: with file_search_path set, DuckDB resolves relative paths against it only.
    layout = RunLayout(layout.root.resolve())
    final = layout.catalog_path
    tmp = layout.root / f".{final.name}.{uuid.uuid4().hex}.tmp"
    model = manifest.model
    id_type = ID_TYPES[manifest.dataset.id_type]
    timings = {}
    try:
        with driver_connection(memory_mib, layout.root / ".duckdb-spill") as con:
            # An older storage format than this DuckDB's own, so that the duckdb CLIs users
            # already have can open the catalog (DuckDB 2.0 writes files 1.x cannot read).
            con.execute(f"ATTACH ? AS {BUILDING} (STORAGE_VERSION '{CATALOG_STORAGE_VERSION}')", [str(tmp)]).fetchall()
            con.execute(f"USE {BUILDING}").fetchall()  # everything below lands in the file, unqualified
            # Relative paths in views are resolved against this, and stored relative.
            con.execute("SET file_search_path = ?", [str(layout.root)]).fetchall()
            # Uncompressed floats scan about twice as fast as DuckDB's compressed ones for
            # whole-layer aggregates (benchmarks/RESULTS.md); activations dominate the file.
            con.execute("PRAGMA force_compression = 'uncompressed'").fetchall()
            con.read_parquet(str(layout.instances_dir / "*.parquet")).create("instances")
            for sql in (TABLES_SQL, OPERATORS_SQL, BUILD_SQL):
                _run_statements(con, sql)
            parquet_views, layers, methods = [], [], []
            for layer, neurons in model.layer_neurons.items():
                layer_started = time.perf_counter()
                relative = f"{layout.activations_dir(layer).relative_to(layout.root)}/*.parquet"
                parquet_views.append((activation_vectors_view(layer), relative))
                wide = neurons <= WIDE_NEURON_LIMIT
                if wide:
                    _build_wide_layer(con, layout, layer, neurons, id_type)
                    con.execute("INSERT INTO neuron_cells SELECT * FROM _neuron_cells_of(?)", [layer]).fetchall()
                layers.append({"layer": layer, "view": activations_view(layer) if wide else None,
                               "vectors_view": activation_vectors_view(layer), "neurons": neurons,
                               "output_shape": json.dumps(model.layer_output_shapes.get(layer))})
                timings[f"layer {layer}"] = time.perf_counter() - layer_started
            index_started = time.perf_counter()
            wide_layers = {row["layer"]: _parts(layout.activations_dir(row["layer"])) for row in layers if row["view"]}
            write_activation_index(layout.root, wide_layers,
                                   con.sql("SELECT instance_id FROM instances").to_arrow_table()["instance_id"])
            timings["activation index"] = time.perf_counter() - index_started
            projection_started = time.perf_counter()
            _build_projections(con, layout, manifest.projections.tables, id_type)
            timings["projections"] = time.perf_counter() - projection_started
            instance_keys = _instance_keys(con) if any(model.attribution_shapes.values()) else None
            for method, shape in model.attribution_shapes.items():
                method_started = time.perf_counter()
                relative = f"{layout.attributions_dir(method).relative_to(layout.root)}/*.parquet"
                parquet_views.append((attributions_view(method), relative))
                if shape is not None:
                    cells = _attribution_cells(layout, method, instance_keys)
                    con.from_arrow(cells).insert_into("attribution_cells")
                methods.append({"method": method, "view": attributions_view(method), "stored_shape": json.dumps(shape)})
                timings[f"method {method}"] = time.perf_counter() - method_started
            for method in manifest.tables.fidelity:
                parquet_views.append((fidelity_view(method),
                                      f"{layout.fidelity_dir(method).relative_to(layout.root)}/*.parquet"))
            summary_started = time.perf_counter()
            _build_fidelity_summary(con, layout, list(model.attribution_shapes), manifest.fidelity.curve_steps,
                                    manifest.tables.fidelity)
            timings["fidelity summary"] = time.perf_counter() - summary_started
            for view, relative in parquet_views:
                con.read_parquet(relative).create_view(view)
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


def _build_wide_layer(con, layout: RunLayout, layer: str, neurons: int, id_type: pa.DataType) -> None:
    """One FLOAT column per neuron, filled part by part (memory stays one part's worth)."""
    schema = pa.schema([pa.field("instance_id", id_type)] + [pa.field(f"n{j}", pa.float32()) for j in range(neurons)])
    name = activations_view(layer)
    con.from_arrow(schema.empty_table()).create(name)
    for part in _parts(layout.activations_dir(layer)):
        table = pq.read_table(part)
        # Transposed once so that every neuron's column is contiguous (no per-column copy).
        columns = np.ascontiguousarray(vectors_to_numpy(table["activation"]).T)
        wide = pa.Table.from_arrays([table["instance_id"].combine_chunks()] + [pa.array(c) for c in columns],
                                    schema=schema)
        con.from_arrow(wide).insert_into(name)


_FIDELITY_SUMMARY_SQL = """
SELECT ?::VARCHAR AS method, count(*) AS instances,
       avg(abs(convergence_delta)) AS mean_abs_convergence_delta,
       max(abs(convergence_delta)) AS max_abs_convergence_delta,
       {curves}
FROM read_parquet(?) WHERE target_rank = 0
"""
_SAMPLED_SQL = """
SELECT count(*) AS sampled, avg(infidelity) AS mean_infidelity, avg(sensitivity_max) AS mean_sensitivity_max,
       avg(randomization_spearman) AS mean_randomization_spearman,
       avg(randomization_spearman_abs) AS mean_randomization_spearman_abs
FROM read_parquet(?)
"""


def _one_row(con, sql: str, parameters: list) -> dict:
    cursor = con.execute(sql, parameters)
    names = [column[0] for column in cursor.description]
    (row,) = cursor.fetchall()  # fetched to the end: DuckDB 2 refuses other work until then
    return dict(zip(names, row))


def _build_fidelity_summary(con, layout: RunLayout, methods: list[str], curves: int, sampled: dict) -> None:
    """``fidelity_summary``: one row per method, its fidelity checks averaged over the run
    (``curves``: the curves' steps, 0 when none; ``sampled``: the methods with sampled checks)."""
    curve_sql = ("avg(deletion_auc) AS mean_deletion_auc, avg(insertion_auc) AS mean_insertion_auc" if curves else
                 "NULL::DOUBLE AS mean_deletion_auc, NULL::DOUBLE AS mean_insertion_auc")
    rows = []
    for method in methods:
        row = _one_row(con, _FIDELITY_SUMMARY_SQL.format(curves=curve_sql),
                       [method, str(layout.attributions_dir(method) / "*.parquet")])
        if method in sampled:
            row.update(_one_row(con, _SAMPLED_SQL, [str(layout.fidelity_dir(method) / "*.parquet")]))
        rows.append(row)
    schema = pa.schema([("method", pa.string()), ("instances", pa.int64())]
                       + [(name, pa.float64()) for name in ("mean_abs_convergence_delta", "max_abs_convergence_delta",
                                                            "mean_deletion_auc", "mean_insertion_auc")]
                       + [("sampled", pa.int64())]
                       + [(name, pa.float64()) for name in ("mean_infidelity", "mean_sensitivity_max",
                                                            "mean_randomization_spearman",
                                                            "mean_randomization_spearman_abs")])
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    con.from_arrow(pa.table(columns, schema=schema)).create("fidelity_summary")
    con.execute("COMMENT ON TABLE fidelity_summary IS 'Per method, how faithful its explanations are: Integrated "
                "Gradients/DeepLift convergence delta, mean deletion AUC (lower is better) and insertion AUC "
                "(higher is better) over every instance; on the sampled instances (fidelity_<method> views) mean "
                "infidelity and sensitivity-max (lower is better) and the rank correlation of each map with the map "
                "of a randomly re-initialised model (near 0 passes the model-randomization check)'").fetchall()


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


ATTRIBUTION_CELLS_SCHEMA = pa.schema([
    ("method", pa.string()), ("target_rank", pa.int16()), ("label", pa.int64()), ("prediction", pa.int64()),
    ("position", pa.int32()), ("size", pa.int64()), ("total", pa.float64()), ("total_abs", pa.float64()),
])


def _instance_keys(con) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids sorted, and beside them ``(label is null, label, prediction)`` rows.

    24 bytes an instance: what grouping attribution maps needs, without a join.
    """
    table = con.sql("SELECT instance_id, label IS NULL, coalesce(label, 0), prediction FROM instances "
                    "ORDER BY instance_id").to_arrow_table()
    ids = table.column(0).to_numpy()
    if ids.dtype == object:
        ids = ids.astype(str)
    keys = np.stack([table.column(i).to_numpy().astype(np.int64) for i in (1, 2, 3)], axis=1)
    return ids, keys


def _attribution_cells(layout: RunLayout, method: str, instance_keys: tuple[np.ndarray, np.ndarray]) -> pa.Table:
    """Sums of each stored map position per (target rank, label, prediction), part by part.

    DuckDB has no element-wise aggregate over arrays (and unnesting a million maps costs
    minutes), so the sums are accumulated here. Each part's rows find their instance's
    label and prediction by binary search in the sorted ids: DuckDB's streaming join of the
    maps with the instances held 300 MB at 200k instances, a join per part rebuilt its hash
    table each time (0.2 s per part at 1M).
    """
    sorted_ids, instance_rows = instance_keys
    totals: dict[tuple, list] = {}
    for part in _parts(layout.attributions_dir(method)):
        table = pq.read_table(part, columns=["instance_id", "target_rank", "attribution"])
        if table.num_rows == 0:
            continue
        maps = vectors_to_numpy(table["attribution"]).astype(np.float64)
        ids = table["instance_id"].to_numpy()
        positions = np.searchsorted(sorted_ids, ids.astype(str) if sorted_ids.dtype.kind == "U" else ids)
        keys = np.column_stack([table["target_rank"].to_numpy().astype(np.int64), instance_rows[positions]])
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        starts = np.searchsorted(inverse[order], np.arange(len(unique)))
        sums = np.add.reduceat(maps[order], starts, axis=0)
        abs_sums = np.add.reduceat(np.abs(maps[order]), starts, axis=0)
        counts = np.diff(np.append(starts, len(order)))
        for i, (rank, label_is_null, label, prediction) in enumerate(unique.tolist()):
            key = (rank, None if label_is_null else label, prediction)
            if key not in totals:
                totals[key] = [0, np.zeros(maps.shape[1]), np.zeros(maps.shape[1])]
            entry = totals[key]
            entry[0] += int(counts[i])
            entry[1] += sums[i]
            entry[2] += abs_sums[i]
    columns = {name: [] for name in ATTRIBUTION_CELLS_SCHEMA.names}
    for (rank, label, prediction), (size, total, total_abs) in totals.items():
        width = len(total)
        columns["method"] += [method] * width
        columns["target_rank"] += [rank] * width
        columns["label"] += [label] * width
        columns["prediction"] += [prediction] * width
        columns["position"] += list(range(width))
        columns["size"] += [size] * width
        columns["total"] += total.tolist()
        columns["total_abs"] += total_abs.tolist()
    return pa.table(columns, schema=ATTRIBUTION_CELLS_SCHEMA)


# -- querying ------------------------------------------------------------------------------


def catalog_manifest(con: duckdb.DuckDBPyConnection) -> RunManifest:
    """The manifest of the run an :func:`open_catalog` connection is over (its ``run_metadata``)."""
    rows = con.execute("SELECT key, value FROM run_metadata").fetchall()
    return RunManifest.model_validate({key: json.loads(value) for key, value in rows})


def open_catalog(run_dir: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """A read-only, sandboxed DuckDB connection over the committed run at ``run_dir``.

    Every view, table and operator of the run's ``catalog.duckdb`` is reachable by its
    plain name. Run analysts' SQL through :func:`run_query`.
    """
    layout = RunLayout(Path(run_dir).resolve())
    manifest = layout.read_manifest()
    if not layout.catalog_path.exists():
        raise RunError(
            f"run {layout.root} has no {layout.catalog_path.name} (it was made by an older netloupe); "
            f"build it with `netloupe catalog {layout.root}`"
        )
    con = duckdb.connect(":memory:")
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
    _register_fast_moments(con, layout, manifest.dataset.id_type)
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


def _create_inputs_view(con: duckdb.DuckDBPyConnection, dataset: DatasetInfo) -> tuple[list[str], list[str]]:
    """The view ``inputs`` (``instance_id`` and the model's input column or feature columns)
    over the dataset the run was made from, when it is still where the run found it; returns
    the directories and files the sandbox must then allow (read only: nothing in the sandbox
    writes)."""
    path = Path(dataset.path or "")
    columns = [dataset.input_column] if dataset.input_column else dataset.feature_columns
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
    """Serve ``_neuron_moments`` from the run's activation index (see its module)."""
    whole = con.sql("SELECT layer, neuron, sum(total) AS total, sum(total_sq) AS total_sq, "
                    "sum(active)::BIGINT AS active FROM neuron_cells GROUP BY ALL ORDER BY layer, neuron"
                    ).to_arrow_table()
    layers = np.asarray(whole["layer"].to_pylist(), dtype=object)
    totals = {layer: {key: whole[key].to_numpy()[layers == layer] for key in ("total", "total_sq", "active")}
              for layer in dict.fromkeys(layers)}
    index = ActivationIndex(layout.root, totals)

    def moments(layer_names: pa.Array, id_lists: pa.Array) -> pa.Array:
        rows = []
        for layer, ids in zip(layer_names.to_pylist(), id_lists):
            # Nulls dropped first: they would turn int64 ids into float64 (and match nothing).
            values = pc.drop_null(ids.values).to_numpy(zero_copy_only=False) if ids.is_valid else np.empty(0)
            size, total, total_sq, active = index.moments(layer, values)
            rows.append({"size": size, "total": total.tolist(), "total_sq": total_sq.tolist(), "active": active.tolist()})
        return pa.array(rows, type=_MOMENTS_ARROW)

    id_sql = "BIGINT" if id_type == "int64" else "VARCHAR"
    con.create_function("_neuron_moments_fast", moments, [con.type("VARCHAR"), con.type(f"{id_sql}[]")],
                        con.type(_MOMENTS_TYPE), type="arrow", side_effects=False)
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
