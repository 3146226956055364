"""Dataset resolution: the spec's dataset found, its columns checked, its rows counted.

Every dataset reaches the workers the same way: as Parquet read by ``ray.data``; a built-in
(:mod:`netloupe.pipeline.builtin_datasets`) is written to the cache on first use, so no code
path is special.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

from netloupe.contract.errors import DatasetError, did_you_mean
from netloupe.contract.spec import JobSpec, PreprocessSpec
from netloupe.pipeline.builtin_datasets import BUILTIN_DATASETS
from netloupe.storage.catalog import driver_connection
from netloupe.storage.features import features_of
from netloupe.storage.schema import RESERVED_INSTANCE_COLUMNS, id_digest_sql
from netloupe.workers.inputs import ResolvedDataset


def _open(path: str) -> pads.Dataset:
    return pads.dataset(path, format="parquet")


def _check_ids(dataset: pads.Dataset, id_column: str, id_type: str, path: str, memory_mib: int) -> int:
    """Ids must be present and unique: they key every table of the run (checked by DuckDB,
    which spills rather than hold ten million ids in the driver). Returns the ids' digest
    (:func:`netloupe.storage.schema.id_digest_sql`), which the workers' parts must add up to."""
    column = '"' + id_column.replace('"', '""') + '"'
    with tempfile.TemporaryDirectory(prefix="netloupe-id-check-") as spill, \
            driver_connection(memory_mib, Path(spill)) as con:
        rows, present, distinct, digest = con.execute(
            f"SELECT count(*), count({column}), count(DISTINCT {column}), {id_digest_sql(column, id_type)} "
            "FROM read_parquet(?)", [dataset.files]
        ).fetchone()
        if present != rows:
            raise DatasetError(f"id column {id_column!r} of {path} has {rows - present} null values; "
                               "every instance needs an id")
        if distinct != rows:
            examples = [row[0] for row in con.execute(
                f"SELECT {column} FROM read_parquet(?) GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT 3",
                [dataset.files]).fetchall()]
            raise DatasetError(
                f"id column {id_column!r} of {path} has {rows - distinct} repeated values "
                f"(e.g. {examples}); ids must be unique: choose another id_column or de-duplicate"
            )
    return int(digest)


def resolve_dataset(job: JobSpec) -> ResolvedDataset:
    """Find the dataset, check that every named column exists, and count its rows."""
    spec = job.dataset
    source = spec.source
    preprocess = job.preprocess
    input_column, feature_columns, text_column = spec.input_column, spec.feature_columns, spec.text_column
    metadata_columns = list(spec.metadata_columns)
    feature_groups = spec.feature_groups
    if spec.rows is not None and not (source in BUILTIN_DATASETS and BUILTIN_DATASETS[source].generated):
        generated = [name for name, d in BUILTIN_DATASETS.items() if d.generated]
        raise DatasetError(
            f"dataset.rows sizes a generated built-in ({', '.join(generated)}), but source is {source!r}; "
            "use dataset.limit to explain only the first N rows of a dataset"
        )
    if source in BUILTIN_DATASETS:
        builtin = BUILTIN_DATASETS[source]
        defaults = builtin.defaults()
        path = str(builtin.path(spec.rows, spec.generator_seed))
        if input_column is None and feature_columns is None and text_column is None:
            input_column = defaults.get("input_column")
            feature_columns = defaults.get("feature_columns")
            text_column = defaults.get("text_column")
            if feature_groups is None:
                feature_groups = defaults.get("feature_groups")
        if "metadata_columns" not in spec.model_fields_set:
            metadata_columns = defaults["metadata_columns"]
        # The set's own preprocessing, with whatever the spec sets on top of it.
        preprocess = PreprocessSpec.model_validate(
            {**defaults["preprocess"], **job.preprocess.model_dump(exclude_unset=True)}
        )
    else:
        if not Path(source).exists():
            raise DatasetError(
                f"dataset {source!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}) "
                "nor an existing Parquet file or directory; check the path in dataset.source"
            )
        if input_column is None and feature_columns is None and text_column is None:
            raise DatasetError(
                f"for the Parquet dataset {source} give dataset.input_column (a list/tensor column), "
                "dataset.feature_columns (numeric columns) or dataset.text_column (strings)"
            )
        path = source
    try:
        dataset = _open(path)
        schema = dataset.schema
        num_rows = total_rows = dataset.count_rows()
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetError(
            f"cannot read {path} as Parquet: {error}. Check that the file is a complete "
            "Parquet file (re-write it if it was truncated)"
        ) from None
    available = schema.names
    wanted = {"dataset.id_column": [spec.id_column], "dataset.metadata_columns": metadata_columns}
    if text_column:
        wanted["dataset.text_column"] = [text_column]
    else:
        wanted["dataset.input_column" if input_column else "dataset.feature_columns"] = (
            [input_column] if input_column else list(feature_columns)
        )
    if spec.label_column:
        wanted["dataset.label_column"] = [spec.label_column]
    for key, names in wanted.items():
        for name in names:
            if name not in available:
                hint = (" (for unlabeled data set dataset.label_column: null)"
                        if key == "dataset.label_column" else "")
                raise DatasetError(
                    f"{key} names column {name!r}, which {path} does not have; "
                    f"{did_you_mean(name, available)}{hint}"
                )
    clashes = sorted(set(RESERVED_INSTANCE_COLUMNS) & set(metadata_columns))
    if clashes:
        raise DatasetError(
            f"metadata columns {clashes} clash with columns netloupe writes ({sorted(RESERVED_INSTANCE_COLUMNS)}); "
            "rename them in the dataset"
        )
    if feature_groups and not feature_columns:
        raise DatasetError("dataset.feature_groups groups feature columns; give dataset.feature_columns too "
                           "(or remove feature_groups)")
    if feature_columns:
        try:
            features_of(feature_columns, feature_groups)
        except ValueError as error:
            raise DatasetError(f"dataset.feature_groups: {error}") from None
    if text_column and spec.text_column is None:  # a built-in text set: the spec did not say so
        try:
            job.check_text_input()
        except ValueError as error:
            raise DatasetError(f"{source} is a set of texts: {error}") from None
    if text_column and not (pa.types.is_string(schema.field(text_column).type)
                            or pa.types.is_large_string(schema.field(text_column).type)):
        raise DatasetError(f"text column {text_column!r} has type {schema.field(text_column).type}; expected "
                           "strings (one text per row)")
    if spec.label_column and not pa.types.is_integer(schema.field(spec.label_column).type):
        raise DatasetError(
            f"label column {spec.label_column!r} has type {schema.field(spec.label_column).type}; "
            "expected integer class indices 0..classes-1 (map names to indices, and give the "
            "names as model.class_names)"
        )
    id_field = schema.field(spec.id_column)
    if pa.types.is_integer(id_field.type):
        id_type = "int64"
    elif pa.types.is_string(id_field.type) or pa.types.is_large_string(id_field.type):
        id_type = "string"
    else:
        raise DatasetError(
            f"id column {spec.id_column!r} has type {id_field.type}; expected integers or "
            "strings, one unique value per row"
        )
    if spec.limit is not None:
        num_rows = min(num_rows, spec.limit)
    if num_rows == 0:
        raise DatasetError(f"dataset {path} has no rows to explain")
    digest = _check_ids(dataset, spec.id_column, id_type, path, job.execution.driver_sql_memory_mib)
    return ResolvedDataset(
        path=path,
        input_column=input_column,
        feature_columns=tuple(feature_columns) if feature_columns else None,
        feature_groups=feature_groups or {},
        id_column=spec.id_column,
        label_column=spec.label_column,
        metadata_columns=tuple(metadata_columns),
        text_column=text_column,
        limit=spec.limit,
        num_rows=num_rows,
        id_type=id_type,
        metadata_fields=tuple(schema.field(c) for c in metadata_columns),
        preprocess=preprocess,
        # "The first N rows" are Ray Data's first N: their digest is not known before the pass.
        id_digest=digest if spec.limit is None or spec.limit >= total_rows else None,
    )
