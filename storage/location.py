"""Where runs are kept: a local (or shared, mounted) directory, or any pyarrow filesystem
URI such as ``s3://bucket/runs`` or ``gs://bucket/runs``.

A local root is used in place (:class:`netloupe.storage.layout.RunStaging` stages and renames). An
object store has no rename, so a run there is made in four steps, and the rule that makes
it safe is the one local runs follow too: **a run exists when its ``manifest.json`` does,
and the manifest is written last**.

1. the workers write their parts under ``<root>/.staging/<run>-<uuid>/`` in the store
   (each object appears whole when its upload ends, so no temporary names are needed);
2. the driver downloads what the catalog is built from into a local work directory: the
   instances, the workers' per-part statistics, the projection sample's candidates and the
   projections (a few dozen bytes per instance), and of each bulk table an empty stand-in
   with one part's columns (its footer read in place; a view binds to it). The bulk itself
   (activations, attributions, their index forms, the part pass's wide segments) never
   passes through the driver;
3. it publishes the run to ``<root>/<run>/`` (:func:`publish_run`): the reported parts copied
   inside the store (server-side copies, in parallel), the driver's files uploaded, manifest
   last;
4. it deletes the staged prefix; its work directory becomes the start of the read cache.

Reading a run kept in a store (``netloupe sql``, ``netloupe dashboard``) downloads it once
into a local cache (:func:`local_run_dir`; a cache the driver left is completed then):
DuckDB then reads it as a local run, with no extension to install.

Connection settings travel in the URI as pyarrow reads them (``?endpoint_override=host:port
&scheme=http&region=...``); credentials come from the environment as each store's SDK
reads them (``AWS_ACCESS_KEY_ID``..., ``GOOGLE_APPLICATION_CREDENTIALS``), never from the
spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from netloupe.contract.errors import RunError
from netloupe.storage.manifest import parse_manifest

MANIFEST = "manifest.json"
CACHE_ENV = "NETLOUPE_CACHE"
"""Environment variable naming netloupe's local cache (default ``~/.cache/netloupe``):
built-in datasets, demo weights, runs read from a store, and the driver's work directories
for runs bound for a store."""


def is_uri(root: str | os.PathLike) -> bool:
    """True for a filesystem URI (``s3://...``), false for a plain local path."""
    return "://" in str(root)


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it that ``uri`` names, or a clear error."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid / ArrowIOError
        raise RunError(
            f"cannot open the filesystem of {uri!r}: {error}. Give a local directory or a URI pyarrow "
            "understands (s3://bucket/path, gs://bucket/path, file:///abs/path); connection settings go "
            "in the query (s3://bucket/path?endpoint_override=host:port&scheme=http)"
        ) from None


def strip_query(uri: str) -> tuple[str, str]:
    """``uri`` without its query and trailing slash, and the query (``"?..."`` or ``""``)."""
    base, sep, query = uri.partition("?")
    return base.rstrip("/"), (sep + query)


def join_uri(uri: str, *parts: str) -> str:
    """``uri`` with path parts appended, keeping its ``?query`` at the end."""
    base, query = strip_query(uri)
    return "/".join([base, *parts]) + query


@dataclass(frozen=True)
class StoreRoot:
    """An output root in an object store: the filesystem and the root's path inside it."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @classmethod
    def open(cls, uri: str) -> "StoreRoot":
        filesystem, path = open_filesystem(uri)
        return cls(uri, filesystem, path.rstrip("/"))

    def child(self, *parts: str) -> str:
        """A path inside the filesystem under the root."""
        return "/".join([self.path, *parts])

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def delete_tree(self, path: str) -> None:
        if self.filesystem.get_file_info(path).type == pafs.FileType.Directory:
            self.filesystem.delete_dir(path)


def files_under(filesystem: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return [info for info in filesystem.get_file_info(selector) if info.type == pafs.FileType.File]


def download_tree(filesystem: pafs.FileSystem, source: str, target: Path) -> int:
    """Copy every file under ``source`` in ``filesystem`` to the local directory ``target``
    (streamed, one file at a time); return the bytes copied."""
    local = pafs.LocalFileSystem()
    copied = 0
    for info in files_under(filesystem, source):
        relative = info.path[len(source.rstrip("/")) + 1:]
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(info.path, str(destination), source_filesystem=filesystem, destination_filesystem=local)
        copied += info.size or 0
    return copied


COPY_THREADS = 16
"""Server-side copies in flight at once when a run is published (each is one request)."""
COMPLETE = ".netloupe-complete"
"""In a cached run: every file of the run is there (the driver's own cache is not, yet)."""


def publish_run(local_run: Path, store: StoreRoot, run_name: str, force: bool, staged: str | None = None,
                copied: list[str] = ()) -> str:
    """Publish the finished run to ``<root>/<run_name>``, manifest last; return its URI.

    The files at ``local_run`` are uploaded; the files ``copied`` (paths relative to the run)
    are copied inside the store from under the store path ``staged``. With ``force``, an
    existing run of that name stops being a run (its manifest is removed) before anything of
    the new one is published, so a reader sees the old run, no run, or the new run, never a
    mixture.
    """
    target = store.child(run_name)
    manifest = store.child(run_name, MANIFEST)
    if store.exists(manifest) and not force:
        raise RunError(f"run {run_name!r} appeared at {store.uri} while this run was computed; its results "
                       f"are kept at {local_run}. Publish them under another name, or rerun with --force")
    if store.exists(target):
        if store.exists(manifest):
            store.filesystem.delete_file(manifest)
        store.filesystem.delete_dir(target)
    local = pafs.LocalFileSystem()
    files = sorted(p for p in local_run.rglob("*") if p.is_file() and p.name != MANIFEST)
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(lambda relative: store.filesystem.copy_file(f"{staged}/{relative}",
                                                                  store.child(run_name, relative)), copied))
    for path in files:
        relative = path.relative_to(local_run).as_posix()
        pafs.copy_files(str(path), store.child(run_name, relative),
                        source_filesystem=local, destination_filesystem=store.filesystem)
    pafs.copy_files(str(local_run / MANIFEST), manifest, source_filesystem=local,
                    destination_filesystem=store.filesystem)
    return join_uri(store.uri, run_name)


def cache_root() -> Path:
    """netloupe's local cache directory (:data:`CACHE_ENV` overrides)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "netloupe")


def work_dir(run_name: str) -> Path:
    """A fresh local directory where the driver finishes a run bound for a store."""
    parent = cache_root() / "work"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{run_name}-", dir=parent))


def cached_run_dir(run_uri: str) -> Path:
    """Where the run at ``run_uri`` is cached locally (the URI's query does not count)."""
    base = strip_query(run_uri)[0]
    digest = hashlib.blake2b(base.encode(), digest_size=8).hexdigest()
    return cache_root() / "runs" / digest / base.rsplit("/", 1)[-1]


def local_run_dir(run: str | os.PathLike) -> Path:
    """A local directory holding the committed run ``run``: the directory itself, or for a
    URI a cached download of it (fetched again only when its manifest changed)."""
    if not is_uri(run):
        return Path(run)
    run = str(run)
    filesystem, path = open_filesystem(run)
    path = path.rstrip("/")
    try:
        with filesystem.open_input_stream(f"{path}/{MANIFEST}") as stream:
            manifest = stream.read()
    except (FileNotFoundError, OSError) as error:
        raise RunError(f"{run} is not a committed netloupe run: reading its {MANIFEST} failed ({error}). "
                       "Pass the URI that `netloupe run` printed at its end") from None
    # A run of another netloupe is refused before its tables are downloaded.
    try:
        parse_manifest(json.loads(manifest), run)
    except json.JSONDecodeError as error:
        raise RunError(f"the manifest of the run at {run} is not JSON ({error})") from None
    cached = cached_run_dir(run)
    if (cached / COMPLETE).exists() and (cached / MANIFEST).read_bytes() == manifest:
        return cached
    # Downloaded beside the cache entry and swapped in whole, manifest last as in the store.
    incoming = cached.parent / f".incoming-{uuid.uuid4().hex[:12]}"
    try:
        download_tree(filesystem, path, incoming)
        if (incoming / MANIFEST).read_bytes() != manifest:
            raise RunError(f"run {run} changed while it was downloaded; open it again")
        (incoming / COMPLETE).touch()
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(incoming, cached)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return cached
