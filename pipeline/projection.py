"""The projection stage of a run: sample, fit on the driver, transform in the workers.

Runs after every explained part is staged and checked, before the catalog is built:

1. draw the sample: ``projection.sample_size`` instance ids by a seeded hash of the ids
   (:func:`netloupe.storage.reader.sample_instance_ids`), kept as ``projections/sample.parquet``;
2. per projected table, read the sample's vectors and fit (:func:`netloupe.workers.projection.fit_projection`);
   the driver holds the sample only, never the whole table;
3. a Ray Data pass over the run's part keys: :class:`netloupe.workers.projection.ProjectWorker`
   actors read each part, transform it and write its coordinates beside it.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from netloupe.contract.errors import RunError
from netloupe.contract.spec import JobSpec
from netloupe.storage import schema as S
from netloupe.storage.layout import RunLayout, write_parquet
from netloupe.storage.manifest import Projections, ProjectionTable
from netloupe.storage.reader import read_vectors, sample_instance_ids
from netloupe.workers.projection import SOURCE_COLUMNS, Projection, ProjectWorker, fit_projection

SAMPLE_BYTES = 512 * 2**20
"""Most float64 sample bytes fitted per table on the driver: wide vectors (an unpooled conv
map, a full attribution map) are fitted on the first rows of the sample that fit in it."""


def projection_sources(spec: JobSpec) -> list[tuple[str, str]]:
    """``(kind, name)`` of every table the spec projects."""
    return ([(S.ACTIVATIONS, layer) for layer in spec.projected_layers]
            + [(S.ATTRIBUTIONS, method) for method in spec.projection.attributions])


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


def fit_projections(spec: JobSpec, layout: RunLayout) -> tuple[pa.Array, list[Projection]]:
    """Draw the sample, store its ids, and fit every projection on it (on the driver)."""
    settings = spec.projection
    memory_mib = spec.execution.driver_sql_memory_mib
    ids = sample_instance_ids(layout.instances_dir, settings.sample_size, settings.seed, memory_mib)
    write_parquet(layout.projection_sample_path, pa.table(
        {"instance_id": ids, "position": pa.array(np.arange(len(ids), dtype=np.int64))}))
    projections = []
    for kind, name in projection_sources(spec):
        width = _vector_width(layout, kind, name)
        # The sample is in hash order, so its first rows are a uniform sample as well.
        rows = ids.slice(0, max(2, SAMPLE_BYTES // (8 * width)))
        vectors = read_vectors(layout.source_dir(kind, name), SOURCE_COLUMNS[kind], rows, memory_mib)
        projections.append(fit_projection(kind, name, vectors, settings.algorithms, settings.seed,
                                          settings.umap_neighbors, settings.umap_min_dist))
    return ids, projections


def _vector_width(layout: RunLayout, kind: str, name: str) -> int:
    import pyarrow.dataset as pads

    field = pads.dataset(layout.source_dir(kind, name), format="parquet").schema.field(SOURCE_COLUMNS[kind])
    return field.type.list_size


def run_projection_stage(spec: JobSpec, layout: RunLayout, keys: set[str], id_type: str,
                         threads: int, worker_root: str | None = None) -> Projections:
    """Fit and apply every projection of the spec; return the manifest's ``projections``.

    The driver fits on ``layout`` (local); the workers read and write the staged run at
    ``worker_root`` (:attr:`netloupe.storage.layout.RunStaging.worker_root`; default ``layout``).
    """
    import ray

    sources = projection_sources(spec)
    if not sources:
        return Projections(seed=spec.projection.seed)
    started = time.perf_counter()
    ids, projections = fit_projections(spec, layout)
    fitted = time.perf_counter()
    execution = spec.execution
    results = ray.data.from_items([{"part": key} for key in sorted(keys)]).map_batches(
        ProjectWorker,
        fn_constructor_kwargs={"projections": projections, "worker_root": worker_root or str(layout.root.resolve()),
                               "id_type": id_type, "threads": threads},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=execution.num_workers),
        num_cpus=execution.cpus_per_worker,
    )
    reported = {(row["table"], row["part"]) for row in results.iter_rows()}
    missing = [(f"{kind}/{name}", key) for kind, name in sources for key in keys
               if (f"{kind}/{name}", key) not in reported]
    if missing:
        raise RunError(f"the projection pass did not report {len(missing)} parts (e.g. {missing[:3]}); "
                       "nothing was committed")
    return Projections(
        sample_rows=len(ids), seed=spec.projection.seed,
        tables=[ProjectionTable.model_validate(p.describe()) for p in projections],
        timings={"fit_seconds": fitted - started, "transform_seconds": time.perf_counter() - fitted},
    )
