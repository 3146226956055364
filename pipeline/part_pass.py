"""The part pass of a run: after the explain pass and the projections' fit, Ray tasks read
every part once more to write its projection coordinates and the layers' wide segments
(:mod:`netloupe.workers.part_pass`); the driver checks what they report against the batches'
reports, reading no part.

Each task takes a run of consecutive part keys, so each writes one wide segment per layer: the
number of files DuckDB scans is the number of tasks, not of batches.
"""

from __future__ import annotations

from netloupe.contract.errors import RunError
from netloupe.contract.spec import JobSpec
from netloupe.storage.wide_segments import WideSegment
from netloupe.workers.part_pass import PartPassReport, part_pass_task
from netloupe.workers.projection import Projection

TASKS_PER_WORKER = 4
"""Tasks per worker: enough for one slow node not to hold up the pass, few enough that a task's
overhead (~ms) is small beside its parts (a few ms each)."""
MIN_TASK_ROWS = 32768
"""Fewest instances a task is given (a small run gets fewer tasks): a segment of fewer rows
than a row group would bring back the per-file cost the segments are for."""


def run_part_pass(spec: JobSpec, projections: list[Projection], wide_layers: dict[str, int], rows: dict[str, int],
                  id_type: str, worker_root: str) -> list[WideSegment]:
    """Project every part and write each of ``wide_layers``' (layer → neurons) segments in the
    workers, in the staged run at ``worker_root``; ``rows`` maps each batch's key to its rows.
    Returns the segments written, checked to hold every batch once."""
    import ray

    if not projections and not wide_layers:
        return []
    execution = spec.execution
    keys = sorted(rows)
    tasks = max(1, min(len(keys), execution.num_workers * TASKS_PER_WORKER, -(-sum(rows.values()) // MIN_TASK_ROWS)))
    bounds = [round(i * len(keys) / tasks) for i in range(tasks + 1)]
    shipped = ray.put(projections)
    # A whole CPU at least: with fractional workers (many per core) as many task processes
    # would start at once, each importing numpy, pyarrow and scikit-learn for milliseconds of work.
    cpus = max(1.0, execution.cpus_per_worker)
    task = ray.remote(part_pass_task).options(num_cpus=cpus, scheduling_strategy="SPREAD")
    threads = round(cpus)  # BLAS threads: the CPUs a task holds (more tasks than workers may run at once)
    pending = [task.remote(shipped, wide_layers, worker_root, id_type, threads, keys[bounds[i]:bounds[i + 1]])
               for i in range(tasks)]
    try:
        reports: list[PartPassReport] = ray.get(pending)
    except BaseException:
        for ref in pending:  # none may go on writing into a staging the failure removes
            ray.cancel(ref, force=True)
        raise
    _check_projected(reports, projections, rows)
    segments = [segment for report in reports for segment in report.segments]
    _check_segments(segments, wide_layers, rows)
    return segments


def _check_projected(reports: list[PartPassReport], projections: list[Projection], rows: dict[str, int]) -> None:
    reported = {(table, key): written for report in reports for table, key, written in report.projected}
    wrong = [(f"{p.kind}/{p.name}", key) for p in projections for key in rows
             if reported.get((f"{p.kind}/{p.name}", key)) != rows[key]]
    if wrong:
        raise RunError(f"the part pass did not report {len(wrong)} projection parts with their batch's rows "
                       f"(e.g. {wrong[:3]}); nothing was committed")


def _check_segments(segments: list[WideSegment], wide_layers: dict[str, int], rows: dict[str, int]) -> None:
    """Each layer's segments hold every batch exactly once, with the batch's rows."""
    for layer in wide_layers:
        mine = [segment for segment in segments if segment.layer == layer]
        covered = sorted(key for segment in mine for key in segment.keys)
        wrong = [segment.key for segment in mine if segment.rows != sum(rows.get(key, 0) for key in segment.keys)]
        if covered != sorted(rows) or wrong:
            raise RunError(f"the wide segments of layer {layer!r} do not hold each of the {len(rows):,} batches once "
                           f"({len(covered):,} parts in {len(mine)} segments; {len(wrong)} with other rows than "
                           "their batches'); nothing was committed")

