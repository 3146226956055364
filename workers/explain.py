"""Explaining a batch: the forward pass with layer hooks, then each attribution method.

:class:`BatchExplainer` is the whole computation for one batch and has no Ray in it: the
driver runs it on a few rows to validate a spec, and :class:`ExplainWorker` (the Ray Data
actor) runs it on every batch and writes the results as Parquet parts.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from netloupe.contract.errors import DatasetError, MethodError, ModelError, NetloupeError
from netloupe.contract.spec import JobSpec
from netloupe.storage import schema as S
from netloupe.storage.features import feature_index, feature_values, membership
from netloupe.storage.layout import (
    RunLayout,
    part_key,
    part_name,
    worker_layout,
    write_npy,
    write_part,
)
from netloupe.storage.manifest import BatchReport, ModelFacts
from netloupe.storage.part_statistics import candidate_fraction, derive_parts, projection_candidates
from netloupe.workers import fidelity as fid
from netloupe.workers.capture import LayerCapture
from netloupe.workers.inputs import InputDecoder, ResolvedDataset
from netloupe.workers.methods import (
    BoundMethod,
    bind_method,
    default_chunk_rows,
    reused_nonlinearities,
    tune_chunk_rows,
)
from netloupe.workers.model_identity import ModelFingerprint, check_same_model, model_fingerprint
from netloupe.workers.model_output import check_output_kind, output_probabilities
from netloupe.workers.text import TextEncoder, TokenBatch, length_chunks, load_tokenizer
from netloupe.workers.token_methods import bind_token_method


def batch_seed(seed: int, key: str, table_name: str) -> int:
    """The RNG seed for a stochastic method on one batch: fixed by the spec's seed, the
    batch's ids and the method, so a retried batch reproduces its attributions."""
    digest = hashlib.blake2b(f"{seed}/{key}/{table_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def module_output_bytes(model: nn.Module, x: torch.Tensor | TokenBatch, max_length: int = 0) -> int:
    """Bytes of every leaf module's output for one instance of ``x`` (a text padded to ``max_length``)."""
    if isinstance(x, TokenBatch):
        # A text as long as any may be (padded to max_length): the chunk budget must hold
        # the longest texts, and a short first text would size it 10x too large.
        x = x.take(np.arange(1)).padded_to(max_length)
        arguments, x = (x.input_ids, x.attention_mask), x.input_ids
    else:
        arguments = (x[:1],)
    if isinstance(model, torch.jit.ScriptModule):
        # No hooks on TorchScript: assume activations 64× the input, a conv net's order.
        return 64 * x[:1].numel() * x.element_size()
    total = [0]

    def add(_m, _i, output):
        if isinstance(output, torch.Tensor):
            total[0] += output[:1].numel() * output.element_size()

    handles = [m.register_forward_hook(add) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(*arguments)
    finally:
        for handle in handles:
            handle.remove()
    return max(total[0], x[:1].numel() * x.element_size())


@dataclass
class ExplainedBatch:
    """One batch's rows for every table of the run, each with its schema."""

    instance_ids: list
    num_classes: int
    instances: pa.Table | None = None
    activations: dict[str, pa.Table] = field(default_factory=dict)
    """Per recorded layer."""
    attributions: dict[str, pa.Table] = field(default_factory=dict)
    """Per method (its table name)."""
    fidelity: dict[str, pa.Table] = field(default_factory=dict)
    """Per method with sampled rows in this batch."""
    tokens: pa.Table | None = None
    """A text run's tokens of the batch."""

    @property
    def tables(self) -> dict[Path, pa.Table]:
        """Table directory (relative to the run) → the batch's rows."""
        run = RunLayout(Path("."))
        return {run.instances_dir: self.instances,
                **({run.tokens_dir: self.tokens} if self.tokens is not None else {}),
                **{run.activations_dir(name): table for name, table in self.activations.items()},
                **{run.attributions_dir(name): table for name, table in self.attributions.items()},
                **{run.fidelity_dir(name): table for name, table in self.fidelity.items()}}


class BatchExplainer:
    """Computes predictions, activations and attributions for Arrow batches of a dataset."""

    def __init__(self, spec: JobSpec, dataset: ResolvedDataset, model: nn.Module,
                 device: torch.device, facts: ModelFacts | None = None, tune_chunks: bool = False):
        self.spec = spec
        self.dataset = dataset
        self.model = model
        self.device = device
        self.decoder = InputDecoder(dataset.input_column, dataset.feature_columns, dataset.preprocess)
        _check_input_kind(spec, model, dataset.text_column)
        self.text = text_encoder(spec, model, dataset.text_column) if dataset.text_column else None
        """Tokenizes the text column (a text run), else None."""
        self.capture = LayerCapture(model, [(layer.name, spec.pooling_of(layer)) for layer in spec.layers])
        self.facts = facts
        self.methods: list[BoundMethod] | None = None
        self.raw_attribution_shapes: dict[str, tuple[int, ...]] = {}
        self.tune_chunks = tune_chunks
        """Measure the best chunk size on the first batch (workers) instead of the budget."""
        self.per_instance_bytes: int | None = facts.per_instance_bytes if facts else None
        """Bytes of all module outputs for one instance (measured on the first batch)."""
        self.chunk_rows: int | None = None
        self.node_id = os.environ.get("NETLOUPE_NODE_ID", "driver")
        self.randomized_methods: dict[str, BoundMethod] | None = None
        """The methods bound to a re-initialised copy of the model (the randomization check)."""
        sampled = spec.fidelity.sample_size
        self.sample_rate = min(1.0, sampled / max(1, dataset.num_rows)) if sampled else 0.0
        self.features = dataset.features
        """A tabular run's features (a categorical's one-hot columns are one); else empty."""
        # (a text run has no baseline rows to decode: its methods refuse data baselines themselves)
        self.background: torch.Tensor | None = (
            torch.from_numpy(self.decoder(dataset.background)).to(device)
            if dataset.background is not None and not dataset.text_column else None)
        """The run's background rows as model inputs, for baselines drawn from the data."""

    # -- the model's answers -------------------------------------------------------------

    def model_input(self, table: pa.Table) -> torch.Tensor | TokenBatch:
        """The model's input for a batch of rows, on the device: a tensor, or a text run's tokens."""
        if self.text is not None:
            return self.text(table).to(self.device)
        return torch.from_numpy(self.decoder(table)).to(self.device)

    def forward(self, x: torch.Tensor | TokenBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The model's outputs (``model.output``: logits, probabilities or log-probabilities)
        and pooled activations of the recorded layers, in one forward pass (texts: one per chunk)."""
        texts = isinstance(x, TokenBatch)
        if texts:
            outputs, activations = self._forward_texts(x)
        else:
            self.capture.token_mask = None
            with torch.inference_mode(), self.capture:
                outputs = self.model(x)
                activations = dict(self.capture.activations)
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or outputs.shape[0] != len(x):
            got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ModelError(
                f"the model must return one score per class, shape (batch, classes); for an input of shape "
                f"{_shape(x)} it returned {got}"
            )
        return outputs.float(), activations

    def _forward_texts(self, x: TokenBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward` of a batch of texts in chunks of similar length, each within the
        methods' token budget (a batch of 1,024 texts of 512 tokens through BERT-base at once
        holds ~12 GB of attention weights per layer) and padded to its own longest; outputs and
        activations come back in the batch's order."""
        if self.per_instance_bytes is None:
            self.per_instance_bytes = module_output_bytes(self.model, x, self.text.max_length)
        rows = self.chunk_rows or self.spec.execution.chunk_rows or default_chunk_rows(self.per_instance_bytes)
        order = np.argsort(x.lengths, kind="stable")
        outputs, activations = [], []
        for chunk in length_chunks(x.lengths[order], 1, rows * self.text.max_length):
            part = x.take(order[chunk])
            self.capture.token_mask = part.attention_mask
            with torch.inference_mode(), self.capture:
                output = self.model(part.input_ids, part.attention_mask)
                activations.append(dict(self.capture.activations))
            if not isinstance(output, torch.Tensor) or output.dim() != 2:
                return output, {}  # not logits: forward() says what it got
            outputs.append(output)
        self.capture.token_mask = None
        back = torch.as_tensor(np.argsort(order, kind="stable"), device=x.input_ids.device)
        joined = {name: torch.cat([a[name] for a in activations])[back] for name in activations[0]}
        return torch.cat(outputs)[back], joined

    def targets(self, probabilities: torch.Tensor, labels: np.ndarray | None) -> torch.Tensor:
        """``(n, k)`` class indices to explain, per the spec's target."""
        target = self.spec.target
        num_classes = probabilities.shape[1]
        if target.kind == "predicted":
            return probabilities.argmax(dim=1, keepdim=True)
        if target.kind == "label":
            if labels is None:
                raise DatasetError(
                    "target.kind is 'label' but the dataset has no label_column, or a row of this "
                    "batch has a null label; set dataset.label_column or use target.kind 'predicted'"
                )
            bad = (labels < 0) | (labels >= num_classes)
            if bad.any():
                raise DatasetError(
                    f"labels must be class indices 0..{num_classes - 1} for target.kind 'label'; "
                    f"found {sorted(set(labels[bad].tolist()))[:5]}"
                )
            return torch.as_tensor(labels, device=probabilities.device).reshape(-1, 1)
        if target.k > num_classes:
            raise MethodError(f"target.k is {target.k} but the model has only {num_classes} classes")
        return probabilities.topk(target.k, dim=1).indices

    def bind_methods(self, x: torch.Tensor) -> list[BoundMethod]:
        """The spec's methods bound to the model, their chunk size measured on ``x`` when
        this explainer tunes (workers do; the driver's validation does not)."""
        if self.methods is None:
            if self.per_instance_bytes is None:
                self.per_instance_bytes = module_output_bytes(self.model, x, self.text.max_length if self.text else 0)
            per_instance = self.per_instance_bytes
            pinned = self.spec.execution.chunk_rows
            if pinned is not None:
                self.chunk_rows = pinned
            elif self.tune_chunks and self.text is None and not isinstance(self.model, torch.jit.ScriptModule):
                with torch.enable_grad():
                    self.chunk_rows = tune_chunk_rows(self.model, x, per_instance)
            else:
                self.chunk_rows = default_chunk_rows(per_instance)
            if self.text is not None:
                text = self.spec.text
                self.methods = [bind_token_method(m, self.model, self.text, text.baseline_token, text.hidden_reduction,
                                                  self.chunk_rows, x) for m in self.spec.attributions]
            else:
                self.methods = [self._bind(m, self.model, tuple(x.shape[1:])) for m in self.spec.attributions]
        return self.methods

    def _bind(self, method_spec, model: nn.Module, input_shape: tuple[int, ...]) -> BoundMethod:
        mask = (torch.from_numpy(feature_index(self.features, len(self.dataset.feature_columns)))
                if self.features else None)
        return bind_method(method_spec, model, input_shape, self.chunk_rows, mask, self.background)

    def feature_attribution(self, method: BoundMethod, attributions: torch.Tensor) -> np.ndarray:
        """``(n, features)``: a perturbation method's value per feature (Captum repeats it on
        each of the feature's columns: their mean), a gradient method's sum over the columns."""
        members = torch.from_numpy(membership(self.features, attributions[0].numel())).to(attributions)
        if method.method.perturbs_features:
            members = members / members.sum(dim=0, keepdim=True)
        return (attributions.reshape(attributions.shape[0], -1) @ members).cpu().numpy()

    # -- storing ---------------------------------------------------------------------------

    def stored_map(self, attributions: torch.Tensor) -> torch.Tensor | None:
        """Attributions as kept: flattened whole, pooled heatmap, or nothing (summary)."""
        mode = self.spec.storage.attributions
        if mode == "summary":
            return None
        if mode == "heatmap":
            if attributions.dim() != 4:
                raise MethodError(
                    f"storage.attributions 'heatmap' needs image-shaped maps (channels, height, "
                    f"width); this one is {tuple(attributions.shape[1:])}. Use 'full' or 'summary'"
                )
            summed = attributions.sum(dim=1, keepdim=True)
            attributions = F.adaptive_avg_pool2d(summed, tuple(self.spec.storage.heatmap_size))
        return attributions.reshape(attributions.shape[0], -1)

    @staticmethod
    def summary(attributions: torch.Tensor) -> dict[str, np.ndarray]:
        flat = attributions.reshape(attributions.shape[0], -1).double()
        stats = {
            "attr_sum": flat.sum(dim=1),
            "attr_abs_sum": flat.abs().sum(dim=1),
            "attr_min": flat.min(dim=1).values,
            "attr_max": flat.max(dim=1).values,
            "attr_l2": flat.norm(dim=1),
        }
        return {k: v.float().cpu().numpy() for k, v in stats.items()}

    @staticmethod
    def token_summary(values: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
        """:meth:`summary` over each instance's own tokens (``values`` is 0 at padding)."""
        own = mask.bool()
        values = values.double()
        stats = {
            "attr_sum": values.sum(dim=1),
            "attr_abs_sum": values.abs().sum(dim=1),
            "attr_min": values.masked_fill(~own, float("inf")).min(dim=1).values,
            "attr_max": values.masked_fill(~own, float("-inf")).max(dim=1).values,
            "attr_l2": values.norm(dim=1),
        }
        return {k: v.float().cpu().numpy() for k, v in stats.items()}

    # -- the whole batch -------------------------------------------------------------------

    def explain(self, table: pa.Table, key: str | None = None) -> ExplainedBatch:
        """All of the run's rows for one batch of input rows."""
        ds = self.dataset
        n = table.num_rows
        ids = table[ds.id_column].combine_chunks()
        if ids.null_count:
            raise DatasetError(f"id column {ds.id_column!r} has null values; every instance needs an id")
        key = key or part_key(ids.to_pylist())
        x = self.model_input(table)
        texts = isinstance(x, TokenBatch)
        finite_inputs = (torch.ones(n, dtype=torch.bool) if texts  # token ids are always finite
                         else torch.isfinite(x.reshape(n, -1)).all(dim=1))
        outputs, activations = self.forward(x)
        probabilities = output_probabilities(outputs, self.spec.model.output)
        confidence, prediction = probabilities.max(dim=1)
        labels = None
        if ds.label_column:
            label_col = table[ds.label_column]
            if label_col.null_count == 0:
                labels = label_col.to_numpy(zero_copy_only=False).astype(np.int64)
        num_classes = probabilities.shape[1]
        pred_np = prediction.cpu().numpy().astype(np.int64)
        label_values = table[ds.label_column] if ds.label_column else pa.nulls(n, pa.int64())
        label_values = label_values.cast(pa.int64()) if ds.label_column else label_values
        correct = pc.equal(label_values, pa.array(pred_np)) if ds.label_column else pa.nulls(n, pa.bool_())
        instance_columns = {
            "instance_id": ids.cast(S.ID_TYPES[ds.id_type]),
            "label": label_values,
            "prediction": pa.array(pred_np),
            "confidence": pa.array(confidence.cpu().numpy()),
            "correct": correct,
            "probabilities": S.fixed_vectors(probabilities.cpu().numpy(), num_classes),
            "input_finite": pa.array(finite_inputs.cpu().numpy()),
            "node_id": pa.array([self.node_id] * n, pa.string()),
            "device": pa.array([str(self.device)] * n, pa.string()),
        }
        if self.features:
            values = feature_values(self.features, self.decoder.stored_matrix(table))
            instance_columns["feature_value"] = pa.FixedSizeListArray.from_arrays(
                pa.array(values.reshape(-1), pa.float64()), len(self.features))
        for column in ds.metadata_columns:
            instance_columns[column] = table[column]
        out = ExplainedBatch(instance_ids=ids.to_pylist(), num_classes=num_classes)
        if texts:
            out.tokens = self.text.tokens_table(instance_columns["instance_id"], x, ds.id_type)
        out.instances = S.table_from_columns(
            S.instances_schema(num_classes, ds.id_type, ds.metadata_fields, len(self.features) or None),
            instance_columns,
        )
        for name, values in activations.items():
            width = values.shape[1]
            out.activations[name] = S.table_from_columns(
                S.activations_schema(width, ds.id_type),
                {"instance_id": instance_columns["instance_id"], "activation": S.fixed_vectors(values.cpu().numpy(), width)},
            )
        if self.spec.attributions:
            targets = self.targets(probabilities, labels)
            # Which rows get the sampled fidelity checks: hashed once, used by every method.
            chosen = fid.in_sample(out.instance_ids, self.spec.fidelity.seed, self.sample_rate)
            ends = (fid.curve_ends(self.model, x, self.spec.fidelity.curve_baseline, self.spec.model.output,
                                   probabilities)
                    if self.spec.fidelity.curve_steps else None)
            for method in self.bind_methods(x):
                table, sampled = self._attribute(method, x, targets, instance_columns["instance_id"], key, chosen,
                                                 ends)
                out.attributions[method.table_name] = table
                if sampled is not None:
                    out.fidelity[method.table_name] = sampled
        return out

    def _attribute(self, method: BoundMethod, x, targets, ids: pa.Array, key: str,
                   chosen: np.ndarray, ends: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ) -> tuple[pa.Table, pa.Table | None]:
        """The method's rows for every target, and the fidelity rows of the ``chosen`` (sampled)
        rows, or None when none is; ``ends``: the batch's :func:`netloupe.workers.fidelity.curve_ends`."""
        pieces, sampled = [], None
        steps = self.spec.fidelity.curve_steps
        for rank in range(targets.shape[1]):
            target = targets[:, rank]
            if method.stochastic:
                self._seed(key, method.table_name)
            with torch.enable_grad(), warnings.catch_warnings():
                # Captum warns on every call that it set requires_grad or hooks; expected here.
                warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")
                masks = method.feature_masks(x) if isinstance(method, BoundMethod) else None
                attributions, delta = method(x, target) if masks is None else method(x, target, masks)
            attributions = attributions.detach()
            texts = isinstance(x, TokenBatch)
            # A text's map has as many values as it has tokens: at most max_length.
            self.raw_attribution_shapes[method.table_name] = ((self.text.max_length,) if texts
                                                              else tuple(attributions.shape[1:]))
            stored = None if texts else self.stored_map(attributions)
            columns = {
                "instance_id": ids,
                "target_rank": pa.array(np.full(len(ids), rank, np.int16)),
                "target": pa.array(target.cpu().numpy().astype(np.int64)),
                **(self.token_summary(attributions, x.attention_mask) if texts else self.summary(attributions)),
                "convergence_delta": pa.array(delta.detach().double().cpu().numpy()) if delta is not None else pa.nulls(len(ids), pa.float64()),
                "finite": pa.array(torch.isfinite(attributions.reshape(len(ids), -1)).all(dim=1).cpu().numpy()),
            }
            if steps:
                columns.update(self._curves(x, attributions, target, steps, ends))
            width = None
            if stored is not None:
                width = stored.shape[1]
                columns["attribution"] = S.fixed_vectors(stored.cpu().numpy(), width)
            tokens = texts and self.spec.storage.attributions != "summary"
            if tokens:
                columns["token_attribution"] = x.own(attributions)
            if masks is not None and self.spec.storage.attributions == "summary":
                masks = None  # summary storage keeps no maps, nor the masks to draw them
            if masks is not None:  # each image's superpixels, so that a view can draw them
                columns["feature_mask"] = pa.FixedSizeListArray.from_arrays(
                    pa.array(masks[:, 0].reshape(-1).cpu().numpy().astype(np.int16)), masks[0, 0].numel())
            features = (len(self.features) if self.features and self.spec.storage.attributions != "summary"
                        and not method.method.layer_method and attributions[0].numel() == len(self.dataset.feature_columns)
                        else None)
            if features:
                columns["feature_attribution"] = S.fixed_vectors(self.feature_attribution(method, attributions), features)
            schema = S.attributions_schema(width, self.dataset.id_type, steps + 1 if steps else None, tokens, features,
                                           masks[0, 0].numel() if masks is not None else None)
            pieces.append(S.table_from_columns(schema, columns))
            if rank == 0 and chosen.any():
                sampled = self._sampled_checks(method, x, attributions, target, ids, key, chosen)
        return pa.concat_tables(pieces), sampled

    def _seed(self, key: str, name: str) -> None:
        seed = batch_seed(self.spec.execution.seed, key, name)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # GradientSHAP draws its path points from numpy

    def _curves(self, x, attributions, target, steps: int, ends: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """Deletion and insertion curves and areas (:mod:`netloupe.workers.fidelity`), null for a map
        that cannot be laid over the input."""
        n = x.shape[0]
        scores = fid.feature_scores(attributions, tuple(x.shape[1:]))
        if scores is None:
            empty = pa.nulls(n, S.vector_type(steps + 1))
            return {"deletion_curve": empty, "insertion_curve": empty,
                    "deletion_auc": pa.nulls(n, pa.float32()), "insertion_auc": pa.nulls(n, pa.float32())}
        deletion, insertion = fid.deletion_insertion(self.model, x, scores, target, steps,
                                                     self.spec.fidelity.curve_baseline, self.spec.model.output, ends)
        return {"deletion_curve": S.fixed_vectors(deletion, steps + 1),
                "insertion_curve": S.fixed_vectors(insertion, steps + 1),
                "deletion_auc": pa.array(fid.curve_area(deletion)),
                "insertion_auc": pa.array(fid.curve_area(insertion))}

    def _sampled_checks(self, method: BoundMethod, x, attributions, target, ids: pa.Array, key: str,
                        mask: np.ndarray) -> pa.Table:
        """Infidelity, sensitivity-max and the randomization check for the batch's sampled rows."""
        settings = self.spec.fidelity
        chosen = torch.from_numpy(mask).to(x.device)
        xs, ts, maps = x[chosen], target[chosen], attributions[chosen]
        self._seed(key, f"{method.table_name}/fidelity")
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")
            infidelity = fid.infidelity(self.model, xs, maps, ts, settings.perturbations, settings.infidelity_std)
            sensitivity = fid.sensitivity_max(method, xs, ts, settings.perturbations, settings.sensitivity_radius)
            randomized, _ = self.randomized(method)(xs, ts)
        trained = maps.reshape(len(xs), -1).double().cpu().numpy()
        random_maps = randomized.detach().reshape(len(xs), -1).double().cpu().numpy()
        return S.table_from_columns(S.fidelity_schema(self.dataset.id_type), {
            "instance_id": ids.filter(pa.array(mask)),
            "target": pa.array(ts.cpu().numpy().astype(np.int64)),
            # NaN (not defined: a layer map's infidelity, a constant map's rank correlation) as null.
            "infidelity": pa.array(infidelity, from_pandas=True),
            "sensitivity_max": pa.array(sensitivity, from_pandas=True),
            "randomization_spearman": pa.array(fid.spearman(trained, random_maps), from_pandas=True),
            "randomization_spearman_abs": pa.array(fid.spearman(np.abs(trained), np.abs(random_maps)),
                                                   from_pandas=True),
        })

    def randomized(self, method: BoundMethod) -> BoundMethod:
        """``method`` bound to a copy of the model with re-initialised weights."""
        if self.randomized_methods is None:
            model = fid.randomized_copy(self.model, self.spec.fidelity.seed)
            self.randomized_methods = {m.table_name: self._bind(m, model, method.input_shape)
                                       for m in self.spec.attributions}
        return self.randomized_methods[method.table_name]

    def describe(self, table: pa.Table) -> ModelFacts:
        """Run one small batch and report the shapes every table will have.

        This is the driver's validation: any error a worker would hit on the first batch
        (a missing layer, a shape mismatch, a method that cannot run) is raised here.
        """
        x = self.model_input(table)
        try:
            check_output_kind(self.forward(x)[0], self.spec.model.output)
            deeplifts = [b.table_name for b in self.bind_methods(x)
                         if isinstance(b, BoundMethod) and b.method.needs_unique_nonlinearities]
            reused = reused_nonlinearities(self.model, x) if deeplifts else []
            if reused:
                raise MethodError(
                    f"{', '.join(deeplifts)} cannot explain this model: the nonlinearity module(s) "
                    f"{reused} are called more than once per forward pass (as torchvision's ResNet "
                    "reuses one ReLU), which makes DeepLift's multipliers wrong. Give each use its "
                    "own module, or choose integrated_gradients or gradient_shap instead"
                )
            explained = self.explain(table)
        except NetloupeError:
            raise
        except AssertionError as error:
            # Captum checks its arguments with assert (window larger than the input, unknown
            # integration method...): those are the spec's method parameters.
            raise MethodError(
                f"an attribution method rejected its parameters on a validation batch of shape "
                f"{_shape(x)}: {error or 'Captum assertion failed'}. Check each method's "
                "params against `netloupe methods` and Captum's documentation"
            ) from None
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise ModelError(
                f"the model failed on a validation batch of shape {_shape(x)}: "
                f"{type(error).__name__}: {error}. Check preprocess.shape and that the layers "
                "and methods fit the model"
            ) from None
        mode = self.spec.storage.attributions
        stored_shapes = {
            name: None if mode == "summary" or self.text is not None  # a text's values: token_attribution
            else tuple(self.spec.storage.heatmap_size) if mode == "heatmap" else shape
            for name, shape in self.raw_attribution_shapes.items()
        }
        return ModelFacts(
            num_classes=explained.num_classes,
            input_shape=(self.text.max_length,) if self.text is not None else tuple(x.shape[1:]),
            input_kind="tokens" if self.text is not None else "array",
            special_tokens=self.text.special_tokens() if self.text is not None else [],
            layer_neurons={name: int(v.shape[1]) for name, v in self.capture.activations.items()},
            layer_output_shapes=dict(self.capture.output_shapes),
            attribution_shapes=stored_shapes,
            attribution_raw_shapes=dict(self.raw_attribution_shapes),
            per_instance_bytes=self.per_instance_bytes,
        )


DEFAULT_MAX_LENGTH = 512
"""Tokens per text when neither the spec nor the model's config says (BERT's)."""
OFFSET_POSITION_MODELS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "ibert")
"""Model types whose position ids start after the pad id (514 positions, 512 usable)."""


def _shape(x: torch.Tensor | TokenBatch) -> tuple[int, ...]:
    return tuple((x.input_ids if isinstance(x, TokenBatch) else x).shape)


def text_encoder(spec: JobSpec, model: nn.Module, column: str) -> TextEncoder:
    """The tokenizer of a text run: ``text.tokenizer``, else the checkpoint's own directory."""
    text = spec.text
    tokenizer = load_tokenizer(text.tokenizer or spec.model.huggingface)
    limit = _token_limit(model, tokenizer)
    if limit is not None and text.max_length is not None and text.max_length > limit:
        raise ModelError(f"text.max_length is {text.max_length} but the model reads at most {limit} tokens "
                         f"(its positions and its tokenizer's model_max_length); set text.max_length to at most {limit}")
    embeddings = getattr(getattr(model, "get_input_embeddings", lambda: None)(), "num_embeddings", None)
    if embeddings is not None and len(tokenizer) > embeddings:
        raise ModelError(f"the tokenizer in {text.tokenizer or spec.model.huggingface} has {len(tokenizer):,} tokens but "
                         f"the model's input embeddings hold {embeddings:,}: it is not the model's tokenizer; give the "
                         "directory of the tokenizer the model was trained with (text.tokenizer)")
    encoder = TextEncoder(column, tokenizer, text.max_length or limit or DEFAULT_MAX_LENGTH, spec.dataset.id_column)
    encoder.baseline_id(text.baseline_token)  # the tokenizer has it
    return encoder


def _token_limit(model: nn.Module, tokenizer) -> int | None:
    """The most tokens the model reads: its position table, less the positions RoBERTa-style
    models skip (their ids start after the pad id), and the tokenizer's own limit where it
    states a real one (``model_max_length`` is 1e30 when unset)."""
    config = getattr(getattr(model, "checkpoint_model", None), "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and getattr(config, "model_type", "") in OFFSET_POSITION_MODELS:
        positions -= (config.pad_token_id or 0) + 1
    stated = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    known = [limit for limit in (positions, stated) if limit is not None]
    return min(known) if known else None


def _check_input_kind(spec: JobSpec, model: nn.Module, text_column: str | None) -> None:
    """A Hugging Face text classifier reads a text column, and only a text classifier does (a
    factory model given a text column takes token ids: that is its contract)."""
    if spec.model.huggingface is None:
        return
    reads_text = bool(getattr(model, "reads_text", False))
    if reads_text and not text_column:
        raise ModelError(f"the model in {spec.model.huggingface} is a text classifier (it takes token ids); give "
                         "dataset.text_column: the column of texts to explain")
    if text_column and not reads_text:
        raise ModelError(f"dataset.text_column needs a text classifier, but the checkpoint {spec.model.huggingface} "
                         "takes images (...ForImageClassification); give a ...ForSequenceClassification checkpoint")


def pick_device() -> torch.device:
    """The GPU Ray assigned to this worker, else the CPU."""
    import ray

    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so the first visible is ours.
        return torch.device("cuda:0")
    return torch.device("cpu")


class ExplainWorker:
    """The Ray Data actor: loads the model once, explains each batch, writes its parts.

    It returns one :class:`BatchReport` per batch (part key, row count, bytes, seconds) for the
    driver to commit; the results themselves never travel through the driver.
    """

    def __init__(self, spec_data: dict, dataset: ResolvedDataset, facts: ModelFacts, fingerprint: ModelFingerprint,
                 worker_root: str, threads: int):
        import ray

        from netloupe.workers.model_loading import load_model

        torch.set_num_threads(threads)
        self.spec = JobSpec.model_validate(spec_data)
        self.device = pick_device()
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        model = load_model(self.spec.model)
        self.validated_model = fingerprint
        self.own_model = model_fingerprint(model)
        self.explainer = BatchExplainer(self.spec, dataset, model.to(self.device), self.device,
                                        facts, tune_chunks=True)
        if ray.is_initialized():
            self.explainer.node_id = ray.get_runtime_context().get_node_id()
        # The staged run: a directory every node sees, or a prefix in an object store.
        self.layout, self.filesystem = worker_layout(worker_root)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Checked here, not in __init__: Ray reports an error raised there as a dead actor,
        # without its message. Before any batch is explained, so a differing model writes nothing.
        check_same_model(self.validated_model, self.own_model,
                         f"by the worker on node {self.explainer.node_id} ({self.device})")
        started = time.perf_counter()
        ids = batch[self.explainer.dataset.id_column].to_pylist()
        key = part_key(ids)
        try:
            explained = self.explainer.explain(batch, key)
        except NetloupeError:
            raise
        except Exception as error:
            raise RuntimeError(
                f"explaining the batch of {len(ids)} rows with ids {ids[0]!r}..{ids[-1]!r} failed "
                f"on {self.device}: {type(error).__name__}: {error}"
            ) from error
        computed = time.perf_counter()
        size = self._write(key, explained)
        dataset = self.explainer.dataset
        return BatchReport(
            part=key, rows=len(ids), bytes=size, compute_seconds=computed - started,
            write_seconds=time.perf_counter() - computed, device=str(self.device), gpu_ids=",".join(self.gpu_ids),
            node_id=self.explainer.node_id, chunk_rows=self.explainer.chunk_rows or 0,
            id_digest=S.id_digest(explained.instances["instance_id"], self.explainer.dataset.id_type),
            input_digest=S.input_digest(batch, dataset.id_column, dataset.input_columns, dataset.id_type),
            fidelity_rows=[explained.fidelity[m.table_name].num_rows if m.table_name in explained.fidelity else 0
                           for m in self.spec.attributions],
        ).to_arrow()

    def _write(self, key: str, explained: ExplainedBatch) -> int:
        """Write every part of the batch, the statistics and index rows derived from it and
        its projection-sample candidates; return their bytes. The instances part last: its
        presence tells a resumed run that the batch is whole."""
        dataset, projection = self.explainer.dataset, self.spec.projection
        derived = derive_parts(explained.instances,
                               {name: S.vectors_to_numpy(t["activation"]) for name, t in explained.activations.items()},
                               explained.attributions, explained.fidelity, dataset.id_type, explained.tokens)
        vectors = {(kind, name): S.vectors_to_numpy(_source_vectors(explained, kind, name))
                   for kind, name in self.spec.projection_sources}
        candidates = projection_candidates(explained.instances["instance_id"], vectors, dataset.id_type,
                                           projection.seed, candidate_fraction(projection.sample_size,
                                                                               dataset.num_rows))
        tables = {**explained.tables, **derived.tables}
        instances = tables.pop(Path(S.INSTANCES))
        root, filesystem = self.layout.root, self.filesystem
        for relative, table in candidates.items():  # not the run's bytes: removed at the commit
            write_part(root / relative, key, table, filesystem, root)
        size = 0
        for relative, table in tables.items():
            size += write_part(root / relative, key, table, filesystem, root, derived.options.get(relative))
        for relative, matrix in derived.matrices.items():
            size += write_npy(root / relative / part_name(key, ".npy"), matrix, filesystem, root)
        return size + write_part(root / S.INSTANCES, key, instances, filesystem, root)


class CheckpointsWorker:
    """The Ray Data actor of a run group (``model.checkpoints``): one :class:`ExplainWorker`
    per checkpoint, each with its own model loaded once, explaining every batch in turn, each
    into its own member's staged run. Returns each member's report of the batch, tagged with
    the member's position (``member``)."""

    def __init__(self, members: list[dict]):
        """``members``: each checkpoint's :class:`ExplainWorker` arguments, in the group's order."""
        self.workers = [ExplainWorker(**member) for member in members]

    def __call__(self, batch: pa.Table) -> pa.Table:
        reports = [worker(batch) for worker in self.workers]
        return pa.concat_tables([report.append_column("member", pa.array([position] * report.num_rows, pa.int32()))
                                 for position, report in enumerate(reports)])


def _source_vectors(explained: ExplainedBatch, kind: str, name: str) -> pa.ChunkedArray:
    """The vectors a projection of ``(kind, name)`` is fitted on: a layer's activations, or a
    method's maps for the first target, in instances order."""
    if kind == S.ACTIVATIONS:
        return explained.activations[name]["activation"]
    table = explained.attributions[name]
    return table.filter(pc.equal(table["target_rank"], 0))["attribution"]
