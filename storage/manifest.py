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
from netloupe.contract.spec import FidelitySpec, PreprocessSpec
from netloupe.storage.schema import SCHEMA_VERSION

MANIFEST_FORMAT = 3
"""Version of ``manifest.json``'s layout (2: typed, model identity and output kind; 3: per-part
statistics and index parts written by the workers, wide segments by the part pass)."""


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
    """Seconds the worker spent explaining the batch."""
    write_seconds: float
    """Seconds it spent writing the batch's parts."""
    device: str
    """``cpu`` or ``cuda:0`` (the worker's view of its assigned GPU)."""
    gpu_ids: str
    """Ray's GPU ids for the worker, comma-separated; empty on the CPU."""
    node_id: str
    """The Ray node that computed the batch."""
    chunk_rows: int
    """Rows per forward/backward pass the worker chose (0 when not measured)."""
    id_digest: int
    """The digest of the batch's instance ids (:func:`netloupe.storage.schema.id_digest_sql`):
    the batches' digests add up to the dataset's when every instance is in exactly one."""
    fidelity_rows: list[int]
    """Rows of each method's sampled fidelity table, in the order of the spec's attributions."""
    input_digest: int | None = None
    """The digest of the batch's ids with their inputs (:func:`netloupe.storage.schema.input_digest`);
    None for a batch a resumed run kept (its report is rebuilt from its parts, without the inputs)."""

    def to_arrow(self) -> pa.Table:
        """One row, as a Ray Data batch (the digests as text: Arrow's int64 cannot hold them)."""
        return pa.Table.from_pylist([{**self.model_dump(), "id_digest": str(self.id_digest),
                                      "input_digest": None if self.input_digest is None else str(self.input_digest)}])


class ModelFacts(Record):
    """What the validation batch revealed about the model; fixes every table's schema."""

    num_classes: int
    """Outputs of the model (classes)."""
    input_shape: tuple[int, ...]
    """Shape of one instance as the model takes it."""
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
    input_kind: Literal["array", "tokens"] = "array"
    """``tokens`` when the instances are texts: the run has a tokens table and per-token
    attributions (``token_attribution``) instead of maps over the input."""
    special_tokens: list[str] = []
    """A text run's tokens that are not words of a text ([CLS], [SEP], [PAD]...; [UNK] stands
    for a word, so it is not one): views of words leave them out."""


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
    """Type of the instance ids in every table."""
    id_column: str | None = None
    """The dataset's id column (the tables call it ``instance_id``)."""
    label_column: str | None = None
    """The dataset's label column, if it has one."""
    input_column: str | None = None
    """The column holding each instance's input (images, tensors), if one does."""
    feature_columns: list[str] = []
    """The numeric columns forming the input (tabular models), in model order."""
    text_column: str | None = None
    """The column holding each instance's text, if the instances are texts."""
    metadata_columns: list[str] = []
    """Columns copied into ``instances`` for slicing."""
    feature_groups: dict[str, list[str]] = {}
    """Feature columns that are one feature together (a categorical's one-hot columns), by
    the feature's name (:mod:`netloupe.storage.features`)."""
    input_digest: str | None = None
    """``<hasher>:<hex>``: the sum of every instance's hash of its id and model input
    (:func:`netloupe.storage.schema.input_digest`), the same for two runs over the same data
    whatever their sharding (``netloupe sql RUN_A RUN_B`` refuses runs whose digests differ);
    None for a run made before it existed, or resumed (then compared by ids only)."""


class Counts(Record):
    """How much the run holds."""

    instances: int
    """Instances explained."""
    parts: int = 0
    """Batches written."""
    bytes: int = 0
    """Bytes of every part file the workers wrote."""
    attribution_rows_per_method: int = 0
    """Rows of each attribution table (instances x targets per instance)."""


class Tables(Record):
    """Each table's directory, relative to the run."""

    instances: str = "instances"
    """The instances table's directory."""
    activations: dict[str, str] = {}
    """Layer → directory."""
    attributions: dict[str, str] = {}
    """Method table → directory."""
    projections: dict[str, str] = {}
    """``<kind>/<name>`` → directory."""
    fidelity: dict[str, str] = {}
    """Method table → directory of its sampled fidelity checks."""
    tokens: str | None = None
    """A text run's tokens table's directory."""
    influence: str | None = None
    """The ``influence`` table's directory, when the run computed it."""


class FidelityInfo(Record):
    """The fidelity settings the run used, and how many instances each method's sample got."""

    settings: FidelitySpec = FidelitySpec()
    """The spec's ``fidelity`` section."""
    sampled_rows: dict[str, int] = {}
    """Method table → instances that got the sampled checks."""

    @property
    def curve_steps(self) -> int:
        return self.settings.curve_steps


class InfluenceInfo(Record):
    """How the ``influence`` table was computed (TracIn over the last linear layer)."""

    training_path: str
    """The training set's Parquet file or directory."""
    training_id_column: str
    """Its id column, the table's ``train_id``."""
    training_input_columns: list[str]
    """Its model input columns (an input column, or the feature columns)."""
    training_label_column: str
    """Its label column."""
    where: str | None = None
    """The predicate that chose the training rows."""
    training_rows: int
    """Training examples scored."""
    layer: str
    """The last linear layer whose weights' gradients were compared."""
    k: int
    """Proponents and opponents kept per instance."""
    checkpoints: list[str]
    """The weights of each checkpoint summed over (a run: its own model's)."""
    learning_rates: list[float]
    """Each checkpoint's learning rate."""
    target: str
    """``predicted`` or ``label``: whose loss an instance's gradient is of."""
    seconds: float
    """Seconds the influence stage took."""


class ProjectionTable(Record):
    """One fitted projection (:meth:`netloupe.workers.projection.Projection.describe`)."""

    kind: str
    """``activations`` or ``attributions``."""
    name: str
    """The layer or method table projected."""
    algorithms: list[str]
    """The projections fitted (``pca``, ``umap``)."""
    dimensions: int
    """Length of the vectors projected."""
    sample_rows: int
    """Instances the projection was fitted on."""
    explained_variance_ratio: list[float]
    """PCA's share of variance of each of the two axes."""
    pca_mean: list[float] = []
    """PCA's centre (with the components, the whole linear map)."""
    pca_components: list[list[float]] = []
    """PCA's two axes."""
    umap_neighbors: int | None = None
    """UMAP's ``n_neighbors``, when UMAP was fitted."""
    fit_seconds: dict[str, float] = {}
    """Seconds each algorithm took to fit."""


class Projections(Record):
    """The 2-D maps of the run."""

    sample_rows: int = 0
    """Instances the projections were fitted on."""
    seed: int | None = None
    """Seed of the sample and of UMAP."""
    tables: list[ProjectionTable] = []
    """Each projected table's fitted parameters."""
    timings: dict[str, float] = {}
    """Seconds fitting and applying them."""


class WorkerInfo(Record):
    """One worker as its batches reported it."""

    node_id: str
    """The Ray node it ran on."""
    device: str
    """``cpu`` or its GPU (``cuda:0``)."""
    gpu_ids: str
    """Ray's GPU ids for it, comma-separated."""
    chunk_rows: int
    """Rows per forward/backward pass it chose."""


class RunManifest(Record):
    """A committed run's self-description (``manifest.json``)."""

    netloupe_manifest: Literal[3] = MANIFEST_FORMAT
    """The manifest's format (:data:`MANIFEST_FORMAT`)."""
    schema_version: int = SCHEMA_VERSION
    """The tables' schema version (:data:`netloupe.storage.schema.SCHEMA_VERSION`)."""
    run_name: str
    """The run's directory name."""
    created_unix: float
    """When the run was committed (seconds since the epoch)."""
    handmade: bool = False
    """Made from arrays (tests, benchmarks) by :mod:`netloupe.storage.handmade`, not by a job."""
    spec: dict[str, Any] | None = None
    """The job spec, as data; None for a handmade run."""
    preprocess: PreprocessSpec = PreprocessSpec()
    """The preprocessing applied (the spec's, or a built-in dataset's own)."""
    dataset: DatasetInfo
    """Where the instances came from."""
    counts: Counts
    """How much the run holds."""
    class_names: list[str]
    """The model's output classes, in output order."""
    model: ModelFacts
    """What validation learned about the model: the tables' shapes."""
    model_identity: ModelIdentity
    """Which model it was, and what its output means."""
    model_graph: dict[str, Any] | None = None
    """The model's graph for the dashboard (:func:`netloupe.pipeline.model_graph.model_graph`)."""
    tables: Tables
    """Each table's directory."""
    fidelity: FidelityInfo = FidelityInfo()
    """The fidelity checks' settings and samples."""
    projections: Projections = Projections()
    """The 2-D maps."""
    influence: InfluenceInfo | None = None
    """How the ``influence`` table was computed, when it was."""
    workers: list[WorkerInfo] = []
    """The workers that computed the batches."""
    timings: dict[str, Any] = {}
    """Seconds per stage; ``catalog`` holds the catalog build's own timings."""
    versions: dict[str, str] = {}
    """Python's and the main packages' versions."""
    argv: list[str] = []
    """The command line that made the run."""

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
