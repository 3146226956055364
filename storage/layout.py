"""Where a run's files live, and how a run becomes visible: staged, then committed at once.

::

    <output_root>/
      <run>/                      the committed run (appears only through one rename)
        manifest.json
        catalog.duckdb            views, fast tables and SQL operators (storage/catalog.py)
        instances/part-<key>.parquet
        activations/<layer>/part-<key>.parquet
        attributions/<method>/part-<key>.parquet
        projections/sample.parquet            the instances the projections were fitted on
        projections/<kind>/<name>/part-<key>.parquet   kind: activations | attributions
      .staging/<run>-<uuid>/      a run being written; never read by anyone else

A part's ``<key>`` is derived from the instance ids of the batch it holds, so a batch
that Ray retries after a worker died overwrites its own part instead of adding a
second copy. Files are written under a temporary name and renamed, so a reader never
sees half a Parquet file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import RunError
from storage.schema import ACTIVATIONS, ATTRIBUTIONS, INSTANCES, PROJECTIONS

MANIFEST = "manifest.json"
CATALOG = "catalog.duckdb"
STAGING_DIR = ".staging"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TABLE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RunExistsError(RunError):
    """A committed run of that name is already there and ``force`` was not given."""


def check_run_name(name: str) -> str:
    """Return ``name`` if it is usable as a directory name, else raise a clear error."""
    if not _RUN_NAME.match(name):
        raise ValueError(
            f"run name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (for example 'mnist-2026-11-22')"
        )
    return name


def table_dir_name(name: str) -> str:
    """A layer or method name as a directory name (module paths like ``features.0`` stay)."""
    if not _TABLE_PART.match(name):
        raise ValueError(f"{name!r} cannot name a table directory: use letters, digits, '.', '_', '-'")
    return name


def part_key(instance_ids) -> str:
    """A stable name for the part that holds exactly these instance ids, in this order."""
    digest = hashlib.blake2b(digest_size=10)
    for value in instance_ids:
        digest.update(str(value).encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run, committed or being staged. Every reader and writer asks here."""

    root: Path
    """The run's directory: the committed run, or its staging directory while writing."""

    @classmethod
    def committed(cls, output_root: str | os.PathLike, run_name: str) -> "RunLayout":
        return cls(Path(output_root) / check_run_name(run_name))

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def catalog_path(self) -> Path:
        """The run's DuckDB catalog (storage/catalog.py builds it)."""
        return self.root / CATALOG

    @property
    def instances_dir(self) -> Path:
        return self.root / INSTANCES

    def activations_dir(self, layer: str) -> Path:
        return self.root / ACTIVATIONS / table_dir_name(layer)

    def attributions_dir(self, method: str) -> Path:
        return self.root / ATTRIBUTIONS / table_dir_name(method)

    def source_dir(self, kind: str, name: str) -> Path:
        """The table a projection is computed from: ``activations`` of a layer or
        ``attributions`` of a method."""
        if kind == ACTIVATIONS:
            return self.activations_dir(name)
        if kind == ATTRIBUTIONS:
            return self.attributions_dir(name)
        raise ValueError(f"projection sources are {ACTIVATIONS!r} or {ATTRIBUTIONS!r}, got {kind!r}")

    def projections_dir(self, kind: str, name: str) -> Path:
        """2-D coordinates of every instance for the ``kind`` table of ``name``."""
        self.source_dir(kind, name)  # the same kinds and names are valid
        return self.root / PROJECTIONS / kind / table_dir_name(name)

    @property
    def projection_sample_path(self) -> Path:
        """The sampled instance ids the projections were fitted on, in sample order."""
        return self.root / PROJECTIONS / "sample.parquet"

    def table_dirs(self, layers, methods) -> list[Path]:
        return [self.instances_dir] + [self.activations_dir(l) for l in layers] + [
            self.attributions_dir(m) for m in methods
        ]

    def read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            raise RunError(
                f"{self.root} is not a committed netloupe run: it has no {MANIFEST}. "
                "Pass the directory that `netloupe run` printed at its end."
            )
        return json.loads(self.manifest_path.read_text())


def write_parquet(path: Path, table: pa.Table) -> int:
    """Write ``table`` to ``path`` atomically (temporary name, then rename); return its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.stem}-{uuid.uuid4().hex}.parquet"
    # Row groups sized to a batch keep readers' memory bounded; zstd is the best size/speed
    # trade for float vectors measured so far.
    pq.write_table(table, tmp, compression="zstd", row_group_size=max(1, table.num_rows))
    os.replace(tmp, path)
    return path.stat().st_size


def write_part(directory: Path, key: str, table: pa.Table) -> int:
    """Write ``table`` as ``directory/part-<key>.parquet`` atomically; return its size in bytes."""
    return write_parquet(directory / f"part-{key}.parquet", table)


class RunStaging:
    """A run being written: a private directory that becomes the run in one rename."""

    def __init__(self, output_root: str | os.PathLike, run_name: str, force: bool = False):
        self.final = RunLayout.committed(output_root, run_name)
        self.force = force
        if self.final.root.exists() and not force:
            raise RunExistsError(
                f"run {run_name!r} already exists at {self.final.root}; "
                "choose another run name, or pass --force to replace it"
            )
        staging_root = Path(output_root) / STAGING_DIR
        self.layout = RunLayout(staging_root / f"{run_name}-{uuid.uuid4().hex[:12]}")

    def create(self) -> RunLayout:
        self.layout.root.mkdir(parents=True, exist_ok=False)
        return self.layout

    def remove_unlisted_parts(self, table_dirs: list[Path], keys: set[str]) -> list[Path]:
        """Delete parts (and temporaries) that no successful batch reported, e.g. from a
        worker that died after writing; return what was removed."""
        removed = []
        for directory in table_dirs:
            if not directory.exists():
                continue
            for path in directory.iterdir():
                key = path.name[len("part-") : -len(".parquet")] if path.name.startswith("part-") else None
                if key not in keys:
                    path.unlink()
                    removed.append(path)
        return removed

    def commit(self, manifest: dict) -> RunLayout:
        """Write the manifest, then move the staged run into place in one rename."""
        tmp = self.layout.root / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.layout.manifest_path)
        target = self.final.root
        if target.exists():
            if not self.force:
                raise RunExistsError(
                    f"run {target.name!r} appeared at {target} while this run was computed; "
                    f"its results are kept at {self.layout.root}"
                )
            # Move the old run aside first so that the name is never empty of a whole run
            # for longer than two renames.
            trash = target.parent / STAGING_DIR / f"replaced-{target.name}-{uuid.uuid4().hex[:12]}"
            os.replace(target, trash)
            try:
                os.replace(self.layout.root, target)
            except OSError:
                os.replace(trash, target)  # put the old run back; the new one stays staged
                raise
            shutil.rmtree(trash)
        else:
            os.replace(self.layout.root, target)
        self._cleanup_staging_root()
        return self.final

    def abort(self) -> None:
        """Remove everything this run staged; committed runs are never touched."""
        shutil.rmtree(self.layout.root, ignore_errors=True)
        self._cleanup_staging_root()

    def _cleanup_staging_root(self) -> None:
        staging_root = self.layout.root.parent
        if staging_root.exists() and not any(staging_root.iterdir()):
            staging_root.rmdir()
