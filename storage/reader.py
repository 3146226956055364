"""Reading a committed run's tables (the Python side; SQL comes through the catalog)."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from netloupe.contract.errors import RunError, did_you_mean
from netloupe.contract.spec import DRIVER_SQL_MEMORY_MIB
from netloupe.storage.layout import RunLayout
from netloupe.storage.part_statistics import SAMPLE_HASH_SQL
from netloupe.storage.schema import vectors_to_numpy


class RunReader:
    """A committed run: its manifest and its tables as Arrow, in ``instance_id`` order."""

    def __init__(self, run_dir: str | os.PathLike):
        self.layout = RunLayout(Path(run_dir))
        self.manifest = self.layout.read_manifest()

    @property
    def layers(self) -> list[str]:
        return self.manifest.layers

    @property
    def methods(self) -> list[str]:
        return self.manifest.methods

    def _read(self, directory: Path, sort_keys: list[str]) -> pa.Table:
        table = pads.dataset(directory, format="parquet").to_table()
        return table.sort_by([(key, "ascending") for key in sort_keys])

    def instances(self) -> pa.Table:
        return self._read(self.layout.instances_dir, ["instance_id"])

    def background(self) -> pa.Table:
        """The background rows a method's baseline was drawn from (``background.parquet``)."""
        return pq.read_table(self.layout.background_path)

    def tokens(self) -> pa.Table:
        """A text run's tokens table (:func:`netloupe.storage.schema.tokens_schema`), by instance."""
        if not self.manifest.tables.tokens:
            raise RunError(f"the run at {self.layout.root} explained no texts, so it has no tokens table")
        return self._read(self.layout.root / self.manifest.tables.tokens, ["instance_id"])

    def activations(self, layer: str) -> pa.Table:
        if layer not in self.layers:
            raise RunError(f"run has no activations of layer {layer!r}; {did_you_mean(layer, self.layers)}")
        return self._read(self.layout.activations_dir(layer), ["instance_id"])

    def attributions(self, method: str) -> pa.Table:
        if method not in self.methods:
            raise RunError(f"run has no attributions {method!r}; {did_you_mean(method, self.methods)}")
        return self._read(self.layout.attributions_dir(method), ["instance_id", "target_rank"])

    def activation_matrix(self, layer: str) -> tuple[pa.Array, np.ndarray]:
        """Instance ids and the ``(n, neurons)`` activation matrix of ``layer``."""
        table = self.activations(layer)
        return table["instance_id"], vectors_to_numpy(table["activation"])

    def attribution_maps(self, method: str) -> tuple[pa.Table, np.ndarray]:
        """Attribution rows and their maps reshaped to the stored per-instance shape."""
        table = self.attributions(method)
        shape = self.manifest.model.attribution_shapes[method]
        if shape is None:
            raise RunError(f"attributions {method!r} were stored as summaries only; no maps to read")
        maps = vectors_to_numpy(table["attribution"]).reshape((table.num_rows, *shape))
        return table, maps


def sample_instance_ids(instances_dir: Path, size: int, seed: int, memory_mib: int = DRIVER_SQL_MEMORY_MIB) -> pa.Array:
    """Up to ``size`` instance ids drawn uniformly by a seeded hash of each id, in hash order.

    The draw depends on the ids and the seed only, not on how the instances were sharded
    into parts or in which order they were written, so a rerun samples the same instances.
    DuckDB keeps only the ``size`` smallest hashes while it scans (memory stays bounded).
    """
    with duckdb.connect() as con:
        con.execute(f"SET memory_limit = '{int(memory_mib)}MiB'")
        return con.sql(
            f"SELECT instance_id FROM read_parquet(?) ORDER BY {SAMPLE_HASH_SQL}, instance_id LIMIT ?",
            params=[str(instances_dir / "*.parquet"), seed, size],
        ).to_arrow_table()["instance_id"].combine_chunks()


def read_vectors(directory: Path, column: str, ids: pa.Array, memory_mib: int = DRIVER_SQL_MEMORY_MIB) -> np.ndarray:
    """The ``(len(ids), d)`` float32 matrix of ``column`` for ``ids``, in their order.

    ``directory`` is an activations or attributions table (of the latter, each instance's
    first target: ``target_rank = 0``). Every id must be present.
    """
    if column not in ("activation", "attribution"):
        raise ValueError(f"vectors are read from 'activation' or 'attribution' columns, got {column!r}")
    wanted = pa.table({"instance_id": ids, "position": pa.array(np.arange(len(ids), dtype=np.int64))})
    rank = "AND t.target_rank = 0" if column == "attribution" else ""
    with duckdb.connect() as con:
        con.execute(f"SET memory_limit = '{int(memory_mib)}MiB'")
        con.register("wanted", wanted)
        # The column name is one of two constants checked above, never user text.
        rows = con.sql(
            f"SELECT t.{column} AS vector FROM read_parquet(?) AS t JOIN wanted AS w "
            f"ON t.instance_id = w.instance_id {rank} ORDER BY w.position",
            params=[str(directory / "*.parquet")],
        ).to_arrow_table()
    if rows.num_rows != len(ids):
        raise RunError(f"{directory} holds {rows.num_rows} of the {len(ids)} sampled instances; "
                       "the run's tables disagree (rebuild the run)")
    return vectors_to_numpy(rows["vector"])
