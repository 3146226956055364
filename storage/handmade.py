"""Write a committed run from arrays already in memory, without a model or Ray.

Tests use it to build runs whose every number is known, and benchmarks to build runs of
a million instances in seconds. The files are the ones the pipeline writes (the same
schemas, layout, catalog and atomic commit), so whatever reads a run reads these too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from netloupe.storage import schema as S
from netloupe.storage.catalog import build_catalog
from netloupe.storage.layout import RunLayout, RunStaging, part_name, write_npy, write_part
from netloupe.storage.manifest import (
    Counts,
    DatasetInfo,
    ModelFacts,
    ModelIdentity,
    Projections,
    ProjectionTable,
    RunManifest,
    Tables,
)
from netloupe.storage.part_statistics import WIDE_NEURON_LIMIT, derive_parts
from netloupe.storage.wide_segments import WideSegmentWriter


def write_handmade_run(
    output_root: str | os.PathLike,
    run_name: str,
    instances: pa.Table,
    activations: Mapping[str, np.ndarray],
    attributions: Mapping[str, np.ndarray] | None = None,
    rows_per_part: int = 65536,
    projections: Mapping[str, np.ndarray] | None = None,
) -> RunLayout:
    """Commit a run and return its layout.

    ``instances`` has ``instance_id`` (int64 or string), ``label`` (nullable),
    ``prediction``, ``probabilities`` (a vector column, :func:`netloupe.storage.schema.fixed_vectors`)
    and any metadata columns; ``confidence``, ``correct``, ``input_finite``, ``node_id``
    and ``device`` are derived when absent.
    ``activations`` maps a layer name to its ``(n, neurons)`` matrix and ``attributions``
    a method name to its ``(n, *map_shape)`` maps (one target per instance), rows in
    the order of ``instances``. ``projections`` maps a recorded layer to given ``(n, 2)``
    coordinates, stored as that layer's PCA projection (nothing is fitted).
    """
    attributions = attributions or {}
    projections = projections or {}
    unknown = sorted(set(projections) - set(activations))
    if unknown:
        raise ValueError(f"projections are of recorded layers {sorted(activations)}, got {unknown}")
    n = instances.num_rows
    probabilities = S.vectors_to_numpy(instances["probabilities"])
    num_classes = probabilities.shape[1]
    columns = {name: instances[name] for name in instances.column_names}
    label = instances["label"].to_numpy(zero_copy_only=False) if "label" in columns else None
    prediction = instances["prediction"].to_numpy()
    columns.setdefault("label", pa.nulls(n, pa.int64()))
    columns.setdefault("confidence", pa.array(probabilities.max(axis=1)))
    if "correct" not in columns:
        correct = None if label is None else pa.array([None if l is None else bool(l == p) for l, p in
                                                      zip(instances["label"].to_pylist(), prediction.tolist())])
        columns["correct"] = correct if correct is not None else pa.nulls(n, pa.bool_())
    columns.setdefault("input_finite", pa.array(np.ones(n, bool)))
    columns.setdefault("node_id", pa.array(["handmade"] * n))
    columns.setdefault("device", pa.array(["cpu"] * n))
    id_type = "string" if pa.types.is_string(instances["instance_id"].type) else "int64"
    metadata_fields = [instances.schema.field(name) for name in instances.column_names
                       if name not in S.RESERVED_INSTANCE_COLUMNS]
    instance_schema = S.instances_schema(num_classes, id_type, metadata_fields)
    instance_table = S.table_from_columns(instance_schema, columns)

    staging = RunStaging.open(output_root, run_name)
    layout = staging.create()
    try:
        ids = instance_table["instance_id"]
        for start in range(0, n, rows_per_part):
            stop = min(n, start + rows_per_part)
            key = f"{start:012d}"
            part_instances = instance_table.slice(start, stop - start)
            for layer, matrix in activations.items():
                width = matrix.shape[1]
                write_part(layout.activations_dir(layer), key, S.table_from_columns(
                    S.activations_schema(width, id_type),
                    {"instance_id": ids.slice(start, stop - start),
                     "activation": S.fixed_vectors(matrix[start:stop], width)}))
            part_attributions = {}
            for method, maps in attributions.items():
                flat = maps[start:stop].reshape(stop - start, -1).astype(np.float32)
                width = flat.shape[1]
                part_attributions[method] = S.table_from_columns(
                    S.attributions_schema(width, id_type),
                    {"instance_id": ids.slice(start, stop - start),
                     "target_rank": pa.array(np.zeros(stop - start, np.int16)),
                     "target": instance_table["prediction"].slice(start, stop - start),
                     "attribution": S.fixed_vectors(flat, width),
                     "attr_sum": flat.sum(axis=1), "attr_abs_sum": np.abs(flat).sum(axis=1),
                     "attr_min": flat.min(axis=1), "attr_max": flat.max(axis=1),
                     "attr_l2": np.linalg.norm(flat, axis=1),
                     "convergence_delta": pa.nulls(stop - start, pa.float64()),
                     "finite": np.isfinite(flat).all(axis=1)})
                write_part(layout.attributions_dir(method), key, part_attributions[method])
            derived = derive_parts(part_instances, {layer: m[start:stop] for layer, m in activations.items()},
                                   part_attributions, {}, id_type)
            for relative, table in derived.tables.items():
                write_part(layout.root / relative, key, table, options=derived.options.get(relative))
            for relative, matrix in derived.matrices.items():
                write_npy(layout.root / relative / part_name(key, ".npy"), matrix)
            for layer, coordinates in projections.items():
                write_part(layout.projections_dir(S.ACTIVATIONS, layer), key, S.table_from_columns(
                    S.projections_schema(["pca"], id_type),
                    {"instance_id": ids.slice(start, stop - start),
                     "pca_x": coordinates[start:stop, 0].astype(np.float32),
                     "pca_y": coordinates[start:stop, 1].astype(np.float32)}))
            write_part(layout.instances_dir, key, part_instances)
        _write_wide_segments(layout, instance_table["instance_id"], activations, rows_per_part, id_type)
        fitted = [ProjectionTable(kind=S.ACTIVATIONS, name=layer, algorithms=["pca"],
                                  dimensions=int(activations[layer].shape[1]), sample_rows=n,
                                  explained_variance_ratio=[0.0, 0.0]) for layer in projections]
        manifest = RunManifest(
            run_name=run_name,
            created_unix=time.time(),
            handmade=True,
            dataset=DatasetInfo(id_type=id_type, label_column="label",
                                metadata_columns=[f.name for f in metadata_fields]),
            counts=Counts(instances=n),
            class_names=[str(c) for c in range(num_classes)],
            model=ModelFacts(
                num_classes=num_classes, input_shape=(),
                layer_neurons={layer: int(m.shape[1]) for layer, m in activations.items()},
                layer_output_shapes={layer: (int(m.shape[1]),) for layer, m in activations.items()},
                attribution_shapes={method: tuple(m.shape[1:]) for method, m in attributions.items()},
                attribution_raw_shapes={method: tuple(m.shape[1:]) for method, m in attributions.items()},
                per_instance_bytes=0,
            ),
            # No model: the numbers were given, as probabilities.
            model_identity=ModelIdentity(fingerprint=None, output="probabilities"),
            tables=Tables(
                activations={layer: f"activations/{layer}" for layer in activations},
                attributions={method: f"attributions/{method}" for method in attributions},
                projections={f"{S.ACTIVATIONS}/{layer}": f"projections/{S.ACTIVATIONS}/{layer}" for layer in projections},
            ),
            projections=Projections(sample_rows=n, tables=fitted),
        )
        manifest = manifest.model_copy(update={"timings": {"catalog": build_catalog(layout, manifest)}})
        return staging.commit(manifest)
    except BaseException:
        staging.abort()
        raise


def _write_wide_segments(layout: RunLayout, ids: pa.ChunkedArray, activations: Mapping[str, np.ndarray],
                         rows_per_part: int, id_type: str) -> None:
    """Each layer's wide form as one segment of every part (as a part pass of one task writes it)."""
    n = len(ids)
    for layer, matrix in activations.items():
        if matrix.shape[1] > WIDE_NEURON_LIMIT or n == 0:
            continue
        with WideSegmentWriter(layout, layer, matrix.shape[1], id_type, f"{0:012d}") as segment:
            for start in range(0, n, rows_per_part):
                stop = min(n, start + rows_per_part)
                segment.add(f"{start:012d}", ids.slice(start, stop - start), matrix[start:stop])
