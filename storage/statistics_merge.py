"""The workers' per-part statistics added up into the catalog's tables, as the parts arrive.

Every statistics table the workers write (:mod:`netloupe.storage.part_statistics`) is a
mergeable reduction, and so is any sum of its parts: :class:`StatisticsMerge` keeps the
running totals of the parts added so far, in the parts' own schema, and adds newly arrived
parts to them. The driver adds each batch's part while the explain pass runs (on a thread,
as the reports come in), so that at the end of the pass only the last few parts are left to
add: the run's tail no longer grows with its parts. ``netloupe catalog RUN`` adds every part
at once through the same code.

Sizes, sums, counts and the top lists add up in DuckDB (``storage/sql/merge.sql``); the
attribution cells' lists of per-position sums in numpy (DuckDB has no element-wise sum of
lists, and unnesting every part's lists costs 10x more).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from netloupe.contract.spec import DRIVER_SQL_MEMORY_MIB
from netloupe.storage.layout import RunLayout, key_of_part, part_name
from netloupe.storage.part_statistics import (
    ATTRIBUTION_CELLS_SCHEMA,
    METHOD_SUMMARY_SCHEMA,
    NEURON_CELLS_SCHEMA,
    NEURON_TOP_KEPT,
    TOKEN_CELLS_SCHEMA,
    neuron_top_schema,
)
from netloupe.storage.schema import ATTRIBUTION_CELLS, METHOD_SUMMARY, NEURON_CELLS, NEURON_TOP, TOKEN_CELLS

MERGE_SQL = Path(__file__).parent / "sql" / "merge.sql"
PARTS_AT_ONCE = 64
"""Most parts read into memory before they are added to the totals."""
ADD_EVERY_PARTS = 16
"""Parts :meth:`StatisticsMerge.add_soon` gathers before adding them on its thread: each add
also re-reduces the totals (small, but not free)."""

ATTRIBUTION_CELLS_LONG_SCHEMA = pa.schema([
    ("method", pa.string()), ("target_rank", pa.int16()), ("label", pa.int64()), ("prediction", pa.int64()),
    ("position", pa.int32()), ("size", pa.int64()), ("total", pa.float64()), ("total_abs", pa.float64()),
])
"""The catalog's ``attribution_cells``: one row per stored map position."""


class StatisticsMerge:
    """The running totals of the statistics tables ``names`` over the parts added so far.

    ``layout`` is the staged or committed run whose ``stats/`` parts are read, on
    ``filesystem`` (default local). :meth:`add` adds parts now; :meth:`add_soon` on a thread
    of its own, a few at a time, while the caller goes on (the driver, during the explain
    pass; call it from one thread); :meth:`finish` waits for that thread and adds the rest.
    :meth:`tables` gives the catalog's tables over exactly the parts added; :meth:`close`
    stops the thread and frees the merge's DuckDB.
    """

    def __init__(self, layout: RunLayout, names: Iterable[str], id_type: str,
                 filesystem: pafs.FileSystem | None = None, memory_mib: int = DRIVER_SQL_MEMORY_MIB):
        self.layout = layout
        wanted = set(names)
        self.names = [name for name in (NEURON_CELLS, NEURON_TOP, ATTRIBUTION_CELLS, METHOD_SUMMARY, TOKEN_CELLS)
                      if name in wanted]
        self.filesystem = filesystem or pafs.LocalFileSystem()
        self.schemas = {NEURON_CELLS: NEURON_CELLS_SCHEMA, NEURON_TOP: neuron_top_schema(id_type),
                        ATTRIBUTION_CELLS: ATTRIBUTION_CELLS_SCHEMA, METHOD_SUMMARY: METHOD_SUMMARY_SCHEMA,
                        TOKEN_CELLS: TOKEN_CELLS_SCHEMA}
        self.totals = {name: self.schemas[name].empty_table() for name in self.names
                       if name != ATTRIBUTION_CELLS}
        self.cell_sums: dict[tuple, list] = {}
        self.added: set[str] = set()
        self.seconds = 0.0
        """Spent adding parts (on whichever thread): the driver's cost per part, for the manifest."""
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="netloupe-statistics")
        self._waiting: list[str] = []
        self._running: Future | None = None
        self.error: BaseException | None = None
        """Why an add failed, if one did (the totals are then not to be used)."""
        self._closed = False
        # One thread and the driver's memory bound: beside the workers, not instead of them
        # (Arrow reads a window's files in its own threads: the merge must keep up with them).
        self._con = duckdb.connect(config={"threads": 1, "memory_limit": f"{memory_mib}MiB"})
        self._con.execute(f"CREATE TEMP MACRO _neuron_top_kept() AS {NEURON_TOP_KEPT}").fetchall()
        for statement in duckdb.extract_statements(MERGE_SQL.read_text()):
            self._con.execute(statement).fetchall()

    @classmethod
    def of_run(cls, layout: RunLayout, names: Iterable[str], id_type: str,
               memory_mib: int = DRIVER_SQL_MEMORY_MIB) -> StatisticsMerge:
        """Every part of a run on local disk added up (its instances parts name the parts)."""
        merge = cls(layout, names, id_type, memory_mib=memory_mib)
        merge.add(sorted(key for path in layout.instances_dir.glob("part-*.parquet")
                         if (key := key_of_part(path.name)) is not None))
        return merge

    def add(self, keys: Iterable[str]) -> None:
        """Add the statistics parts of ``keys`` (each once: a key added before is skipped)."""
        with self._lock:
            started = time.perf_counter()
            keys = sorted(set(keys) - self.added)
            for start in range(0, len(keys), PARTS_AT_ONCE):
                if self._closed:
                    break
                window = keys[start:start + PARTS_AT_ONCE]
                for name in self.names:
                    parts = self._read(name, window)
                    if name == ATTRIBUTION_CELLS:
                        _add_up_attribution_cells(self.cell_sums, [parts])
                    else:
                        self.totals[name] = self._summed(name, [self.totals[name], parts])
                self.added.update(window)
            self.seconds += time.perf_counter() - started

    def add_soon(self, keys: Iterable[str]) -> None:
        """Add ``keys`` on the merge's thread, once enough are waiting and the last add is done."""
        self._waiting.extend(keys)
        if self.error is not None or self._closed:
            return
        if len(self._waiting) >= ADD_EVERY_PARTS and (self._running is None or self._running.done()):
            self._collect()
            if self.error is None:
                self._running, self._waiting = self._thread.submit(self.add, self._waiting), []

    def finish(self, keys: set[str]) -> bool:
        """Wait for the thread, then add what is left of ``keys``; False (and :attr:`error`
        says why) when an add failed, a part missing or unreadable, or added a part not in
        ``keys``: the totals are not those of ``keys`` then, and the caller starts over."""
        self._thread.shutdown(wait=True)
        self._collect()
        if self.error is None and not self.added <= keys:
            self.error = RuntimeError(f"parts were added that the run does not have: {sorted(self.added - keys)[:3]}")
        if self.error is None:
            try:
                self.add(keys)
            except Exception as error:  # noqa: BLE001 - the caller starts over; its own checks say what is wrong
                self.error = error
        return self.error is None

    def close(self) -> None:
        """Stop the thread (after the window it is adding) and free the merge's DuckDB."""
        self._closed = True
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._con.close()

    def _collect(self) -> None:
        if self._running is not None and self._running.done() and self._running.exception() is not None:
            self.error = self._running.exception()

    def tables(self) -> dict[str, pa.Table]:
        """The catalog's ``neuron_cells``, ``neuron_top``, ``attribution_cells`` and
        ``fidelity_summary`` over the parts added, by table name (those the run has)."""
        with self._lock:
            out = {}
            if NEURON_CELLS in self.totals:
                out[NEURON_CELLS] = self.totals[NEURON_CELLS]
            if NEURON_TOP in self.totals:
                out[NEURON_TOP] = self._query("SELECT * FROM _ranked_neuron_top('_parts')", self.totals[NEURON_TOP])
            if ATTRIBUTION_CELLS in self.names:
                out[ATTRIBUTION_CELLS] = _long_attribution_cells(self.cell_sums)
            if TOKEN_CELLS in self.totals:
                out[TOKEN_CELLS] = self.totals[TOKEN_CELLS]
            if METHOD_SUMMARY in self.totals:
                out["fidelity_summary"] = self._query("SELECT * FROM _merged_method_summary('_parts')",
                                                  _positioned(self.totals[METHOD_SUMMARY]))
            return out

    def _read(self, name: str, keys: list[str]) -> pa.Table:
        """One table's parts of ``keys``, in one read (Arrow reads the files in its own
        threads: half the time of a file at a time from Python)."""
        paths = [str(self.layout.statistics_dir(name) / part_name(key)) for key in keys]
        # No partitioning: a run under a directory like `lr=0.1/` would otherwise add a column.
        return pq.ParquetDataset(paths, filesystem=self.filesystem, partitioning=None).read(use_threads=True)

    def _summed(self, name: str, tables: list[pa.Table]) -> pa.Table:
        schema = self.schemas[name]
        stacked = pa.concat_tables([table.cast(schema) for table in tables])
        if name == METHOD_SUMMARY:
            stacked = _positioned(stacked)
        return self._query(f"SELECT * FROM _summed_{name}('_parts')", stacked).select(schema.names).cast(schema)

    def _query(self, sql: str, parts: pa.Table) -> pa.Table:
        self._con.register("_parts", parts)
        try:
            return self._con.sql(sql).to_arrow_table()
        finally:
            self._con.unregister("_parts")


def _positioned(table: pa.Table) -> pa.Table:
    return table.append_column("position", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def _add_up_attribution_cells(sums: dict[tuple, list], tables: Iterable[pa.Table]) -> None:
    """Add each part's rows to ``sums``: ``(method, rank, label, prediction)`` → ``[size, total, total_abs]``."""
    for table in tables:
        lists = [table[column].combine_chunks() for column in ("total", "total_abs")]
        offsets = lists[0].offsets.to_numpy()  # both lists of a row have the map's width
        values = [column.values.to_numpy() for column in lists]
        keys = zip(table["method"].to_pylist(), table["target_rank"].to_pylist(), table["label"].to_pylist(),
                   table["prediction"].to_pylist(), table["size"].to_pylist())
        for row, (method, rank, label, prediction, size) in enumerate(keys):
            total = values[0][offsets[row]:offsets[row + 1]]
            total_abs = values[1][offsets[row]:offsets[row + 1]]
            entry = sums.get((method, rank, label, prediction))
            if entry is None:
                sums[(method, rank, label, prediction)] = [size, total.copy(), total_abs.copy()]
            else:
                entry[0] += size
                entry[1] += total
                entry[2] += total_abs


def _long_attribution_cells(sums: dict[tuple, list]) -> pa.Table:
    """The summed cells as the catalog's table: one row per map position (built by repeating
    each cell's key, not a Python value per row: a 224×224×3 map has 150,528 positions)."""
    if not sums:
        return ATTRIBUTION_CELLS_LONG_SCHEMA.empty_table()
    keys, entries = zip(*sums.items())
    widths = np.array([len(total) for _, total, _ in entries])
    method, rank, label, prediction = (list(column) for column in zip(*keys))
    cell = np.repeat(np.arange(len(keys)), widths)
    take = pa.array(cell)
    return pa.table({
        "method": pa.array(method).take(take),
        "target_rank": pa.array(rank, pa.int16()).take(take),
        "label": pa.array(label, pa.int64()).take(take),
        "prediction": pa.array(prediction, pa.int64()).take(take),
        "position": np.concatenate([np.arange(width, dtype=np.int32) for width in widths]),
        "size": np.repeat(np.array([size for size, _, _ in entries], dtype=np.int64), widths),
        "total": np.concatenate([total for _, total, _ in entries]),
        "total_abs": np.concatenate([total_abs for _, _, total_abs in entries]),
    }, schema=ATTRIBUTION_CELLS_LONG_SCHEMA)
