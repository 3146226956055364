"""2-D projections of instance vectors: fitted on a sample, applied to every instance.

A :class:`Projection` is fitted once on the driver (:func:`fit_projection`) from a sample
of one table's vectors (a layer's activations or a method's attribution maps) and shipped
to the part pass's tasks (:mod:`netloupe.workers.part_pass`), which transform every part of that
table (:class:`PartProjector`) and write ``projections/<kind>/<name>/part-<key>.parquet`` beside it.

Every instance's coordinates depend on its own vector and the fitted projection only, never
on which other instances share its batch, so the workers' output equals the driver's
:meth:`Projection.transform` on the same rows whatever the sharding:

* **PCA** (scikit-learn, full SVD): ``(x - mean) @ components.T``.
* **UMAP** (umap-learn) embeds the sample; every instance is then placed as umap-learn's
  ``transform`` initialises a new point: the membership-weighted mean of the sample
  embedding at its ``umap_neighbors`` nearest sample points (exact neighbours, UMAP's
  fuzzy weights). umap-learn's ``transform`` would go on to optimise the new points
  together, and that step makes a point's place depend on its batch (measured: up to 3.4
  units apart for the same point in two batches), so it is left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from netloupe.contract.names import PROJECTION_ALGORITHMS
from netloupe.storage import schema as S
from netloupe.storage.layout import RunLayout, part_name, write_part

SOURCE_COLUMNS = {S.ACTIVATIONS: "activation", S.ATTRIBUTIONS: "attribution"}
"""The vector column a projection reads from each kind of source table."""


@dataclass(frozen=True)
class UmapFit:
    """What placing a new point in a fitted UMAP needs."""

    sample: np.ndarray
    """The ``(m, d)`` sample vectors UMAP was fitted on."""
    embedding: np.ndarray
    """Their ``(m, 2)`` UMAP coordinates."""
    neighbors: int
    """Sample points each instance is placed among."""


@dataclass(frozen=True)
class Projection:
    """The fitted 2-D projections of one source table."""

    kind: str
    """``activations`` or ``attributions``."""
    name: str
    """The layer or method."""
    dimensions: int
    """Length of the projected vectors."""
    pca_mean: np.ndarray
    pca_components: np.ndarray
    """``(2, d)``; a zero row where the data had fewer than two dimensions of variance."""
    explained_variance_ratio: list[float]
    sample_rows: int
    """Finite sample vectors the projection was fitted on."""
    umap: UmapFit | None = None
    fit_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def algorithms(self) -> tuple[str, ...]:
        return PROJECTION_ALGORITHMS if self.umap is not None else PROJECTION_ALGORITHMS[:1]

    @property
    def column(self) -> str:
        return SOURCE_COLUMNS[self.kind]

    def transform(self, vectors: np.ndarray) -> dict[str, np.ndarray]:
        """``{algorithm}_x`` / ``_y`` float32 columns for an ``(n, d)`` matrix; a row with
        NaN or Inf gets NaN coordinates."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dimensions:
            raise ValueError(f"projection of {self.kind} {self.name!r} takes (n, {self.dimensions}) "
                             f"vectors, got shape {vectors.shape}")
        finite = np.isfinite(vectors).all(axis=1)
        clean = np.where(finite[:, None], vectors, 0.0).astype(np.float64)
        coords = {"pca": (clean - self.pca_mean) @ self.pca_components.T}
        if self.umap is not None:
            coords["umap"] = _place_in_umap(self.umap, clean)
        columns = {}
        for algorithm, xy in coords.items():
            xy = np.where(finite[:, None], xy, np.nan).astype(np.float32)
            columns[f"{algorithm}_x"], columns[f"{algorithm}_y"] = xy[:, 0], xy[:, 1]
        return columns

    def describe(self) -> dict:
        """The fitted parameters as plain data (for the manifest and the catalog)."""
        return {
            "kind": self.kind, "name": self.name, "algorithms": list(self.algorithms),
            "dimensions": self.dimensions, "sample_rows": self.sample_rows,
            "explained_variance_ratio": self.explained_variance_ratio,
            "pca_mean": self.pca_mean.tolist(), "pca_components": self.pca_components.tolist(),
            "umap_neighbors": self.umap.neighbors if self.umap else None,
            "fit_seconds": self.fit_seconds,
        }


def fit_projection(kind: str, name: str, sample: np.ndarray, algorithms: tuple[str, ...], seed: int,
                   umap_neighbors: int = 15, umap_min_dist: float = 0.1) -> Projection:
    """Fit PCA (and UMAP if asked) on ``sample`` (rows in a deterministic order)."""
    from sklearn.decomposition import PCA

    n, d = sample.shape
    rows = sample[np.isfinite(sample).all(axis=1)].astype(np.float64)
    timings = {}
    started = time.perf_counter()
    # Fewer rows or dimensions than two leave a zero component (the y axis collapses).
    k = min(2, d, max(0, len(rows) - 1))
    mean = rows.mean(axis=0) if len(rows) else np.zeros(d)
    components = np.zeros((2, d))
    ratios = [0.0, 0.0]
    if k > 0:
        pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(rows)
        mean, components[:k] = pca.mean_, pca.components_
        ratios[:k] = [float(r) for r in pca.explained_variance_ratio_]
    timings["pca"] = time.perf_counter() - started
    umap_fit = None
    if "umap" in algorithms:
        started = time.perf_counter()
        umap_fit = _fit_umap(rows.astype(np.float32), seed, umap_neighbors, umap_min_dist)
        timings["umap"] = time.perf_counter() - started
    return Projection(kind, name, d, mean, components, ratios, len(rows), umap_fit, timings)


def _fit_umap(rows: np.ndarray, seed: int, neighbors: int, min_dist: float) -> UmapFit:
    import umap

    neighbors = max(2, min(neighbors, len(rows) - 1))
    # random_state makes umap-learn single-threaded and deterministic.
    model = umap.UMAP(n_components=2, n_neighbors=neighbors, min_dist=min_dist, random_state=seed)
    embedding = model.fit_transform(rows)
    return UmapFit(rows, np.asarray(embedding, dtype=np.float64), neighbors)


def _place_in_umap(fit: UmapFit, vectors: np.ndarray) -> np.ndarray:
    """umap-learn's initial placement of new points (its ``transform`` before optimising)."""
    from sklearn.neighbors import NearestNeighbors
    from umap.umap_ import smooth_knn_dist

    if len(vectors) == 0:
        return np.zeros((0, 2))
    index = NearestNeighbors(n_neighbors=fit.neighbors, algorithm="brute").fit(fit.sample)
    distances, neighbors = index.kneighbors(vectors.astype(np.float32))
    distances = distances.astype(np.float32)
    # As umap-learn's transform: local connectivity one less than the fit's default of 1.
    sigmas, rhos = smooth_knn_dist(distances, float(fit.neighbors), local_connectivity=0.0)
    excess = np.maximum(distances - rhos[:, None], 0.0)
    weights = np.exp(-excess / sigmas[:, None])
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("nk,nkj->nj", weights, fit.embedding[neighbors])


class PartProjector:
    """What the part pass does with each projection: for each part it transforms that part of
    every projected table and writes the coordinates beside it."""

    def __init__(self, projections: list[Projection], layout: RunLayout, filesystem: pafs.FileSystem, id_type: str):
        self.projections = projections
        self.layout, self.filesystem = layout, filesystem
        self.id_type = id_type

    def project_part(self, key: str, ids: pa.ChunkedArray, matrices: dict[str, np.ndarray]) -> list[tuple[str, str, int]]:
        """Project and write every table's part ``key``; ``ids`` are its instances' ids and
        ``matrices`` its layers' index matrices (rows in the same order). Returns (table, key,
        rows) per part written."""
        written = []
        for projection in self.projections:
            table = self.project(projection, key, ids, matrices)
            write_part(self.layout.projections_dir(projection.kind, projection.name), key, table,
                       self.filesystem, self.layout.root)
            written.append((f"{projection.kind}/{projection.name}", key, table.num_rows))
        return written

    def project(self, projection: Projection, key: str, ids: pa.ChunkedArray,
                matrices: dict[str, np.ndarray]) -> pa.Table:
        """The coordinates of one part of ``projection``'s source table."""
        if projection.kind == S.ACTIVATIONS and projection.name in matrices:
            # The index matrix: plain floats, 2-3x faster to read than the Parquet vectors.
            vectors = matrices[projection.name]
        else:  # an attribution map, or a layer too wide for the index
            ids, vectors = self._vectors_of_table(projection, key)
        coords = projection.transform(vectors)
        schema = S.projections_schema(projection.algorithms, self.id_type)
        return S.table_from_columns(schema, {"instance_id": ids, **coords})

    def _vectors_of_table(self, projection: Projection, key: str) -> tuple[pa.ChunkedArray, np.ndarray]:
        source = self.layout.source_dir(projection.kind, projection.name) / part_name(key)
        columns = ["instance_id", projection.column] + (["target_rank"] if projection.kind == S.ATTRIBUTIONS else [])
        table = pq.read_table(str(source), columns=columns, filesystem=self.filesystem)
        if projection.kind == S.ATTRIBUTIONS:
            table = table.filter(pc.equal(table["target_rank"], 0))
        return table["instance_id"], S.vectors_to_numpy(table[projection.column])
