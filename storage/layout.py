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
        fidelity/<method>/part-<key>.parquet    sampled instances' fidelity checks
        index/layers/<layer>/part-<key>.npy     the layer as a row-major matrix     } written by the
        index/gram/<layer>/part-<key>.npy       its Gram matrix (count, sums, products) } workers
        stats/<statistic>/part-<key>.parquet    mergeable per-part statistics       } beside every
                                                                                    } batch
        wide/<layer>/part-<key>.parquet         the layer, one column per neuron, in segments of
                                                many parts (named after the first; wide_segments.py)
        index/instance_ids.npy, index/instance_rows.npy   the ids sorted, and where each one's row lies
        influence/part-0.parquet                TracIn's proponents and opponents per instance
        points/                                 the scatter's columns, memory-mapped (point_columns.py)
      .staging/<run>-<uuid>/      a run being written; never read by anyone else

A part's ``<key>`` is derived from the instance ids of the batch it holds, so a batch
that Ray retries after a worker died overwrites its own part instead of adding a
second copy. Files are written under a temporary name and renamed, so a reader never
sees half a Parquet file.

The output root may also be an object store URI (``s3://``, ``gs://``): the same layout,
staged in the store, finished on the driver's disk and published manifest last
(:mod:`netloupe.storage.location`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from netloupe.contract.errors import RunError
from netloupe.contract.names import check_run_name, table_dir_name
from netloupe.storage.location import (
    MANIFEST,
    StoreRoot,
    cached_run_dir,
    download_tree,
    files_under,
    is_uri,
    join_uri,
    open_filesystem,
    publish_run,
    strip_query,
    work_dir,
)
from netloupe.storage.manifest import BatchReport, RunManifest, read_manifest
from netloupe.storage.schema import (
    ACTIVATIONS,
    ATTRIBUTIONS,
    BACKGROUND,
    FIDELITY,
    INDEX,
    INFLUENCE,
    INSTANCES,
    METHOD_SUMMARY,
    PROJECTIONS,
    STATISTICS,
    TOKENS,
    WIDE,
    id_digest,
)

CATALOG = "catalog.duckdb"
POINTS = "points"
CANDIDATES = "candidates"
"""Under ``projections/``: the projection sample's candidates, in the staged run only."""
STAGING_DIR = ".staging"
JOB_FILE = "job.json"
"""The staged run's spec and model fingerprint, written first: what ``netloupe run --resume`` continues."""
JOB_FORMAT = 1
"""Version of ``job.json``'s layout (:func:`staged_job`)."""


class RunExistsError(RunError):
    """A committed run of that name is already there and ``force`` was not given."""


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

    def __post_init__(self):
        # A path given as text (a notebook's "runs/x") is a path all the same.
        object.__setattr__(self, "root", Path(self.root))

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
    def background_path(self) -> Path:
        """The background rows, for a run whose baselines were drawn from the data."""
        return self.root / BACKGROUND

    @property
    def instances_dir(self) -> Path:
        return self.root / INSTANCES

    @property
    def tokens_dir(self) -> Path:
        return self.root / TOKENS

    def activations_dir(self, layer: str) -> Path:
        return self.root / ACTIVATIONS / table_dir_name(layer)

    def attributions_dir(self, method: str) -> Path:
        return self.root / ATTRIBUTIONS / table_dir_name(method)

    def fidelity_dir(self, method: str) -> Path:
        """The sampled fidelity checks of ``method`` (:mod:`netloupe.workers.fidelity`)."""
        return self.root / FIDELITY / table_dir_name(method)

    def statistics_dir(self, name: str) -> Path:
        """One of the per-part statistics tables (:mod:`netloupe.storage.part_statistics`)."""
        return self.root / STATISTICS / name

    def wide_activations_dir(self, layer: str) -> Path:
        """``layer``'s activations with one column per neuron, per part."""
        return self.root / WIDE / table_dir_name(layer)

    @property
    def influence_path(self) -> Path:
        """The ``influence`` table (written whole by the driver, after the explain pass)."""
        return self.root / INFLUENCE / part_name("0")

    @property
    def points_dir(self) -> Path:
        """The scatter's memory-mapped columns (:mod:`netloupe.storage.point_columns`), written at the catalog."""
        return self.root / POINTS

    @property
    def index_dir(self) -> Path:
        """The activation index: per-part matrices, and the ids sorted (written at the catalog)."""
        return self.root / INDEX

    def index_layer_dir(self, layer: str) -> Path:
        """``layer``'s row-major ``float32`` matrices, one ``part-<key>.npy`` per part."""
        return self.root / INDEX / "layers" / table_dir_name(layer)

    def index_gram_dir(self, layer: str) -> Path:
        """``layer``'s Gram matrix per part (:func:`netloupe.storage.part_statistics.layer_gram`),
        one ``part-<key>.npy`` per part."""
        return self.root / INDEX / "gram" / table_dir_name(layer)

    def projection_sample_dir(self, kind: str, name: str) -> Path:
        """The rows of a projected table that may fall in the projection sample, per part:
        gathered by the workers as they explain, removed once the projection is fitted."""
        self.source_dir(kind, name)
        return self.root / PROJECTIONS / CANDIDATES / kind / table_dir_name(name)

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

    def table_dirs(self, layers, methods, statistics=(), projected=(), tokens: bool = False) -> list[Path]:
        """Every directory of parts the explain pass writes (a method's fidelity table only
        when sampled; the index matrices of the ``layers`` that have them):
        ``statistics`` names the statistics tables, ``projected`` the ``(kind, name)`` of
        the tables whose projection-sample candidates the workers gather; ``tokens``: a text run's."""
        return ([self.instances_dir] + ([self.tokens_dir] if tokens else []) + [self.activations_dir(l) for l in layers]
                + [self.attributions_dir(m) for m in methods] + [self.fidelity_dir(m) for m in methods]
                + [self.index_layer_dir(l) for l in layers] + [self.index_gram_dir(l) for l in layers]
                + [self.statistics_dir(s) for s in statistics]
                + [self.projection_sample_dir(kind, name) for kind, name in projected])

    def read_manifest(self) -> RunManifest:
        """The committed run's manifest, its format and schema version checked."""
        if not self.manifest_path.exists():
            raise RunError(
                f"{self.root} is not a committed netloupe run: it has no {MANIFEST}. "
                "Pass the directory that `netloupe run` printed at its end."
            )
        return read_manifest(self.manifest_path, str(self.root))


PARQUET_OPTIONS = dict(compression="zstd")
"""How parts are written: zstd is the best size/speed trade for float vectors measured so far."""
PLAIN_PARQUET_OPTIONS = dict(compression="none")
"""Parts of floats that compress poorly and are read whole (summed statistics)."""
WIDE_PARQUET_OPTIONS = dict(compression="none", use_dictionary=False, write_statistics=["instance_id"])
"""The wide activation parts (one column per neuron): DuckDB scans plain floats fastest, and
statistics of every neuron's column would only swell the footer."""


def write_parquet(path: Path, table: pa.Table, filesystem: pafs.FileSystem | None = None,
                  run_root: Path | None = None, options: dict | None = None) -> int:
    """Write ``table`` to ``path`` whole; return its size. Locally under a temporary name,
    then renamed; in an object store directly (an object appears only once uploaded).

    A worker names the staged run it writes into as ``run_root``: the directories below it
    are made one level at a time, so that a staged run that is gone (committed, aborted,
    or taken over by ``netloupe run --resume`` while a killed driver's worker still held a
    batch) is not made again by a late write, which fails instead.
    """
    # Row groups sized to a batch keep readers' memory bounded.
    options = {**(options or PARQUET_OPTIONS), "row_group_size": max(1, table.num_rows)}
    return _write_whole(path, lambda sink: pq.write_table(table, sink, **options), filesystem, run_root)


def write_npy(path: Path, matrix: np.ndarray, filesystem: pafs.FileSystem | None = None,
              run_root: Path | None = None) -> int:
    """Write ``matrix`` as a ``.npy`` file whole (as :func:`write_parquet` writes); return its size."""
    return _write_whole(path, lambda sink: np.save(sink, matrix, allow_pickle=False), filesystem, run_root)


def _write_whole(path: Path, write, filesystem: pafs.FileSystem | None, run_root: Path | None) -> int:
    with whole_file(path, filesystem, run_root) as sink:
        write(sink.stream)
    return sink.size


class _WholeSink:
    """What :func:`whole_file` yields: the open file, and its size once the file is whole."""

    def __init__(self, stream):
        self.stream = stream
        self.size = 0


@contextlib.contextmanager
def whole_file(path: Path, filesystem: pafs.FileSystem | None = None, run_root: Path | None = None):
    """A file written at ``path`` that appears whole when the block ends, or not at all if it
    raises (:func:`write_parquet`'s rules); yields a sink: write to its ``stream``; its ``size``
    is set when the file is whole."""
    if filesystem is not None and not isinstance(filesystem, pafs.LocalFileSystem):
        # An object appears only once its upload completes; pyarrow cannot abort an upload
        # (closing completes it), so what an error left is deleted.
        try:
            with filesystem.open_output_stream(str(path)) as stream:
                sink = _WholeSink(stream)
                yield sink
        except BaseException:
            with contextlib.suppress(OSError):
                filesystem.delete_file(str(path))
            raise
        sink.size = filesystem.get_file_info(str(path)).size
        return
    path = Path(path)
    if run_root is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        try:
            below = path.parent.relative_to(run_root).parts
            for depth in range(1, len(below) + 1):
                run_root.joinpath(*below[:depth]).mkdir(exist_ok=True)
        except FileNotFoundError:
            raise RunError(f"the staged run {run_root} is gone (committed, aborted or resumed elsewhere); "
                           f"{path.name} is not written there") from None
    tmp = path.parent / f".tmp-{path.stem}-{uuid.uuid4().hex}{path.suffix}"
    try:
        with open(tmp, "wb") as stream:
            sink = _WholeSink(stream)
            yield sink
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sink.size = path.stat().st_size


def part_name(key: str, suffix: str = ".parquet") -> str:
    return f"part-{key}{suffix}"


def key_of_part(name: str) -> str | None:
    """The key of a part file's name (``part-<key>.<suffix>``), None for any other file."""
    return name[len("part-"):].split(".", 1)[0] if name.startswith("part-") else None


def write_part(directory: Path, key: str, table: pa.Table, filesystem: pafs.FileSystem | None = None,
               run_root: Path | None = None, options: dict | None = None) -> int:
    """Write ``table`` as ``directory/part-<key>.parquet`` whole; return its size in bytes."""
    return write_parquet(directory / part_name(key), table, filesystem, run_root, options)


def worker_layout(worker_root: str) -> tuple[RunLayout, pafs.FileSystem]:
    """The staged run a worker writes to, and the filesystem it is on, from
    :attr:`RunStaging.worker_root` (an absolute directory or a store URI)."""
    if is_uri(worker_root):
        filesystem, path = open_filesystem(worker_root)
        return RunLayout(Path(path)), filesystem
    return RunLayout(Path(worker_root)), pafs.LocalFileSystem()


def _nothing_to_resume(run, staging_root) -> RunError:
    return RunError(f"nothing to resume for {run}: no interrupted run of that name under {staging_root}. "
                    "Pass <output.root>/<run_name> of the run that was interrupted")


def _is_staging_of(staged_name: str, run_name: str) -> bool:
    """True for ``<run_name>-<12 hex digits>`` (:class:`RunStaging`'s names), so that the
    stagings of run ``exp`` are not confused with those of ``exp-2``."""
    return re.fullmatch(rf"{re.escape(run_name)}-[0-9a-f]{{12}}", staged_name) is not None


def staged_job(spec_data: dict, model_fingerprint: dict) -> dict:
    """What a staging keeps for ``--resume`` (its ``job.json``): the spec, and the fingerprint
    (``ModelFingerprint.to_json()``) of the model its finished batches were explained with."""
    return {"netloupe_job": JOB_FORMAT, "spec": spec_data, "model_fingerprint": model_fingerprint}


def _job_of(job: dict, run_name: str) -> tuple[dict, dict]:
    """The staged spec and model fingerprint, checked to be the named run's."""
    if "netloupe_job" not in job:
        raise RunError(f"the interrupted run {run_name!r} was staged by an older netloupe, before model "
                       "fingerprints were recorded, so nothing shows its finished batches came from today's "
                       "model; delete its staging and run its spec again")
    if job["netloupe_job"] != JOB_FORMAT:
        raise RunError(f"the interrupted run {run_name!r} was staged by another version of netloupe (job format "
                       f"{job['netloupe_job']!r}, this one reads {JOB_FORMAT}); resume it with that version")
    spec_data = job["spec"]
    staged_name = (spec_data.get("output") or {}).get("run_name")
    if staged_name != run_name:
        raise RunError(f"the staged spec is for run {staged_name!r}, not {run_name!r}; "
                       f"resume <output.root>/{staged_name} instead")
    return spec_data, job["model_fingerprint"]


class RunStaging(ABC):
    """A run being written, until it is committed whole or aborted. Two kinds, one interface:
    :class:`LocalStaging` (a private directory that becomes the run in one rename) and
    :class:`StoreStaging` (a prefix in an object store, published manifest last; see
    :mod:`netloupe.storage.location`). :meth:`open` and :meth:`resume` pick the kind."""

    layout: RunLayout
    """Where the driver finishes the run on local disk."""
    location: str
    """Where the run will be: its directory, or its URI in the store."""
    worker_root: str
    """Where the workers write their parts: an absolute directory or a store URI."""

    def __init__(self, run_name: str, force: bool):
        self.run_name = check_run_name(run_name)
        self.force = force
        self.resumed = False
        """True for a staging taken over from an interrupted run (:meth:`resume`)."""
        self.staged_fingerprint: dict | None = None
        """For a resumed staging, the fingerprint (``ModelFingerprint.to_json()``) of the model
        its finished batches came from."""

    @staticmethod
    def open(output_root: str | os.PathLike, run_name: str, force: bool = False) -> RunStaging:
        """A new staging for run ``run_name`` under ``output_root`` (a directory or a store URI);
        refused when the run exists, unless ``force``."""
        if is_uri(output_root):
            return StoreStaging(str(output_root), run_name, force)
        return LocalStaging(output_root, run_name, force)

    @staticmethod
    def resume(run: str | os.PathLike, force: bool = False) -> tuple[RunStaging, dict]:
        """The staging an interrupted run left for the run at ``run`` (``<root>/<name>``, a
        directory or a store URI), and its spec; the newest one when several were left."""
        if is_uri(run):
            return StoreStaging.resume(str(run), force)
        return LocalStaging.resume(Path(run), force)

    def create(self, job: dict | None = None) -> RunLayout:
        """Make the staged run; ``job`` (:func:`staged_job`) is kept for ``--resume``."""
        self.layout.root.mkdir(parents=True, exist_ok=self.resumed)
        if job is not None and not self.resumed:
            job_file = self.layout.root / JOB_FILE
            job_file.write_text(json.dumps(job, sort_keys=True, default=str))
            self._keep_job(job_file)
        return self.layout

    def finished_parts(self, table_dirs: list[Path], methods: list[str], id_type: str) -> list[BatchReport]:
        """The batches an interrupted run finished: those with an instances part, which a
        worker writes after all of the batch's other parts (:class:`netloupe.workers.explain.ExplainWorker`).
        Their reports are rebuilt from the parts (``methods``: the spec's, in order, for each
        batch's fidelity rows). For a store, the instances and statistics parts are downloaded first."""
        self.pull(INSTANCES, STATISTICS)
        sizes = self._part_sizes(table_dirs)
        summaries = self.layout.statistics_dir(METHOD_SUMMARY)
        parts = []
        for path in sorted(self.layout.instances_dir.glob("part-*.parquet")):
            key = key_of_part(path.name)
            table = pq.read_table(path, columns=["instance_id", "node_id", "device"])
            first = table.slice(0, 1).to_pylist()
            sampled = {}
            if (summaries / path.name).exists():
                summary = pq.read_table(summaries / path.name, columns=["method", "sampled"]).to_pylist()
                sampled = {row["method"]: row["sampled"] for row in summary}
            parts.append(BatchReport(part=key, rows=table.num_rows, bytes=sizes.get(key, 0),
                                     compute_seconds=0.0, write_seconds=0.0, gpu_ids="", chunk_rows=0,
                                     node_id=first[0]["node_id"] if first else "",
                                     device=first[0]["device"] if first else "",
                                     id_digest=id_digest(table["instance_id"], id_type),
                                     fidelity_rows=[sampled.get(method, 0) for method in methods]))
        return parts

    def remove_unlisted_parts(self, table_dirs: list[Path], keys: set[str]) -> list[Path]:
        """Delete parts (and temporaries) that no successful batch reported, e.g. from a
        worker that died after writing; return what was removed."""
        removed = []
        for directory in table_dirs:
            if not directory.exists():
                continue
            for path in directory.iterdir():
                if key_of_part(path.name) not in keys:
                    path.unlink()
                    removed.append(path)
        return removed

    def clear(self, table_dirs: list[Path]) -> None:
        """Delete everything in ``table_dirs``, here and where the workers wrote: tables each
        attempt of a run rewrites whole (the wide segments)."""
        for directory in table_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    def commit(self, manifest: RunManifest) -> RunLayout:
        """Write the manifest, then make the run visible at once; return the run on local disk."""
        (self.layout.root / JOB_FILE).unlink(missing_ok=True)  # only a resume needed it
        tmp = self.layout.root / f".{MANIFEST}.tmp"
        tmp.write_text(manifest.to_json())
        os.replace(tmp, self.layout.manifest_path)
        return self._make_visible()

    @abstractmethod
    def _keep_job(self, job_file: Path) -> None:
        """Keep ``job.json`` where a resume looks for it."""

    @abstractmethod
    def pull(self, *relative_dirs: str) -> int:
        """Bring the workers' parts under ``relative_dirs`` into the local staged run; return
        the bytes copied."""

    @abstractmethod
    def stand_in_parts(self, table_dirs: list[Path], keys: set[str]) -> int:
        """Make sure each of ``table_dirs`` holds a part (one of ``keys``) in the local staged
        run, for the catalog's views to bind to its columns; return the bytes written. A store
        run's are empty stand-ins with the schema of one of the workers' parts (its footer is
        all that is read): the parts themselves are published from the store, never through the driver."""

    @abstractmethod
    def part_keys(self, directory: Path) -> set[str]:
        """The keys of the parts in ``directory`` where the workers wrote them."""

    @abstractmethod
    def _part_sizes(self, table_dirs: list[Path]) -> dict[str, int]:
        """The bytes of each part's files (by key) summed over ``table_dirs``, where the workers wrote them."""

    @abstractmethod
    def _make_visible(self) -> RunLayout:
        """The committed run appears whole (its manifest is already written)."""

    @abstractmethod
    def keep_for_resume(self) -> None:
        """Leave the staging for ``netloupe run --resume``."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything this run staged; committed runs are never touched."""


class LocalStaging(RunStaging):
    """A run staged in ``<root>/.staging/<run>-<12 hex>/``, renamed to ``<root>/<run>`` at commit."""

    def __init__(self, output_root: str | os.PathLike, run_name: str, force: bool = False):
        super().__init__(run_name, force)
        self.final = RunLayout.committed(output_root, run_name)
        self.location = str(self.final.root)
        if self.final.root.exists() and not force:
            raise RunExistsError(
                f"run {run_name!r} already exists at {self.final.root}; "
                "choose another run name, or pass --force to replace it"
            )
        self.layout = RunLayout(Path(output_root) / STAGING_DIR / f"{run_name}-{uuid.uuid4().hex[:12]}")
        self.worker_root = str(self.layout.root.resolve())

    @classmethod
    def resume(cls, run: Path, force: bool = False) -> tuple[LocalStaging, dict]:
        """The newest staging of ``run``, first renamed to a name of its own: the interrupted
        driver's Ray workers can outlive it by a batch, and a write of theirs then fails
        instead of landing in the run being finished (:func:`write_parquet`)."""
        staging_root = run.parent / STAGING_DIR
        candidates = sorted((d for d in staging_root.glob(f"{run.name}-*")
                             if _is_staging_of(d.name, run.name) and (d / JOB_FILE).is_file()),
                            key=lambda d: (d / JOB_FILE).stat().st_mtime)
        if not candidates:
            raise _nothing_to_resume(run, staging_root)
        # Checked before the takeover: a staging that is not this run's keeps its name.
        spec_data, fingerprint = _job_of(json.loads((candidates[-1] / JOB_FILE).read_text()), run.name)
        staging = cls(run.parent, run.name, force=force)
        try:
            os.rename(candidates[-1], staging.layout.root)
        except FileNotFoundError:
            raise RunError(f"the interrupted run {candidates[-1]} was taken by another `netloupe run --resume` "
                           "while this one started; let that one finish") from None
        staging.resumed, staging.staged_fingerprint = True, fingerprint
        return staging, spec_data

    def _keep_job(self, job_file: Path) -> None:
        pass  # it is in the staged directory already

    def pull(self, *relative_dirs: str) -> int:
        return 0  # the workers wrote into the staged directory itself

    def stand_in_parts(self, table_dirs: list[Path], keys: set[str]) -> int:
        return 0  # the parts are here

    def part_keys(self, directory: Path) -> set[str]:
        return {key_of_part(path.name) for path in directory.glob("part-*")} if directory.is_dir() else set()

    def _part_sizes(self, table_dirs: list[Path]) -> dict[str, int]:
        sizes = {}
        for directory in table_dirs:
            for path in directory.glob("part-*"):
                key = key_of_part(path.name)
                sizes[key] = sizes.get(key, 0) + path.stat().st_size
        return sizes

    def _make_visible(self) -> RunLayout:
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

    def keep_for_resume(self) -> None:
        pass  # the staged directory is what a resume takes over

    def abort(self) -> None:
        shutil.rmtree(self.layout.root, ignore_errors=True)
        self._cleanup_staging_root()

    def _cleanup_staging_root(self) -> None:
        staging_root = self.layout.root.parent
        if staging_root.exists() and not any(staging_root.iterdir()):
            staging_root.rmdir()


class StoreStaging(RunStaging):
    """A run staged under ``<root>/.staging/<run>-<12 hex>/`` in an object store: the workers
    write parts there, the driver finishes the run in a local work directory and publishes it
    to ``<root>/<run>/``, manifest last."""

    def __init__(self, output_root: str, run_name: str, force: bool = False):
        super().__init__(run_name, force)
        self.store = StoreRoot.open(output_root)
        staged_name = f"{run_name}-{uuid.uuid4().hex[:12]}"
        self.location = join_uri(self.store.uri, run_name)
        if self.store.exists(self.store.child(run_name, MANIFEST)) and not force:
            raise RunExistsError(
                f"run {run_name!r} already exists at {self.location}; "
                "choose another run name, or pass --force to replace it"
            )
        self.layout = RunLayout(work_dir(run_name) / run_name)
        self.store_staging = self.store.child(STAGING_DIR, staged_name)
        self.published_keys: dict[str, set[str]] = {}
        """Per table directory (relative to the run), the keys of the parts that are published
        (:meth:`remove_unlisted_parts`): the batches' for their tables, the segments' for the
        wide tables; whatever else a late writer left in the staged prefix stays there."""
        self.stand_ins: list[Path] = []
        """Local empty parts the catalog's views bound to (:meth:`stand_in_parts`): removed
        before publishing, so that the parts in the store are published instead."""
        self.worker_root = join_uri(self.store.uri, STAGING_DIR, staged_name)

    @classmethod
    def resume(cls, run: str, force: bool = False) -> tuple[StoreStaging, dict]:
        """The newest staged prefix of ``run``, continued in place: a store cannot rename it,
        so a killed driver's late parts are dropped with every other part no batch of the
        resumed run reported (:meth:`remove_unlisted_parts`)."""
        base, query = strip_query(run)
        root_uri, _, name = base.rpartition("/")
        if not name or root_uri.endswith(":/"):
            raise RunError(f"--resume needs <output.root>/<run_name>, got {run!r} "
                           "(for example s3://bucket/runs/mnist-demo?endpoint_override=...)")
        root_uri += query
        try:
            check_run_name(name)
        except ValueError as error:
            raise RunError(str(error)) from None
        store = StoreRoot.open(root_uri)
        selector = pafs.FileSelector(store.child(STAGING_DIR), allow_not_found=True)
        try:
            listed = store.filesystem.get_file_info(selector)
        except OSError as error:
            raise RunError(f"cannot list {join_uri(root_uri, STAGING_DIR)}: {error}. Give the URI with the same "
                           "?endpoint_override... settings as the run's output.root") from None
        jobs = [store.filesystem.get_file_info(f"{info.path}/{JOB_FILE}") for info in listed
                if info.type == pafs.FileType.Directory and _is_staging_of(info.base_name, name)]
        jobs = sorted((job for job in jobs if job.type == pafs.FileType.File), key=lambda job: job.mtime_ns or 0)
        if not jobs:
            raise _nothing_to_resume(run, join_uri(root_uri, STAGING_DIR))
        with store.filesystem.open_input_stream(jobs[-1].path) as stream:
            spec_data, fingerprint = _job_of(json.loads(stream.read()), name)
        staging = cls(root_uri, name, force=force)
        staging.store_staging = jobs[-1].path.rsplit("/", 1)[0]
        staging.worker_root = join_uri(store.uri, STAGING_DIR, staging.store_staging.rsplit("/", 1)[-1])
        staging.resumed, staging.staged_fingerprint = True, fingerprint
        return staging, spec_data

    def _keep_job(self, job_file: Path) -> None:
        pafs.copy_files(str(job_file), f"{self.store_staging}/{JOB_FILE}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.store.filesystem)

    def pull(self, *relative_dirs: str) -> int:
        return sum(download_tree(self.store.filesystem, f"{self.store_staging}/{d}", self.layout.root / d)
                   for d in relative_dirs)

    def stand_in_parts(self, table_dirs: list[Path], keys: set[str]) -> int:
        written = 0
        for directory in table_dirs:
            listed = [info for info in self._listed(directory.relative_to(self.layout.root).as_posix())
                      if key_of_part(info.base_name) in keys]
            if listed:
                schema = pq.read_schema(listed[0].path, filesystem=self.store.filesystem)
                written += write_parquet(directory / listed[0].base_name, schema.empty_table())
                self.stand_ins.append(directory / listed[0].base_name)
        return written

    def part_keys(self, directory: Path) -> set[str]:
        listed = self._listed(directory.relative_to(self.layout.root).as_posix())
        keys = {key_of_part(info.base_name) for info in listed}
        return keys - {None}

    def remove_unlisted_parts(self, table_dirs: list[Path], keys: set[str]) -> list[Path]:
        # In the store they stay in the staged prefix, which goes whole: only the listed parts
        # are published (publish_run copies them there, never through the driver).
        for directory in table_dirs:
            self.published_keys[directory.relative_to(self.layout.root).as_posix()] = set(keys)
        return super().remove_unlisted_parts(table_dirs, keys)

    def clear(self, table_dirs: list[Path]) -> None:
        super().clear(table_dirs)
        for directory in table_dirs:
            self.store.delete_tree(f"{self.store_staging}/{directory.relative_to(self.layout.root).as_posix()}")

    def _published_parts(self) -> list[str]:
        """The staged parts the run is published with that the driver does not hold (paths
        relative to the run): the listed parts of each table, but not the projection candidates."""
        here = {path.relative_to(self.layout.root).as_posix() for path in self.layout.root.rglob("*")}
        parts = []
        for info in files_under(self.store.filesystem, self.store_staging):
            relative = info.path[len(self.store_staging.rstrip("/")) + 1:]
            keys = self.published_keys.get(relative.rpartition("/")[0], set())
            if (key_of_part(info.base_name) in keys and relative not in here
                    and not relative.startswith(f"{PROJECTIONS}/{CANDIDATES}/")):
                parts.append(relative)
        return parts

    def _listed(self, relative: str) -> list[pafs.FileInfo]:
        return [info for info in self.store.filesystem.get_file_info(
                    pafs.FileSelector(f"{self.store_staging}/{relative}", allow_not_found=True))
                if info.type == pafs.FileType.File]

    def _part_sizes(self, table_dirs: list[Path]) -> dict[str, int]:
        sizes = {}
        for directory in table_dirs:
            for info in self._listed(directory.relative_to(self.layout.root).as_posix()):
                key = key_of_part(info.base_name)
                if key is not None:
                    sizes[key] = sizes.get(key, 0) + (info.size or 0)
        return sizes

    def _make_visible(self) -> RunLayout:
        for stand_in in self.stand_ins:
            stand_in.unlink(missing_ok=True)
        try:
            publish_run(self.layout.root, self.store, self.run_name, self.force, self.store_staging,
                        self._published_parts())
        except RunError as error:
            raise RunExistsError(str(error)) from None
        self.store.delete_tree(self.store_staging)
        # What the driver holds (the manifest, the catalog, the instances; not the bulk): a
        # cache that a reader completes on first use (local_run_dir).
        cached = cached_run_dir(self.location)
        if cached.exists():
            shutil.rmtree(cached)
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.layout.root, cached)
        shutil.rmtree(self.layout.root.parent, ignore_errors=True)
        return RunLayout(cached)

    def keep_for_resume(self) -> None:
        # The staged prefix keeps the parts (a resume downloads them again); the local
        # work directory goes.
        shutil.rmtree(self.layout.root.parent, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.layout.root.parent, ignore_errors=True)
        try:
            self.store.delete_tree(self.store_staging)
        except OSError:
            pass  # the store is unreachable: the error that aborted the run says more
