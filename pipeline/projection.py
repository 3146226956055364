"""The projection stage of a run: sample, fit on the driver, transform in the workers.

Runs after every explained part is staged and checked, before the catalog is built:

1. draw the sample: the ``projection.sample_size`` instances first by a seeded hash of their
   ids (:func:`netloupe.storage.reader.sample_instance_ids`' order), kept as
   ``projections/sample.parquet``. The workers gathered the candidates as they explained:
   each batch's rows early in that order, with their vectors
   (:func:`netloupe.storage.part_statistics.projection_candidates`), so the driver reads those
   few rows, never the tables;
2. per projected table, fit on the sample's vectors (:func:`netloupe.workers.projection.fit_projection`);
3. Ray tasks over chunks of the run's part keys (:func:`netloupe.workers.projection.projection_task`)
   read each part, transform it and write its coordinates beside it.
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
from netloupe.workers.projection import SOURCE_COLUMNS, Projection, fit_projection, projection_task

TASKS_PER_WORKER = 4
"""Projection tasks per worker: enough for one slow node not to hold up the pass, few enough
that a task's overhead (~ms) is small beside its parts (a few ms each)."""
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


def run_projection_stage(spec: JobSpec, layout: RunLayout, rows: dict[str, int], id_type: str,
                         worker_root: str | None = None) -> Projections:
    """Fit and apply every projection of the spec; return the manifest's ``projections``.

    The driver fits on ``layout`` (local); the workers read and write the staged run at
    ``worker_root`` (:attr:`netloupe.storage.layout.RunStaging.worker_root`; default ``layout``).
    """
    import ray

    sources = spec.projection_sources
    if not sources:
        return Projections(seed=spec.projection.seed)
    started = time.perf_counter()
    ids, projections = fit_projections(spec, layout, sum(rows.values()))
    fitted = time.perf_counter()
    execution = spec.execution
    keys = sorted(rows)
    tasks = max(1, min(len(keys), execution.num_workers * TASKS_PER_WORKER))
    shipped = ray.put(projections)
    # A whole CPU at least: with fractional workers (many per core) as many task processes
    # would start at once, each importing numpy, pyarrow and scikit-learn for milliseconds of work.
    cpus = max(1.0, execution.cpus_per_worker)
    task = ray.remote(projection_task).options(num_cpus=cpus, scheduling_strategy="SPREAD")
    threads = round(cpus)  # BLAS threads: the CPUs a task holds (more tasks than workers may run at once)
    pending = [task.remote(shipped, worker_root or str(layout.root.resolve()), id_type, threads, keys[i::tasks])
               for i in range(tasks)]
    try:
        done = ray.get(pending)
    except BaseException:
        for ref in pending:  # none may go on writing into a staging the failure removes
            ray.cancel(ref, force=True)
        raise
    reported = {(table, key): written for parts in done for table, key, written in parts}
    wrong = [(f"{kind}/{name}", key) for kind, name in sources for key in rows
             if reported.get((f"{kind}/{name}", key)) != rows[key]]
    if wrong:
        raise RunError(f"the projection pass did not report {len(wrong)} parts with their batch's rows "
                       f"(e.g. {wrong[:3]}); nothing was committed")
    return Projections(
        sample_rows=len(ids), seed=spec.projection.seed,
        tables=[ProjectionTable.model_validate(p.describe()) for p in projections],
        timings={"fit_seconds": fitted - started, "transform_seconds": time.perf_counter() - fitted},
    )
