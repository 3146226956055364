"""The job spec: what to explain, how, and where the results go.

A spec is YAML on disk and a tree of frozen pydantic models in memory. Unknown keys are
rejected with the closest valid name; every field carries its documentation as the
docstring below it (shown by ``netloupe spec-help``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from netloupe.contract.errors import SpecError, did_you_mean
from netloupe.contract.names import PROJECTION_ALGORITHMS, check_run_name, table_dir_name

DRIVER_SQL_MEMORY_MIB = 512
"""DuckDB's memory on the driver when the spec (or a run without one) does not say."""



class StrictModel(BaseModel):
    """A frozen model that names the closest valid key when given an unknown one."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            valid = set(cls.model_fields)
            for key in data:
                if key not in valid:
                    raise ValueError(f"unknown key {key!r}; {did_you_mean(str(key), valid)}")
        return data


class ModelSpec(StrictModel):
    """Which network to explain."""

    factory: str | None = None
    """Python entry point ``package.module:callable`` that returns an ``nn.Module``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the factory."""
    weights: str | None = None
    """Optional state-dict file loaded into the factory's module: ``.safetensors``, or a
    ``torch.save`` file read with ``weights_only=True`` (no code is executed). Parameters
    and buffers it does not set keep the factory's values and are named at validation;
    every worker must still build the same model (its fingerprint is checked)."""
    allow_unsafe_pickle: bool = False
    """Read ``weights`` with full pickle (``torch.load(weights_only=False)``), for checkpoints
    that pickle classes (a whole module, an optimizer). Unpickling can run any code the file
    holds: set this only for files you trust."""
    torchscript: str | None = None
    """A TorchScript file (``torch.jit.save``), instead of ``factory``."""
    huggingface: str | None = None
    """A local Hugging Face checkpoint directory (``config.json`` and weights as
    ``save_pretrained`` writes them) of a model for image or sequence classification (a text
    classifier reads ``dataset.text_column``, its tokenizer saved beside it), instead
    of ``factory``: loaded with ``transformers``' Auto classes from that directory only (nothing
    is downloaded; a hub name is refused). Layer names are the checkpoint's own
    (``vit.layers.0``)."""
    trust_remote_code: bool = False
    """Let a ``huggingface`` checkpoint that ships its own modelling code run it (``auto_map``
    in its config): the code runs in the driver and every worker. Set it only for checkpoints
    you trust."""
    checkpoints: list[str] | str | None = None
    """One model's checkpoints in training order, each a ``weights`` file for the factory: a
    list, or a glob (``runs/ckpt/epoch-*.safetensors``, in natural order: epoch-2 before
    epoch-10). The job makes a run per checkpoint, a run group under ``output.run_name``
    (``<root>/<run_name>/<checkpoint>/``), which ``netloupe sql`` opens as runs side by side."""
    class_names: list[str] | None = None
    """Names of the output classes, in output order; default ``"0"``, ``"1"``, ..."""
    output: Literal["logits", "probabilities", "log_probabilities"] = "logits"
    """What the model's forward returns per class: ``logits`` (softmaxed into the stored
    probabilities), ``probabilities`` (a model ending in a softmax: stored as they are) or
    ``log_probabilities`` (ending in a log-softmax: exponentiated). Checked on the validation
    rows. Attributions explain the model's own output, whichever it is, as Captum does."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        sources = {"factory": self.factory, "torchscript": self.torchscript, "huggingface": self.huggingface}
        if sum(value is not None for value in sources.values()) != 1:
            given = ", ".join(f"{key}={value!r}" for key, value in sources.items() if value is not None)
            raise ValueError(
                "give exactly one of 'factory' (an entry point such as 'netloupe.pipeline.zoo:mnist_cnn'), "
                "'torchscript' (a .pt file) or 'huggingface' (a local checkpoint directory); "
                f"got {given or 'none'}"
            )
        if self.trust_remote_code and self.huggingface is None:
            raise ValueError("trust_remote_code applies to a 'huggingface' checkpoint, and none is given")
        if self.huggingface is not None and (self.weights is not None or self.kwargs):
            raise ValueError("'weights' and 'kwargs' apply to a factory model; a Hugging Face checkpoint "
                             "carries its own weights and config")
        if self.allow_unsafe_pickle and self.weights is None:
            raise ValueError("allow_unsafe_pickle applies to a 'weights' file, and none is given")
        if self.torchscript is not None and self.weights is not None:
            raise ValueError("'weights' applies to a factory model; a TorchScript file carries its own")
        if self.checkpoints is not None and (self.factory is None or self.weights is not None):
            raise ValueError("checkpoints are weights files of a factory model, one per run: give 'factory' "
                             "and no 'weights'")
        if self.checkpoints == []:
            raise ValueError("checkpoints is empty: give weights files (a list or a glob)")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(
                f"factory must look like 'package.module:callable', got {self.factory!r}"
            )
        return self


class DatasetSpec(StrictModel):
    """Which instances to explain."""

    source: str
    """A built-in set (``mnist-5k``, ``digits``, ``breast-cancer``, ``rotten-tomatoes``) or a Parquet file or
    directory."""
    input_column: str | None = None
    """Column holding each instance's input as a list of numbers (images, tensors)."""
    feature_columns: list[str] | None = None
    """Numeric columns that together form the input (tabular models), in model order."""
    feature_groups: dict[str, list[str]] | None = None
    """Feature columns that are one feature together, by the feature's name: a categorical's
    one-hot columns (``{"sex": ["sex=Female", "sex=Male"]}``; columns named
    ``<feature>=<category>`` show as the category). Perturbation methods perturb a group
    as one, and every method's per-feature attribution is the group's. Columns in no group
    are features of their own. A built-in set gives its own."""
    text_column: str | None = None
    """Column holding each instance's text (strings), tokenized in the workers with the
    model's tokenizer (a ``huggingface`` text classifier; see ``text``)."""
    id_column: str = "instance_id"
    """Column with a unique integer or string id per instance."""
    label_column: str | None = "label"
    """Column with the true class index; null for unlabeled data."""
    metadata_columns: list[str] = Field(default_factory=list)
    """Columns copied into the instances table for slicing (subgroups, provenance)."""
    limit: int | None = Field(default=None, gt=0)
    """Explain only the first N instances (for trying a spec out)."""
    rows: int | None = Field(default=None, gt=0)
    """Size of a generated built-in (``mnist-variants``: MNIST digits with random affine
    jitter, stroke width and noise); generated once per size and seed and cached. Default
    50,000."""
    generator_seed: int = 0
    """Seed of a generated built-in: the same seed and ``rows`` give the same instances."""

    @model_validator(mode="after")
    def _one_input(self) -> "DatasetSpec":
        # Whether a source needs either at all (a built-in has its own) is the dataset
        # registry's to say, at validation.
        given = {key: value for key, value in (("input_column", self.input_column),
                                               ("feature_columns", self.feature_columns),
                                               ("text_column", self.text_column)) if value is not None}
        if len(given) > 1:
            raise ValueError(
                "give exactly one of 'input_column' (a list/tensor column), 'feature_columns' "
                f"(numeric columns) or 'text_column' (strings); got {given}"
            )
        return self


class PreprocessSpec(StrictModel):
    """How a stored input becomes the model's input tensor: ``(x * scale + offset - mean) / std``."""

    shape: list[int] | None = None
    """Shape of one instance as the model takes it, e.g. ``[1, 28, 28]``; default: as stored."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating dtype of the model input."""
    scale: float = 1.0
    """Multiplier applied first (``1/255`` for 8-bit images)."""
    offset: float = 0.0
    """Added after scaling."""
    mean: list[float] | None = None
    """Per-channel (or per-feature) mean subtracted after scaling."""
    std: list[float] | None = None
    """Per-channel (or per-feature) standard deviation divided by last."""

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value):
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"every std must be > 0, got {value}")
        return value


AUTO_POOLING = "auto"
"""A checkpoint layer's default pooling, by its output's rank (``pool_activation``); not a spec value."""


class LayerSpec(StrictModel):
    """A layer whose activations are recorded."""

    name: str
    """Module name as in ``model.named_modules()`` (e.g. ``conv2`` or ``features.3``)."""
    pooling: Literal["mean", "max", "none", "token_mean", "first_token"] | None = None
    """For outputs with spatial dimensions ``(n, channels, ...)``: average (``mean``) or max
    over them, one value per channel, or ``none`` to keep every unit. For a transformer's
    token vectors ``(n, tokens, hidden)``: their mean (``token_mean``) or the first token's
    (``first_token``: [CLS] where the model has one). Default: ``mean``; for a
    ``huggingface`` model's layers, ``token_mean`` for token vectors and ``mean`` for others
    (a pooler's or a head's ``(n, features)`` is kept as it is)."""


class TextSpec(StrictModel):
    """How a text column becomes tokens, and what a token's attribution is measured against."""

    max_length: int | None = Field(default=None, ge=2)
    """Most tokens per text, special tokens included; a longer text is cut (its tokens table
    row says ``truncated``). At most, and by default, the model's ``max_position_embeddings``
    (512 where its config does not say). Padding is per batch, so only long texts cost more."""
    tokenizer: str | None = None
    """A local directory with the tokenizer (``tokenizer.json``, as ``save_pretrained``
    writes it); default: the model's checkpoint directory."""
    baseline_token: Literal["pad", "mask", "unk"] = "pad"
    """The token that replaces each of a text's words' tokens ([UNK] too; special tokens such
    as [CLS] and [SEP] are kept) in the baseline of integrated gradients and in occlusion. A
    classifier that reads the last token not its pad token (GPT-2, Llama) needs one that is not
    the pad token: ``unk`` or ``mask``."""
    hidden_reduction: Literal["sum", "l2"] = "sum"
    """How a map over the embeddings ``(tokens, hidden)`` becomes one value per token:
    ``sum`` (signed; what completeness adds up) or ``l2`` (the norm, unsigned)."""


class NoiseTunnelSpec(StrictModel):
    """Captum's NoiseTunnel around a method (SmoothGrad and its variants)."""

    nt_type: Literal["smoothgrad", "smoothgrad_sq", "vargrad"] = "smoothgrad"
    """How the noisy attributions are combined."""
    nt_samples: int = Field(default=8, gt=0)
    """Noisy copies per instance."""
    stdevs: float = Field(default=0.1, ge=0)
    """Standard deviation of the Gaussian noise, in model-input units."""


DATA_BASELINES = ("background", "mean")
"""The ``baseline`` values drawn from the run's background rows (not a constant)."""


class FeatureMaskSpec(StrictModel):
    """How the perturbation methods (kernel_shap, lime, feature_ablation,
    shapley_value_sampling) group an image's pixels into features. (A tabular run's features
    are its columns, grouped by ``dataset.feature_groups``.)"""

    kind: Literal["grid", "superpixels"] = "grid"
    """``grid``: square cells, every image alike; ``superpixels``: SLIC's segments of each
    image (scikit-image), computed in the workers and stored with the run (``feature_mask``)."""
    cell: list[int] | None = None
    """grid: a cell's height and width in pixels; default about 1/7 of each side."""
    segments: int = Field(default=50, gt=1)
    """superpixels: SLIC's ``n_segments`` (about how many per image)."""
    compactness: float = Field(default=0.1, gt=0)
    """superpixels: SLIC's ``compactness`` (space against colour: ~0.1 for an image scaled
    to 0-1, ~10 for 0-255)."""


class LrpRuleSpec(StrictModel):
    """One propagation rule of Captum's LRP (``captum.attr._utils.lrp_rules``)."""

    rule: Literal["epsilon", "gamma", "alpha1_beta0", "identity"]
    """``epsilon`` (LRP-ε: Captum's default for linear, convolution and pooling layers),
    ``gamma`` (LRP-γ: favours positive contributions, for lower convolutions),
    ``alpha1_beta0`` (LRP-α1β0: positive contributions only), ``identity`` (passes relevance
    through unchanged)."""
    epsilon: float = Field(default=1e-9, gt=0)
    """epsilon: the stabiliser added to the denominator (larger: sparser, less noisy maps)."""
    gamma: float = Field(default=0.25, ge=0)
    """gamma: how much positive weights are favoured."""
    set_bias_to_zero: bool = False
    """gamma, alpha1_beta0: ignore the layer's bias in the propagation."""

    @model_validator(mode="after")
    def _settings_of_the_rule(self) -> "LrpRuleSpec":
        takes = {"epsilon": {"epsilon"}, "gamma": {"gamma", "set_bias_to_zero"},
                 "alpha1_beta0": {"set_bias_to_zero"}, "identity": set()}[self.rule]
        # (by value, not by presence: a spec written back out names every setting at its default)
        extra = sorted(name for name, field in type(self).model_fields.items()
                       if name not in takes | {"rule"} and getattr(self, name) != field.default)
        if extra:
            raise ValueError(f"the {self.rule} rule takes {sorted(takes) or 'no setting'}, not {extra}")
        return self


class MethodSpec(StrictModel):
    """One attribution method to run on every instance."""

    method: str
    """Registry name: integrated_gradients, saliency, input_x_gradient, deeplift,
    gradient_shap, grad_cam, occlusion, kernel_shap, lime, feature_ablation,
    shapley_value_sampling, lrp, guided_backprop, guided_grad_cam, deeplift_shap,
    attention_rollout (a Hugging Face vision transformer's) (``netloupe methods`` lists them)."""
    name: str | None = None
    """Name of the stored table; defaults to ``method`` (``<method>_<nt_type>`` in a noise tunnel).
    Set it to run one method twice with different parameters."""
    layer: str | None = None
    """The layer for layer methods (grad_cam)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the Captum ``attribute`` call (``n_steps``, ``sliding_window_shapes``...)."""
    baseline: float | Literal[DATA_BASELINES] = 0.0
    """The reference input of methods that take one (IG, DeepLift, GradientSHAP, Occlusion,
    the perturbation methods): a constant value; ``background``, the run's background rows
    (see ``background``) as a distribution, for the methods that average over one (Kernel
    SHAP, DeepLiftSHAP, GradientSHAP); or ``mean``, the background rows' mean."""
    noise_tunnel: NoiseTunnelSpec | None = None
    """Wrap the method in a noise tunnel."""
    feature_mask: FeatureMaskSpec | None = None
    """An image's features for the perturbation methods: grid cells (the default) or superpixels."""
    rules: dict[str, LrpRuleSpec] = Field(default_factory=dict)
    """lrp: the propagation rule per module, keyed by module path (``features.0``) or by module
    class (``Conv2d``), a path winning over its class; modules not named keep their own
    ``rule`` attribute, else Captum's default for their class (ε)."""

    @field_validator("name")
    @classmethod
    def _table_name(cls, value):
        return value if value is None else table_dir_name(value)

    @property
    def table_name(self) -> str:
        if self.name is not None:
            return self.name
        if self.noise_tunnel is not None:
            return f"{self.method}_{self.noise_tunnel.nt_type}"
        return self.method


class BackgroundSpec(StrictModel):
    """The background set: instances drawn from the dataset for ``baseline: background`` or
    ``mean``, stored with the run (``background.parquet``)."""

    size: int = Field(default=50, gt=0)
    """Rows drawn. Kernel SHAP evaluates the model on every one per coalition: its cost
    grows with it (SHAP's advice is 50 to 100, or a k-means summary)."""
    seed: int = 0
    """Which rows: the ``size`` ids of lowest hash under this seed, the same whatever the
    files, their order or the sharding."""


class TargetSpec(StrictModel):
    """Which output class each attribution explains."""

    kind: Literal["predicted", "label", "top_k"] = "predicted"
    """The predicted class, the true label, or the k most probable classes."""
    k: int = Field(default=1, gt=0)
    """How many classes for ``top_k``."""

    @property
    def per_instance(self) -> int:
        """Attribution rows per instance: ``k`` for ``top_k``, else one."""
        return self.k if self.kind == "top_k" else 1


class StorageSpec(StrictModel):
    """How much of each attribution is kept."""

    attributions: Literal["full", "heatmap", "summary"] = "full"
    """``full``: the whole map; ``heatmap``: channels summed and pooled to ``heatmap_size``;
    ``summary``: only the per-instance statistics."""
    heatmap_size: list[int] = Field(default_factory=lambda: [14, 14])
    """Height and width of a stored heatmap."""

    @field_validator("heatmap_size")
    @classmethod
    def _two_sides(cls, value):
        if len(value) != 2 or any(v < 1 for v in value):
            raise ValueError(f"heatmap_size must be [height, width], both >= 1; got {value}")
        return value


class ExecutionSpec(StrictModel):
    """Resources and batching."""

    batch_size: int = Field(default=1024, gt=0)
    """Instances per batch handed to a worker."""
    num_workers: int = Field(default=1, gt=0)
    """Worker actors (each holds one model); with ``max_workers``, the fewest."""
    max_workers: int | None = Field(default=None, gt=0)
    """When set, the pool grows from ``num_workers`` up to this many workers while there
    is work and the cluster (or its autoscaler) finds room; default: exactly ``num_workers``."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """Logical CPUs Ray reserves for each worker."""
    threads_per_worker: int | None = Field(default=None, gt=0)
    """PyTorch threads in each worker; default: the node's cores divided among its workers."""
    gpus_per_worker: float = Field(default=0.0, ge=0)
    """GPUs Ray assigns to each worker; the worker computes on its GPU when it gets one."""
    ray_address: str | None = None
    """Address of an existing Ray cluster; default: start a local one on 127.0.0.1."""
    seed: int = 0
    """Seed for stochastic methods (noise tunnel, GradientSHAP); with the same seed and
    ``chunk_rows`` their results reproduce exactly."""
    chunk_rows: int | None = Field(default=None, gt=0)
    """Rows per forward/backward pass inside a method (batches are cut to fit); default:
    each worker measures the fastest on its first batch."""
    driver_sql_memory_mib: int = Field(default=DRIVER_SQL_MEMORY_MIB, ge=32)
    """Memory limit of the DuckDB work on the driver (id check, exactly-once checks,
    catalog build); beyond it DuckDB spills to disk, so the driver's memory stays bounded
    whatever the number of instances."""

    @model_validator(mode="after")
    def _pool_bounds(self) -> "ExecutionSpec":
        if self.max_workers is not None and self.max_workers < self.num_workers:
            raise ValueError(f"max_workers ({self.max_workers}) is below num_workers ({self.num_workers}): "
                             "num_workers is the pool's minimum, max_workers its maximum")
        return self


class FidelitySpec(StrictModel):
    """Checks of how faithful each method's explanations are, computed by the workers.

    Per instance (when ``curve_steps`` > 0): deletion and insertion curves (Petsiuk et al.
    2018) with their areas. Per sampled instance (when ``sample_size`` > 0): Captum's
    infidelity and sensitivity-max, and the model-randomization check (Adebayo et al.
    2018): the rank correlation between the method's map for the trained model and for a
    copy with re-initialised weights. Integrated Gradients' convergence delta is stored
    for every instance always.
    """

    curve_steps: int = Field(default=0, ge=0, le=100)
    """Points (beyond the first) of each deletion/insertion curve: the features are removed
    (or inserted) most-attributed first, ``1/curve_steps`` of them per point; 0 turns the
    curves off. Costs ``2 * (curve_steps - 1)`` forward passes per batch and method, plus
    one per batch (the all-baseline input; the curves' other end is the batch's own forward)."""
    curve_baseline: float = 0.0
    """The value a deleted feature takes, and every feature starts from for insertion."""
    sample_size: int = Field(default=0, ge=0)
    """About how many instances get the sampled checks (chosen by a seeded hash of their
    ids, so the same ones in every run and whatever the sharding); 0 turns them off."""
    perturbations: int = Field(default=10, gt=0)
    """Perturbed copies per sampled instance, for infidelity and for sensitivity-max."""
    infidelity_std: float = Field(default=0.1, gt=0)
    """Standard deviation of infidelity's Gaussian perturbations, in model-input units."""
    sensitivity_radius: float = Field(default=0.02, gt=0)
    """Radius of sensitivity-max's uniform perturbations (L-infinity ball)."""
    seed: int = 0
    """Seed of the sample, the perturbations and the randomized model's weights."""


class ProjectionSpec(StrictModel):
    """2-D maps of the instances (the analyst's first view): each projection is fitted on
    a seeded sample on the driver, then applied to every instance inside the Ray workers."""

    layers: list[str] | None = None
    """Recorded layers to project (names from ``layers``); default every recorded layer,
    ``[]`` for none."""
    attributions: list[str] = Field(default_factory=list)
    """Attribution tables to project as well (table names, maps stored ``full`` or
    ``heatmap``); the first target's map of each instance is used."""
    umap: bool = False
    """Fit UMAP (umap-learn) too; PCA is always fitted. UMAP costs about a minute more on
    the driver for 20,000 sampled rows, plus numba's start-up in every worker."""
    sample_size: int = Field(default=20000, ge=2)
    """Instances the projections are fitted on, drawn uniformly by a seeded hash of their
    ids (so the sample does not depend on how the data was sharded)."""
    seed: int = 0
    """Seed of the sample and of UMAP: the same seed gives the same coordinates."""
    umap_neighbors: int = Field(default=15, ge=2)
    """UMAP's ``n_neighbors``, also the sample neighbours each instance is placed among."""
    umap_min_dist: float = Field(default=0.1, ge=0)
    """UMAP's ``min_dist``."""

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The projections fitted, in storage order."""
        return PROJECTION_ALGORITHMS if self.umap else PROJECTION_ALGORITHMS[:1]


class InfluenceSpec(StrictModel):
    """TracIn (Pruthi et al. 2020) over the model's last linear layer, as Captum's
    ``TracInCPFast``: for each explained instance, the training examples whose loss gradients
    most agree (proponents) and most disagree (opponents) with its own, summed over the
    checkpoints (a run group's members; a single run is one checkpoint)."""

    training: DatasetSpec | None = None
    """The training set, its columns named as in ``dataset`` (it is preprocessed the same
    way; labels and integer ids are required). None: the explained dataset itself."""
    where: str | None = None
    """A DuckDB predicate choosing the training rows, e.g. ``split = 'train'``."""
    layer: str
    """The module path of the last linear layer, whose output is the model's logits."""
    k: int = Field(default=10, gt=0, le=1000)
    """Proponents and opponents kept per instance (k of each)."""
    learning_rates: list[float] | float = 1.0
    """Each checkpoint's learning rate (TracIn's weights), in the checkpoints' order; one
    number: the same for every checkpoint."""
    target: Literal["predicted", "label"] = "predicted"
    """Whose loss an instance's gradient is of: the class the model predicts (which training
    examples made the model call it that), or its label."""
    batch_size: int = Field(default=2048, gt=0)
    """Training rows whose factors a task computes at a time (it scores them against the instances
    in blocks of at most 64 MiB)."""

    def rate_of(self, checkpoints: int) -> list[float]:
        """The learning rate of each of ``checkpoints`` checkpoints."""
        if isinstance(self.learning_rates, (int, float)):
            return [float(self.learning_rates)] * checkpoints
        if len(self.learning_rates) != checkpoints:
            raise SpecError(f"influence.learning_rates has {len(self.learning_rates)} rates for {checkpoints} "
                            "checkpoint(s); give one per checkpoint, or one number for all")
        return [float(rate) for rate in self.learning_rates]


class OutputSpec(StrictModel):
    """Where the run is written."""

    root: str = "runs"
    """Directory that holds runs (relative paths are taken from the working directory), or a
    pyarrow filesystem URI such as ``s3://bucket/runs`` or ``gs://bucket/runs`` (settings in its
    query, e.g. ``?endpoint_override=host:port&scheme=http``; credentials from the environment)."""
    run_name: str
    """The run's directory name under ``root``."""

    @field_validator("run_name")
    @classmethod
    def _usable_name(cls, value):
        return check_run_name(value)


class JobSpec(StrictModel):
    """A whole explanation job."""

    model: ModelSpec
    """The network."""
    dataset: DatasetSpec
    """The instances."""
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    """Stored input → model input."""
    layers: list[LayerSpec] = Field(default_factory=list)
    """Layers whose activations are recorded."""
    attributions: list[MethodSpec] = Field(default_factory=list)
    """Attribution methods to run."""
    target: TargetSpec = Field(default_factory=TargetSpec)
    """Which class each attribution explains."""
    background: BackgroundSpec = Field(default_factory=BackgroundSpec)
    """The background set of the methods whose baseline is ``background`` or ``mean``."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """How attributions are kept."""
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    """Resources and batching."""
    projection: ProjectionSpec = Field(default_factory=ProjectionSpec)
    """2-D projections of layer activations (and optionally attributions) per instance."""
    fidelity: FidelitySpec = Field(default_factory=FidelitySpec)
    """Faithfulness checks of the explanations (deletion/insertion, infidelity, sensitivity,
    model randomization)."""
    text: TextSpec = Field(default_factory=TextSpec)
    """Tokenization and token baselines, for a ``dataset.text_column``."""
    influence: InfluenceSpec | None = None
    """The most influential training examples of each instance (TracIn); None: not computed."""
    output: OutputSpec
    """Where the run goes."""

    @model_validator(mode="after")
    def _unique_names(self) -> "JobSpec":
        for kind, names in (
            ("layer", [layer.name for layer in self.layers]),
            ("attribution table", [m.table_name for m in self.attributions]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(
                    f"{kind} names must be unique, {dupes} repeat; give each method entry "
                    "its own 'name' to run it twice"
                )
        layer_names = [layer.name for layer in self.layers]
        for name in self.projection.layers or []:
            if name not in layer_names:
                raise ValueError(
                    f"projection.layers names {name!r}, which is not a recorded layer "
                    f"({layer_names or 'none recorded'}); {did_you_mean(name, layer_names)}"
                )
        tables = [m.table_name for m in self.attributions]
        for name in self.projection.attributions:
            if name not in tables:
                raise ValueError(
                    f"projection.attributions names {name!r}, which is not an attribution table "
                    f"({tables or 'none'}); {did_you_mean(name, tables)}"
                )
        if self.dataset.text_column is not None:
            self.check_text_input()
        if self.projection.attributions and self.storage.attributions == "summary":
            raise ValueError(
                "projection.attributions needs stored maps, but storage.attributions is 'summary'; "
                "set it to 'full' or 'heatmap', or drop projection.attributions"
            )
        return self

    def check_text_input(self) -> None:
        """What a text run does not do (yet), said at once rather than deep in a worker: at
        validation when the spec names a text column, when the dataset is resolved for a
        built-in text set."""
        if self.model.huggingface is None and (self.model.factory is None or self.text.tokenizer is None):
            raise ValueError("dataset.text_column explains a Hugging Face text classifier (model.huggingface: DIR, a "
                             "...ForSequenceClassification checkpoint and its tokenizer) or a factory model that takes "
                             "token ids (model.factory, with text.tokenizer: the directory of its tokenizer)")
        unsupported = [(key, why) for key, on, why in (
            ("preprocess", self.preprocess != PreprocessSpec(), "texts are tokenized, not scaled"),
            ("fidelity", self.fidelity.curve_steps > 0 or self.fidelity.sample_size > 0,
             "the fidelity checks perturb pixels and features, not tokens, so far"),
            ("projection.attributions", bool(self.projection.attributions),
             "texts' token maps have no common length to project"),
            ("storage.attributions", self.storage.attributions == "heatmap", "a heatmap needs an image"),
            ("influence", self.influence is not None, "training examples' influence is computed for images and "
             "tables so far"),
        ) if on]
        for key, why in unsupported:
            raise ValueError(f"{key} does not apply to a text_column run ({why}); remove it")
        for layer in self.layers:
            if layer.pooling == "none":
                raise ValueError(f"layer {layer.name!r}: pooling 'none' keeps every position, and texts have "
                                 "different lengths; use token_mean or first_token")

    def pooling_of(self, layer: LayerSpec) -> str:
        """How ``layer``'s output is pooled (the default resolved for this spec's model)."""
        if layer.pooling is not None:
            return layer.pooling
        return AUTO_POOLING if self.model.huggingface is not None or self.dataset.text_column else "mean"

    @property
    def projected_layers(self) -> list[str]:
        """The layers whose activations get 2-D projections."""
        if self.projection.layers is None:
            return [layer.name for layer in self.layers]
        return list(self.projection.layers)

    @property
    def projection_sources(self) -> list[tuple[str, str]]:
        """``(kind, name)`` of every table the spec projects: ``activations`` of a layer,
        ``attributions`` of a method."""
        return ([("activations", layer) for layer in self.projected_layers]
                + [("attributions", method) for method in self.projection.attributions])


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"invalid job spec {origin}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_spec(data: Any, origin: str = "") -> JobSpec:
    """Validate a mapping (parsed YAML) into a :class:`JobSpec`, or raise :class:`SpecError`."""
    if not isinstance(data, dict):
        raise SpecError(f"a job spec {origin} must be a mapping of keys, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(_format_validation_error(error, origin)) from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["execution.num_workers=2", ...]`` (the CLI's ``--set``) → ``{dotted key: YAML value}``."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--set takes KEY=VALUE (e.g. execution.num_workers=2), got {pair!r}")
        result[key] = yaml.safe_load(value)
    return result


def load_spec(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read a YAML job spec, apply dotted-key ``overrides`` (from the CLI), and validate it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job spec {path} does not exist; pass the path of a YAML file like examples/mnist.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"job spec {path} is not valid YAML: {error}") from None
    if isinstance(data, dict):
        for dotted, value in (overrides or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise SpecError(
                        f"--set {dotted}: {key!r} is not a section of keys; --set reaches "
                        "mapping keys only (edit lists such as layers in the YAML file)"
                    )
            node[leaf] = value
    return parse_spec(data, origin=f"in {path}")


def spec_help(section: str | None = None) -> str:
    """Every key of the job spec (or of one section, e.g. ``execution``) with its type,
    default and documentation: the docstrings in this module, as ``netloupe spec-help`` shows them."""
    model: type[BaseModel] = JobSpec
    prefix = ""
    if section:
        for part in section.split("."):
            field = model.model_fields.get(part)
            nested = _section_model(field.annotation) if field else None
            if nested is None:
                sections = [n for n, f in model.model_fields.items() if _section_model(f.annotation)]
                raise SpecError(f"no spec section {section!r}; {did_you_mean(part, sections)}")
            model, prefix = nested, f"{prefix}{part}."
    return "\n".join(_help_lines(model, prefix))


def _section_model(annotation) -> type[BaseModel] | None:
    """The model a field holds (itself, in a list, or optional), if any."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(repr(value) for value in get_args(annotation))
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _help_lines(model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        nested = _section_model(field.annotation)
        kind = _type_name(field.annotation)
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = "default " + (repr(value) if not isinstance(value, BaseModel) else "(see below)")
        described = " ".join((field.description or "").split())
        lines.append(f"{prefix}{name}  [{kind}; {default}]")
        lines.append(f"    {described}")
        if nested is not None:
            lines += _help_lines(nested, f"{prefix}{name}{'[]' if 'list' in str(field.annotation) else ''}.")
    return lines


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """The spec as plain data, as stored in the manifest and handed to workers."""
    return spec.model_dump(mode="json")
