"""The run's background set: instances drawn from the dataset for the methods whose baseline is
the data itself (``baseline: background``, the expected value over those rows, as SHAP's
explainers take it; ``baseline: mean``, their mean).

Drawn once, on the driver, by a seeded hash of the instance ids (the ``size`` lowest): the
same rows whatever the files, their order or the sharding, and the same on a resume. The rows
go to every worker with the dataset and are stored with the run (``background.parquet``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

from netloupe.contract.errors import DatasetError
from netloupe.contract.spec import DATA_BASELINES, JobSpec
from netloupe.storage.catalog import driver_connection
from netloupe.workers.inputs import ResolvedDataset


def needs_background(spec: JobSpec) -> bool:
    return any(method.baseline in DATA_BASELINES for method in spec.attributions)


def draw_background(spec: JobSpec, dataset: ResolvedDataset) -> pa.Table:
    """The background rows (the columns the workers read), ordered by their hash."""
    size = spec.background.size
    column = '"' + dataset.id_column.replace('"', '""') + '"'
    columns = ", ".join('"' + c.replace('"', '""') + '"' for c in dataset.columns)
    files = pads.dataset(dataset.path, format="parquet").files
    # Within `limit`, the first rows are the ones explained: draw among those only.
    source = ("read_parquet($files)" if dataset.limit is None
              else f"(SELECT * FROM read_parquet($files) LIMIT {int(dataset.limit)})")
    with tempfile.TemporaryDirectory(prefix="netloupe-background-") as spill, \
            driver_connection(spec.execution.driver_sql_memory_mib, Path(spill)) as con:
        table = con.sql(
            f"SELECT {columns} FROM {source} ORDER BY hash({column}::VARCHAR || '/' || $seed), {column} LIMIT $size",
            params={"seed": str(spec.background.seed), "size": size, "files": files}).to_arrow_table()
    if table.num_rows < min(size, dataset.num_rows):
        raise DatasetError(f"background.size is {size} but only {table.num_rows} rows could be drawn")
    schema = pa.schema([pads.dataset(dataset.path, format="parquet").schema.field(c) for c in dataset.columns])
    return table.cast(schema)
