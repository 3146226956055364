"""What a worker writes beside each batch's parts so that no pass on the driver reads them again.

Every statistic the catalog serves without a scan is a *mergeable* reduction (sizes, sums,
sums of squares, counts, minima, maxima, top-k lists): each worker reduces its own batch and
writes the result as a small Parquet part; :class:`netloupe.storage.statistics_merge.StatisticsMerge`
adds the parts up (``storage/sql/merge.sql``), as they arrive. The driver's cost then grows with
the number of parts and cells, not with the instances or the width of their vectors.

Beside the statistics, each batch's recorded layers (up to ``WIDE_NEURON_LIMIT`` neurons)
are written as ``index/layers/<layer>/part-<key>.npy``: the batch's rows (in the order of
its ``instances`` part) as a row-major ``float32`` matrix, memory-mapped by :class:`netloupe.storage.activation_index.ActivationIndex`,
which gathers a subset's rows from them, and read again after the explain pass to write the
layer's wide form for SQL in segments of many parts (:mod:`netloupe.storage.wide_segments`).

The same functions serve the workers (:class:`netloupe.workers.explain.ExplainWorker`) and
runs written by hand (:mod:`netloupe.storage.handmade`), so both produce the same files.

NaN follows DuckDB's rules, so that a merged statistic equals the one DuckDB would compute
over every row: sums propagate NaN, ``active`` counts values > 0 that are not NaN, ``min``
ignores NaN unless every value is NaN, ``max`` and the top-k rank NaN above every number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from netloupe.storage import schema as S
from netloupe.storage.layout import PLAIN_PARQUET_OPTIONS, RunLayout
from netloupe.storage.schema import ATTRIBUTION_CELLS, METHOD_SUMMARY, NEURON_CELLS, NEURON_TOP, TOKEN_CELLS

WIDE_NEURON_LIMIT = 4096
"""Widest layer given an index matrix and one column per neuron (``wide/``); wider ones (a
conv map kept with ``pooling: none``) stay Parquet vectors only."""

ATTRIBUTION_COLUMNS_AT_ONCE = 1024
"""Map positions summed at a time (a float64 block of a batch's rows: 8 MB at 1,024 rows)."""
NEURON_TOP_KEPT = 16
"""Instances kept per neuron in ``neuron_top``: ``top_instances`` and ``neuron_exemplars``
answer ``k`` up to this from it; a larger ``k`` scans the layer."""


NEURON_CELLS_SCHEMA = pa.schema([
    ("layer", pa.string()), ("label", pa.int64()), ("prediction", pa.int64()), ("neuron", pa.int32()),
    ("size", pa.int64()), ("total", pa.float64()), ("total_sq", pa.float64()), ("active", pa.int64()),
    ("minimum", pa.float64()), ("maximum", pa.float64()),
])
ATTRIBUTION_CELLS_SCHEMA = pa.schema([
    ("method", pa.string()), ("target_rank", pa.int16()), ("label", pa.int64()), ("prediction", pa.int64()),
    ("size", pa.int64()), ("total", pa.list_(pa.float64())), ("total_abs", pa.list_(pa.float64())),
])
"""One row per (method, target rank, label, prediction) with the sums of every stored map
position as lists: a row per position would be 800x the rows (slow to write and to merge);
the catalog adds the lists up (:class:`~netloupe.storage.statistics_merge.StatisticsMerge`) into its long table."""
TOKEN_CELLS_SCHEMA = pa.schema([
    ("method", pa.string()), ("target_rank", pa.int16()), ("label", pa.int64()), ("prediction", pa.int64()),
    ("token", pa.string()), ("occurrences", pa.int64()), ("instances", pa.int64()),
    ("total", pa.float64()), ("total_abs", pa.float64()),
])
"""A text run's per-token sums: one row per (method, target rank, label, prediction, token),
how often the token occurs (and in how many instances: the parts' instances are disjoint, so
these add up too), the sum and the sum of absolute values of its attributions. Serves
``top_tokens_by`` at any size without reading a token."""
METHOD_SUMMARY_SCHEMA = pa.schema(
    [("method", pa.string()), ("rows", pa.int64())]
    + [(f"{column}_{part}", kind) for column in ("abs_delta", "deletion_auc", "insertion_auc")
       for part, kind in (("count", pa.int64()), ("sum", pa.float64()))]
    + [("abs_delta_max", pa.float64()), ("sampled", pa.int64())]
    + [(f"{column}_{part}", kind) for column in S.FIDELITY_SAMPLE_COLUMNS
       for part, kind in (("count", pa.int64()), ("sum", pa.float64()))]
)
"""Per method, over its rows of target rank 0 (and its sampled fidelity rows): counts and
sums of the non-null values, whose quotients are the run's means."""


def neuron_top_schema(id_type: str) -> pa.Schema:
    return pa.schema([("layer", pa.string()), ("neuron", pa.int32()), ("instance_id", S.ID_TYPES[id_type]),
                      ("activation", pa.float32())])


@dataclass
class DerivedParts:
    """One batch's statistics and index rows, by directory relative to the run."""

    tables: dict[Path, pa.Table] = field(default_factory=dict)
    matrices: dict[Path, np.ndarray] = field(default_factory=dict)
    """Row-major matrices, written as ``.npy``: each layer's ``float32`` rows, and its Gram
    matrix (:func:`layer_gram`)."""
    options: dict[Path, dict] = field(default_factory=dict)
    """Parquet options of the tables not written as parts usually are (zstd)."""


GRAM_NEURON_LIMIT = 512
"""Widest layer whose Gram matrix is kept per part: (d + 1)² float64 grows past the part's own
rows beyond it (2 MB per part at 512 units, 134 MB at 4,096); a wider layer's CKA computes its
self-products at query time."""


def layer_gram(values: np.ndarray) -> np.ndarray:
    """``(d + 1, d + 1)`` ``float64``: the Gram matrix of the rows ``values`` with a column of
    ones before them: the count, each neuron's sum and every pair's sum of products. Parts'
    add up to the run's, whose centred second moments linear CKA needs of each run
    (:mod:`netloupe.storage.compare`): kept per part, they cost nothing at query time. In
    ``float64``: raw moments about zero cancel in ``float32`` (a neuron of mean 10 and
    deviation 0.01 would lose its variance)."""
    augmented = np.empty((len(values), values.shape[1] + 1))
    augmented[:, 0] = 1.0
    augmented[:, 1:] = values
    return augmented.T @ augmented


def derive_parts(instances: pa.Table, activations: dict[str, np.ndarray], attributions: dict[str, pa.Table],
                 fidelity: dict[str, pa.Table], id_type: str, tokens: pa.Table | None = None) -> DerivedParts:
    """Everything a batch adds besides its tables: ``activations`` maps each recorded layer
    to its ``(n, neurons)`` matrix (rows in ``instances`` order), ``attributions`` and
    ``fidelity`` each method to the batch's rows of that table; ``tokens``, a text run's
    tokens part."""
    run = RunLayout(Path("."))
    out = DerivedParts()
    cells = _Cells(instances)
    ids = instances["instance_id"]
    neuron_cells, tops = [], []
    for layer, values in activations.items():
        if values.shape[1] > WIDE_NEURON_LIMIT:
            continue
        values = np.ascontiguousarray(values, dtype=np.float32)
        neuron_cells.append(_neuron_cells(layer, values, cells))
        tops.append(_neuron_top(layer, ids, values, id_type))
        out.matrices[run.index_layer_dir(layer)] = values
        if values.shape[1] <= GRAM_NEURON_LIMIT:
            out.matrices[run.index_gram_dir(layer)] = layer_gram(values)
    attribution_cells, summaries, token_cells = [], [], []
    for method, table in attributions.items():
        if "attribution" in table.column_names:
            attribution_cells.append(_attribution_cells(method, table, cells, instances))
        if "token_attribution" in table.column_names and tokens is not None:
            token_cells.append(_token_cells(method, table, cells, instances, tokens))
        summaries.append(_method_summary(method, table, fidelity.get(method)))
    for name, pieces, schema in ((NEURON_CELLS, neuron_cells, NEURON_CELLS_SCHEMA),
                                 (NEURON_TOP, tops, neuron_top_schema(id_type)),
                                 (ATTRIBUTION_CELLS, attribution_cells, ATTRIBUTION_CELLS_SCHEMA),
                                 (METHOD_SUMMARY, summaries, METHOD_SUMMARY_SCHEMA),
                                 (TOKEN_CELLS, token_cells, TOKEN_CELLS_SCHEMA)):
        if pieces:
            out.tables[run.statistics_dir(name)] = pa.concat_tables(pieces).cast(schema)
    # Sums of floats hardly compress (1.2 MB zstd, 1.7 MB plain) and decoding zstd was most of
    # the catalog's merge.
    out.options[run.statistics_dir(ATTRIBUTION_CELLS)] = PLAIN_PARQUET_OPTIONS
    return out


def statistics_of(layer_neurons: dict[str, int], attribution_shapes: dict[str, tuple | None],
                  token_values: bool = False) -> list[str]:
    """The statistics tables every batch of a run with these layers and methods writes a part
    of (what :func:`derive_parts` returns); ``token_values``: a text run that stores its
    methods' values per token."""
    wide = any(neurons <= WIDE_NEURON_LIMIT for neurons in layer_neurons.values())
    maps = any(shape is not None for shape in attribution_shapes.values())
    return (([NEURON_CELLS, NEURON_TOP] if wide else []) + ([ATTRIBUTION_CELLS] if maps else [])
            + ([METHOD_SUMMARY] if attribution_shapes else [])
            + ([TOKEN_CELLS] if token_values and attribution_shapes else []))


class _Cells:
    """The (label, prediction) cell of each row of a batch; a null label is a cell of its own."""

    def __init__(self, instances: pa.Table):
        label = instances["label"].combine_chunks()
        keys = np.stack([label.is_null().to_numpy(zero_copy_only=False).astype(np.int64),
                         pc.fill_null(label, 0).to_numpy(zero_copy_only=False).astype(np.int64),
                         instances["prediction"].to_numpy().astype(np.int64)], axis=1)
        self.keys, inverse = np.unique(keys, axis=0, return_inverse=True)
        self.inverse = inverse.reshape(-1)

    def columns(self, repeat: int) -> tuple[pa.Array, pa.Array]:
        """``label`` and ``prediction`` of each cell, each repeated ``repeat`` times."""
        label = np.repeat(self.keys[:, 1], repeat)
        null = np.repeat(self.keys[:, 0].astype(bool), repeat)
        return pa.array(label, mask=null), pa.array(np.repeat(self.keys[:, 2], repeat))

    def reduce(self, values: np.ndarray, inverse: np.ndarray | None = None):
        """Per cell: ``(order, starts)`` so that ``np.<ufunc>.reduceat(values[order], starts)``
        reduces each cell's rows (every cell present in ``inverse`` has a row)."""
        inverse = self.inverse if inverse is None else inverse
        order = np.argsort(inverse, kind="stable")
        starts = np.searchsorted(inverse[order], np.arange(len(self.keys)))
        return values[order], starts


def _neuron_cells(layer: str, values: np.ndarray, cells: _Cells) -> pa.Table:
    ordered, starts = cells.reduce(values)
    wide = ordered.astype(np.float64)
    total = np.add.reduceat(wide, starts, axis=0)
    total_sq = np.add.reduceat(np.square(wide), starts, axis=0)
    active = np.add.reduceat((ordered > 0).astype(np.int64), starts, axis=0)  # NaN > 0 is False
    minimum = np.fmin.reduceat(wide, starts, axis=0)  # fmin: NaN only when every value is NaN
    maximum = np.maximum.reduceat(wide, starts, axis=0)  # NaN wins, as in DuckDB's max
    size = np.diff(np.append(starts, len(ordered)))
    neurons = values.shape[1]
    label, prediction = cells.columns(neurons)
    return pa.table({
        "layer": pa.array([layer] * total.size), "label": label, "prediction": prediction,
        "neuron": np.tile(np.arange(neurons, dtype=np.int32), len(size)),
        "size": np.repeat(size, neurons), "total": total.ravel(), "total_sq": total_sq.ravel(),
        "active": active.ravel(), "minimum": minimum.ravel(), "maximum": maximum.ravel(),
    })


def _neuron_top(layer: str, ids: pa.ChunkedArray, values: np.ndarray, id_type: str) -> pa.Table:
    """Each neuron's ``NEURON_TOP_KEPT`` highest rows: NaN first (DuckDB ranks NaN above every
    number), then by value descending, ties by instance id."""
    n, neurons = values.shape
    kept = min(NEURON_TOP_KEPT, n)
    id_values = ids.combine_chunks().to_numpy(zero_copy_only=False)
    by_id = np.argsort(id_values.astype(str) if id_values.dtype == object else id_values, kind="stable")
    ordered = values[by_id]  # rows in id order: a row's index is its rank among ties
    nan = np.isnan(ordered)
    # NaN first as the smallest key of all (+inf and NaN in one column, which this would tie,
    # are ranked apart below).
    key = np.where(nan, -np.inf, -ordered)
    rows = _smallest_rows(key, kept)
    for j in np.flatnonzero(nan.any(axis=0) & np.isinf(ordered).any(axis=0)):
        rows[:, j] = np.lexsort((-np.where(nan[:, j], 0, ordered[:, j]), ~nan[:, j]))[:kept]
    rows = by_id[rows]
    chosen = values[rows, np.arange(neurons)]
    return pa.table({
        "layer": pa.array([layer] * rows.size),
        "neuron": np.repeat(np.arange(neurons, dtype=np.int32), kept),
        "instance_id": ids.combine_chunks().take(pa.array(rows.T.ravel())).cast(S.ID_TYPES[id_type]),
        "activation": chosen.T.ravel(),
    })


def _smallest_rows(key: np.ndarray, kept: int) -> np.ndarray:
    """Per column of ``key``, the ``kept`` rows of the smallest keys in order, ties by row:
    what a stable argsort of each column starts with, without sorting every row (a partition
    finds each column's cut, and only the rows above it are sorted)."""
    cut = np.partition(key, kept - 1, axis=0)[kept - 1]
    chosen = key <= cut
    # Where more rows tie at the cut than places are left, the first ones (by row) fill them.
    crowded = np.flatnonzero(chosen.sum(axis=0) > kept)
    if crowded.size:
        at_cut = key[:, crowded] == cut[crowded]
        left = kept - (key[:, crowded] < cut[crowded]).sum(axis=0)
        chosen[:, crowded] &= ~at_cut | (np.cumsum(at_cut, axis=0) <= left)
    columns, rows = np.nonzero(chosen.T)  # column by column, rows ascending
    rows = rows.reshape(key.shape[1], kept)
    order = np.argsort(key[rows, columns.reshape(key.shape[1], kept)], axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1).T


def _token_cells(method: str, table: pa.Table, cells: _Cells, instances: pa.Table, tokens: pa.Table) -> pa.Table:
    """Per (target rank, label, prediction, token): occurrences, instances, sum and sum of
    absolute values of the token's attributions (the lists of ``table`` and ``tokens`` have
    one entry per own token, in order)."""
    ids = instances["instance_id"].combine_chunks()
    cell = cells.inverse[pc.index_in(table["instance_id"], value_set=ids).to_numpy(zero_copy_only=False)]
    token_row = pc.index_in(table["instance_id"], value_set=tokens["instance_id"].combine_chunks()).combine_chunks()
    values = table["token_attribution"].combine_chunks()
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    texts = tokens["tokens"].combine_chunks().take(token_row)
    flat = pa.table({
        "row": np.repeat(np.arange(table.num_rows), lengths),
        "rank": np.repeat(table["target_rank"].to_numpy(), lengths),
        "cell": np.repeat(cell, lengths),
        "token": texts.flatten(),
        "value": values.flatten(),
    })
    con = S.hashing_connection()  # the worker's own DuckDB: a group-by over a batch's tokens
    con.register("_token_values", flat)
    try:
        summed = con.sql("SELECT rank, cell, token, count(*) AS occurrences, count(DISTINCT row) AS instances, "
                         "sum(value::DOUBLE) AS total, sum(abs(value::DOUBLE)) AS total_abs "
                         "FROM _token_values GROUP BY ALL").to_arrow_table()
    finally:
        con.unregister("_token_values")
    keys = cells.keys[summed["cell"].to_numpy()]
    return pa.table({
        "method": pa.array([method] * summed.num_rows),
        "target_rank": summed["rank"].cast(pa.int16()),
        "label": pa.array(keys[:, 1], mask=keys[:, 0].astype(bool)),
        "prediction": keys[:, 2],
        "token": summed["token"],
        "occurrences": summed["occurrences"],
        "instances": summed["instances"],
        "total": summed["total"],
        "total_abs": summed["total_abs"],
    })


def _attribution_cells(method: str, table: pa.Table, cells: _Cells, instances: pa.Table) -> pa.Table:
    """Sums of each stored map position per (target rank, label, prediction)."""
    row_of = pc.index_in(table["instance_id"], value_set=instances["instance_id"].combine_chunks())
    ranks = table["target_rank"].to_numpy().astype(np.int64)
    keys = np.stack([ranks, cells.inverse[row_of.to_numpy(zero_copy_only=False)]], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    maps = S.vectors_to_numpy(table["attribution"])
    starts = np.searchsorted(inverse[order], np.arange(len(unique)))
    width = maps.shape[1]
    total, total_abs = np.empty((len(unique), width)), np.empty((len(unique), width))
    # Summed in float64 from a float64 copy (reduceat converting each float32 as it adds is
    # 2x slower), made a few columns at a time: a copy of a large map batch would double it.
    for first in range(0, width, ATTRIBUTION_COLUMNS_AT_ONCE):
        columns = slice(first, first + ATTRIBUTION_COLUMNS_AT_ONCE)
        block = maps[order, columns].astype(np.float64)
        total[:, columns] = np.add.reduceat(block, starts, axis=0)
        total_abs[:, columns] = np.add.reduceat(np.abs(block, out=block), starts, axis=0)
    size = np.diff(np.append(starts, len(order)))
    cell = cells.keys[unique[:, 1]]
    return pa.table({
        "method": pa.array([method] * len(size)),
        "target_rank": unique[:, 0].astype(np.int16),
        "label": pa.array(cell[:, 1], mask=cell[:, 0].astype(bool)),
        "prediction": cell[:, 2],
        "size": size,
        "total": pa.ListArray.from_arrays(np.arange(0, total.size + 1, width, dtype=np.int32), total.ravel()),
        "total_abs": pa.ListArray.from_arrays(np.arange(0, total.size + 1, width, dtype=np.int32), total_abs.ravel()),
    })


def _count_sum(column: pa.ChunkedArray | pa.Array, absolute: bool = False) -> tuple[int, float]:
    """Count and sum of the non-null values (NaN counts and makes the sum NaN, as in DuckDB)."""
    values = pc.drop_null(column).to_numpy(zero_copy_only=False).astype(np.float64)
    return len(values), float(np.sum(np.abs(values) if absolute else values))


def _method_summary(method: str, table: pa.Table, sampled: pa.Table | None) -> pa.Table:
    first = table.filter(pc.equal(table["target_rank"], 0))
    row = {"method": method, "rows": first.num_rows}
    row["abs_delta_count"], row["abs_delta_sum"] = _count_sum(first["convergence_delta"], absolute=True)
    deltas = np.abs(pc.drop_null(first["convergence_delta"]).to_numpy(zero_copy_only=False))
    row["abs_delta_max"] = float(np.max(deltas)) if len(deltas) else None
    for column in ("deletion_auc", "insertion_auc"):
        present = column in first.column_names
        row[f"{column}_count"], row[f"{column}_sum"] = _count_sum(first[column]) if present else (0, 0.0)
    row["sampled"] = sampled.num_rows if sampled is not None else 0
    for column in S.FIDELITY_SAMPLE_COLUMNS:
        row[f"{column}_count"], row[f"{column}_sum"] = _count_sum(sampled[column]) if sampled is not None else (0, 0.0)
    return pa.Table.from_pylist([row], schema=METHOD_SUMMARY_SCHEMA)


# -- projection sample candidates ------------------------------------------------------------

SAMPLE_HASH_SQL = "hash(instance_id, ?::BIGINT)"
"""The projection sample's order: an instance's place depends on its id and the seed only
(:func:`netloupe.storage.reader.sample_instance_ids` takes the ``size`` first)."""


def candidate_fraction(sample_size: int, rows: int) -> float:
    """The share of instances each worker keeps as sample candidates: enough that the run's
    ``sample_size`` first by hash are all among them except with negligible probability
    (six standard deviations of the binomial count over the mean)."""
    wanted = sample_size + 6 * sample_size ** 0.5 + 16
    return min(1.0, wanted / max(1, rows))


def sample_hashes(ids: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """Each id's place in the projection sample order (``uint64``); ``ids`` of the run's id type."""
    con = S.hashing_connection()
    con.register("batch_ids", pa.table({"instance_id": ids}))
    try:
        hashes = con.sql(f"SELECT {SAMPLE_HASH_SQL} FROM batch_ids", params=[seed]).to_arrow_table()
    finally:
        con.unregister("batch_ids")
    return hashes.column(0).to_numpy().astype(np.uint64)


def candidates_schema(width: int, id_type: str) -> pa.Schema:
    return pa.schema([pa.field("instance_id", S.ID_TYPES[id_type], nullable=False),
                      pa.field("sample_hash", pa.uint64(), nullable=False),
                      pa.field("vector", S.vector_type(width), nullable=False)])


def projection_candidates(ids: pa.Array, vectors: dict[tuple[str, str], np.ndarray], id_type: str,
                          seed: int, fraction: float) -> dict[Path, pa.Table]:
    """The batch's rows whose sample hash falls in the first ``fraction`` of the hash range,
    with their vectors of each projected table (``(kind, name)`` → ``(n, d)``)."""
    if not vectors or fraction <= 0:
        return {}
    ids = (ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids).cast(S.ID_TYPES[id_type])
    hashes = sample_hashes(ids, seed)
    keep = np.flatnonzero(hashes <= np.uint64(min(2**64 - 1, int(fraction * 2**64))))
    run = RunLayout(Path("."))
    taken = pa.array(keep)
    return {run.projection_sample_dir(kind, name): pa.Table.from_arrays(
                [ids.take(taken), pa.array(hashes[keep]), S.fixed_vectors(matrix[keep], matrix.shape[1])],
                schema=candidates_schema(matrix.shape[1], id_type))
            for (kind, name), matrix in vectors.items()}
