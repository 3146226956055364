"""The Arrow schemas of a run: the one place every writer and reader takes them from.

A run holds four kinds of table, each a directory of Parquet parts:

* ``instances``: one row per input instance (label, prediction, probabilities, metadata).
* ``activations/<layer>``: one row per instance, the layer's pooled activation vector.
* ``attributions/<method>``: one row per instance and explained target (``target_rank``
  runs over the top-k targets), the attribution (full or as a heatmap) and its summary.
* ``fidelity/<method>``: one row per *sampled* instance (workers/fidelity.py): infidelity,
  sensitivity-max and the model-randomization rank correlation of its map.
* ``projections/<kind>/<name>``: one row per instance, its 2-D coordinates under each
  fitted projection of a layer's activations (``kind`` ``activations``) or of a method's
  attribution maps (``attributions``).

Vectors are ``fixed_size_list<float32>`` so that a reader gets an ``(n, d)`` numpy matrix
without a copy, and their length is part of the schema, so a wrong-sized write fails.
Run-level facts (class names, shapes, the spec) live in the manifest, not in every row.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute below

SCHEMA_VERSION = 1
"""Bumped whenever a table's columns or their meaning change."""

INSTANCES = "instances"
ACTIVATIONS = "activations"
ATTRIBUTIONS = "attributions"
PROJECTIONS = "projections"
FIDELITY = "fidelity"
STATISTICS = "stats"
"""Per-part mergeable statistics (:mod:`netloupe.storage.part_statistics`)."""
NEURON_CELLS = "neuron_cells"
ATTRIBUTION_CELLS = "attribution_cells"
NEURON_TOP = "neuron_top"
METHOD_SUMMARY = "method_summary"
TOKEN_CELLS = "token_cells"
STATISTICS_TABLES = (NEURON_CELLS, ATTRIBUTION_CELLS, NEURON_TOP, METHOD_SUMMARY, TOKEN_CELLS)
"""The statistics tables, each ``stats/<name>/part-<key>.parquet``."""
WIDE = "wide"
"""Wide activations, one column per neuron, in segments of many parts written by the part pass
(the ``activations_<layer>`` views)."""
BACKGROUND = "background.parquet"
"""The run's background rows (the dataset's columns the workers read), when a method's
baseline is drawn from the data."""
TOKENS = "tokens"
"""A text run's tokens, one row per instance (:func:`tokens_schema`)."""
INDEX = "index"
"""Per-part row-major activation matrices and the id index (:mod:`netloupe.storage.activation_index`)."""

ID_TYPES = {"int64": pa.int64(), "string": pa.string()}
ID_SQL_TYPES = {"int64": "BIGINT", "string": "VARCHAR"}


def quoted_identifier(name: str) -> str:
    """A column or schema name as a DuckDB identifier, whatever it holds."""
    return '"' + name.replace('"', '""') + '"'


def id_digest_sql(column: str, id_type: str) -> str:
    """A DuckDB aggregate over the id ``column`` (quoted SQL): the sum of the ids' hashes
    modulo 2**64, as a UBIGINT. Additive, so the digests of disjoint parts add up (mod 2**64)
    to the digest of their union: how the driver checks that the workers' parts hold each
    instance of the dataset exactly once without reading them."""
    return (f"coalesce((sum(hash(CAST({column} AS {ID_SQL_TYPES[id_type]})))::HUGEINT "
            f"% 18446744073709551616)::UBIGINT, 0::UBIGINT)")


def hashing_connection():
    """This process's in-memory DuckDB for hashing a batch's ids (a new connection costs
    20 ms, more than the hashing; a worker hashes every batch)."""
    import duckdb

    global _HASHING
    if _HASHING is None:
        _HASHING = duckdb.connect(":memory:")
    return _HASHING


_HASHING = None


def id_digest(ids: pa.Array | pa.ChunkedArray, id_type: str) -> int:
    """:func:`id_digest_sql` of an Arrow array of ids."""
    con = hashing_connection()
    con.register("batch_ids", pa.table({"id": ids}))
    try:
        [(digest,)] = con.execute(f"SELECT {id_digest_sql('id', id_type)} FROM batch_ids").fetchall()
    finally:
        con.unregister("batch_ids")
    return int(digest)


DIGEST_MODULUS = 2**64
INPUT_HASHER = f"duckdb-{importlib.metadata.version('duckdb')}"
"""What hashed a run's inputs (:func:`input_digest`): two runs' input digests compare only when
the same hasher made both (another DuckDB may hash otherwise)."""


def input_digest(table: pa.Table, id_column: str, input_columns: list[str], id_type: str) -> int:
    """The sum (mod 2**64) over rows of the hash of each row's id and model input columns:
    additive like :func:`id_digest`, so the batches' digests add up to the dataset's whatever
    the sharding; two runs over the same data have the same."""
    con = hashing_connection()
    columns = [id_column, *input_columns]
    con.register("batch_inputs", table.select(columns))
    quoted = ['"' + c.replace('"', '""') + '"' for c in columns]
    try:
        [(digest,)] = con.execute(
            f"SELECT coalesce((sum(hash(CAST({quoted[0]} AS {ID_SQL_TYPES[id_type]}), {', '.join(quoted[1:])}))"
            "::HUGEINT % 18446744073709551616)::UBIGINT, 0::UBIGINT) FROM batch_inputs").fetchall()
    finally:
        con.unregister("batch_inputs")
    return int(digest)


#: Statistics of every stored attribution, kept in all storage modes so that a run in
#: ``summary`` mode still answers "how much evidence, and of which sign".
ATTRIBUTION_SUMMARY_COLUMNS = ("attr_sum", "attr_abs_sum", "attr_min", "attr_max", "attr_l2")


def vector_type(length: int, value_type: pa.DataType = pa.float32()) -> pa.DataType:
    """A fixed-length vector, float32 unless told (activations, probabilities, attributions)."""
    if length < 1:
        raise ValueError(f"a stored vector needs length >= 1, got {length}")
    return pa.list_(value_type, length)


def instances_schema(
    num_classes: int,
    id_type: str = "int64",
    metadata_fields: Sequence[pa.Field] = (),
    features: int | None = None,
) -> pa.Schema:
    """Schema of the ``instances`` table.

    ``label`` and ``correct`` are null when the dataset has no label column (or the row
    has no label).
    ``input_finite`` is false for rows whose preprocessed input held NaN or Inf; such rows
    are still explained, and every map the NaN reaches is flagged ``finite = false``.
    With ``features`` (a tabular run), ``feature_value`` holds each feature's stored value
    (:func:`netloupe.storage.features.feature_values`: a number, or a categorical's category
    number), in the order of the ``features`` table.
    """
    fields = _instance_fields(num_classes, id_type)
    if features is not None:
        fields.append(pa.field("feature_value", vector_type(features, pa.float64()), nullable=False))
    for field in metadata_fields:
        if field.name in RESERVED_INSTANCE_COLUMNS:
            raise ValueError(
                f"metadata column {field.name!r} clashes with a netloupe column; "
                f"rename it in the dataset (reserved: {sorted(RESERVED_INSTANCE_COLUMNS)})"
            )
        fields.append(field.with_nullable(True))
    return pa.schema(fields)


def _instance_fields(num_classes: int, id_type: str) -> list[pa.Field]:
    """The columns netloupe writes in ``instances`` (before the dataset's metadata columns)."""
    return [
        pa.field("instance_id", ID_TYPES[id_type], nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("prediction", pa.int64(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=True),
        pa.field("probabilities", vector_type(num_classes), nullable=False),
        pa.field("input_finite", pa.bool_(), nullable=False),
        pa.field("node_id", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
    ]


RESERVED_INSTANCE_COLUMNS = tuple(field.name for field in _instance_fields(1, "int64")) + ("feature_value",)
"""The names netloupe's own ``instances`` columns take: no metadata column may take one."""


def activations_schema(num_neurons: int, id_type: str = "int64") -> pa.Schema:
    """Schema of one layer's ``activations/<layer>`` table."""
    return pa.schema(
        [
            pa.field("instance_id", ID_TYPES[id_type], nullable=False),
            pa.field("activation", vector_type(num_neurons), nullable=False),
        ]
    )


def attributions_schema(stored_size: int | None, id_type: str = "int64", curve_points: int | None = None,
                        tokens: bool = False, features: int | None = None,
                        mask_size: int | None = None) -> pa.Schema:
    """Schema of one method's ``attributions/<method>`` table.

    With ``curve_points`` (``fidelity.curve_steps + 1``), each row also holds its deletion
    and insertion curves (the target's probability as the most attributed features are
    removed / put back) and their areas; null where the map cannot be laid over the input.

    ``stored_size`` is the flattened length of the stored map (the input's for ``full``,
    H*W for ``heatmap``), or None in ``summary`` mode, where no map is kept.
    ``convergence_delta`` is Captum's delta for methods that have one (Integrated
    Gradients, DeepLift, GradientSHAP), else null: signed where Captum gives one per
    instance; for sampling methods (GradientSHAP, a noise tunnel), which give one per
    sample, the largest absolute delta among the instance's samples. ``finite`` is false when the method
    returned NaN or Inf for the row.

    With ``tokens`` (a text run), ``token_attribution`` holds one value per own token of the
    instance, in the order of its ``tokens`` row (no padding); the summary columns are over
    those values.

    With ``features`` (a tabular run), ``feature_attribution`` holds one value per feature
    (the ``features`` table's order): a perturbation method's value for the feature (Captum
    gives each of its columns that value), a gradient method's sum over its columns.

    With ``mask_size`` (an image method whose features are superpixels), ``feature_mask``
    holds the instance's superpixel number per pixel (height × width, row-major).
    """
    fields = [
        pa.field("instance_id", ID_TYPES[id_type], nullable=False),
        pa.field("target_rank", pa.int16(), nullable=False),
        pa.field("target", pa.int64(), nullable=False),
    ]
    if stored_size is not None:
        fields.append(pa.field("attribution", vector_type(stored_size), nullable=False))
    if tokens:
        fields.append(pa.field("token_attribution", pa.list_(pa.float32()), nullable=False))
    if features is not None:
        fields.append(pa.field("feature_attribution", vector_type(features), nullable=False))
    if mask_size is not None:
        fields.append(pa.field("feature_mask", vector_type(mask_size, pa.int16()), nullable=False))
    fields += [pa.field(name, pa.float32(), nullable=False) for name in ATTRIBUTION_SUMMARY_COLUMNS]
    fields += [
        pa.field("convergence_delta", pa.float64(), nullable=True),
        pa.field("finite", pa.bool_(), nullable=False),
    ]
    if curve_points is not None:
        fields += [pa.field("deletion_curve", vector_type(curve_points), nullable=True),
                   pa.field("insertion_curve", vector_type(curve_points), nullable=True),
                   pa.field("deletion_auc", pa.float32(), nullable=True),
                   pa.field("insertion_auc", pa.float32(), nullable=True)]
    return pa.schema(fields)


def tokens_schema(id_type: str = "int64") -> pa.Schema:
    """Schema of a text run's ``tokens`` table: per instance, its own tokens as the model saw
    them (``length`` of them, special tokens included, after truncation to ``text.max_length``:
    ``truncated`` says the text had more), their ids, and each token's characters in the
    text, ``text[token_start:token_end]`` (both 0 for a special token)."""
    return pa.schema([
        pa.field("instance_id", ID_TYPES[id_type], nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("tokens", pa.list_(pa.string()), nullable=False),
        pa.field("token_start", pa.list_(pa.int32()), nullable=False),
        pa.field("token_end", pa.list_(pa.int32()), nullable=False),
    ])


FIDELITY_SAMPLE_COLUMNS = ("infidelity", "sensitivity_max", "randomization_spearman", "randomization_spearman_abs")


def fidelity_schema(id_type: str = "int64") -> pa.Schema:
    """Schema of one method's ``fidelity/<method>`` table: one row per sampled instance (its
    first target). ``infidelity`` is null for layer maps (Grad-CAM), which input perturbations
    do not compare to; the rank correlations compare the map for the trained model with the
    map for a randomly re-initialised copy (signed values, and absolute values), null where a
    map is constant."""
    return pa.schema([pa.field("instance_id", ID_TYPES[id_type], nullable=False),
                      pa.field("target", pa.int64(), nullable=False)]
                     + [pa.field(name, pa.float64(), nullable=True) for name in FIDELITY_SAMPLE_COLUMNS])


INFLUENCE = "influence"
"""The training examples' influence on each instance (TracIn: :mod:`netloupe.workers.influence`)."""
INFLUENCE_SIGNS = ("proponent", "opponent")


def influence_schema(id_type: str = "int64") -> pa.Schema:
    """Schema of the ``influence`` table: per explained instance its ``k`` proponents (largest
    TracIn scores, ``rank`` 1 the largest) and ``k`` opponents (smallest, ``rank`` 1 the
    smallest), by the training set's integer id."""
    return pa.schema([pa.field("instance_id", ID_TYPES[id_type], nullable=False),
                      pa.field("train_id", pa.int64(), nullable=False),
                      pa.field("score", pa.float64(), nullable=False),
                      pa.field("rank", pa.int32(), nullable=False),
                      pa.field("sign", pa.string(), nullable=False)])


def fixed_vectors(matrix, length: int) -> pa.FixedSizeListArray:
    """Wrap a C-contiguous ``(n, length)`` float32 numpy matrix as a vector column, no copy."""
    import numpy as np

    flat = np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), length)


def vectors_to_numpy(column: pa.ChunkedArray | pa.Array):
    """The inverse of :func:`fixed_vectors`: an ``(n, d)`` float32 matrix from a vector column."""
    import numpy as np

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
    else:  # a variable list column (as DuckDB returns arrays) whose lists are all one length
        lengths = np.unique(pa.compute.list_value_length(column).to_numpy(zero_copy_only=False))
        if len(lengths) > 1:
            raise ValueError(f"vectors of one column must have one length, got lengths {lengths[:5].tolist()}")
        width = int(lengths[0]) if len(lengths) else 0
    return np.asarray(values, dtype=np.float32).reshape(len(column), width)


def projections_schema(algorithms: Sequence[str], id_type: str = "int64") -> pa.Schema:
    """Schema of one ``projections/<kind>/<name>`` table: ``<algorithm>_x, <algorithm>_y``
    per fitted projection (``pca``, ``umap``), NaN for an instance whose vector was not finite."""
    fields = [pa.field("instance_id", ID_TYPES[id_type], nullable=False)]
    for algorithm in algorithms:
        fields += [pa.field(f"{algorithm}_x", pa.float32(), nullable=False),
                   pa.field(f"{algorithm}_y", pa.float32(), nullable=False)]
    return pa.schema(fields)


def table_from_columns(schema: pa.Schema, columns: Mapping[str, object]) -> pa.Table:
    """Build a table that has exactly ``schema``; a missing or extra column is an error."""
    missing = [f.name for f in schema if f.name not in columns]
    extra = [name for name in columns if schema.get_field_index(name) < 0]
    if missing or extra:
        raise ValueError(f"columns do not match the schema: missing {missing}, unexpected {extra}")
    arrays = []
    for f in schema:
        value = columns[f.name]
        if isinstance(value, (pa.Array, pa.ChunkedArray)):
            arrays.append(value if value.type == f.type else value.cast(f.type))
        else:
            arrays.append(pa.array(value, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)
