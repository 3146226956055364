"""Row-major activation matrices beside the catalog: the fast path of subset statistics.

DuckDB aggregates a layer's wide table at about 1.5 ns per value on two cores, so a
subset's mean over 1M instances × 256 neurons costs 0.6-1.2 s whatever the subset's size
(it scans every row). Here each layer is also kept as row-major ``float32`` matrices, one
per part, written by the workers beside the part (``index/layers/<layer>/part-<key>.npy``,
rows in the order of the part's instances; :mod:`netloupe.storage.part_statistics`), and
memory-mapped: a subset costs a gather of its own rows, and a subset larger than half the
run is answered from the run's totals minus its complement. ``benchmarks/bench_sql.py``
measures both paths side by side.

The catalog (:func:`write_id_index`) numbers the rows of the parts in key order and writes
``index/instance_ids.npy`` (every id, sorted) and ``index/instance_rows.npy`` (the row of
each), and records where each part's rows begin (its ``activation_index_parts`` table): no
pass on the driver rewrites the matrices.

:func:`open_catalog <netloupe.storage.catalog.open_catalog>` registers :meth:`ActivationIndex.moments`
as the scalar function ``_neuron_moments_fast`` (and :meth:`ActivationIndex.vector` as
``_instance_activations_fast``) and shadows the SQL macros ``_neuron_moments`` and
``_instance_activations`` with ones that call them, so every operator built on them (neuron
matrices, subset comparison, an instance's top neurons) takes the fast path; a plain DuckDB
client (the stock CLI) runs the same operators in pure SQL.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from netloupe.contract.errors import RunError, did_you_mean
from netloupe.storage.layout import RunLayout, part_name, write_npy
from netloupe.storage.part_statistics import WIDE_NEURON_LIMIT

IDS_FILE = "instance_ids.npy"
ROWS_FILE = "instance_rows.npy"
THREADS = min(4, os.cpu_count() or 1)
"""Threads that gather and reduce a subset's rows (numpy releases the GIL for both)."""

ID_INDEXES_KEPT = 4
"""Runs whose sorted ids a process keeps, the last used (an operator across runs searches two)."""

_ID_INDEXES: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
"""The sorted ids and their rows by their files and times, shared by every index of the process."""

_NP_LOAD = threading.Lock()
"""Held around every np.load here: it parses each header with ast.literal_eval, and CPython
3.11's AST builder is not thread-safe across threads ("AST constructor recursion depth
mismatch" when the gather threads, or two dashboard sessions, opened parts at once)."""


def write_id_index(layout: RunLayout, instance_ids: pa.Array, rows: pa.Array) -> None:
    """Write ``index/instance_ids.npy`` (sorted) and ``index/instance_rows.npy`` (each id's
    row in the parts' key order) from every instance's id and row, in any order."""
    ids = instance_ids.to_numpy(zero_copy_only=False)
    if ids.dtype == object:
        ids = ids.astype(str)
    order = np.argsort(ids, kind="stable")
    write_npy(layout.index_dir / IDS_FILE, ids[order])
    write_npy(layout.index_dir / ROWS_FILE, rows.to_numpy(zero_copy_only=False).astype(np.int64)[order])


class ActivationIndex:
    """The memory-mapped matrices of one run; answers per-neuron moments of any subset."""

    def __init__(self, run_root: Path, totals: dict[str, dict[str, np.ndarray]], parts: list[tuple[str, int]]):
        """``totals``: per layer the whole run's ``total``, ``total_sq`` and ``active``
        (from the catalog's neuron_cells): the layers there are, and the answer by complement.
        ``parts``: each part's key and first row, in row order (``activation_index_parts``)."""
        self.layout = RunLayout(run_root)
        self.totals = totals
        self.part_keys = [key for key, _ in parts]
        self.first_rows = np.array([first for _, first in parts], dtype=np.int64)
        self._matrices: dict[str, list[np.ndarray | None]] = {}

    @property
    def sorted_ids(self) -> np.ndarray:
        """Every instance id, sorted (:func:`write_id_index`)."""
        return self._id_index()[0]

    @property
    def rows_of_sorted(self) -> np.ndarray:
        """Each of :attr:`sorted_ids`' row in the parts' key order."""
        return self._id_index()[1]

    def _id_index(self) -> tuple[np.ndarray, np.ndarray]:
        # In memory (8 bytes per int id; searching a memory-mapped array was 10x slower), read
        # when first searched and shared by every index of the run in the process: a dashboard
        # opens one per session, and at 10M instances the two arrays are 160 MB.
        paths = [self.layout.index_dir / IDS_FILE, self.layout.index_dir / ROWS_FILE]
        key = tuple((str(path.resolve()), path.stat().st_mtime_ns) for path in paths)
        with _NP_LOAD:
            if key not in _ID_INDEXES:
                _ID_INDEXES[key] = (np.load(paths[0]), np.load(paths[1]))
                while len(_ID_INDEXES) > ID_INDEXES_KEPT:
                    _ID_INDEXES.popitem(last=False)
            _ID_INDEXES.move_to_end(key)
            return _ID_INDEXES[key]

    @property
    def rows(self) -> int:
        return len(self.sorted_ids)

    def _check_layer(self, layer: str) -> None:
        # Checked against the catalog's layers before any path is made from the name: the
        # name comes from an analyst's SQL, and this read bypasses DuckDB's file sandbox.
        if layer not in self.totals:
            raise RunError(
                f"no neuron statistics for layer {layer!r} in this run; {did_you_mean(str(layer), self.totals)} "
                f"(neuron operators cover recorded layers of up to {WIDE_NEURON_LIMIT:,} neurons; a wider "
                "one is only in activation_vectors_<layer>)"
            )

    def part_matrix(self, layer: str, part: int) -> np.ndarray:
        """The memory-mapped matrix of the ``part``-th part (in row order) of ``layer``."""
        self._check_layer(layer)
        matrices = self._matrices.setdefault(layer, [None] * len(self.part_keys))
        if matrices[part] is None:
            path = self.layout.index_layer_dir(layer) / part_name(self.part_keys[part], ".npy")
            with _NP_LOAD:
                if matrices[part] is None:
                    matrices[part] = np.load(path, mmap_mode="r")
        return matrices[part]

    def read_part(self, layer: str, part: int) -> np.ndarray:
        """The ``part``-th part of ``layer`` read whole into a fresh array: a pass over every
        part reads so faster than through the memory map's page faults."""
        self._check_layer(layer)
        with _NP_LOAD:
            return np.load(self.layout.index_layer_dir(layer) / part_name(self.part_keys[part], ".npy"))

    def gram(self, layer: str, parts: list[int]) -> np.ndarray | None:
        """The sum of the ``parts``' Gram matrices of ``layer``
        (:func:`netloupe.storage.part_statistics.layer_gram`); None when a part has none (a run
        made before they were kept)."""
        self._check_layer(layer)
        directory = self.layout.index_gram_dir(layer)
        total = None
        for part in parts:
            path = directory / part_name(self.part_keys[part], ".npy")
            if not path.exists():
                return None
            with _NP_LOAD:
                gram = np.load(path)
            total = gram if total is None else total + gram
        return total

    def take(self, layer: str, rows: np.ndarray) -> np.ndarray:
        """The matrix rows ``rows`` (sorted global rows) of ``layer``, gathered part by part."""
        parts = np.searchsorted(self.first_rows, rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(parts)) + 1
        pieces = [self.part_matrix(layer, int(parts[start]))[rows[start:stop] - self.first_rows[parts[start]]]
                  for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(rows)])]
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Sorted, distinct rows of the given instance ids (unknown ids are ignored, as the
        SQL path's ``instance_id IN (...)`` ignores them)."""
        ids = np.asarray(ids)
        if ids.dtype == object:
            ids = ids.astype(str)
        sorted_ids, rows_of_sorted = self._id_index()  # one fetch: both of the same build
        if len(ids) == 0 or len(sorted_ids) == 0:
            return np.empty(0, np.int64)
        # Sorted needles: numpy's search then walks the ids in order (10x fewer cache misses
        # than random needles), and the positions come out sorted and distinct.
        # Strings stay as they are: a cast to the stored width would truncate longer ids.
        needles = np.sort(ids.astype(str) if sorted_ids.dtype.kind == "U" else ids.astype(sorted_ids.dtype))
        # (np.unique took 50x longer than this sort for 333k int64 ids with numpy 2.x)
        needles = needles[np.concatenate(([True], needles[1:] != needles[:-1]))]
        found = np.minimum(np.searchsorted(sorted_ids, needles), len(sorted_ids) - 1)
        return np.sort(rows_of_sorted[found[sorted_ids[found] == needles]])

    def vector(self, layer: str, instance_id) -> np.ndarray | None:
        """One instance's activations of ``layer``, or None for an unknown id."""
        self._check_layer(layer)
        rows = self.positions(np.asarray([instance_id]))
        return self.take(layer, rows)[0] if len(rows) else None

    def moments(self, layer: str, ids: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """``(size, total, total_sq, active)`` per neuron over the instances ``ids``."""
        self._check_layer(layer)
        rows = self.positions(ids)
        n = self.rows
        whole = self.totals[layer]
        finite = all(np.isfinite(whole[key]).all() for key in ("total", "total_sq"))
        # The complement trick subtracts from the run's totals: with a NaN activation in the
        # run those are NaN, and a subset without that row would wrongly come out NaN.
        if 2 * len(rows) <= n or not finite:
            return (len(rows), *self._sums(layer, rows))
        # More than half the run: the run's totals minus the complement's (fewer rows read).
        keep = np.ones(n, bool)
        keep[rows] = False
        rest = np.flatnonzero(keep)
        total, total_sq, active = self._sums(layer, rest)
        return (len(rows), whole["total"] - total, whole["total_sq"] - total_sq, whole["active"] - active)

    def _sums(self, layer: str, rows: np.ndarray):
        """Sum, sum of squares and count > 0 per column over ``rows``, in parallel pieces."""
        pieces = [p for p in np.array_split(rows, THREADS) if len(p)] or [rows]
        if len(pieces) == 1:
            return self._sums_of_piece(layer, pieces[0])
        with ThreadPoolExecutor(len(pieces)) as pool:
            parts = list(pool.map(lambda piece: self._sums_of_piece(layer, piece), pieces))
        return tuple(sum(values) for values in zip(*parts))

    def _sums_of_piece(self, layer: str, rows: np.ndarray):
        width = self.part_matrix(layer, 0).shape[1]
        total, total_sq = np.zeros(width), np.zeros(width)
        active = np.zeros(width, np.int64)
        if len(rows) == 0:
            return total, total_sq, active
        # Part by part (a part's rows are a few hundred KB: reduced from cache), no concatenation.
        parts = np.searchsorted(self.first_rows, rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(parts)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
            part = int(parts[start])
            block = self.part_matrix(layer, part)[rows[start:stop] - self.first_rows[part]]
            total += block.sum(axis=0, dtype=np.float64)
            # Squared in float64, as the SQL path does: float32 squares lose the spread of
            # values far from zero (a std 10-15% off at mean 100, std 0.01).
            total_sq += np.square(block, dtype=np.float64).sum(axis=0)
            active += np.count_nonzero(block > 0, axis=0)
        return total, total_sq, active
