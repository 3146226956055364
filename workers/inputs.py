"""The dataset as workers see it (:class:`ResolvedDataset`: where it is, which columns play
which part), and turning a batch of stored rows into the model's input tensor."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from netloupe.contract.errors import DatasetError
from netloupe.contract.spec import PreprocessSpec
from netloupe.storage.features import Feature, features_of


@dataclass(frozen=True)
class ResolvedDataset:
    """A dataset ready to read: where it is and which columns play which part."""

    path: str
    input_column: str | None
    feature_columns: tuple[str, ...] | None
    id_column: str
    label_column: str | None
    metadata_columns: tuple[str, ...]
    limit: int | None
    num_rows: int
    """Rows that will be explained (after ``limit``)."""
    id_type: str
    """``int64`` or ``string``."""
    metadata_fields: tuple[pa.Field, ...]
    preprocess: PreprocessSpec
    """The spec's preprocessing, or the built-in set's own when the spec gives none."""
    text_column: str | None = None
    """The column of texts, when the instances are texts (tokenized in the workers)."""
    id_digest: int | None = None
    """The digest of every id explained (:func:`netloupe.storage.schema.id_digest_sql`); None
    when only the first ``limit`` rows are (the workers' reports are then counted only)."""
    feature_groups: dict[str, list[str]] = field(default_factory=dict)
    """Feature columns that are one feature together (``dataset.feature_groups``)."""
    background: pa.Table | None = None
    """The background rows (:mod:`netloupe.pipeline.run_background`), when a method needs them."""

    @property
    def features(self) -> list[Feature]:
        """A tabular set's features (:func:`netloupe.storage.features.features_of`); else empty."""
        return features_of(self.feature_columns, self.feature_groups) if self.feature_columns else []

    @property
    def input_columns(self) -> list[str]:
        """The columns of the model's input: the texts, the input column, or the features."""
        if self.text_column:
            return [self.text_column]
        return [self.input_column] if self.input_column else list(self.feature_columns)

    @property
    def columns(self) -> list[str]:
        """Columns the workers read."""
        cols = [self.id_column, *self.input_columns]
        if self.label_column:
            cols.append(self.label_column)
        return cols + [c for c in self.metadata_columns if c not in cols]

    def head(self, n: int) -> pa.Table:
        """The first ``n`` rows of the needed columns, read on the driver without Ray.

        Read row group by row group: the dataset scanner's read-ahead pulled 450 MB of a
        200k-row file into the driver to return 4 rows.
        """
        batches, rows = [], 0
        try:
            dataset = pads.dataset(self.path, format="parquet")
            schema = pa.schema([dataset.schema.field(c) for c in self.columns])
            for fragment in dataset.get_fragments():
                with pq.ParquetFile(fragment.path, filesystem=fragment.filesystem) as file:
                    for batch in file.iter_batches(batch_size=n, columns=self.columns):
                        batches.append(batch.slice(0, n - rows))
                        rows += batches[-1].num_rows
                        if rows >= n:
                            return pa.Table.from_batches(batches).cast(schema)
            return pa.Table.from_batches(batches, schema=schema)
        except (pa.ArrowInvalid, OSError) as error:
            raise DatasetError(f"cannot read {self.path}: {error}") from None


@dataclass(frozen=True)
class InputDecoder:
    """Decodes the input column (or feature columns) of an Arrow batch into ``(n, *shape)``."""

    input_column: str | None
    feature_columns: tuple[str, ...] | None
    preprocess: PreprocessSpec

    def stored_matrix(self, table: pa.Table) -> np.ndarray:
        """The raw stored values as an ``(n, width)`` array, before preprocessing."""
        n = table.num_rows
        if self.feature_columns:
            columns = []
            for name in self.feature_columns:
                column = table[name]
                if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
                    raise DatasetError(
                        f"feature column {name!r} has type {column.type}; feature columns must be "
                        "numeric (encode categories as numbers, or list them as metadata_columns)"
                    )
                columns.append(column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False))
            return np.stack(columns, axis=1) if columns else np.zeros((n, 0))
        column = table[self.input_column].combine_chunks()
        if column.null_count:
            raise DatasetError(
                f"input column {self.input_column!r} has {column.null_count} null rows in this "
                "batch; every instance needs an input (drop or fill those rows)"
            )
        kind = column.type
        if pa.types.is_fixed_size_list(kind):
            width = kind.list_size
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            if n and (lengths != lengths[0]).any():
                raise DatasetError(
                    f"input column {self.input_column!r} holds lists of different lengths "
                    f"({int(lengths.min())} to {int(lengths.max())}); every instance must have "
                    "the same number of values"
                )
            width = int(lengths[0]) if n else 0
        else:
            raise DatasetError(
                f"input column {self.input_column!r} has type {kind}; expected a list of numbers "
                "per row (e.g. an image flattened to list<uint8>)"
            )
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(n, width)

    def instance_shape(self, width: int) -> tuple[int, ...]:
        """The per-instance shape the model takes, checked against the stored width."""
        shape = tuple(self.preprocess.shape) if self.preprocess.shape else (width,)
        if int(np.prod(shape)) != width:
            raise DatasetError(
                f"preprocess.shape {list(shape)} holds {int(np.prod(shape))} values but each "
                f"stored input has {width}; set preprocess.shape to a shape with {width} values"
            )
        return shape

    def __call__(self, table: pa.Table) -> np.ndarray:
        raw = self.stored_matrix(table)
        shape = self.instance_shape(raw.shape[1])
        dtype = np.dtype(self.preprocess.dtype)
        x = raw.astype(dtype, copy=True).reshape((raw.shape[0],) + shape)
        p = self.preprocess
        if p.scale != 1.0:
            x *= dtype.type(p.scale)
        if p.offset != 0.0:
            x += dtype.type(p.offset)
        for name, values in (("mean", p.mean), ("std", p.std)):
            if values is None:
                continue
            vector = np.asarray(values, dtype=dtype)
            channels = shape[0]
            if vector.size not in (1, channels):
                raise DatasetError(
                    f"preprocess.{name} has {vector.size} values; expected 1 or one per "
                    f"channel/feature ({channels} for shape {list(shape)})"
                )
            vector = vector.reshape((1, -1) + (1,) * (len(shape) - 1))
            if name == "mean":
                x -= vector
            else:
                x /= vector
        return x
