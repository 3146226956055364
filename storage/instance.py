"""One instance of a committed run, read through the run's catalog: what the dashboard's
instance view and the Python API (``Run.instance``) show."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np

from netloupe.contract.errors import RunError
from netloupe.storage.catalog import fidelity_view, run_query
from netloupe.storage.manifest import RunManifest

FIDELITY_COLUMNS = ("convergence_delta", "deletion_auc", "insertion_auc", "deletion_curve", "insertion_curve")
"""Per-instance fidelity columns of an attributions view, kept with the instance."""


class NoSuchInstance(RunError):
    """The run has no instance with that id."""


@dataclass(frozen=True)
class InstanceRecord:
    """Everything a run holds about one instance."""

    row: dict[str, Any]
    """Its row of ``instances``: id, label, prediction, confidence, correct, probabilities, metadata."""
    input: np.ndarray | dict | None
    """Its model input as stored in the dataset (an image array shaped as the model takes it,
    or feature values by column); None when the dataset is no longer where the run read it."""
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    """Each method's map of the first target, in its stored shape (none for summary storage)."""
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    """Each recorded layer's (pooled) activation vector."""
    fidelity: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each method's fidelity checks of this instance (curves, areas, sampled checks)."""
    tokens: dict[str, Any] | None = None
    """A text's row of the tokens table (its tokens, ids and character spans), else None."""
    token_values: dict[str, np.ndarray] = field(default_factory=dict)
    """A text's value per own token for each method, of the first target."""
    segments: dict[str, np.ndarray] = field(default_factory=dict)
    """Each method whose features are this image's own superpixels: its segment number per
    pixel, ``(H, W)`` (a view draws their boundaries over the map)."""

    @property
    def instance_id(self):
        return self.row["instance_id"]

    @property
    def probabilities(self) -> np.ndarray:
        return np.asarray(self.row["probabilities"], np.float32)


def read_instance(con: duckdb.DuckDBPyConnection, manifest: RunManifest, instance_id) -> InstanceRecord:
    """The instance ``instance_id`` of the run ``con`` is over (:func:`open_catalog`)."""
    rows = run_query(con, "SELECT * EXCLUDE (node_id, device) FROM instances WHERE instance_id = ?",
                     [instance_id]).to_pylist()
    if not rows:
        raise NoSuchInstance(f"no instance with id {instance_id!r} in this run")
    tokens = None
    if manifest.tables.tokens:
        found = run_query(con, "SELECT * EXCLUDE (instance_id) FROM tokens WHERE instance_id = ?", [instance_id])
        tokens = found.to_pylist()[0] if found.num_rows else None
    record = InstanceRecord(row=rows[0], input=_input_of(con, manifest, instance_id), tokens=tokens)
    for method, shape in manifest.model.attribution_shapes.items():
        view = run_query(con, "SELECT view FROM methods WHERE method = ?", [method])["view"][0].as_py()
        found = run_query(con, f"SELECT * FROM {view} WHERE instance_id = ? AND target_rank = 0",
                          [instance_id]).to_pylist()
        if not found:
            continue
        if shape is not None:
            record.maps[method] = np.asarray(found[0]["attribution"], np.float32).reshape(shape)
            if found[0].get("feature_mask") is not None:  # the input's pixels, whatever the map's storage
                record.segments[method] = np.asarray(found[0]["feature_mask"], np.int32).reshape(
                    manifest.model.input_shape[-2:])
        if found[0].get("token_attribution") is not None:
            record.token_values[method] = np.asarray(found[0]["token_attribution"], np.float32)
        checks = {key: found[0].get(key) for key in FIDELITY_COLUMNS if key in found[0]}
        if method in manifest.tables.fidelity:
            sampled = run_query(con, f"SELECT * EXCLUDE (instance_id, target) FROM {fidelity_view(method)} "
                                     "WHERE instance_id = ?", [instance_id]).to_pylist()
            checks.update(sampled[0] if sampled else {})
        record.fidelity[method] = checks
    for layer in manifest.layers:
        view = run_query(con, "SELECT vectors_view FROM layers WHERE layer = ?", [layer])["vectors_view"][0].as_py()
        found = run_query(con, f"SELECT activation FROM {view} WHERE instance_id = ?", [instance_id])
        if found.num_rows:
            record.activations[layer] = np.asarray(found["activation"][0].as_py(), np.float32)
    return record


def _input_of(con: duckdb.DuckDBPyConnection, manifest: RunManifest, instance_id):
    """The instance's model input as stored in the dataset, or None when the catalog has no
    ``inputs`` view (the dataset moved)."""
    has_inputs = run_query(con, "SELECT count(*) AS n FROM duckdb_views() WHERE view_name = 'inputs'")
    if not has_inputs["n"][0].as_py():
        return None
    found = run_query(con, "SELECT * FROM inputs WHERE instance_id = ?", [instance_id]).to_pylist()
    if not found:
        return None
    row = found[0]
    row.pop("instance_id")
    if len(row) == 1:
        (values,) = row.values()
        if isinstance(values, str):
            return values  # a text
        shape = manifest.preprocess.shape
        array = np.asarray(values, np.float32)
        return array.reshape(shape) if shape and int(np.prod(shape)) == array.size else array
    return row
