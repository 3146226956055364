"""The part pass: after the explain pass, one more pass over every part, in plain Ray tasks.

Each task takes a run of consecutive part keys (in key order) and reads each part's index
matrices and instance ids once, to

* project the part: each fitted projection's coordinates, written beside it
  (:class:`~netloupe.workers.projection.PartProjector`);
* append its rows to the task's segment of each layer's wide form
  (:class:`~netloupe.storage.wide_segments.WideSegmentWriter`): one file per task and
  layer instead of one per batch, which is what DuckDB scans fast.

Plain tasks, not a Ray Data actor pool: the pass costs milliseconds per part, and starting
an actor pool cost ~5 s of the run's tail.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from netloupe.storage.layout import RunLayout, part_name, worker_layout
from netloupe.storage.wide_segments import WideSegment, WideSegmentWriter
from netloupe.workers.projection import PartProjector, Projection


@dataclass(frozen=True)
class PartPassReport:
    """What one task wrote."""

    projected: list[tuple[str, str, int]]
    """``(kind/name, key, rows)`` per projection part."""
    segments: list[WideSegment]
    """One per layer with a wide form."""


def part_pass_task(projections: list[Projection], wide_layers: dict[str, int], worker_root: str, id_type: str,
                   threads: int, keys: list[str]) -> PartPassReport:
    """The body of one task: project ``keys``' parts and write their segment of each of
    ``wide_layers`` (layer → neurons), in the staged run at ``worker_root``."""
    from threadpoolctl import threadpool_limits

    layout, filesystem = worker_layout(worker_root)
    projector = PartProjector(projections, layout, filesystem, id_type)
    projected = []
    # BLAS threads as the explain workers' torch threads: the cores shared by the workers.
    with threadpool_limits(threads), contextlib.ExitStack() as stack:
        writers = [stack.enter_context(WideSegmentWriter(layout, layer, neurons, id_type, keys[0], filesystem,
                                                         layout.root))
                   for layer, neurons in wide_layers.items()]
        for key in keys:
            ids = pq.read_table(str(layout.instances_dir / part_name(key)), columns=["instance_id"],
                                filesystem=filesystem)["instance_id"]
            matrices = {layer: _index_matrix(layout, filesystem, layer, key) for layer in wide_layers}
            projected += projector.project_part(key, ids, matrices)
            for writer in writers:
                writer.add(key, ids, matrices[writer.layer])
    return PartPassReport(projected, [writer.segment for writer in writers])


def _index_matrix(layout: RunLayout, filesystem: pafs.FileSystem, layer: str, key: str) -> np.ndarray:
    """A part's rows of ``layer`` as the workers wrote them beside the batch."""
    with filesystem.open_input_file(str(layout.index_layer_dir(layer) / part_name(key, ".npy"))) as stream:
        return np.load(io.BytesIO(stream.read()), allow_pickle=False)
