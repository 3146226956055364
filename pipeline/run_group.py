"""A job over a model's checkpoints (``model.checkpoints``): one run per checkpoint, in
order, committed as a run group (:mod:`netloupe.storage.run_group`).

Each member is an ordinary job (the spec with that checkpoint as ``model.weights``), so it is
validated, explained, committed and resumable like any run; the group's record is written
only once every member is committed. Ray stays up between members (one ``ray.init``). Influence
(``spec.influence``) is the group's, not each member's: TracIn sums over the checkpoints, so it
is computed once every member is, over all of their checkpoints (:mod:`netloupe.pipeline.influence`).
"""

from __future__ import annotations

import glob
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from netloupe.contract.errors import SpecError
from netloupe.contract.spec import JobSpec
from netloupe.pipeline.driver import RunResult, run_job, validate
from netloupe.pipeline.influence import run_influence
from netloupe.pipeline.progress import RunProgress
from netloupe.storage.compare import run_name_problem
from netloupe.storage.layout import RunExistsError, write_parquet
from netloupe.storage.location import is_uri
from netloupe.storage.run_group import (
    GROUP_FILE,
    GroupMember,
    RunGroupRecord,
    influence_path,
    member_name,
    read_group,
    write_group,
)


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
    # The influence's training set and layer checked before any member runs.
    checked = validate(member_spec(spec, files[0], directory).model_copy(update={"influence": spec.influence})) \
        if spec.influence is not None else None
    old = read_group(directory) if directory.exists() else None
    if directory.exists():
        if not force:
            raise RunExistsError(f"{directory} already exists; use --force to replace it")
        if old is None and not _only_runs(directory):
            raise RunExistsError(f"{directory} holds something that is no run group; move it away or choose "
                                 "another output.run_name")
        (directory / GROUP_FILE).unlink(missing_ok=True)  # a group half replaced is no group
        shutil.rmtree(influence_path(directory).parent, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    members = {}
    for checkpoint in files:
        result = run_job(member_spec(spec, checkpoint, directory), force=force, progress=progress)
        members[member_name(checkpoint)] = result
    # The replaced group's runs this one has not (an interrupted group's: every run there).
    for stale in directory.iterdir():
        if stale.is_dir() and not stale.name.startswith(".") and stale.name not in members \
                and (stale / "manifest.json").exists():
            shutil.rmtree(stale)
    influence = None
    if checked is not None:
        table, influence = run_influence(spec, checked.influence, [member_spec(spec, f, directory).model for f in files],
                                         checked.dataset, progress or RunProgress())
        write_parquet(influence_path(directory), table)
    write_group(directory, RunGroupRecord(run_name=spec.output.run_name, influence=influence, members=[
        GroupMember(name=name, checkpoint=str(checkpoint)) for name, checkpoint in zip(members, files)]))
    return GroupResult(directory, members)
