"""Row-major activation matrices beside the catalog: the fast path of subset statistics.

DuckDB aggregates a layer's wide table at about 1.5 ns per value on two cores, so a
subset's mean over 1M instances × 256 neurons costs 0.6-1.2 s whatever the subset's size
(it scans every row). Here each layer is also kept as one ``float32`` matrix in
``instance_id`` order (``index/layer-<layer>.npy``, memory-mapped), so a subset costs a gather
of its own rows, and a subset larger than half the run is answered from the run's totals
minus its complement. ``benchmarks/bench_sql.py`` measures both paths side by side.

:func:`open_catalog <netloupe.storage.catalog.open_catalog>` registers :meth:`ActivationIndex.moments`
as the scalar function ``_neuron_moments_fast`` and shadows the SQL macro
``_neuron_moments`` with one that calls it, so every operator built on it (neuron
matrices, subset comparison) takes the fast path; a plain DuckDB client (the stock CLI)
runs the same operators in pure SQL.
"""

from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from netloupe.contract.errors import RunError, did_you_mean
from netloupe.storage.schema import vectors_to_numpy

WIDE_NEURON_LIMIT = 4096
"""Widest layer given one column per neuron in the catalog and a matrix here; wider ones
(a conv map kept with ``pooling: none``) stay Parquet vectors only."""

INDEX_DIR = "index"
IDS_FILE = "instance_ids.npy"
GATHER_ROWS = 2048
"""Rows gathered per step: about 2 MB at 256 neurons, so each step's reductions run from
cache (1-2k rows measured fastest on this machine's 2 cores)."""
THREADS = min(4, os.cpu_count() or 1)
"""Threads that gather and reduce a subset's rows (numpy releases the GIL for both)."""


def layer_file(layer: str) -> str:
    return f"layer-{layer}.npy"  # prefixed: a layer named like IDS_FILE must not replace it


def write_activation_index(run_root: Path, layers: dict[str, list[Path]], instance_ids: pa.Array) -> None:
    """Write ``index/instance_ids.npy`` (sorted) and each layer's rows in that order.

    ``layers`` maps a layer to its Parquet parts. Rows are placed part by part, so memory
    stays one part's worth plus the id arrays.
    """
    final = run_root / INDEX_DIR
    # Written aside and swapped in whole: a failed rebuild must not leave new ids beside old
    # matrices, and open sessions keep their memory maps of the old files.
    directory = run_root / f".{INDEX_DIR}.{uuid.uuid4().hex}.tmp"
    directory.mkdir()
    try:
        _write_index(directory, layers, instance_ids)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    if final.exists():
        old = run_root / f".{INDEX_DIR}.{uuid.uuid4().hex}.old"
        os.replace(final, old)
        os.replace(directory, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(directory, final)


def _write_index(directory: Path, layers: dict[str, list[Path]], instance_ids: pa.Array) -> None:
    ids = instance_ids.to_numpy(zero_copy_only=False)
    if ids.dtype == object:
        ids = ids.astype(str)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    np.save(directory / IDS_FILE, sorted_ids)
    for layer, parts in layers.items():
        path = directory / layer_file(layer)
        handle = None
        try:
            for part in parts:
                table = pq.read_table(part)
                values = vectors_to_numpy(table["activation"])
                if handle is None:
                    # The header (and a sparse file of the full size), then rows by pwrite: a
                    # memory map would count every written page in the driver's resident memory.
                    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                                       shape=(len(ids), values.shape[1]))
                    del header
                    row_bytes = values.shape[1] * 4
                    data_offset = path.stat().st_size - len(ids) * row_bytes
                    handle = os.open(path, os.O_WRONLY)
                positions = np.searchsorted(sorted_ids, table["instance_id"].to_numpy(zero_copy_only=False)
                                            .astype(sorted_ids.dtype))
                _write_rows(handle, data_offset, row_bytes, positions, values)
        finally:
            if handle is not None:
                os.close(handle)


def _write_rows(handle: int, data_offset: int, row_bytes: int, positions: np.ndarray, values: np.ndarray) -> None:
    """Write ``values[i]`` at row ``positions[i]``, one write per run of consecutive rows."""
    order = np.argsort(positions, kind="stable")
    positions, values = positions[order], np.ascontiguousarray(values[order], dtype=np.float32)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(positions)]):
        os.pwrite(handle, values[start:stop].tobytes(), data_offset + int(positions[start]) * row_bytes)


class ActivationIndex:
    """The memory-mapped matrices of one run; answers per-neuron moments of any subset."""

    def __init__(self, run_root: Path, totals: dict[str, dict[str, np.ndarray]]):
        """``totals``: per layer the whole run's ``total``, ``total_sq`` and ``active``
        (from the catalog's neuron_cells): the layers there are, and the answer by complement."""
        directory = run_root / INDEX_DIR
        # In memory (8 bytes per int id): searching a memory-mapped array was 10x slower.
        self.sorted_ids = np.load(directory / IDS_FILE)
        self.totals = totals
        self._matrices: dict[str, np.ndarray] = {}
        self._directory = directory

    def matrix(self, layer: str) -> np.ndarray:
        # Checked against the catalog's layers before any path is made from the name: the
        # name comes from an analyst's SQL, and this read bypasses DuckDB's file sandbox.
        if layer not in self.totals:
            raise RunError(
                f"no neuron statistics for layer {layer!r} in this run; {did_you_mean(str(layer), self.totals)} "
                f"(neuron operators cover recorded layers of up to {WIDE_NEURON_LIMIT:,} neurons; a wider "
                "one is only in activation_vectors_<layer>)"
            )
        if layer not in self._matrices:
            self._matrices[layer] = np.load(self._directory / layer_file(layer), mmap_mode="r")
        return self._matrices[layer]

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Sorted, distinct row positions of the given instance ids (unknown ids are ignored,
        as the SQL path's ``instance_id IN (...)`` ignores them)."""
        ids = np.asarray(ids)
        if ids.dtype == object:
            ids = ids.astype(str)
        if len(ids) == 0 or len(self.sorted_ids) == 0:
            return np.empty(0, np.int64)
        # Sorted needles: numpy's search then walks the ids in order (10x fewer cache misses
        # than random needles), and the positions come out sorted and distinct.
        # Strings stay as they are: a cast to the stored width would truncate longer ids.
        needles = np.sort(ids.astype(str) if self.sorted_ids.dtype.kind == "U" else ids.astype(self.sorted_ids.dtype))
        # (np.unique took 50x longer than this sort for 333k int64 ids with numpy 2.x)
        needles = needles[np.concatenate(([True], needles[1:] != needles[:-1]))]
        found = np.minimum(np.searchsorted(self.sorted_ids, needles), len(self.sorted_ids) - 1)
        return found[self.sorted_ids[found] == needles]

    def moments(self, layer: str, ids: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """``(size, total, total_sq, active)`` per neuron over the instances ``ids``."""
        matrix = self.matrix(layer)
        rows = self.positions(ids)
        n = matrix.shape[0]
        whole = self.totals[layer]
        finite = all(np.isfinite(whole[key]).all() for key in ("total", "total_sq"))
        # The complement trick subtracts from the run's totals: with a NaN activation in the
        # run those are NaN, and a subset without that row would wrongly come out NaN.
        if 2 * len(rows) <= n or not finite:
            return (len(rows), *self._sums(matrix, rows))
        # More than half the run: the run's totals minus the complement's (fewer rows read).
        keep = np.ones(n, bool)
        keep[rows] = False
        rest = np.flatnonzero(keep)
        total, total_sq, active = self._sums(matrix, rest)
        return (len(rows), whole["total"] - total, whole["total_sq"] - total_sq, whole["active"] - active)

    @staticmethod
    def _sums(matrix: np.ndarray, rows: np.ndarray):
        """Sum, sum of squares and count > 0 per column over ``rows``, in parallel pieces."""
        pieces = [p for p in np.array_split(rows, THREADS) if len(p)] or [rows]
        if len(pieces) == 1:
            return ActivationIndex._sums_of_piece(matrix, pieces[0])
        with ThreadPoolExecutor(len(pieces)) as pool:
            parts = list(pool.map(lambda piece: ActivationIndex._sums_of_piece(matrix, piece), pieces))
        return tuple(sum(values) for values in zip(*parts))

    @staticmethod
    def _sums_of_piece(matrix: np.ndarray, rows: np.ndarray):
        width = matrix.shape[1]
        total, total_sq = np.zeros(width), np.zeros(width)
        active = np.zeros(width, np.int64)
        for start in range(0, len(rows), GATHER_ROWS):
            block = matrix[rows[start:start + GATHER_ROWS]]
            total += block.sum(axis=0, dtype=np.float64)
            # Squared in float64, as the SQL path does: float32 squares lose the spread of
            # values far from zero (a std 10-15% off at mean 100, std 0.01).
            total_sq += np.square(block, dtype=np.float64).sum(axis=0)
            active += np.count_nonzero(block > 0, axis=0)
        return total, total_sq, active
