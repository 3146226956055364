"""A job over a model's checkpoints (``model.checkpoints``): one run per checkpoint, in
order, committed as a run group (:mod:`netloupe.storage.run_group`).

Each member is an ordinary run (the spec with that checkpoint as ``model.weights``): its own
:class:`~netloupe.pipeline.driver.JobRun` validates, settles, projects and commits it like any
run. The explain pass is shared: the dataset is read once and each worker holds every
checkpoint's model, explaining each batch under each in turn into each member's staged run
(:class:`~netloupe.workers.explain.CheckpointsWorker`), so the workers start once, not once per
checkpoint. The group's record is written only once every member is committed. Influence
(``spec.influence``) is the group's, not each member's: TracIn sums over the checkpoints, so it
is computed once every member is, over all of their checkpoints (:mod:`netloupe.pipeline.influence`).
"""

from __future__ import annotations

import glob
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from netloupe.contract.errors import SpecError, netloupe_cause
from netloupe.contract.spec import JobSpec
from netloupe.pipeline.driver import JobRun, RunResult, validate, worker_options
from netloupe.pipeline.influence import run_influence
from netloupe.pipeline.progress import RunProgress
from netloupe.storage.compare import run_name_problem
from netloupe.storage.layout import RunExistsError, RunStaging, write_parquet
from netloupe.storage.location import is_uri
from netloupe.storage.manifest import BatchReport
from netloupe.storage.run_group import (
    GROUP_FILE,
    GroupMember,
    RunGroupRecord,
    influence_path,
    member_name,
    read_group,
    write_group,
)
from netloupe.workers.explain import CheckpointsWorker


@dataclass(frozen=True)
class GroupResult:
    """A committed run group: its directory and each member's run."""

    directory: Path
    members: dict[str, RunResult]


def checkpoint_files(spec: JobSpec) -> list[Path]:
    """The spec's checkpoints, in order: a list as given, a glob's matches in natural order
    (numbers compared as numbers); every one a file, their member names distinct."""
    given = spec.model.checkpoints
    if isinstance(given, str):
        matches = glob.glob(given)
        if not matches:
            raise SpecError(f"model.checkpoints: no file matches {given!r}; give a glob of weights files "
                            "(runs/ckpt/epoch-*.safetensors) or a list of them")
        files = sorted((Path(m) for m in matches), key=_natural_key)
    else:
        files = [Path(p) for p in given]
    for path in files:
        if not path.is_file():
            raise SpecError(f"model.checkpoints: {str(path)!r} is not a file; each checkpoint is a weights file "
                            "for the factory (.safetensors or a torch.save state dict)")
    names = [member_name(p) for p in files]
    for path, name in zip(files, names):
        problem = run_name_problem(name)
        if problem:
            raise SpecError(f"model.checkpoints: {path.name} would be the run {name!r}, which {problem}; "
                            "rename the file")
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise SpecError(f"model.checkpoints: several checkpoints would be named {clash[0]!r} (the file's stem); "
                        "give files of distinct names")
    return [p.resolve() for p in files]


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _only_runs(directory: Path) -> bool:
    """Whether ``directory`` holds runs only (a group interrupted before its record: --force
    may replace it), hidden entries (a member's staging) aside."""
    return all(entry.name.startswith(".") or entry == influence_path(directory).parent
               or (entry / "manifest.json").exists() for entry in directory.iterdir())


def member_spec(spec: JobSpec, checkpoint: Path, group_directory: Path) -> JobSpec:
    """The job of one checkpoint: the spec with it as ``model.weights``, its run inside the
    group (the group's influence is the group's own)."""
    model = spec.model.model_copy(update={"weights": str(checkpoint), "checkpoints": None})
    output = spec.output.model_copy(update={"root": str(group_directory), "run_name": member_name(checkpoint)})
    return spec.model_copy(update={"model": model, "output": output, "influence": None})


def run_checkpoints(spec: JobSpec, force: bool = False, progress: RunProgress | None = None) -> GroupResult:
    """Explain every checkpoint of ``spec.model.checkpoints`` in turn; commit the group."""
    if is_uri(spec.output.root):
        raise SpecError("a run group (model.checkpoints) is written to a local output.root for now; "
                        f"got {spec.output.root}: run it to a directory and copy the group")
    files = checkpoint_files(spec)
    directory = (Path(spec.output.root) / spec.output.run_name).resolve()
    old = read_group(directory) if directory.exists() else None
    if directory.exists():
        if not force:
            raise RunExistsError(f"{directory} already exists; use --force to replace it")
        if old is None and not _only_runs(directory):
            raise RunExistsError(f"{directory} holds something that is no run group; move it away or choose "
                                 "another output.run_name")
    progress = progress or RunProgress()
    # Everything checked before any work: the influence's training set, layer and labels, and every checkpoint.
    checked = validate(member_spec(spec, files[0], directory).model_copy(update={"influence": spec.influence}),
                       checkpoints=len(files)) if spec.influence is not None else None
    jobs = [JobRun(member_spec(spec, f, directory), RunStaging.open(directory, member_name(f), force=force), progress)
            for f in files]
    for job in jobs:
        job.validate()
    if directory.exists():
        (directory / GROUP_FILE).unlink(missing_ok=True)  # a group half replaced is no group
        shutil.rmtree(influence_path(directory).parent, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        job.start_ray()
    table = influence = None
    if checked is not None:  # before any member is staged: a failure here leaves nothing behind
        table, influence = _group_influence(spec, checked, [job.spec.model for job in jobs], progress)
    members = _explain_and_commit(jobs)
    # The replaced group's runs this one has not (an interrupted group's: every run there).
    for stale in directory.iterdir():
        if stale.is_dir() and not stale.name.startswith(".") and stale.name not in members \
                and (stale / "manifest.json").exists():
            shutil.rmtree(stale)
    if table is not None:
        write_parquet(influence_path(directory), table)
    write_group(directory, RunGroupRecord(run_name=spec.output.run_name, influence=influence, members=[
        GroupMember(name=name, checkpoint=str(checkpoint)) for name, checkpoint in zip(members, files)]))
    return GroupResult(directory, members)


def _group_influence(spec: JobSpec, checked, checkpoints: list, progress: RunProgress):
    """TracIn summed over every checkpoint of the group (:func:`run_influence`); a user's
    error raised in a task reaches the caller as itself."""
    try:
        return run_influence(spec, checked.influence, checkpoints, checked.dataset, progress,
                             checked.dataset.id_digest)
    except BaseException as error:
        user_error = netloupe_cause(error)
        if user_error is not None and user_error is not error:
            raise user_error from None
        raise


def _explain_and_commit(jobs: list[JobRun]) -> dict[str, RunResult]:
    """One explain pass for every member, then each member settled, projected, catalogued and
    committed in turn; on a failure every member not yet committed is removed."""
    committed: dict[str, RunResult] = {}
    try:
        try:
            for job in jobs:
                job.stage()
            _explain_together(jobs)
            for job in jobs:
                parts, sampled = job.settle(job.parts)
                projections, segments = job.part_pass(parts)
                final, manifest = job.commit(job.catalog(job.manifest(parts, projections, segments, sampled)))
                committed[job.spec.output.run_name] = RunResult(final, manifest, job.staging.location)
        finally:
            for job in jobs:
                job.close()
    except BaseException as error:
        for job in jobs:
            if job.spec.output.run_name not in committed:
                job.staging.abort()
        user_error = netloupe_cause(error)
        if user_error is not None and user_error is not error:
            raise user_error from None
        raise
    return committed


def _explain_together(jobs: list[JobRun]) -> None:
    """The members' explain pass, shared: each worker holds every checkpoint's model and
    explains each batch under each in turn (:class:`netloupe.workers.explain.CheckpointsWorker`),
    writing into each member's staged run; the reports go to their member's run. The dataset
    is read once and the workers start once, not once per checkpoint."""
    for position, job in enumerate(jobs):
        job.begin_explain(report_progress=position == 0)
    first = jobs[0]
    try:
        plan = first.explain_input([]).map_batches(
            CheckpointsWorker, fn_constructor_kwargs={"members": [job.worker_arguments() for job in jobs]},
            **worker_options(first.spec.execution))
        for batch in plan.iter_batches(batch_format="pyarrow", batch_size=None):
            rows = batch.to_pylist()
            for position, job in enumerate(jobs):
                reports = [BatchReport.model_validate({k: v for k, v in row.items() if k != "member"})
                           for row in rows if row["member"] == position]
                if reports:
                    job.take(reports)
    finally:
        first.progress.explaining_done()
    for job in jobs:
        job.end_explain()
        job.timings["explain_pass_shared_by"] = len(jobs)
