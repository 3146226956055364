"""Turning a batch of stored rows into the model's input tensor (the spec's preprocessing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DatasetError
from pipeline.spec import PreprocessSpec


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
