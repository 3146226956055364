"""The instance view's points as memory-mapped columns (``points/``): what the dashboard's
scatter draws, written at the catalog build so that a server maps them instead of holding them.

A dashboard serving ten million points read them through DuckDB into pandas: 4.5 GiB resident,
most of it the metadata's Python strings. Here every column is a ``.npy`` file the server maps
(:func:`numpy.load` with ``mmap_mode``): the operating system pages in what a render touches
and may drop it again, and every session of every process shares the same pages.

::

    points/
      points.json                 what follows: rows, each column's file, kind and categories
      instance_id.npy             (int64 ids; a run of text ids has instance_id.arrow instead)
      column-<i>.npy              one per instance column, in instance_id order
      projection-<i>-x.npy, -y.npy  one pair per projected table and algorithm, the same order;
                                  NaN for an instance whose vector was not finite

Columns are numbers as DuckDB holds them (an integer or boolean column with nulls becomes
``float64`` with NaN, as pandas reads it), or, for text and the class names, integer codes
into ``categories`` (-1 for null; of the width pandas keeps them in): pandas categoricals over the mapped codes. Rows are in
``instance_id`` order, the same for every projection, so a frame of any projection is the
mapped columns side by side, copied nowhere.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

POINTS_FORMAT = 1
"""Version of ``points.json``'s layout; a reader refuses (and a rebuild replaces) any other."""
POINTS_FILE = "points.json"
BATCH_ROWS = 1 << 20
"""Rows read from DuckDB and written per step: the build's memory stays a few such batches."""
CATEGORY_LIMIT = 1000
"""Most values of a text column the scatter can be coloured by: one colour each, and a count
per pixel and value (a free-text column of a million values would be a million counts per
pixel). A column of more is left out of the points."""
DERIVED = ("label_name", "prediction_name", "outcome")
"""Columns made here from netloupe's own (class names, and whether the prediction was right)."""
FRAME_NAMES = ("x", "y", *DERIVED)
"""Names the frame gives its own columns: a metadata column of one of them is left out (it
would hide the coordinates, or be hidden)."""
OUTCOMES = ("correct", "incorrect", "unlabeled")
EXCLUDED = ("instance_id", "probabilities", "node_id", "device", "feature_value", "correct", "input_finite")
"""Instance columns the scatter never shows: vectors (a million arrays), where a row was
computed, and the flags ``outcome`` already says."""


@dataclass(frozen=True)
class PointColumns:
    """A run's mapped point columns (:func:`read_point_columns`)."""

    ids: pd.api.extensions.ExtensionArray | np.ndarray
    """The instance ids, in the order of every column."""
    columns: dict[str, np.ndarray | pd.Categorical]
    """Every instance column by name (but a text column of over :data:`CATEGORY_LIMIT` values),
    ``DERIVED`` included."""
    projections: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]
    """``(kind, source, algorithm)`` → the mapped ``x`` and ``y``."""

    def frame(self, kind: str, source: str, algorithm: str) -> pd.DataFrame:
        """``instance_id, x, y`` and every column, sharing the mapped files' memory."""
        x, y = self.projections[(kind, source, algorithm)]
        return pd.DataFrame({"instance_id": self.ids, "x": x, "y": y, **self.columns}, copy=False)


def write_point_columns(con: duckdb.DuckDBPyConnection, directory: Path, class_names: list[str]) -> None:
    """Write the point columns into ``directory`` (a run's ``RunLayout.points_dir``), replacing
    any there at once, from a catalog: ``con`` reaches its ``instances``, ``projections`` and
    ``projection_models``."""
    final = Path(directory)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        description = _write(con, tmp, class_names)
        (tmp / POINTS_FILE).write_text(json.dumps(description, indent=1))
        if final.exists():  # a catalog rebuilt: the old columns go once the new ones are whole
            trash = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / POINTS_FILE).exists():
                    raise
                shutil.rmtree(tmp)  # another process wrote the same columns meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_point_columns(directory: Path) -> PointColumns | None:
    """The point columns mapped from ``directory``; None when there are none (a run whose
    catalog an older netloupe built: ``netloupe catalog RUN`` rebuilds it with them)."""
    directory = Path(directory)
    try:
        description = json.loads((directory / POINTS_FILE).read_text())
    except FileNotFoundError:
        return None
    if description.get("format") != POINTS_FORMAT:
        return None

    def mapped(name: str) -> np.ndarray:
        return np.load(directory / name, mmap_mode="r")

    if description["ids"].endswith(".arrow"):
        # Text ids stay in the mapped Arrow file: pandas' Arrow-backed strings wrap it as it is.
        with pa.memory_map(str(directory / description["ids"])) as source:
            ids = pa.ipc.open_file(source).read_all()["instance_id"]
        ids = pd.arrays.ArrowStringArray(ids)
    else:
        ids = mapped(description["ids"])
    columns = {}
    for column in description["columns"]:
        values = mapped(column["file"])
        if column["categories"] is not None:
            values = pd.Categorical.from_codes(values, categories=column["categories"], validate=False)
        columns[column["name"]] = values
    projections = {(p["kind"], p["source"], p["algorithm"]): (mapped(p["x"]), mapped(p["y"]))
                   for p in description["projections"]}
    return PointColumns(ids, columns, projections)


# -- writing --------------------------------------------------------------------------------


def _write(con: duckdb.DuckDBPyConnection, directory: Path, class_names: list[str]) -> dict:
    rows = con.execute("SELECT count(*) FROM instances").fetchall()[0][0]
    schema = con.sql("SELECT * FROM instances LIMIT 0").to_arrow_table().schema
    columns = _instance_columns(con, schema, class_names)
    text_ids = pa.types.is_string(schema.field("instance_id").type)
    ids_file = "instance_id.arrow" if text_ids else "instance_id.npy"
    expressions = ["instance_id"] + [c["expression"] for c in columns]
    reader = con.sql(f"SELECT {', '.join(expressions)} FROM instances ORDER BY instance_id").to_arrow_reader(BATCH_ROWS)
    arrays = [np.lib.format.open_memmap(directory / c["file"], "w+", np.dtype(c["dtype"]), (rows,)) for c in columns]
    id_array = None if text_ids else np.lib.format.open_memmap(directory / ids_file, "w+", np.int64, (rows,))
    id_writer = pa.ipc.new_file(str(directory / ids_file), pa.schema([("instance_id", pa.string())])) \
        if text_ids else None
    start = 0
    for batch in reader:
        end = start + batch.num_rows
        if text_ids:
            id_writer.write_batch(pa.record_batch([batch.column(0)], names=["instance_id"]))
        else:
            id_array[start:end] = batch.column(0).to_numpy()
        for index, column in enumerate(columns, start=1):
            arrays[index - 1][start:end] = _as_numbers(batch.column(index), column)
        start = end
    if id_writer is not None:
        id_writer.close()
    for array in arrays + ([] if id_array is None else [id_array]):
        array.flush()
    return {"format": POINTS_FORMAT, "rows": rows, "ids": ids_file,
            "columns": [{k: c[k] for k in ("name", "file", "dtype", "categories")} for c in columns],
            "projections": _write_projections(con, directory, rows)}


def _instance_columns(con, schema: pa.Schema, class_names: list[str]) -> list[dict]:
    """What to write of each instance column: its SQL, the file's dtype, its categories."""
    classes = len(class_names)
    columns = []
    for field in schema:
        if field.name in EXCLUDED or field.name in FRAME_NAMES:
            continue
        quoted = '"' + field.name.replace('"', '""') + '"'
        nulls = con.execute(f"SELECT count(*) - count({quoted}) FROM instances").fetchall()[0][0]
        kind = field.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            dtype = "float64" if nulls and not pa.types.is_floating(kind) else kind.to_pandas_dtype().__name__
            expression, categories = quoted, None
        else:  # text, and anything else as its text: one colour per value
            expression = f"{quoted}::VARCHAR"
            found = con.execute(f"SELECT DISTINCT {expression} AS v FROM instances WHERE v IS NOT NULL ORDER BY v "
                                f"LIMIT {CATEGORY_LIMIT + 1}")
            categories = [row[0] for row in found.fetchall()]
            if len(categories) > CATEGORY_LIMIT:
                continue
            dtype = _codes_dtype(categories)
        columns.append({"name": field.name, "expression": expression, "dtype": dtype, "categories": categories})
    for name, source in (("label_name", "label"), ("prediction_name", "prediction")):
        columns.append({"name": name, "dtype": _codes_dtype(class_names), "categories": list(class_names),
                        "class_codes": True,
                        "expression": f"CASE WHEN {source} BETWEEN 0 AND {classes - 1} THEN {source} ELSE -1 END"})
    present = [o for o, in con.execute(
        "SELECT DISTINCT CASE WHEN correct IS NULL THEN 'unlabeled' WHEN correct THEN 'correct' ELSE 'incorrect' END "
        "FROM instances").fetchall()]
    columns.append({"name": "outcome", "dtype": "int8", "categories": [o for o in OUTCOMES if o in present],
                    "expression": "CASE WHEN correct IS NULL THEN 'unlabeled' WHEN correct THEN 'correct' "
                                  "ELSE 'incorrect' END"})
    for index, column in enumerate(columns):
        column["file"] = f"column-{index}.npy"
    return columns


def _codes_dtype(categories: list) -> str:
    """The integer type pandas keeps a categorical's codes in for this many categories: codes
    of any other type it would convert, a copy of the whole column."""
    return next(t for t in ("int8", "int16", "int32", "int64") if len(categories) < np.iinfo(t).max)


def _as_numbers(values: pa.Array, column: dict) -> np.ndarray:
    """One batch of a column as its file holds it: the values, or codes into its categories."""
    if column["categories"] is None:
        if values.null_count:
            values = pc.cast(values, pa.float64())  # nulls become NaN below
        return values.to_numpy(zero_copy_only=False)
    if column.get("class_codes"):
        return values.to_numpy(zero_copy_only=False)
    codes = pc.index_in(values, value_set=pa.array(column["categories"], pa.string()))
    return pc.fill_null(codes, -1).to_numpy(zero_copy_only=False)


def _write_projections(con, directory: Path, rows: int) -> list[dict]:
    """Each projected table's coordinates per fitted algorithm, in ``instance_id`` order."""
    written = []
    fitted = con.execute("SELECT kind, source, algorithms FROM projection_models ORDER BY kind, source").fetchall()
    for kind, source, algorithms in fitted:
        # Column names from projection_models, which the build wrote from a fixed list.
        axes = ", ".join(f"p.{a}_{axis}" for a in algorithms for axis in "xy")
        reader = con.sql(f"""
            SELECT {axes} FROM instances i LEFT JOIN projections p
              ON p.instance_id = i.instance_id AND p.kind = ? AND p.source = ?
            ORDER BY i.instance_id""", params=[kind, source]).to_arrow_reader(BATCH_ROWS)
        files = []
        for algorithm in algorithms:
            index = len(written)
            entry = {"kind": kind, "source": source, "algorithm": algorithm,
                     "x": f"projection-{index}-x.npy", "y": f"projection-{index}-y.npy"}
            written.append(entry)
            files += [np.lib.format.open_memmap(directory / entry[axis], "w+", np.float32, (rows,)) for axis in "xy"]
        start = 0
        for batch in reader:
            end = start + batch.num_rows
            for array, values in zip(files, batch.columns):
                # Not fitted for this instance (NULL) or not finite (or beyond float32): NaN,
                # which no view draws.
                coordinates = pc.cast(values, pa.float32(), safe=False).to_numpy(zero_copy_only=False)
                array[start:end] = np.where(np.isfinite(coordinates), coordinates, np.float32(np.nan))
            start = end
        for array in files:
            array.flush()
    return written
