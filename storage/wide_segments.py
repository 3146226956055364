"""A layer's wide form, ``wide/<layer>/part-<key>.parquet``: what ``activations_<layer>`` views.

One uncompressed FLOAT column per neuron (DuckDB scans plain floats fastest) and the
instance ids, in *segments* of many parts rather than a file per batch: DuckDB pays per
file and per column chunk, and over a run's per-batch parts that was most of a scan (the
stock CLI's pure-SQL predicate at 1M × 256: 3.4 s over 977 per-batch parts, 1.2 s over
segments of a few batches; benchmarks/RESULTS.md).

A segment holds a run of consecutive part keys (in key order; each part's rows in the order
of its instances part), is named after the first of them, and is written after the explain
pass from the index matrices the workers wrote beside every batch
(``index/layers/<layer>/part-<key>.npy``): by the part pass's tasks
(:mod:`netloupe.workers.part_pass`), and by :mod:`netloupe.storage.handmade`. The wide
directory is rewritten whole by every attempt of a run (:meth:`RunStaging.clear
<netloupe.storage.layout.RunStaging.clear>` first), so a segment never outlives the parts it
was made of.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from netloupe.storage import schema as S
from netloupe.storage.layout import WIDE_PARQUET_OPTIONS, RunLayout, part_name, whole_file

SEGMENT_ROW_GROUP_BYTES = 32 * 2**20
"""Bytes of floats per row group: DuckDB reads a row group per thread, and its cost per column
chunk is what per-batch parts paid (a 256-neuron layer: 32,768 rows a group)."""


def wide_schema(neurons: int, id_type: str) -> pa.Schema:
    """``instance_id, n0 .. n<d-1>``: the columns of ``activations_<layer>``."""
    return pa.schema([pa.field("instance_id", S.ID_TYPES[id_type], nullable=False)]
                     + [pa.field(f"n{j}", pa.float32()) for j in range(neurons)])


@dataclass(frozen=True)
class WideSegment:
    """One written segment, as its writer reports it."""

    layer: str
    key: str
    """The first of its parts' keys: the file is ``wide/<layer>/part-<key>.parquet``."""
    keys: tuple[str, ...]
    """Its parts' keys, in the order their rows are."""
    rows: int
    bytes: int


class WideSegmentWriter:
    """Writes one segment of ``layer`` part by part (:meth:`add`); the file appears whole when
    the ``with`` block ends without error, and not at all otherwise."""

    def __init__(self, layout: RunLayout, layer: str, neurons: int, id_type: str, first_key: str,
                 filesystem: pafs.FileSystem | None = None, run_root=None):
        self.layer, self.key, self.id_type = layer, first_key, id_type
        self.schema = wide_schema(neurons, id_type)
        self.group_rows = max(1, SEGMENT_ROW_GROUP_BYTES // (4 * neurons))
        self._file = whole_file(layout.wide_activations_dir(layer) / part_name(first_key), filesystem, run_root)
        self._ids: list[pa.Array] = []
        self._matrices: list[np.ndarray] = []
        self._pending_rows = 0
        self.keys: list[str] = []
        self.rows = 0
        self.segment: WideSegment | None = None
        """Set when the block ends without error."""

    def __enter__(self) -> WideSegmentWriter:
        self._sink = self._file.__enter__()
        try:
            self._writer = pq.ParquetWriter(self._sink.stream, self.schema, **WIDE_PARQUET_OPTIONS)
        except BaseException as failed:  # no temporary file or open upload is left behind
            self._file.__exit__(type(failed), failed, failed.__traceback__)
            raise
        return self

    def add(self, key: str, ids: pa.Array | pa.ChunkedArray, matrix: np.ndarray) -> None:
        """Append one part's rows: its instance ids and its ``(n, neurons)`` matrix, in the same order."""
        if matrix.shape != (len(ids), len(self.schema) - 1):
            raise ValueError(f"part {key} of layer {self.layer!r}: expected a ({len(ids)}, {len(self.schema) - 1}) "
                             f"matrix, got {matrix.shape}")
        self.keys.append(key)
        self._ids.append(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids)
        self._matrices.append(matrix)
        self._pending_rows += len(ids)
        self.rows += len(ids)
        if self._pending_rows >= self.group_rows:
            self._write_group()

    def _write_group(self) -> None:
        if not self._pending_rows:
            return
        ids = pa.concat_arrays(self._ids).cast(S.ID_TYPES[self.id_type])
        # Every neuron's column contiguous: no copy per column.
        columns = np.ascontiguousarray(np.concatenate(self._matrices).astype(np.float32, copy=False).T)
        table = pa.Table.from_arrays([ids] + [pa.array(c) for c in columns], schema=self.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._ids, self._matrices, self._pending_rows = [], [], 0

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            try:
                self._write_group()
                self._writer.close()
            except BaseException as failed:
                self._file.__exit__(type(failed), failed, failed.__traceback__)
                raise
            self._file.__exit__(None, None, None)
            self.segment = WideSegment(self.layer, self.key, tuple(self.keys), self.rows, self._sink.size)
            return False
        with contextlib.suppress(Exception):
            self._writer.close()
        return self._file.__exit__(kind, error, traceback)
