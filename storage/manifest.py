"""The run contract in types: a worker's report of each batch, what validation learned about
the model, and the manifest every committed run carries.

``manifest.json`` is written last: its presence marks a committed run. Reading one checks its
format and table schema version first, so a run made by another netloupe is refused with what
to do, not half-read. Every field is typed and documented here; nothing reads a manifest as a
loose dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from netloupe.contract.errors import RunError
from netloupe.storage.schema import SCHEMA_VERSION

MANIFEST_FORMAT = 2
"""Version of ``manifest.json``'s layout (2: typed, model identity and output kind)."""


class Record(BaseModel):
    """A frozen record that refuses unknown keys (a key this version does not know means the
    file was made by another version, which the format check reports first)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class BatchReport(Record):
    """What a worker reports to the driver for one batch it wrote (the results themselves
    never travel through the driver)."""

    part: str
    """The part key: a hash of the batch's instance ids, the name of its file in every table."""
    rows: int
    """Instances in the batch."""
    bytes: int
    """Bytes of all the batch's part files."""
    compute_seconds: float
    write_seconds: float
    device: str
    """``cpu`` or ``cuda:0`` (the worker's view of its assigned GPU)."""
    gpu_ids: str
    """Ray's GPU ids for the worker, comma-separated; empty on the CPU."""
    node_id: str
    """The Ray node that computed the batch."""
    chunk_rows: int
    """Rows per forward/backward pass the worker chose (0 when not measured)."""

    def to_arrow(self) -> pa.Table:
        """One row, as a Ray Data batch."""
        return pa.Table.from_pylist([self.model_dump()])


class ModelFacts(Record):
    """What the validation batch revealed about the model; fixes every table's schema."""

    num_classes: int
    input_shape: tuple[int, ...]
    layer_neurons: dict[str, int]
    """Stored vector length per recorded layer (after pooling)."""
    layer_output_shapes: dict[str, tuple[int, ...]]
    """Per-instance output shape of each recorded layer, before pooling."""
    attribution_shapes: dict[str, tuple[int, ...] | None]
    """Per-instance shape of each method's stored map (None in summary mode)."""
    attribution_raw_shapes: dict[str, tuple[int, ...]]
    """Per-instance shape of each method's map as Captum returns it."""
    per_instance_bytes: int
    """Bytes of all module outputs for one instance: sizes the methods' internal chunks."""


class ModelIdentity(Record):
    """Which model the run explained, so that runs of the same model can be recognised."""

    fingerprint: str | None
    """``blake2b-128:<hex>`` over every parameter and buffer; None for a handmade run."""
    tensor_fingerprints: dict[str, str] = {}
    """Each parameter's and buffer's own digest (to tell which ones two models differ in)."""
    weights_unset: list[str] = []
    """Parameters and buffers ``model.weights`` did not set (the factory's values stand)."""
    output: Literal["logits", "probabilities", "log_probabilities"]
    """What the model's forward returns (``model.output``)."""


class DatasetInfo(Record):
    """Where the instances came from and which columns played which part."""

    path: str | None = None
    """The dataset read (absolute); None for a handmade run."""
    id_type: Literal["int64", "string"]
    id_column: str | None = None
    label_column: str | None = None
    input_column: str | None = None
    feature_columns: list[str] = []
    metadata_columns: list[str] = []


class Counts(Record):
    instances: int
    parts: int = 0
    """Batches written."""
    bytes: int = 0
    """Bytes of every part file the workers wrote."""
    attribution_rows_per_method: int = 0


class Tables(Record):
    """Each table's directory, relative to the run."""

    instances: str = "instances"
    activations: dict[str, str] = {}
    """Layer → directory."""
    attributions: dict[str, str] = {}
    """Method table → directory."""
    projections: dict[str, str] = {}
    """``<kind>/<name>`` → directory."""
    fidelity: dict[str, str] = {}
    """Method table → directory of its sampled fidelity checks."""


class FidelityInfo(Record):
    """The fidelity settings the run used, and how many instances each method's sample got."""

    settings: dict[str, Any] = {}
    """The spec's ``fidelity`` section."""
    sampled_rows: dict[str, int] = {}

    @property
    def curve_steps(self) -> int:
        return int(self.settings.get("curve_steps", 0))


class ProjectionTable(Record):
    """One fitted projection (:meth:`netloupe.workers.projection.Projection.describe`)."""

    kind: str
    name: str
    algorithms: list[str]
    dimensions: int
    sample_rows: int
    explained_variance_ratio: list[float]
    pca_mean: list[float] = []
    pca_components: list[list[float]] = []
    umap_neighbors: int | None = None
    fit_seconds: dict[str, float] = {}
    """Seconds each algorithm took to fit."""


class Projections(Record):
    sample_rows: int = 0
    """Instances the projections were fitted on."""
    seed: int | None = None
    tables: list[ProjectionTable] = []
    timings: dict[str, float] = {}


class WorkerInfo(Record):
    """One worker as its batches reported it."""

    node_id: str
    device: str
    gpu_ids: str
    chunk_rows: int


class RunManifest(Record):
    """A committed run's self-description (``manifest.json``)."""

    netloupe_manifest: Literal[2] = MANIFEST_FORMAT
    """The manifest's format (:data:`MANIFEST_FORMAT`)."""
    schema_version: int = SCHEMA_VERSION
    """The tables' schema version (:data:`netloupe.storage.schema.SCHEMA_VERSION`)."""
    run_name: str
    created_unix: float
    handmade: bool = False
    """Made from arrays (tests, benchmarks) by :mod:`netloupe.storage.handmade`, not by a job."""
    spec: dict[str, Any] | None = None
    """The job spec, as data; None for a handmade run."""
    preprocess: dict[str, Any] = {}
    """The preprocessing applied (the spec's, or a built-in dataset's own)."""
    dataset: DatasetInfo
    counts: Counts
    class_names: list[str]
    model: ModelFacts
    model_identity: ModelIdentity
    model_graph: dict[str, Any] | None = None
    """The model's graph for the dashboard (:func:`netloupe.pipeline.model_graph.model_graph`)."""
    tables: Tables
    fidelity: FidelityInfo = FidelityInfo()
    projections: Projections = Projections()
    workers: list[WorkerInfo] = []
    timings: dict[str, Any] = {}
    """Seconds per stage; ``catalog`` holds the catalog build's own timings."""
    versions: dict[str, str] = {}
    """Python's and the main packages' versions."""
    argv: list[str] = []

    @property
    def layers(self) -> list[str]:
        return list(self.tables.activations)

    @property
    def methods(self) -> list[str]:
        return list(self.tables.attributions)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)  # dicts keep their order (the spec's)


def parse_manifest(data: Any, where: str) -> RunManifest:
    """Check a manifest's format and schema version, then read it (``where`` names the run in
    errors)."""
    if not isinstance(data, dict) or "netloupe_manifest" not in data:
        raise RunError(f"{where} has a manifest.json that is not a netloupe manifest")
    made_by = (data.get("versions") or {}).get("netloupe", "an older version")
    if data["netloupe_manifest"] != MANIFEST_FORMAT:
        raise RunError(
            f"the run at {where} was made by netloupe {made_by} (manifest format {data['netloupe_manifest']}); "
            f"this netloupe reads format {MANIFEST_FORMAT}. Run its spec again (it is in its manifest.json) to "
            "make a run this version reads, or read it with the netloupe that made it"
        )
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RunError(
            f"the run at {where} has tables of schema version {data.get('schema_version')} (netloupe {made_by}); "
            f"this netloupe reads version {SCHEMA_VERSION}. Run its spec again, or read it with the netloupe "
            "that made it"
        )
    try:
        return RunManifest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        raise RunError(f"the manifest of the run at {where} is damaged: {'.'.join(map(str, first['loc']))}: "
                       f"{first['msg']}") from None


def read_manifest(path: Path, where: str) -> RunManifest:
    """The manifest at ``path`` (a run's ``manifest.json``)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunError(f"the manifest of the run at {where} is not JSON ({error})") from None
    return parse_manifest(data, where)
