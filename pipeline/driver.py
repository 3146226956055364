"""The driver: validate on one batch, run the Ray Data plan, check and commit the run.

Order matters: everything that can fail on the user's input (spec, dataset, model,
layers, methods, an existing run name) fails before Ray starts and before any file is
written; once workers run, results are staged and become visible only at the commit.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from netloupe.contract.errors import RunError, netloupe_cause
from netloupe.contract.spec import JobSpec, spec_to_dict
from netloupe.pipeline.datasets import resolve_dataset
from netloupe.pipeline.model_graph import model_graph
from netloupe.pipeline.progress import RunProgress, count, duration, size
from netloupe.pipeline.projection import check_umap_available, projection_sources, run_projection_stage
from netloupe.storage import schema as S
from netloupe.storage.catalog import build_catalog, driver_connection
from netloupe.storage.layout import RunExistsError, RunLayout, RunStaging, staged_job
from netloupe.workers.explain import BatchExplainer, ExplainWorker, ModelFacts
from netloupe.workers.inputs import ResolvedDataset
from netloupe.workers.model_identity import ModelFingerprint, model_fingerprint
from netloupe.workers.model_loading import load_model_reporting, weights_report

VALIDATION_ROWS = 4
"""Rows the driver explains itself before starting workers (fail fast, learn shapes)."""

PACKAGES = ("netloupe", "torch", "captum", "ray", "pyarrow", "duckdb", "numpy", "pydantic")


@dataclass(frozen=True)
class Validated:
    """What validation established: the dataset's columns and the model's shapes."""

    dataset: ResolvedDataset
    facts: ModelFacts
    class_names: list[str]
    bytes_per_row: int
    """Arrow bytes of one input row, to size Ray Data blocks."""
    graph: dict
    """The model's graph for the dashboard (:func:`netloupe.pipeline.model_graph.model_graph`)."""
    fingerprint: ModelFingerprint
    """The validated model's parameters and buffers: every worker must build the same."""
    weights_unset: list[str]
    """Parameters and buffers ``model.weights`` did not set (the factory's values stand)."""
    seconds: float


@dataclass(frozen=True)
class RunResult:
    """A committed run."""

    layout: RunLayout
    """The run on local disk: where it was committed, or for a store its local cache."""
    manifest: dict
    location: str
    """Where the run was committed: its directory, or its URI in an object store."""


def validate(spec: JobSpec) -> Validated:
    """Check the spec against the data and the model on a few rows, on the driver."""
    started = time.perf_counter()
    check_umap_available(spec)
    dataset = resolve_dataset(spec)
    model, weights_unset = load_model_reporting(spec.model)
    fingerprint = model_fingerprint(model)  # before any method touches the model
    explainer = BatchExplainer(spec, dataset, model, torch.device("cpu"))
    head = dataset.head(VALIDATION_ROWS)
    facts = explainer.describe(head)
    class_names = spec.model.class_names or [str(i) for i in range(facts.num_classes)]
    if len(class_names) != facts.num_classes:
        raise RunError(
            f"model.class_names has {len(class_names)} names but the model outputs "
            f"{facts.num_classes} classes; give one name per output"
        )
    bytes_per_row = max(1, head.nbytes // max(1, head.num_rows))
    return Validated(dataset, facts, class_names, bytes_per_row, model_graph(model), fingerprint, weights_unset,
                     time.perf_counter() - started)


def local_ray_environment() -> None:
    """Keep a local Ray on loopback with token authentication, unless the user chose."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


WORKER_START_TIMEOUT_S = 600
"""How long the explain pass waits for all its workers to start before failing."""


def ensure_ray(address: str | None) -> float:
    """Connect to the spec's cluster, or start a local one on 127.0.0.1; return seconds."""
    # Ray reads these when it is first imported; the CLI sets them before that too.
    local_ray_environment()
    import ray

    if ray.is_initialized():
        return 0.0
    started = time.perf_counter()
    if address is None:
        # One logical CPU more than the cores: Ray Data's read tasks need a CPU slot, and
        # actors holding every slot would leave them (and the run) waiting forever.
        # address="local": without a ray_address the run is local, even when a cluster
        # started by `ray start` runs on this machine (a bare ray.init() would join it).
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=(os.cpu_count() or 1) + 1,
                 include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)
    return time.perf_counter() - started


def default_threads(spec: JobSpec) -> int:
    """Torch threads per worker: the spec's; on a local cluster the cores shared by the
    workers (one 2-thread actor beat two 1-thread actors here); elsewhere its CPUs."""
    execution = spec.execution
    if execution.threads_per_worker is not None:
        return execution.threads_per_worker
    if execution.ray_address is None:
        return max(1, (os.cpu_count() or 1) // execution.num_workers)
    return max(1, round(execution.cpus_per_worker))


def worker_pool(execution):
    """Ray Data's pool of explain workers: ``num_workers`` of them, or an autoscaling pool
    from ``num_workers`` up to ``max_workers``."""
    import ray

    if execution.max_workers is None or execution.max_workers == execution.num_workers:
        return ray.data.ActorPoolStrategy(size=execution.num_workers)
    return ray.data.ActorPoolStrategy(min_size=execution.num_workers, max_size=execution.max_workers)


def _check_cluster_fits(spec: JobSpec) -> None:
    """Fail with a fix instead of waiting forever when the workers cannot all be placed."""
    import ray

    execution = spec.execution
    total = ray.cluster_resources()
    cpus_needed = execution.num_workers * execution.cpus_per_worker + 1
    gpus_needed = execution.num_workers * execution.gpus_per_worker
    if total.get("CPU", 0) < cpus_needed or total.get("GPU", 0) < gpus_needed:
        raise RunError(
            f"the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; "
            f"{execution.num_workers} workers with {execution.cpus_per_worker:g} CPUs and "
            f"{execution.gpus_per_worker:g} GPUs each, plus 1 CPU for reading, need "
            f"{cpus_needed:g} CPUs and {gpus_needed:g} GPUs. Lower execution.num_workers or "
            "the per-worker resources, or add nodes"
        )


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


_COUNT_BY_INSTANCE = "SELECT count(*), count(DISTINCT instance_id) FROM read_parquet(?)"
_COUNT_BY_TARGET = "SELECT count(*), count(DISTINCT (instance_id, target_rank)) FROM read_parquet(?)"


def _explained_tables(layout: RunLayout, expected: int, checked: "Validated", targets: int) -> list[tuple]:
    """``(directory, rows expected, count query)`` of every table the explain pass writes."""
    tables = [(layout.instances_dir, expected, _COUNT_BY_INSTANCE)]
    tables += [(layout.activations_dir(n), expected, _COUNT_BY_INSTANCE) for n in checked.facts.layer_neurons]
    tables += [(layout.attributions_dir(n), expected * targets, _COUNT_BY_TARGET)
               for n in checked.facts.attribution_shapes]
    return tables


def _check_exactly_once(layout: RunLayout, tables: list[tuple], memory_mib: int) -> None:
    """Every table must hold each instance exactly once (attributions: once per target)."""
    with driver_connection(memory_mib, layout.root / ".duckdb-spill") as con:
        counts = [(d, want, con.execute(sql, [str(d / "*.parquet")]).fetchall()[0]) for d, want, sql in tables]
    for directory, want, (rows, distinct) in counts:
        if rows != want or distinct != want:
            raise RunError(
                f"table {directory.relative_to(layout.root)} has {rows} rows with {distinct} distinct "
                f"keys, expected {want} of each; nothing was committed"
            )


def _check_resumed_model(staging: RunStaging, checked: Validated) -> None:
    """A resumed run keeps batches explained by the interrupted run's model: refuse to add
    batches from any other."""
    if not staging.resumed:
        return
    staged = ModelFingerprint.from_json(staging.staged_fingerprint)
    if staged.digest != checked.fingerprint.digest:
        differing = checked.fingerprint.differing(staged)
        raise RunError(
            f"the interrupted run's finished batches were explained by another model: {len(differing)} of its "
            f"parameters and buffers differ from the model as it loads now ({', '.join(differing[:8])}"
            f"{' ...' if len(differing) > 8 else ''}); its weights file or factory changed since. Restore that "
            f"model and resume again, or start over: delete {staging.worker_root} and run the spec again"
        )


def run_job(spec: JobSpec, force: bool = False, progress: RunProgress | None = None,
            resume: RunStaging | None = None) -> RunResult:
    """Validate, explain every instance on Ray, and commit the run atomically.

    ``resume`` continues the staging an interrupted run left (:meth:`RunStaging.resume`):
    the batches it finished are kept, only the other instances are explained. ``progress``
    reports as the run goes (:mod:`netloupe.pipeline.progress`); by default nothing is reported.
    """
    progress = progress or RunProgress()
    timings = {}
    started = time.perf_counter()
    # Checked first: a taken name should not cost a model load.
    staging = resume or RunStaging(spec.output.root, spec.output.run_name, force=force)
    checked = validate(spec)
    _check_resumed_model(staging, checked)
    timings["validate_seconds"] = checked.seconds
    progress.stage(f"validated on {VALIDATION_ROWS} rows in {duration(checked.seconds)}: "
                   f"{count(checked.dataset.num_rows, 'instance')}, {count(checked.facts.num_classes, 'class')}, "
                   f"{count(len(checked.facts.layer_neurons), 'layer')}, "
                   f"{count(len(checked.facts.attribution_shapes), 'method')}")
    note = weights_report(checked.weights_unset, spec.model)
    if note:
        progress.stage(note)
    timings["ray_init_seconds"] = ensure_ray(spec.execution.ray_address)

    import ray

    progress.configure_ray_data(ray.data.DataContext.get_current())
    # A worker's NetloupeError should reach the CLI as itself, not as Ray's wrapper.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    _check_cluster_fits(spec)
    layout = staging.create(staged_job(spec_to_dict(spec), checked.fingerprint.to_json()))
    try:
        dataset = checked.dataset
        execution = spec.execution
        # Blocks of about one batch: a small file otherwise arrives as one block, which
        # one actor would process alone while the others idle.
        context = ray.data.DataContext.get_current()
        context.target_max_block_size = max(2**16, checked.bytes_per_row * execution.batch_size)
        # Start work once every worker is up: by default the first actor ready takes blocks
        # while the rest start, and a small run (or a cluster's far node) can end up with
        # one worker doing everything. _check_cluster_fits made sure they all fit.
        context.wait_for_min_actors_s = WORKER_START_TIMEOUT_S
        if dataset.limit is not None:
            # "The first N rows" must mean the same rows in every run.
            context.execution_options.preserve_order = True
        ds = ray.data.read_parquet(dataset.path).select_columns(dataset.columns)
        if dataset.limit is not None:
            ds = ds.limit(dataset.limit)
        parts = _kept_parts(staging, checked, timings)
        if parts:
            ds = ds.map_batches(_drop_explained, fn_kwargs={"id_column": dataset.id_column,
                                                            "done": _explained_ids(layout, parts)},
                                batch_format="pyarrow", zero_copy_batch=True)
        results = ds.map_batches(
            ExplainWorker,
            fn_constructor_kwargs={
                "spec_data": spec_to_dict(spec),
                "dataset": dataset,
                "facts_data": checked.facts.to_json(),
                "fingerprint_data": checked.fingerprint.to_json(),
                "worker_root": staging.worker_root,
                "threads": default_threads(spec),
            },
            batch_size=execution.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=worker_pool(execution),
            num_cpus=execution.cpus_per_worker,
            num_gpus=execution.gpus_per_worker or None,
        )
        explain_started = time.perf_counter()
        kept, first_rows = len(parts), []
        computed = dataset.num_rows - timings.get("resumed_rows", 0)
        progress.stage(f"explaining {count(computed, 'instance')} with {_workers_text(execution)}"
                       + (f" ({timings['resumed_rows']:,} kept from the interrupted run)" if parts else ""))
        progress.explaining(computed)
        try:
            if computed:
                for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
                    if len(parts) == kept:
                        # Until the first result: actor start-up, model load, first batch.
                        timings["first_result_seconds"] = time.perf_counter() - explain_started
                        first_rows = batch["rows"].to_pylist()
                    parts.extend(batch.to_pylist())
                    progress.explained(sum(batch["rows"].to_pylist()))
        finally:
            progress.explaining_done()
        timings["explain_seconds"] = time.perf_counter() - explain_started
        progress.stage(f"explained {count(computed, 'instance')} in {duration(timings['explain_seconds'])}")
        steady = timings["explain_seconds"] - timings.get("first_result_seconds", timings["explain_seconds"])
        timings["steady_instances_per_second"] = (computed - sum(first_rows)) / steady if steady > 0 else None
        keys = {part["part"] for part in parts}
        timings["pull_bytes"] = staging.pull(S.INSTANCES, S.ACTIVATIONS, S.ATTRIBUTIONS, S.FIDELITY)
        staging.remove_unlisted_parts(
            layout.table_dirs(checked.facts.layer_neurons, checked.facts.attribution_shapes), keys
        )
        _check_exactly_once(layout, _explained_tables(layout, dataset.num_rows, checked, spec.target.per_instance),
                            execution.driver_sql_memory_mib)
        sampled = _check_fidelity_samples(layout, checked, execution.driver_sql_memory_mib)
        # Projections read the checked parts, so they come after the check and get their own.
        projection_started = time.perf_counter()
        if projection_sources(spec):
            progress.stage(f"projecting {count(len(projection_sources(spec)), 'table')} to 2-D")
        projections = run_projection_stage(spec, layout, keys, dataset.id_type, default_threads(spec),
                                           staging.worker_root)
        projected = [layout.projections_dir(kind, name) for kind, name in projection_sources(spec)]
        timings["pull_bytes"] += staging.pull(*(str(d.relative_to(layout.root)) for d in projected))
        staging.remove_unlisted_parts(projected, keys)
        _check_exactly_once(layout, [(d, dataset.num_rows, _COUNT_BY_INSTANCE) for d in projected],
                            execution.driver_sql_memory_mib)
        timings["projection_seconds"] = time.perf_counter() - projection_started
        if projection_sources(spec):
            progress.stage(f"projected in {duration(timings['projection_seconds'])}")
        manifest = build_manifest(spec, checked, parts, dataset.num_rows, timings, projections, sampled)
        progress.stage("building the SQL catalog")
        # Part of the staged run, so a committed run always answers SQL.
        manifest["timings"]["catalog"] = build_catalog(layout, manifest, execution.driver_sql_memory_mib)
        progress.stage(f"built the SQL catalog in {duration(manifest['timings']['catalog']['total'])}")
        manifest["timings"]["total_seconds"] = time.perf_counter() - started
        final = staging.commit(manifest)
    except RunExistsError:
        raise  # lost a race for the name: the staged results stay where the message says
    except KeyboardInterrupt:
        staging.keep_for_resume()  # interrupted, not failed: `netloupe run --resume` continues it
        raise
    except BaseException as error:
        user_error = netloupe_cause(error)
        if staging.resumed:
            # The finished batches it was given are not this attempt's to throw away.
            staging.keep_for_resume()
            hint = (f"the interrupted run stays staged at {staging.worker_root}: fix the cause and run "
                    f"`netloupe run --resume {staging.location}` again, or delete that staging to start over")
            if user_error is not None:
                raise RunError(f"{user_error}\n{hint}") from None
            error.add_note(hint)
            raise
        staging.abort()
        if user_error is not None and user_error is not error:
            raise user_error from None
        raise
    return RunResult(final, manifest, staging.location)


def _workers_text(execution) -> str:
    if execution.max_workers is not None and execution.max_workers != execution.num_workers:
        return f"{execution.num_workers} to {execution.max_workers} workers"
    return count(execution.num_workers, "worker")


def _kept_parts(staging: RunStaging, checked: "Validated", timings: dict) -> list[dict]:
    """The batches a resumed run keeps (those its interrupted run finished); every other
    part file in the staging is removed, so that its batch is redone whole."""
    if not staging.resumed:
        return []
    table_dirs = staging.layout.table_dirs(checked.facts.layer_neurons, checked.facts.attribution_shapes)
    parts = staging.finished_parts(table_dirs)
    staging.remove_unlisted_parts(table_dirs, {part["part"] for part in parts})
    timings["resumed_parts"] = len(parts)
    timings["resumed_rows"] = sum(part["rows"] for part in parts)
    return parts


def _explained_ids(layout: RunLayout, parts: list[dict]):
    """The instance ids of the kept parts (read from their instances files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_arrays([pq.read_table(layout.instances_dir / f"part-{p['part']}.parquet",
                                           columns=["instance_id"])["instance_id"].combine_chunks() for p in parts])


def _drop_explained(batch, id_column: str, done):
    """The rows of ``batch`` whose ids are not in ``done`` (a resumed run's kept instances)."""
    import pyarrow.compute as pc

    return batch.filter(pc.invert(pc.is_in(batch[id_column], value_set=done.cast(batch[id_column].type))))


def _check_fidelity_samples(layout: RunLayout, checked: "Validated", memory_mib: int) -> dict[str, int]:
    """Each sampled instance once per method's fidelity table; return the rows per method."""
    directories = {m: layout.fidelity_dir(m) for m in checked.facts.attribution_shapes}
    directories = {m: d for m, d in directories.items() if d.exists() and any(d.glob("part-*.parquet"))}
    if not directories:
        return {}
    with driver_connection(memory_mib, layout.root / ".duckdb-spill") as con:
        counts = {m: con.execute(_COUNT_BY_INSTANCE, [str(d / "*.parquet")]).fetchall()[0] for m, d in directories.items()}
    for method, (rows, distinct) in counts.items():
        if rows != distinct:
            raise RunError(f"fidelity/{method} has {rows} rows for {distinct} instances; each sampled instance "
                           "must appear once. Nothing was committed")
    return {m: rows for m, (rows, _) in counts.items()}


def build_manifest(spec: JobSpec, checked: Validated, parts: list[dict], count: int, timings: dict,
                   projections: dict, sampled: dict[str, int] | None = None) -> dict:
    """The run's self-description, written last (its presence marks a committed run)."""
    facts = checked.facts
    return {
        "netloupe_manifest": 1,
        "schema_version": S.SCHEMA_VERSION,
        "run_name": spec.output.run_name,
        "created_unix": time.time(),
        "spec": spec_to_dict(spec),
        "preprocess": checked.dataset.preprocess.model_dump(mode="json"),
        "dataset": {
            "path": str(Path(checked.dataset.path).resolve()),
            "id_type": checked.dataset.id_type,
            "metadata_columns": list(checked.dataset.metadata_columns),
            "label_column": checked.dataset.label_column,
            "id_column": checked.dataset.id_column,
            "input_column": checked.dataset.input_column,
            "feature_columns": list(checked.dataset.feature_columns or []),
        },
        "counts": {
            "instances": count,
            "parts": len(parts),
            "bytes": sum(p["bytes"] for p in parts),
            "attribution_rows_per_method": count * spec.target.per_instance,
        },
        "class_names": checked.class_names,
        "model": facts.to_json(),
        "model_fingerprint": checked.fingerprint.digest,
        "model_tensor_fingerprints": checked.fingerprint.tensors,
        "model_weights_unset": checked.weights_unset,
        "model_output": spec.model.output,
        "model_graph": checked.graph,
        "tables": {
            "instances": "instances",
            "activations": {name: f"activations/{name}" for name in facts.layer_neurons},
            "attributions": {name: f"attributions/{name}" for name in facts.attribution_shapes},
            "projections": {f"{p['kind']}/{p['name']}": f"projections/{p['kind']}/{p['name']}"
                            for p in projections["tables"]},
            "fidelity": {name: f"fidelity/{name}" for name in (sampled or {})},
        },
        "fidelity": {**spec.fidelity.model_dump(mode="json"), "sampled_rows": dict(sampled or {})},
        "projections": projections,
        "workers": sorted({(p["node_id"], p["device"], p["gpu_ids"], p["chunk_rows"]) for p in parts}),
        "timings": {**timings, "compute_seconds_sum": sum(p["compute_seconds"] for p in parts),
                    "write_seconds_sum": sum(p["write_seconds"] for p in parts)},
        "versions": _package_versions(),
        "argv": sys.argv,
    }


def run_summary(result: RunResult) -> str:
    """What a person wants to see when a run ends: what was explained, how long it took and
    where the run is (the manifest stays in its file)."""
    manifest = result.manifest
    counts = manifest["counts"]
    methods = list(manifest["tables"]["attributions"])
    layers = list(manifest["model"]["layer_neurons"])
    lines = [
        f"run {manifest['run_name']!r} committed: {counts['instances']:,} instances explained in "
        f"{duration(manifest['timings']['total_seconds'])}",
        f"  layers:  {', '.join(layers) or 'none recorded'}",
        f"  methods: {', '.join(methods) or 'none'}",
        f"  stored:  {size(counts['bytes'])} in {count(counts['parts'], 'batch')}, at {result.location}",
    ]
    if result.location != str(result.layout.root):
        lines.append(f"  (a local copy, which sql and dashboard read: {result.layout.root})")
    return "\n".join(lines)
