"""The driver: a run of a job, stage by stage (:class:`JobRun`), and the one failure policy.

    validate          the spec against the data and the model, on a few rows, no Ray
    start_ray         connect, or start a local Ray; check the workers fit
    stage             the staged run, its spec and model fingerprint first (for --resume)
    explain           the Ray Data pass: ExplainWorker actors write every batch's parts;
                      their statistics are added up on a thread as the reports arrive
    settle            keep the reported parts, check every instance is there exactly once
    part_pass         fit 2-D projections on a sample; Ray tasks apply them to every part and
                      write each layer's wide form in segments of many parts
    influence         TracIn's proponents and opponents per instance, in Ray tasks over shards
                      of the training set (when the spec asks; pipeline/influence.py)
    catalog           the run's SQL catalog, part of the staged run
    commit            manifest last, then the run appears at once

Order matters: everything that can fail on the user's input (spec, dataset, model, layers,
methods, an existing run name) fails before Ray starts and before any file is written; once
workers run, results are staged and become visible only at the commit.
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from netloupe.contract.errors import RunError, SpecError, netloupe_cause
from netloupe.contract.spec import JobSpec, spec_to_dict
from netloupe.pipeline.datasets import resolve_dataset
from netloupe.pipeline.influence import InfluencePlan, plan_influence, run_influence
from netloupe.pipeline.model_graph import model_graph
from netloupe.pipeline.part_pass import run_part_pass
from netloupe.pipeline.progress import RunProgress, count, duration, size
from netloupe.pipeline.projection import check_umap_available, fit_projection_stage
from netloupe.pipeline.ray_cluster import (
    WORKER_START_TIMEOUT_S,
    check_cluster_fits,
    default_threads,
    ensure_ray,
    worker_pool,
)
from netloupe.pipeline.run_background import draw_background, needs_background
from netloupe.storage import schema as S
from netloupe.storage.catalog import build_catalog
from netloupe.storage.layout import (
    CANDIDATES,
    RunExistsError,
    RunLayout,
    RunStaging,
    staged_job,
    worker_layout,
    write_parquet,
)
from netloupe.storage.manifest import (
    BatchReport,
    Counts,
    DatasetInfo,
    FidelityInfo,
    InfluenceInfo,
    ModelFacts,
    ModelIdentity,
    Projections,
    RunManifest,
    Tables,
    WorkerInfo,
)
from netloupe.storage.part_statistics import GRAM_NEURON_LIMIT, WIDE_NEURON_LIMIT, statistics_of
from netloupe.storage.statistics_merge import StatisticsMerge
from netloupe.storage.wide_segments import WideSegment
from netloupe.workers.explain import BatchExplainer, ExplainWorker
from netloupe.workers.inputs import ResolvedDataset
from netloupe.workers.model_identity import ModelFingerprint, model_fingerprint
from netloupe.workers.model_loading import load_model_reporting, weights_report

VALIDATION_ROWS = 4
"""Rows the driver explains itself before starting workers (fail fast, learn shapes)."""

PACKAGES = ("netloupe", "torch", "captum", "ray", "pyarrow", "duckdb", "numpy", "pydantic")
"""Packages whose versions the manifest records."""


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
    influence: InfluencePlan | None
    """The influence stage's training set and layer, when the spec asks for influence."""
    seconds: float


@dataclass(frozen=True)
class RunResult:
    """A committed run."""

    layout: RunLayout
    """The run on local disk: where it was committed, or for a store its local cache."""
    manifest: RunManifest
    location: str
    """Where the run was committed: its directory, or its URI in an object store."""


def validate(spec: JobSpec, checkpoints: int = 1) -> Validated:
    """Check the spec against the data and the model on a few rows, on the driver
    (``checkpoints``: how many a run group's influence sums over)."""
    if spec.model.checkpoints is not None:
        raise SpecError("a spec with model.checkpoints is a run group, one run per checkpoint: run it with "
                        "`netloupe run` (pipeline/run_group.py); to check one checkpoint, "
                        "--set model.weights=FILE --set model.checkpoints=null")
    started = time.perf_counter()
    check_umap_available(spec)
    dataset = resolve_dataset(spec)
    if needs_background(spec):
        dataset = replace(dataset, background=draw_background(spec, dataset))
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
    influence = plan_influence(spec, model, dataset, head, checkpoints)
    return Validated(dataset, facts, class_names, bytes_per_row, model_graph(model), fingerprint, weights_unset,
                     influence, time.perf_counter() - started)


def run_job(spec: JobSpec, force: bool = False, progress: RunProgress | None = None,
            resume: RunStaging | None = None) -> RunResult:
    """Validate, explain every instance on Ray, and commit the run atomically.

    ``resume`` continues the staging an interrupted run left (:meth:`RunStaging.resume`):
    the batches it finished are kept, only the other instances are explained. ``progress``
    reports as the run goes (:mod:`netloupe.pipeline.progress`); by default nothing is reported.
    """
    # The staging first: a taken name should not cost a model load.
    job = JobRun(spec, resume or RunStaging.open(spec.output.root, spec.output.run_name, force=force),
                 progress or RunProgress())
    job.validate()
    job.start_ray()
    job.stage()
    with failure_policy(job.staging):
        try:
            parts, sampled = job.settle(job.explain())
            projections, segments = job.part_pass(parts)
            influence = job.influence(parts)
            manifest = job.catalog(job.manifest(parts, projections, segments, sampled, influence))
            final, manifest = job.commit(manifest)
        finally:
            job.close()
    return RunResult(final, manifest, job.staging.location)


@contextmanager
def failure_policy(staging: RunStaging):
    """What a failure leaves behind, decided here only:

    * another run took the name meanwhile: the staged results stay where the message says;
    * interrupted (Ctrl-C): the staging stays for ``netloupe run --resume``;
    * a resumed run fails: its staging stays too (the batches it was given are not this
      attempt's to throw away), and the error says how to resume again;
    * any other failure: the staging goes; nothing was committed.

    A user's error raised inside a worker reaches the caller as itself, not in Ray's wrapper.
    """
    try:
        yield
    except RunExistsError:
        raise
    except KeyboardInterrupt:
        staging.keep_for_resume()
        raise
    except BaseException as error:
        user_error = netloupe_cause(error)
        if staging.resumed:
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


@dataclass
class JobRun:
    """One run of a job on the driver. Each method is a stage; :func:`run_job` calls them
    in order."""

    spec: JobSpec
    staging: RunStaging
    progress: RunProgress
    timings: dict = field(default_factory=dict)
    """Seconds per stage, for the manifest."""
    checked: Validated | None = None
    started: float = field(default_factory=time.perf_counter)
    statistics: StatisticsMerge | None = None
    """The workers' statistics added up as their reports arrive (None: the catalog adds them)."""
    parts: list[BatchReport] = field(default_factory=list)
    """Every batch's report so far in the explain pass, kept ones first."""
    kept: int = 0
    """Of them, the batches kept from an interrupted run."""
    to_explain: int = 0
    """Instances the pass explains (the kept ones aside)."""
    reports_progress: bool = True
    """Whether this run reports the pass's progress (of a run group's members, the first)."""
    explain_started: float = 0.0
    first_rows: int = 0
    """Rows of the first results (the steady rate leaves them out)."""

    @property
    def layout(self) -> RunLayout:
        return self.staging.layout

    @property
    def memory_mib(self) -> int:
        return self.spec.execution.driver_sql_memory_mib

    # -- validate ---------------------------------------------------------------------------

    def validate(self) -> None:
        """The spec against the data and the model, on :data:`VALIDATION_ROWS` rows."""
        self.checked = checked = validate(self.spec)
        self._check_resumed_model()
        self.timings["validate_seconds"] = checked.seconds
        facts = checked.facts
        self.progress.stage(
            f"validated on {VALIDATION_ROWS} rows in {duration(checked.seconds)}: "
            f"{count(checked.dataset.num_rows, 'instance')}, {count(facts.num_classes, 'class')}, "
            f"{count(len(facts.layer_neurons), 'layer')}, {count(len(facts.attribution_shapes), 'method')}")
        note = weights_report(checked.weights_unset, self.spec.model)
        if note:
            self.progress.stage(note)

    def _check_resumed_model(self) -> None:
        """A resumed run keeps batches explained by the interrupted run's model: refuse to
        add batches from any other."""
        if not self.staging.resumed:
            return
        staged = ModelFingerprint.from_json(self.staging.staged_fingerprint)
        now = self.checked.fingerprint
        if staged.digest != now.digest:
            differing = now.differing(staged)
            raise RunError(
                f"the interrupted run's finished batches were explained by another model: {len(differing)} of "
                f"its parameters and buffers differ from the model as it loads now ({', '.join(differing[:8])}"
                f"{' ...' if len(differing) > 8 else ''}); its weights file or factory changed since. Restore "
                f"that model and resume again, or start over: delete {self.staging.worker_root} and run the "
                "spec again"
            )

    # -- start_ray --------------------------------------------------------------------------

    def start_ray(self) -> None:
        """Connect to the spec's cluster (or start a local Ray) and check the workers fit."""
        self.timings["ray_init_seconds"] = ensure_ray(self.spec.execution.ray_address)
        import ray

        context = ray.data.DataContext.get_current()
        self.progress.configure_ray_data(context)
        # A worker's NetloupeError should reach the CLI as itself, not as Ray's wrapper.
        context.raise_original_map_exception = True
        # Ray Data's advice to reserve each worker's memory (every 30 s, a paragraph each):
        # a worker's memory is its chunk budget, measured by the worker itself (workers/methods.py).
        context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
        check_cluster_fits(self.spec.execution)

    # -- stage ------------------------------------------------------------------------------

    def stage(self) -> None:
        """Make the staged run, its spec and model fingerprint first (what ``--resume`` needs)."""
        self.staging.create(staged_job(spec_to_dict(self.spec), self.checked.fingerprint.to_json()))
        if self.checked.dataset.background is not None:
            write_parquet(self.layout.background_path, self.checked.dataset.background)

    # -- explain ----------------------------------------------------------------------------

    def explain(self) -> list[BatchReport]:
        """The explain pass: every batch not kept from an interrupted run, by the workers;
        returns every batch's report, kept ones included."""
        kept = self.begin_explain()
        try:
            if self.to_explain:
                for batch in self._explain_plan(kept).iter_batches(batch_format="pyarrow", batch_size=None):
                    self.take([BatchReport.model_validate(row) for row in batch.to_pylist()])
        finally:
            self.progress.explaining_done()
        return self.end_explain()

    def begin_explain(self, report_progress: bool = True) -> list[BatchReport]:
        """Before the pass: the kept batches (a resumed run's), the statistics merge started;
        returns the kept batches' reports. (A run group's members share one pass:
        :mod:`netloupe.pipeline.run_group`; only the first reports progress.)"""
        self.parts = parts = self._kept_parts()
        self.statistics = self._statistics_merge()
        self.statistics.add_soon(part.part for part in parts)
        self.to_explain = self.checked.dataset.num_rows - self.timings.get("resumed_rows", 0)
        self.reports_progress = report_progress
        if report_progress:
            self.progress.stage(f"explaining {count(self.to_explain, 'instance')} with "
                                f"{_workers_text(self.spec.execution)}"
                                + (f" ({self.timings['resumed_rows']:,} kept from the interrupted run)" if parts else ""))
            self.progress.explaining(self.to_explain)
        self.explain_started, self.first_rows, self.kept = time.perf_counter(), 0, len(parts)
        return list(parts)

    def take(self, reports: list[BatchReport]) -> None:
        """The workers' reports of finished batches, as they arrive."""
        if len(self.parts) == self.kept:
            # Until the first result: actor start-up, model load, first batch.
            self.timings["first_result_seconds"] = time.perf_counter() - self.explain_started
            self.first_rows = sum(r.rows for r in reports)
        self.parts.extend(reports)
        self.statistics.add_soon(report.part for report in reports)
        if self.reports_progress:
            self.progress.explained(sum(r.rows for r in reports))

    def end_explain(self) -> list[BatchReport]:
        """After the pass: its timings; every batch's report."""
        seconds = self.timings["explain_seconds"] = time.perf_counter() - self.explain_started
        self.timings["explain_end_seconds"] = time.perf_counter() - self.started
        if self.reports_progress:
            self.progress.stage(f"explained {count(self.to_explain, 'instance')} in {duration(seconds)}")
        steady = seconds - self.timings.get("first_result_seconds", seconds)
        self.timings["steady_instances_per_second"] = (self.to_explain - self.first_rows) / steady if steady > 0 else None
        return self.parts

    def _statistics_merge(self) -> StatisticsMerge:
        """The merge of the statistics the workers write, read where they write them."""
        facts = self.checked.facts
        layout, filesystem = worker_layout(self.staging.worker_root)
        names = statistics_of(facts.layer_neurons, facts.attribution_shapes, _token_values(facts, self.spec))
        return StatisticsMerge(layout, names, self.checked.dataset.id_type, filesystem, self.memory_mib)

    def close(self) -> None:
        """Stop what the run started on the driver (the statistics merge's thread), failed or not."""
        if self.statistics is not None:
            self.statistics.close()

    def _explain_plan(self, kept: list[BatchReport]):
        """The Ray Data plan: read the dataset (less the kept instances), map ExplainWorker."""
        return self.explain_input(kept).map_batches(ExplainWorker, fn_constructor_kwargs=self.worker_arguments(),
                                                    **worker_options(self.spec.execution))

    def explain_input(self, kept: list[BatchReport]):
        """The dataset as Ray Data reads it for the pass (less the kept instances)."""
        import ray

        dataset, execution = self.checked.dataset, self.spec.execution
        context = ray.data.DataContext.get_current()
        # Blocks of about one batch: a small file otherwise arrives as one block, which
        # one actor would process alone while the others idle.
        context.target_max_block_size = max(2**16, self.checked.bytes_per_row * execution.batch_size)
        # Start work once every worker is up: by default the first actor ready takes blocks
        # while the rest start, and a small run (or a cluster's far node) can end up with
        # one worker doing everything. check_cluster_fits made sure they all fit.
        context.wait_for_min_actors_s = WORKER_START_TIMEOUT_S
        if dataset.limit is not None:
            # "The first N rows" must mean the same rows in every run.
            context.execution_options.preserve_order = True
        ds = ray.data.read_parquet(dataset.path).select_columns(dataset.columns)
        if dataset.limit is not None:
            ds = ds.limit(dataset.limit)
        if kept:
            ds = ds.map_batches(_drop_explained, fn_kwargs={"id_column": dataset.id_column,
                                                            "done": _explained_ids(self.layout, kept)},
                                batch_format="pyarrow", zero_copy_batch=True)
        return ds

    def worker_arguments(self) -> dict:
        """What an ExplainWorker of this run is built with."""
        return {"spec_data": spec_to_dict(self.spec), "dataset": self.checked.dataset, "facts": self.checked.facts,
                "fingerprint": self.checked.fingerprint, "worker_root": self.staging.worker_root,
                "threads": default_threads(self.spec)}

    def _kept_parts(self) -> list[BatchReport]:
        """The batches a resumed run keeps (those its interrupted run finished); every other
        part file in the staging is removed, so that its batch is redone whole."""
        if not self.staging.resumed:
            return []
        facts = self.checked.facts
        kept_dirs = self.layout.table_dirs(facts.layer_neurons, facts.attribution_shapes, S.STATISTICS_TABLES,
                                           tokens=facts.input_kind == "tokens")
        parts = self.staging.finished_parts(kept_dirs, [m.table_name for m in self.spec.attributions],
                                            self.checked.dataset.id_type)
        # The candidates too: they are the projection sample's, not the run's (not in its bytes).
        self.staging.remove_unlisted_parts(
            kept_dirs + [self.layout.projection_sample_dir(*source) for source in self.spec.projection_sources],
            {part.part for part in parts})
        self.timings["resumed_parts"] = len(parts)
        self.timings["resumed_rows"] = sum(part.rows for part in parts)
        return parts

    # -- settle -----------------------------------------------------------------------------

    def settle(self, parts: list[BatchReport]) -> tuple[list[BatchReport], dict[str, int]]:
        """Keep only the parts a finished batch reported (a retried batch's leftovers go) and
        check, from the workers' reports, that every instance was explained exactly once and
        every table has each batch's part; return the reports (one per batch) and the rows of
        each method's sampled fidelity table. No part is read but the statistics of the last
        few batches, which the merge had not added yet."""
        facts = self.checked.facts
        reports = list({part.part: part for part in parts}.values())  # a batch reported twice is one batch
        keys = {part.part for part in reports}
        started = time.perf_counter()
        merge = self.statistics
        if merge.finish(keys):
            self.timings["statistics_merge_seconds"] = merge.seconds  # during the pass, mostly
        else:
            # Say so: the catalog then adds every part up in the tail, what the merge is for avoiding.
            self.progress.stage(f"adding up the statistics as they arrived failed ({merge.error}); "
                                "the catalog adds up every part instead")
            self.timings["statistics_merge_error"] = str(merge.error)
            self.statistics = None
            merge.close()
        self.timings["statistics_finish_seconds"] = time.perf_counter() - started
        # From an object store, what the catalog is built from comes to the driver's disk (a
        # few dozen bytes per instance: the statistics only if their merge, which read them
        # where the workers wrote them, failed), and of each bulk table an empty part with its
        # columns, for its view.
        layout = self.layout
        viewed = [layout.activations_dir(layer) for layer in facts.layer_neurons]
        viewed += [layout.attributions_dir(method) for method in facts.attribution_shapes]
        viewed += [layout.fidelity_dir(method) for method in facts.attribution_shapes]
        viewed += [layout.tokens_dir] if facts.input_kind == "tokens" else []
        pulled = (S.INSTANCES, S.PROJECTIONS) + ((S.STATISTICS,) if self.statistics is None else ())
        self.timings["pull_bytes"] = self.staging.pull(*pulled) + self.staging.stand_in_parts(viewed, keys)
        every = layout.table_dirs(facts.layer_neurons, facts.attribution_shapes, S.STATISTICS_TABLES,
                                  self.spec.projection_sources, tokens=facts.input_kind == "tokens")
        self.staging.remove_unlisted_parts(every, keys)
        _check_exactly_once(reports, self.checked.dataset)
        _check_every_part_written(self.staging, _tables_of_every_batch(layout, facts, self.spec), keys)
        methods = [m.table_name for m in self.spec.attributions]
        sampled = {method: sum(part.fidelity_rows[i] for part in reports) for i, method in enumerate(methods)}
        return reports, {method: rows for method, rows in sampled.items() if rows}

    # -- the part pass ----------------------------------------------------------------------

    def part_pass(self, reports: list[BatchReport]) -> tuple[Projections, list[WideSegment]]:
        """Fit each projection on the sample the workers gathered, then pass over every part in
        the workers: its coordinates, and each layer's wide form in segments of many parts
        (:mod:`netloupe.pipeline.part_pass`); what they wrote is checked against the batches' reports."""
        sources, layout = self.spec.projection_sources, self.layout
        started = time.perf_counter()
        if sources:
            self.progress.stage(f"projecting {count(len(sources), 'table')} to 2-D")
        rows = {part.part: part.rows for part in reports}
        projections, described = fit_projection_stage(self.spec, layout, sum(rows.values()))
        wide = {layer: neurons for layer, neurons in self.checked.facts.layer_neurons.items()
                if neurons <= WIDE_NEURON_LIMIT}
        wide_dirs = [layout.wide_activations_dir(layer) for layer in wide]
        self.staging.clear(wide_dirs)  # an interrupted attempt's segments would hold some parts twice
        segments = run_part_pass(self.spec, projections, wide, rows, self.checked.dataset.id_type,
                                 self.staging.worker_root)
        projected = [layout.projections_dir(kind, name) for kind, name in sources]
        self.timings["pull_bytes"] += (self.staging.pull(*(str(d.relative_to(layout.root)) for d in projected))
                                       + self.staging.stand_in_parts(wide_dirs, {s.key for s in segments}))
        self.staging.remove_unlisted_parts(projected, set(rows))
        # Only the reported segments: a task of an interrupted attempt may outlive the clear above.
        self.staging.remove_unlisted_parts(wide_dirs, {s.key for s in segments})
        _check_every_part_written(self.staging, projected, set(rows))
        _check_every_part_written(self.staging, wide_dirs, {s.key for s in segments})
        self.timings["part_pass_seconds"] = time.perf_counter() - started
        if sources:
            self.progress.stage(f"projected in {duration(self.timings['part_pass_seconds'])}")
        return described, segments

    # -- influence ------------------------------------------------------------------------

    def influence(self, parts: list[BatchReport]) -> InfluenceInfo | None:
        """The ``influence`` table of the run's model (one checkpoint), when the spec asks,
        over the instances of the settled ``parts``."""
        plan = self.checked.influence
        if plan is None:
            return None
        explained = sum(part.id_digest for part in parts) % S.DIGEST_MODULUS
        table, info = run_influence(self.spec, plan, [self.spec.model], self.checked.dataset, self.progress, explained)
        write_parquet(self.layout.influence_path, table)
        self.timings["influence_seconds"] = info.seconds
        return info

    # -- the manifest, the catalog, the commit ----------------------------------------------

    def manifest(self, parts: list[BatchReport], projections: Projections, segments: list[WideSegment],
                 sampled: dict[str, int], influence: InfluenceInfo | None = None) -> RunManifest:
        """The run's self-description (written last: its presence marks a committed run)."""
        spec, checked = self.spec, self.checked
        facts, dataset, instances = checked.facts, checked.dataset, checked.dataset.num_rows
        return RunManifest(
            run_name=spec.output.run_name,
            created_unix=time.time(),
            spec=spec_to_dict(spec),
            preprocess=dataset.preprocess,
            dataset=DatasetInfo(
                path=str(Path(dataset.path).resolve()), id_type=dataset.id_type, id_column=dataset.id_column,
                label_column=dataset.label_column, input_column=dataset.input_column,
                feature_columns=list(dataset.feature_columns or []), metadata_columns=list(dataset.metadata_columns),
                text_column=dataset.text_column, feature_groups=dataset.feature_groups,
                input_digest=_input_digest(parts),
            ),
            counts=Counts(instances=instances, parts=len(parts),
                          bytes=sum(p.bytes for p in parts) + sum(s.bytes for s in segments),
                          attribution_rows_per_method=instances * spec.target.per_instance),
            class_names=checked.class_names,
            model=facts,
            model_identity=ModelIdentity(fingerprint=checked.fingerprint.digest,
                                         tensor_fingerprints=checked.fingerprint.tensors,
                                         weights_unset=checked.weights_unset, output=spec.model.output),
            model_graph=checked.graph,
            tables=Tables(
                activations={name: f"activations/{name}" for name in facts.layer_neurons},
                attributions={name: f"attributions/{name}" for name in facts.attribution_shapes},
                projections={f"{p.kind}/{p.name}": f"projections/{p.kind}/{p.name}" for p in projections.tables},
                fidelity={name: f"fidelity/{name}" for name in sampled},
                tokens=S.TOKENS if facts.input_kind == "tokens" else None,
                influence=S.INFLUENCE if influence is not None else None,
            ),
            fidelity=FidelityInfo(settings=spec.fidelity, sampled_rows=sampled),
            projections=projections,
            influence=influence,
            workers=[WorkerInfo(node_id=n, device=d, gpu_ids=g, chunk_rows=c)
                     for n, d, g, c in sorted({(p.node_id, p.device, p.gpu_ids, p.chunk_rows) for p in parts})],
            timings={**self.timings, "compute_seconds_sum": sum(p.compute_seconds for p in parts),
                     "write_seconds_sum": sum(p.write_seconds for p in parts)},
            versions=_package_versions(),
            argv=sys.argv,
        )

    def catalog(self, manifest: RunManifest) -> RunManifest:
        """The run's SQL catalog, built in the staged run (a committed run always answers
        SQL); returns the manifest with its timings."""
        self.progress.stage("building the SQL catalog")
        timings = build_catalog(self.layout, manifest, self.memory_mib, statistics=self.statistics)
        self.progress.stage(f"built the SQL catalog in {duration(timings['total'])}")
        return manifest.model_copy(update={"timings": {**manifest.timings, "catalog": timings}})

    def commit(self, manifest: RunManifest) -> tuple[RunLayout, RunManifest]:
        """Write the manifest (with the run's total time) and make the run appear at once."""
        # The candidates stay until here: a run resumed after the fit needs them again.
        shutil.rmtree(self.layout.root / S.PROJECTIONS / CANDIDATES, ignore_errors=True)
        total = time.perf_counter() - self.started
        # Everything after the last explain batch: what more workers cannot shorten.
        tail = total - self.timings["explain_end_seconds"]
        manifest = manifest.model_copy(update={"timings": {**manifest.timings, "total_seconds": total,
                                                           "driver_tail_seconds": tail}})
        return self.staging.commit(manifest), manifest


def worker_options(execution) -> dict:
    """Ray Data's options of the explain workers' map: batches, the pool, its resources."""
    return dict(batch_size=execution.batch_size, batch_format="pyarrow", zero_copy_batch=True,
                compute=worker_pool(execution), num_cpus=execution.cpus_per_worker,
                num_gpus=execution.gpus_per_worker or None)


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _workers_text(execution) -> str:
    if execution.max_workers is not None and execution.max_workers != execution.num_workers:
        return f"{execution.num_workers} to {execution.max_workers} workers"
    return count(execution.num_workers, "worker")


def _check_exactly_once(reports: list[BatchReport], dataset: ResolvedDataset) -> None:
    """Every instance in exactly one reported batch: the batches' rows add up to the dataset's
    and their id digests to the digest of its ids (the digest is additive; a lost batch and a
    duplicated one cannot cancel out in both)."""
    rows = sum(part.rows for part in reports)
    if rows != dataset.num_rows:
        raise RunError(f"the run's {len(reports):,} batches hold {rows:,} instances, expected "
                       f"{dataset.num_rows:,}; nothing was committed")
    digest = sum(part.id_digest for part in reports) % S.DIGEST_MODULUS
    if dataset.id_digest is not None and digest != dataset.id_digest:
        raise RunError(f"the run's {len(reports):,} batches hold {rows:,} instances but not the dataset's "
                       "ids (their digest differs): some instance was explained twice and another not at all; "
                       "nothing was committed")


def _input_digest(reports: list[BatchReport]) -> str | None:
    """The run's digest of ids and inputs, the sum of its batches' (None when a batch kept from
    an older run has none)."""
    if any(part.input_digest is None for part in reports):
        return None
    return f"{S.INPUT_HASHER}:{sum(part.input_digest for part in reports) % S.DIGEST_MODULUS:016x}"


def _token_values(facts: ModelFacts, spec: JobSpec) -> bool:
    """A text run whose methods' values per token are stored (not summary storage)."""
    return facts.input_kind == "tokens" and spec.storage.attributions != "summary"


def _tables_of_every_batch(layout: RunLayout, facts: ModelFacts, spec: JobSpec) -> list[Path]:
    """The directories that hold a part of every batch (a fidelity table only of the
    batches with sampled instances)."""
    wide = [layer for layer, neurons in facts.layer_neurons.items() if neurons <= WIDE_NEURON_LIMIT]
    return ([layout.instances_dir] + ([layout.tokens_dir] if facts.input_kind == "tokens" else [])
            + [layout.activations_dir(layer) for layer in facts.layer_neurons]
            + [layout.attributions_dir(method) for method in facts.attribution_shapes]
            + [layout.index_layer_dir(layer) for layer in wide]
            + [layout.index_gram_dir(layer) for layer in wide if facts.layer_neurons[layer] <= GRAM_NEURON_LIMIT]
            + [layout.statistics_dir(name)
               for name in statistics_of(facts.layer_neurons, facts.attribution_shapes, _token_values(facts, spec))]
            + [layout.projection_sample_dir(kind, name) for kind, name in spec.projection_sources])


def _check_every_part_written(staging: RunStaging, directories: list[Path], keys: set[str]) -> None:
    """Each directory holds a part of every batch, where the workers wrote them (listed, not read)."""
    for directory in directories:
        missing = keys - staging.part_keys(directory)
        if missing:
            raise RunError(f"{directory.relative_to(staging.layout.root)} lacks the parts of {len(missing):,} of the "
                           f"{len(keys):,} batches (e.g. {sorted(missing)[:3]}); nothing was committed")


def _explained_ids(layout: RunLayout, parts: list[BatchReport]) -> pa.Array:
    """The instance ids of the kept parts (read from their instances files)."""
    return pa.concat_arrays([pq.read_table(layout.instances_dir / f"part-{p.part}.parquet",
                                           columns=["instance_id"])["instance_id"].combine_chunks() for p in parts])


def _drop_explained(batch: pa.Table, id_column: str, done: pa.Array) -> pa.Table:
    """The rows of ``batch`` whose ids are not in ``done`` (a resumed run's kept instances)."""
    return batch.filter(pc.invert(pc.is_in(batch[id_column], value_set=done.cast(batch[id_column].type))))


def run_summary(result: RunResult) -> str:
    """What a person wants to see when a run ends: what was explained, how long it took and
    where the run is (the manifest stays in its file)."""
    manifest = result.manifest
    counts = manifest.counts
    lines = [
        f"run {manifest.run_name!r} committed: {counts.instances:,} instances explained in "
        f"{duration(manifest.timings['total_seconds'])}",
        f"  layers:  {', '.join(manifest.layers) or 'none recorded'}",
        f"  methods: {', '.join(manifest.methods) or 'none'}",
        f"  stored:  {size(counts.bytes)} in {count(counts.parts, 'batch')}, at {result.location}",
    ]
    if result.location != str(result.layout.root):
        lines.append(f"  (a local copy, which sql and dashboard read: {result.layout.root})")
    return "\n".join(lines)
