"""The projection stage's fit: the sample, and the projections fitted on the driver.

Runs after every explained part is staged and checked, before the part pass applies the
projections in the workers (:mod:`netloupe.pipeline.part_pass`):

1. draw the sample: the ``projection.sample_size`` instances first by a seeded hash of their
   ids (:func:`netloupe.storage.reader.sample_instance_ids`' order), kept as
   ``projections/sample.parquet``. The workers gathered the candidates as they explained:
   each batch's rows early in that order, with their vectors
   (:func:`netloupe.storage.part_statistics.projection_candidates`), so the driver reads those
   few rows, never the tables;
2. per projected table, fit on the sample's vectors (:func:`netloupe.workers.projection.fit_projection`).
"""

from __future__ import annotations

import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from netloupe.contract.errors import RunError
from netloupe.contract.spec import JobSpec
from netloupe.storage import schema as S
from netloupe.storage.layout import RunLayout, write_parquet
from netloupe.storage.manifest import Projections, ProjectionTable
from netloupe.storage.reader import read_vectors, sample_instance_ids
from netloupe.workers.projection import SOURCE_COLUMNS, Projection, fit_projection

SAMPLE_BYTES = 512 * 2**20
"""Most float64 sample bytes fitted per table on the driver: wide vectors (an unpooled conv
map, a full attribution map) are fitted on the first rows of the sample that fit in it."""


def check_umap_available(spec: JobSpec) -> None:
    """Fail before any work when UMAP is asked for and umap-learn is not installed."""
    if not spec.projection.umap:
        return
    try:
        import umap  # noqa: F401
    except ImportError:
        raise RunError(
            "projection.umap is true but umap-learn is not installed; install it with "
            "`pip install 'netloupe[umap]'` (or `pip install umap-learn`), or set projection.umap: false"
        ) from None


def fit_projections(spec: JobSpec, layout: RunLayout, instances: int) -> tuple[pa.Array, list[Projection]]:
    """Draw the sample from the workers' candidates, store its ids, and fit every projection
    on it (on the driver)."""
    settings = spec.projection
    memory_mib = spec.execution.driver_sql_memory_mib
    sources = spec.projection_sources
    samples = {source: _sample_of_candidates(layout, *source, settings.sample_size) for source in sources}
    ids = samples[sources[0]][0]
    if any(len(sample_ids) != len(ids) for sample_ids, _ in samples.values()) or len(ids) < min(
            settings.sample_size, instances):
        # Fewer candidates than the sample (a one-in-a-billion draw): the sample from the tables.
        ids = sample_instance_ids(layout.instances_dir, settings.sample_size, settings.seed, memory_mib)
        samples = {source: (ids, read_vectors(layout.source_dir(*source), SOURCE_COLUMNS[source[0]],
                                              ids.slice(0, _fitted_rows(layout, *source)), memory_mib))
                   for source in sources}
    write_parquet(layout.projection_sample_path, pa.table(
        {"instance_id": ids, "position": pa.array(np.arange(len(ids), dtype=np.int64))}))
    projections = []
    for (kind, name), (_, vectors) in samples.items():
        # The sample is in hash order, so its first rows are a uniform sample as well.
        vectors = vectors[:max(2, SAMPLE_BYTES // (8 * vectors.shape[1]))]
        projections.append(fit_projection(kind, name, vectors, settings.algorithms, settings.seed,
                                          settings.umap_neighbors, settings.umap_min_dist))
    return ids, projections


def _sample_of_candidates(layout: RunLayout, kind: str, name: str, size: int) -> tuple[pa.Array, np.ndarray]:
    """The ``size`` first candidates of one table in sample order: their ids and vectors."""
    parts = str(layout.projection_sample_dir(kind, name) / "*.parquet")
    with duckdb.connect() as con:
        table = con.sql("SELECT instance_id, vector FROM read_parquet(?) ORDER BY sample_hash, instance_id LIMIT ?",
                        params=[parts, size]).to_arrow_table()
    return table["instance_id"].combine_chunks(), S.vectors_to_numpy(table["vector"])


def _fitted_rows(layout: RunLayout, kind: str, name: str) -> int:
    field = pads.dataset(layout.source_dir(kind, name), format="parquet").schema.field(SOURCE_COLUMNS[kind])
    return max(2, SAMPLE_BYTES // (8 * field.type.list_size))


def fit_projection_stage(spec: JobSpec, layout: RunLayout, instances: int) -> tuple[list[Projection], Projections]:
    """Fit every projection of the spec on the driver; return them (for the part pass) and the
    manifest's ``projections`` (without the pass's timings)."""
    if not spec.projection_sources:
        return [], Projections(seed=spec.projection.seed)
    started = time.perf_counter()
    ids, projections = fit_projections(spec, layout, instances)
    return projections, Projections(
        sample_rows=len(ids), seed=spec.projection.seed,
        tables=[ProjectionTable.model_validate(p.describe()) for p in projections],
        timings={"fit_seconds": time.perf_counter() - started},
    )
