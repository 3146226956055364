"""The SQL face of a run: DuckDB views over its Parquet parts, read-only and sandboxed.

:func:`open_catalog` is the one place views are made. Paths are taken from where the run
is now, so a moved or copied run still queries. An analyst's connection can read the run
and nothing else: only SELECT/EXPLAIN statements run, file access outside the run is off,
extensions cannot be installed or loaded, no database can be attached, and the settings
are locked so a query cannot undo any of it.

View names: ``instances``; ``activations_<layer>`` and ``attributions_<method>`` with
non-identifier characters of the name as ``_`` (``features.3`` → ``activations_features_3``);
``layers``, ``methods`` and ``run_metadata`` describe the run. Operators (table macros
from ``storage/sql/operators.sql``): ``confusion_matrix()``, ``class_metrics()``,
``subset_summary(predicate)``, ``subgroup_metrics(columns, positive)``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.errors import NetloupeError
from storage.layout import RunLayout


class QueryError(NetloupeError):
    """A user's SQL was refused or failed."""


ALLOWED_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
"""Statement kinds an analyst may run (SELECT covers DESCRIBE, SHOW and SUMMARIZE)."""


def sql_identifier(name: str) -> str:
    """A layer or method name as part of a view name."""
    return re.sub(r"\W", "_", name)


def _parquet(con: duckdb.DuckDBPyConnection, directory: Path) -> duckdb.DuckDBPyRelation:
    return con.read_parquet(str(directory / "*.parquet"))


OPERATORS_SQL = Path(__file__).with_name("sql") / "operators.sql"
"""The explanation operators (table macros); SQL lives in this file, not in Python."""


def _load_operators(con: duckdb.DuckDBPyConnection) -> None:
    for statement in duckdb.extract_statements(OPERATORS_SQL.read_text()):
        con.execute(statement.query).fetchall()


def open_catalog(run_dir: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view for every table of the committed run at ``run_dir``.

    The connection is in memory (nothing is written anywhere) and locked down as the
    module docstring says; run analysts' SQL through :func:`run_query`.
    """
    layout = RunLayout(Path(run_dir).resolve())
    manifest = layout.read_manifest()
    con = duckdb.connect(":memory:")
    con.execute("SET allowed_directories = ?", [[str(layout.root) + os.sep]]).fetchall()
    _parquet(con, layout.instances_dir).create_view("instances")
    layers, methods = [], []
    model = manifest["model"]
    for layer, neurons in model["layer_neurons"].items():
        view = f"activations_{sql_identifier(layer)}"
        _parquet(con, layout.activations_dir(layer)).create_view(view)
        layers.append({"layer": layer, "view": view, "neurons": neurons,
                       "output_shape": json.dumps(model["layer_output_shapes"].get(layer))})
    for method, shape in model["attribution_shapes"].items():
        view = f"attributions_{sql_identifier(method)}"
        _parquet(con, layout.attributions_dir(method)).create_view(view)
        methods.append({"method": method, "view": view, "stored_shape": json.dumps(shape)})
    con.from_arrow(pa.Table.from_pylist(layers, schema=pa.schema(
        [("layer", pa.string()), ("view", pa.string()), ("neurons", pa.int64()), ("output_shape", pa.string())]
    ))).create_view("layers")
    con.from_arrow(pa.Table.from_pylist(methods, schema=pa.schema(
        [("method", pa.string()), ("view", pa.string()), ("stored_shape", pa.string())]
    ))).create_view("methods")
    _load_operators(con)
    metadata = [{"key": key, "value": json.dumps(value, default=str)} for key, value in sorted(manifest.items())]
    con.from_arrow(pa.Table.from_pylist(metadata)).create_view("run_metadata")
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions"):
        con.execute(f"SET {setting} = false").fetchall()  # constant names, no user input
    con.execute("SET lock_configuration = true").fetchall()
    return con


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run an analyst's SQL (one or more statements); return the last statement's result.

    Statements other than SELECT/EXPLAIN are refused before anything runs.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryError(f"cannot parse the SQL: {error}") from None
    if not statements:
        raise QueryError("no SQL statement given")
    for statement in statements:
        if statement.type not in ALLOWED_STATEMENTS:
            raise QueryError(
                f"{statement.type.name} statements are not allowed: run catalogs are read-only "
                "(SELECT and EXPLAIN only). To export results use `netloupe sql --format "
                "csv|json|parquet`"
            )
    try:
        for statement in statements:
            # Fetched here so that errors raised while executing are reported like the rest.
            result = con.sql(statement.query).to_arrow_table()
    except duckdb.PermissionException as error:
        raise QueryError(f"refused: {error}. A run's SQL can read only that run's tables") from None
    except duckdb.Error as error:
        raise QueryError(f"{type(error).__name__}: {error}") from None
    return result
