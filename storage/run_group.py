"""A run group: one run per checkpoint of one model, under one name (``model.checkpoints``).

``<root>/<name>/`` holds each member as a complete run (``<root>/<name>/<member>/``) and
``group.json``, written last (atomically) once every member is committed: a directory without
it is no group. Members keep the checkpoints' order; ``netloupe sql`` and
``netloupe.compare`` open a group's members side by side, each under its member name. A group
whose spec asks for influence holds ``influence/part-0.parquet`` too: TracIn summed over every
member's checkpoint (the ``influence`` table's schema, :func:`netloupe.storage.schema.influence_schema`).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

from netloupe.contract.errors import RunError
from netloupe.storage.manifest import InfluenceInfo, Record
from netloupe.storage.schema import INFLUENCE

GROUP_FILE = "group.json"
GROUP_FORMAT = 1


class GroupMember(Record):
    """One checkpoint's run."""

    name: str
    """The member's name: its directory, and its name in SQL (the checkpoint file's stem as
    an identifier: ``epoch-3.safetensors`` → ``epoch_3``)."""
    checkpoint: str
    """The weights file it explains (absolute)."""


class RunGroupRecord(Record):
    """``group.json``."""

    format: int = GROUP_FORMAT
    """This file's format version."""
    run_name: str
    """The group's name (``output.run_name``)."""
    members: list[GroupMember]
    """Its runs, in the checkpoints' order."""
    influence: InfluenceInfo | None = None
    """How the group's ``influence`` table was computed, when it was."""


def influence_path(directory: str | os.PathLike) -> Path:
    """The group's ``influence`` table (written before ``group.json``)."""
    return Path(directory) / INFLUENCE / "part-0.parquet"


def member_name(checkpoint: str | os.PathLike) -> str:
    """A checkpoint's member name: the file's stem with every other character than an ASCII
    letter, digit or ``_`` as ``_``, prefixed with ``c`` when it would start with a digit."""
    stem = Path(checkpoint).name.split(".", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem)
    return f"c{name}" if not name or name[0].isdigit() else name


def read_group(directory: str | os.PathLike) -> RunGroupRecord | None:
    """The group at ``directory``, or None when it holds no ``group.json``."""
    path = Path(directory) / GROUP_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != GROUP_FORMAT:
        raise RunError(f"{path} is a run group of format {data.get('format')!r}; this netloupe reads format "
                       f"{GROUP_FORMAT}: run the job again")
    return RunGroupRecord.model_validate(data)


def write_group(directory: str | os.PathLike, record: RunGroupRecord) -> Path:
    """Write ``group.json`` into ``directory`` atomically (a reader sees the old or the new)."""
    path = Path(directory) / GROUP_FILE
    tmp = path.with_name(f".{GROUP_FILE}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(record.model_dump(mode="json"), indent=2))
    os.replace(tmp, path)
    return path


def group_members(directory: str | os.PathLike) -> dict[str, Path]:
    """The members of the group at ``directory``, name → run directory, in order."""
    record = read_group(directory)
    if record is None:
        raise RunError(f"{directory} is no run group (no {GROUP_FILE})")
    return {member.name: Path(directory) / member.name for member in record.members}


def group_of(run_directories: list[Path]) -> tuple[Path, RunGroupRecord] | None:
    """The run group whose members are exactly ``run_directories``, with its record; None
    when they are not one group's members."""
    parents = {Path(d).resolve().parent for d in run_directories}
    if len(parents) != 1:
        return None
    directory = next(iter(parents))
    record = read_group(directory)
    if record is None or {m.name for m in record.members} != {Path(d).resolve().name for d in run_directories}:
        return None
    return directory, record
