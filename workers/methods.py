"""The attribution-method registry: a name → a thin wrapper around one Captum class (or, for
attention rollout, which no Captum class computes, netloupe's own in Captum's shape:
:mod:`netloupe.workers.attention`).

Each :class:`AttributionMethod` declares what the method needs (a layer, a baseline) and
what it gives (a convergence delta, randomness) as flags, so the rest of netloupe asks
flags instead of checking names. Captum does the computing; netloupe only chooses the
arguments (baselines, chunk sizes) and never re-implements a method.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from captum.attr import (
    LRP,
    DeepLift,
    DeepLiftShap,
    FeatureAblation,
    GradientShap,
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    Lime,
    NoiseTunnel,
    Occlusion,
    Saliency,
    ShapleyValueSampling,
)
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR
from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule, IdentityRule
from torch import nn

from netloupe.contract.errors import MethodError, did_you_mean
from netloupe.contract.spec import DATA_BASELINES
from netloupe.workers.attention import AttentionRollout
from netloupe.workers.kernel_shap import BatchedKernelShap
from netloupe.workers.patch_grid import patch_grid_layer, patch_grid_of

#: Working-set budget (module outputs) of one forward/backward pass inside a method, used
#: until a worker has measured its own best chunk (:func:`tune_chunk_rows`). On 2 CPU cores
#: the MNIST CNN ran fastest with 128-512-row chunks, 1.4x faster than 1024-row ones.
CHUNK_BYTES = 64 * 2**20
#: The largest chunk tuning may choose, so a big model cannot exhaust memory.
MAX_CHUNK_BYTES = 1024 * 2**20
CHUNK_CANDIDATES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def tune_chunk_rows(model: nn.Module, example: torch.Tensor, per_instance_bytes: int) -> int:
    """Rows per forward+backward pass that run fastest per row on this device, measured.

    Each candidate (within :data:`MAX_CHUNK_BYTES`) runs twice on copies of ``example``'s
    rows; the best time per row wins. It costs a few thousand rows of forward+backward,
    once per worker, and adapts to the model and the hardware (a GPU wants large chunks,
    two CPU cores a few hundred MNIST rows).
    """
    import time

    cap = max(CHUNK_CANDIDATES[0], MAX_CHUNK_BYTES // max(1, per_instance_bytes))
    best_rows, best_time = CHUNK_CANDIDATES[0], float("inf")
    for rows in (r for r in CHUNK_CANDIDATES if r <= cap):
        repeats = -(-rows // example.shape[0])
        x = example.detach().repeat((repeats,) + (1,) * (example.dim() - 1))[:rows]
        per_row = []
        for _ in range(2):
            xr = x.clone().requires_grad_(True)
            started = time.perf_counter()
            torch.autograd.grad(model(xr).sum(), xr)
            if xr.is_cuda:
                torch.cuda.synchronize()
            per_row.append((time.perf_counter() - started) / rows)
        if min(per_row) < best_time:
            best_rows, best_time = rows, min(per_row)
    return best_rows


@dataclass(frozen=True)
class AttributionMethod:
    """One registered method and its capability flags."""

    name: str
    """Registry name used in job specs."""
    captum_class: type
    """The Captum attribution class that does the work."""
    layer_method: bool = False
    """Constructed with a layer; its map has the layer's spatial shape (Grad-CAM)."""
    needs_layer: bool = False
    """Constructed with a layer, its map shaped like the input (guided Grad-CAM)."""
    perturbs_features: bool = False
    """Perturbs groups of input values as one feature (Captum's ``feature_mask``: a tabular
    run's features, an image's grid cells); Captum repeats a group's value on each member."""
    one_instance_per_call: bool = False
    """Captum computes one instance at a time (LIME fits a model per instance): its
    perturbations per evaluation fill the chunk alone."""
    checks_layers: bool = False
    """Needs a propagation rule for every module (LRP): checked when the method is bound."""
    needs_relu_modules: bool = False
    """Overrides the gradient of ``nn.ReLU`` modules (guided backpropagation): a model
    without them would silently get plain gradients."""
    shares_samples: bool = False
    """Draws its samples once per call for every instance in it (Kernel SHAP here): a call
    takes the whole batch, and its perturbations per evaluation fill the chunk."""
    samples_are_perturbations: bool = False
    """Its ``perturbations_per_eval`` batches its ``n_samples`` samples (LIME, Kernel SHAP)."""
    requires_distribution: bool = False
    """Takes only a distribution of baselines (Captum's DeepLiftShap refuses a single row)."""
    evaluates_every_baseline: bool = False
    """With a baseline distribution, evaluates every baseline row (DeepLiftSHAP, Kernel
    SHAP: an instance becomes a row per background row) rather than drawing some (GradientSHAP)."""
    takes_baselines: bool = False
    """``attribute`` takes ``baselines``."""
    has_convergence_delta: bool = False
    """``attribute`` can return Captum's convergence delta."""
    stochastic: bool = False
    """Draws random numbers; seeded per batch for reproducibility."""
    needs_unique_nonlinearities: bool = False
    """Every nonlinearity module must be called once per forward (DeepLift's rule)."""
    needs_hooks: bool = False
    """Works through module hooks, which TorchScript models do not support."""
    baselines_as_distribution: bool = False
    """Baselines are a tensor of reference samples (GradientSHAP), not a scalar."""
    rows_per_instance: int = 1
    """Rows one instance becomes in a single ``attribute`` call (DeepLift pairs each input
    with its baseline: 2)."""
    samples_parameter: str | None = None
    """The ``attribute`` argument that multiplies the rows per instance (``n_samples``)."""
    internal_batch_parameter: str | None = None
    """The ``attribute`` argument with which Captum chunks its own expanded rows
    (Integrated Gradients' ``internal_batch_size``): set to the chunk size."""
    perturbations_parameter: str | None = None
    """The ``attribute`` argument that batches perturbations (Occlusion's
    ``perturbations_per_eval``): as many as fit a chunk."""
    sliding_window: bool = False
    """Takes ``sliding_window_shapes`` and ``strides``; defaults follow the input shape."""
    sums_targets: bool = False
    """Captum differentiates the batch's summed target outputs, one backward root, instead
    of one root per instance (``torch.unbind``), which costs a Python step per instance:
    ~10 ms per 128-row call, a third of Grad-CAM's time on the demo CNN. The gradients are
    the same because instances do not interact in an eval-mode model; only for methods
    that use no per-instance forward output (no convergence delta)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Default ``attribute`` keyword arguments."""
    takes_noise_tunnel: bool = True
    """Captum's NoiseTunnel can wrap it (it needs a Captum attribution class)."""

    def attribute_parameters(self) -> list[str]:
        """Names a job spec may set in ``params`` (those of Captum's ``attribute``)."""
        # feature_mask is the method spec's own field (an image's grid or superpixels; a
        # tabular run's feature groups), return_input_shape netloupe's to keep.
        reserved = {"self", "inputs", "target", "baselines", "additional_forward_args", "feature_mask",
                    "return_convergence_delta", "attribute_to_layer_input", "show_progress", "return_input_shape"}
        parameters = inspect.signature(self.captum_class.attribute).parameters
        return [n for n, p in parameters.items()
                if n not in reserved and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]

    def parameter_defaults(self) -> list["ParameterDefault"]:
        """Each ``params`` name with the value netloupe uses when the spec does not set it,
        beside Captum's own default."""
        signature = inspect.signature(self.captum_class.attribute).parameters
        chosen = {
            self.internal_batch_parameter: "the worker's chunk size (measured on its first batch)",
            self.perturbations_parameter: ("as many windows as fit the worker's chunk" if self.sliding_window
                                           else "as many perturbations as fit the worker's chunk"),
        }
        if self.sliding_window:
            chosen["sliding_window_shapes"] = "all channels x about 1/7 of each side"
            chosen["strides"] = "the window (windows do not overlap)"
        rows = []
        for name in self.attribute_parameters():
            default = signature[name].default
            captum = "(required)" if default is inspect.Parameter.empty else repr(default)
            ours = repr(self.defaults[name]) if name in self.defaults else chosen.get(name, captum)
            rows.append(ParameterDefault(name, ours, captum))
        return rows


CAPABILITY_FLAGS = ("layer_method", "takes_baselines", "has_convergence_delta", "stochastic",
                    "needs_unique_nonlinearities", "perturbs_features", "baselines_as_distribution")
"""The flags a method's listing shows (``netloupe methods``, ``netloupe.methods()``)."""


def flags_of(method: "AttributionMethod") -> dict[str, bool]:
    return {flag: getattr(method, flag) for flag in CAPABILITY_FLAGS}


def noise_tunnel_defaults() -> list["ParameterDefault"]:
    """The noise tunnel's settings: the spec's defaults beside Captum's ``NoiseTunnel``'s."""
    from netloupe.contract.spec import NoiseTunnelSpec

    captum = inspect.signature(NoiseTunnel.attribute).parameters
    return [ParameterDefault(name, repr(field.default), repr(captum[name].default))
            for name, field in NoiseTunnelSpec.model_fields.items()]


def baseline_default() -> float:
    """The constant baseline a method uses when its spec entry gives none."""
    from netloupe.contract.spec import MethodSpec

    return MethodSpec.model_fields["baseline"].default


@dataclass(frozen=True)
class ParameterDefault:
    """One ``attribute`` parameter's default here and in Captum (``netloupe methods``)."""

    name: str
    netloupe: str
    """What netloupe passes when the spec leaves it out."""
    captum: str
    """Captum's own default (``(required)`` when it has none)."""

    @property
    def differs(self) -> bool:
        return self.netloupe != self.captum


METHODS: dict[str, AttributionMethod] = {
    m.name: m
    for m in [
        AttributionMethod(
            "integrated_gradients", IntegratedGradients, takes_baselines=True,
            has_convergence_delta=True, internal_batch_parameter="internal_batch_size",
            defaults={"n_steps": 32, "method": "gausslegendre"},
        ),
        AttributionMethod("saliency", Saliency, defaults={"abs": True}),
        AttributionMethod("input_x_gradient", InputXGradient),
        AttributionMethod(
            "deeplift", DeepLift, takes_baselines=True, has_convergence_delta=True,
            needs_unique_nonlinearities=True, needs_hooks=True, rows_per_instance=2,
        ),
        AttributionMethod(
            "gradient_shap", GradientShap, takes_baselines=True, has_convergence_delta=True,
            stochastic=True, baselines_as_distribution=True, samples_parameter="n_samples",
            defaults={"n_samples": 8, "stdevs": 0.0},
        ),
        AttributionMethod(
            "grad_cam", LayerGradCam, layer_method=True, needs_hooks=True, sums_targets=True,
            defaults={"relu_attributions": False},
        ),
        AttributionMethod(
            "occlusion", Occlusion, takes_baselines=True, sliding_window=True,
            perturbations_parameter="perturbations_per_eval",
        ),
        # Not Captum (none computes it): a Hugging Face vision transformer's attention rollout.
        AttributionMethod("attention_rollout", AttentionRollout, takes_noise_tunnel=False),
        AttributionMethod(
            "feature_ablation", FeatureAblation, takes_baselines=True, perturbs_features=True,
            perturbations_parameter="perturbations_per_eval",
        ),
        AttributionMethod(
            "shapley_value_sampling", ShapleyValueSampling, takes_baselines=True, perturbs_features=True,
            stochastic=True, perturbations_parameter="perturbations_per_eval", defaults={"n_samples": 25},
        ),
        # Captum's sampling and kernel, every instance's regression in one solve (workers/kernel_shap.py).
        AttributionMethod(
            "kernel_shap", BatchedKernelShap, takes_baselines=True, perturbs_features=True, stochastic=True,
            baselines_as_distribution=True, evaluates_every_baseline=True, samples_are_perturbations=True,
            shares_samples=True,
            perturbations_parameter="perturbations_per_eval", defaults={"n_samples": 256}, takes_noise_tunnel=False,
        ),
        AttributionMethod(
            "lime", Lime, takes_baselines=True, perturbs_features=True, stochastic=True, one_instance_per_call=True,
            samples_are_perturbations=True,
            perturbations_parameter="perturbations_per_eval", defaults={"n_samples": 256},
        ),
        AttributionMethod("lrp", LRP, has_convergence_delta=True, needs_hooks=True, checks_layers=True),
        AttributionMethod("guided_backprop", GuidedBackprop, needs_hooks=True, needs_relu_modules=True),
        AttributionMethod("guided_grad_cam", GuidedGradCam, needs_layer=True, needs_hooks=True,
                          needs_relu_modules=True),
        AttributionMethod(
            "deeplift_shap", DeepLiftShap, takes_baselines=True, has_convergence_delta=True,
            needs_unique_nonlinearities=True, needs_hooks=True, baselines_as_distribution=True,
            evaluates_every_baseline=True, requires_distribution=True,
        ),
    ]
}


def get_method(name: str) -> AttributionMethod:
    """The registered method called ``name``, or a :class:`MethodError` naming close ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(
            f"unknown attribution method {name!r}; {did_you_mean(name, METHODS)} "
            "(`netloupe methods` lists them all)"
        ) from None


def reused_nonlinearities(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of nonlinearity modules called more than once in one forward pass.

    DeepLift keeps one module's input and output to compute its multipliers; a module
    used twice (torchvision's ResNet reuses one ReLU per block) silently breaks that.
    """
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module) in SUPPORTED_NON_LINEAR:
            def count(_m, _i, _o, name=name):
                calls[name] = calls.get(name, 0) + 1
            handles.append(module.register_forward_hook(count))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(name for name, n in calls.items() if n > 1)


def default_occlusion_window(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A window covering all channels and about 1/7 of each spatial side (4×4 on MNIST)."""
    if len(input_shape) == 3:
        channels, height, width = input_shape
        return (channels, max(1, round(height / 7)), max(1, round(width / 7)))
    return tuple(1 for _ in input_shape)


@dataclass
class BoundMethod:
    """A configured method bound to one model: the object a worker calls per batch."""

    method: AttributionMethod
    table_name: str
    attribution: Any
    """The Captum object (possibly a NoiseTunnel around the method)."""
    kwargs: dict[str, Any]
    baseline: float | str
    """A constant, or ``background`` / ``mean`` (of :attr:`background`)."""
    noise_tunnel: dict[str, Any] | None
    chunk_rows: int
    """Rows (instances × samples) one forward/backward pass should hold."""
    input_shape: tuple[int, ...]
    background: torch.Tensor | None = None
    """The run's background rows as model inputs, when the baseline is drawn from them."""
    feature_mask: torch.Tensor | None = None
    """``(1, *input_shape)``: each input value's feature, for methods that perturb features."""
    superpixels: dict[str, Any] | None = None
    """SLIC's arguments when each image's features are its own superpixels (:meth:`feature_masks`)."""
    lrp_rules: dict[nn.Module, Any] | None = None
    """LRP: each rule-bearing module's rule, made anew before every call (:func:`lrp_rule_plan`)."""

    def feature_masks(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """``(n, *input_shape)``: each image's superpixels (SLIC on the image, channels last),
        for a method whose features are superpixels; else None (one mask for every instance)."""
        if self.superpixels is None:
            return None
        from skimage.segmentation import slic

        images = inputs.detach().cpu().numpy()
        masks = np.empty(images.shape, dtype=np.int64)
        for i, image in enumerate(images):
            channels_last = np.moveaxis(image, 0, -1)
            segments = slic(channels_last if image.shape[0] > 1 else channels_last[..., 0],
                            channel_axis=-1 if image.shape[0] > 1 else None, start_label=0, **self.superpixels)
            masks[i] = segments[None]
        return torch.from_numpy(masks).to(inputs.device)

    @property
    def stochastic(self) -> bool:
        return self.method.stochastic or self.noise_tunnel is not None

    @property
    def returns_delta(self) -> bool:
        return self.method.has_convergence_delta

    def perturbation_count(self, kwargs: dict[str, Any]) -> int:
        # (with superpixels, the batch's own masks in kwargs: their largest segment number)
        """Perturbations of one instance that a call can batch: occlusion windows, features
        (one ablation each), or samples (LIME's and Kernel SHAP's)."""
        if self.method.sliding_window:
            return occlusion_window_count(self.input_shape, kwargs["sliding_window_shapes"], kwargs["strides"])
        if self.method.samples_are_perturbations:
            return kwargs["n_samples"]
        mask = kwargs.get("feature_mask", self.feature_mask)
        if mask is not None:
            return int(mask.max().item()) + 1
        return int(torch.tensor(self.input_shape).prod().item())

    def baseline_rows(self) -> int:
        """Rows each perturbation becomes: one per background row for the methods that
        evaluate every one (Kernel SHAP, DeepLiftSHAP), else one."""
        if self.method.evaluates_every_baseline and self.baseline == "background":
            return self.background.shape[0]
        return 1

    def rows_per_instance(self, kwargs: dict[str, Any]) -> int:
        """How many rows one instance becomes in a single Captum call (before any chunking
        Captum does itself, as Integrated Gradients does with ``internal_batch_size``)."""
        method = self.method
        rows = method.rows_per_instance * self.baseline_rows()
        if method.samples_parameter:
            rows *= kwargs[method.samples_parameter]
        if method.perturbations_parameter and not method.one_instance_per_call:
            rows *= kwargs[method.perturbations_parameter]
        if self.noise_tunnel is not None:
            rows *= self.noise_tunnel["nt_samples"]
        return rows

    def baselines(self, inputs: torch.Tensor):
        """The ``baselines`` argument: the background rows, their mean, or the constant."""
        if self.baseline == "background":
            return self.background
        if self.baseline == "mean":
            return self.background.mean(dim=0, keepdim=True)
        if self.method.baselines_as_distribution:
            return torch.full_like(inputs[:1], self.baseline)
        return self.baseline

    def call_kwargs(self, inputs: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, Any]:
        """The ``attribute`` keyword arguments for a (sub-)batch, chunk sizes included
        (``masks``: the sub-batch's own superpixels, when its features are those)."""
        kwargs = dict(self.kwargs)
        batch = inputs.shape[0]
        method = self.method
        if method.takes_baselines:
            kwargs["baselines"] = self.baselines(inputs)
        if masks is not None:
            kwargs["feature_mask"] = masks
        elif method.perturbs_features and self.feature_mask is not None:
            kwargs["feature_mask"] = self.feature_mask
        if method.internal_batch_parameter and method.internal_batch_parameter not in kwargs:
            # Captum evaluates batch × n_steps scaled inputs: all at once thrashes (or
            # exhausts) memory, one step at a time wastes calls. Chunks of the budget.
            kwargs[method.internal_batch_parameter] = max(batch, self.chunk_rows)
        if method.sliding_window:
            kwargs.setdefault("sliding_window_shapes", default_occlusion_window(self.input_shape))
            kwargs.setdefault("strides", kwargs["sliding_window_shapes"])
            kwargs["sliding_window_shapes"] = tuple(kwargs["sliding_window_shapes"])
            if isinstance(kwargs["strides"], list):
                kwargs["strides"] = tuple(kwargs["strides"])
        if method.perturbations_parameter and method.perturbations_parameter not in kwargs:
            per_call = 1 if method.one_instance_per_call else batch
            kwargs[method.perturbations_parameter] = max(
                1, min(self.perturbation_count(kwargs), self.chunk_rows // max(1, per_call * self.baseline_rows()))
            )
        if self.returns_delta:
            kwargs["return_convergence_delta"] = True
        if self.noise_tunnel is not None:
            kwargs.update(self.noise_tunnel)
        return kwargs

    def sub_batch_size(self, inputs: torch.Tensor) -> int:
        """Instances per Captum call, so that one call's rows fit the chunk budget."""
        if self.method.shares_samples:
            return inputs.shape[0]
        kwargs = self.call_kwargs(inputs[:1])
        return max(1, self.chunk_rows // self.rows_per_instance(kwargs))

    def __call__(self, inputs: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None = None):
        """Attributions shaped like the input (or the layer, for layer methods), and the
        convergence delta per instance (or None). ``masks``: each instance's superpixels
        (:meth:`feature_masks`), for a method whose features are those.

        The batch is cut into sub-batches that fit the chunk budget. For deterministic
        methods this changes nothing but speed; stochastic methods draw their samples per
        sub-batch, so their results reproduce for the same seed and budget.
        """
        # Input gradients for gradient methods only: a layer method (Grad-CAM) needs the
        # backward pass down to its layer, not through the layers below it; a perturbation
        # method none at all.
        inputs = inputs.detach().requires_grad_(not (self.method.layer_method or self.method.perturbs_features))
        if masks is None:
            masks = self.feature_masks(inputs)
        size = self.sub_batch_size(inputs)
        pieces, deltas = [], []
        for start in range(0, inputs.shape[0], size):
            x, t = inputs[start : start + size], target[start : start + size]
            m = None if masks is None else masks[start : start + size]
            if self.lrp_rules is not None:  # Captum deletes every rule after each call
                attach_lrp_rules(self.lrp_rules)
            if self.method.sums_targets:
                result = self.attribution.attribute(x, additional_forward_args=(t,), **self.call_kwargs(x, m))
            else:
                result = self.attribution.attribute(x, target=t, **self.call_kwargs(x, m))
            if self.returns_delta:
                result, delta = result
                if delta.numel() != x.shape[0]:
                    # Sampling methods (GradientSHAP, DeepLiftSHAP, a noise tunnel) give one delta
                    # per sample, an instance's samples adjacent (repeat_interleave): keep the worst.
                    delta = delta.reshape(x.shape[0], -1).abs().max(dim=1).values
                deltas.append(delta)
            pieces.append(result)
        attributions = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if not self.returns_delta:
            return attributions, None
        return attributions, deltas[0] if len(deltas) == 1 else torch.cat(deltas)


def summed_target_output(model: nn.Module):
    """A forward function for Captum that returns, as one value, the sum over the batch of
    each instance's target logit (the target comes as an additional forward argument)."""
    def forward(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return model(inputs).gather(1, target.reshape(-1, 1)).sum().reshape(1)
    return forward


def occlusion_window_count(input_shape, window, strides) -> int:
    if isinstance(strides, int):
        strides = (strides,) * len(input_shape)
    count = 1
    for size, w, s in zip(input_shape, window, strides):
        count *= (size - w) // s + 1
    return count


def default_chunk_rows(per_instance_bytes: int) -> int:
    """Rows per pass from the memory budget, before a worker has measured its own."""
    return max(1, CHUNK_BYTES // max(1, per_instance_bytes))


def bind_method(spec, model: nn.Module, input_shape: tuple[int, ...], chunk_rows: int,
                feature_mask: torch.Tensor | None = None, background: torch.Tensor | None = None) -> BoundMethod:
    """Build the Captum object for one ``MethodSpec`` on ``model``, checking its parameters.

    ``feature_mask``: a tabular run's features (:func:`netloupe.storage.features.feature_index`),
    for the methods that perturb features; an image's grid cells are made here. ``background``:
    the run's background rows as model inputs, when a method's baseline is drawn from them.
    """
    method = get_method(spec.method)
    name = spec.table_name
    if method.needs_hooks and isinstance(model, torch.jit.ScriptModule):
        raise MethodError(
            f"{name}: {spec.method} works through module hooks, which TorchScript "
            "models do not support; give model.factory with the Python model, or choose "
            f"one of {sorted(n for n, m in METHODS.items() if not m.needs_hooks)}"
        )
    allowed = method.attribute_parameters()
    if spec.noise_tunnel is not None and not method.takes_noise_tunnel:
        raise MethodError(f"{name}: {spec.method} takes no noise_tunnel (Captum's NoiseTunnel wraps "
                          f"Captum's methods only); remove it, or choose one of "
                          f"{sorted(n for n, m in METHODS.items() if m.takes_noise_tunnel)}")
    if spec.noise_tunnel is not None:
        nt_reserved = {"nt_type", "nt_samples", "stdevs", "nt_samples_batch_size", "draw_baseline_from_distrib"}
        clash = nt_reserved & set(spec.params)
        if clash:
            raise MethodError(f"{name}: set {sorted(clash)} under 'noise_tunnel', not 'params'")
    if "feature_mask" in spec.params:
        raise MethodError(f"{name}: netloupe makes the feature_mask: a tabular run's features "
                          "(dataset.feature_groups) or an image's grid cells; remove params.feature_mask")
    for key in spec.params:
        if key not in allowed:
            raise MethodError(f"{name}: {spec.method} has no parameter {key!r}; {did_you_mean(key, allowed)}")
    _check_baseline(spec, method)
    if method.requires_distribution and background is not None and background.shape[0] < 2:
        raise MethodError(f"{name}: {spec.method} averages over at least two background rows; "
                          f"background.size is {background.shape[0]}: raise it")
    lrp_rules = None
    if method.checks_layers:
        _check_lrp_rules(name, model)
        lrp_rules = lrp_rule_plan(name, spec.rules, model)
    elif spec.rules:
        raise MethodError(f"{name}: rules are LRP's propagation rules and {spec.method} has none; remove 'rules'")
    if method.needs_relu_modules and not any(isinstance(m, nn.ReLU) for m in model.modules()):
        raise MethodError(f"{name}: {spec.method} overrides the gradient of nn.ReLU modules and this model has "
                          "none (it may call torch.relu): it would get plain gradients; use saliency, or "
                          "build the model with nn.ReLU modules")
    forward = summed_target_output(model) if method.sums_targets else model
    if method.layer_method or method.needs_layer:
        if spec.layer is None:
            raise MethodError(f"{name}: {spec.method} needs 'layer: <module name>'")
        modules = dict(model.named_modules())
        if spec.layer not in modules:
            raise MethodError(
                f"{name}: no layer {spec.layer!r} in the model; "
                f"{did_you_mean(spec.layer, [n for n in modules if n])}"
            )
        layer = modules[spec.layer]
        grid = patch_grid_of(model)
        if grid is not None:  # a vision transformer: its tokens as a map over the patches
            layer = patch_grid_layer(spec.layer, layer, grid)
        attribution = method.captum_class(forward, layer)
    else:
        if spec.layer is not None:
            raise MethodError(f"{name}: {spec.method} takes no 'layer' (only layer methods such as grad_cam do)")
        attribution = method.captum_class(forward)
    nt_kwargs = None
    if spec.noise_tunnel is not None:
        attribution = NoiseTunnel(attribution)
        nt_kwargs = spec.noise_tunnel.model_dump()
    superpixels = None
    if spec.feature_mask is not None:
        if not method.perturbs_features:
            raise MethodError(f"{name}: {spec.method} perturbs no features; feature_mask is for "
                              f"{sorted(n for n, m in METHODS.items() if m.perturbs_features)}")
        if feature_mask is not None:
            raise MethodError(f"{name}: a tabular run's features are its columns (dataset.feature_groups "
                              "groups them); feature_mask is for images: remove it")
        if len(input_shape) != 3:
            raise MethodError(f"{name}: feature_mask groups an image's pixels, and this input has shape "
                              f"{list(input_shape)}, not (channels, height, width)")
        if spec.feature_mask.kind == "superpixels":
            import importlib.util

            if importlib.util.find_spec("skimage") is None:
                raise MethodError(f"{name}: superpixels are SLIC's, from scikit-image, which is not installed: "
                                  "pip install 'netloupe[superpixels]'")
            superpixels = {"n_segments": spec.feature_mask.segments, "compactness": spec.feature_mask.compactness}
    if method.perturbs_features and feature_mask is None and superpixels is None and len(input_shape) == 3:
        cell = (spec.feature_mask.cell if spec.feature_mask is not None and spec.feature_mask.cell
                else default_occlusion_window(input_shape)[1:])
        if len(cell) != 2 or min(cell) < 1:
            raise MethodError(f"{name}: feature_mask.cell is a cell's [height, width] in pixels, got {cell}")
        feature_mask = grid_feature_mask(input_shape, tuple(cell))
    kwargs = {**method.defaults, **spec.params}
    return BoundMethod(
        method=method,
        table_name=name,
        attribution=attribution,
        kwargs=kwargs,
        baseline=spec.baseline,
        noise_tunnel=nt_kwargs,
        chunk_rows=chunk_rows,
        input_shape=tuple(input_shape),
        background=background if spec.baseline in DATA_BASELINES else None,
        feature_mask=(feature_mask.reshape((1,) + tuple(input_shape))
                      if method.perturbs_features and feature_mask is not None else None),
        superpixels=superpixels,
        lrp_rules=lrp_rules,
    )


def _check_baseline(spec, method: AttributionMethod) -> None:
    """A baseline the method can use: a distribution only where it averages over one."""
    name = spec.table_name
    distribution = sorted(n for n, m in METHODS.items() if m.baselines_as_distribution)
    if spec.baseline in DATA_BASELINES and not method.takes_baselines:
        raise MethodError(f"{name}: {spec.method} takes no baseline; remove 'baseline'")
    if spec.baseline == "background" and not method.baselines_as_distribution:
        raise MethodError(f"{name}: baseline 'background' is a distribution of rows, and {spec.method} takes one "
                          f"baseline; use baseline: mean (the background's mean) or a constant, or one of "
                          f"{distribution}")
    if method.requires_distribution and spec.baseline != "background":
        raise MethodError(f"{name}: {spec.method} averages DeepLift over a distribution of baselines; "
                          "set baseline: background (the run's background rows)")


def _check_lrp_rules(name: str, model: nn.Module) -> None:
    """Every leaf module has a rule in Captum's LRP (or is a nonlinearity it passes through),
    as LRP itself checks only once it runs, on the workers."""
    known = tuple(SUPPORTED_LAYERS_WITH_RULES) + tuple(SUPPORTED_NON_LINEAR_LAYERS)
    missing = [(path, type(m).__name__) for path, m in leaf_modules(model).items()
               if not hasattr(m, "rule") and type(m) not in known]
    if missing:
        path, kind = missing[0]
        raise MethodError(
            f"{name}: Captum's LRP has no LRP rule for module {path!r} ({kind}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); it has rules for "
            f"{', '.join(sorted(t.__name__ for t in SUPPORTED_LAYERS_WITH_RULES))} and passes "
            f"{', '.join(t.__name__ for t in SUPPORTED_NON_LINEAR_LAYERS)}: use another method for this model"
        )


LRP_RULES = {
    "epsilon": lambda r: EpsilonRule(epsilon=r.epsilon),
    "gamma": lambda r: GammaRule(gamma=r.gamma, set_bias_to_zero=r.set_bias_to_zero),
    "alpha1_beta0": lambda r: Alpha1_Beta0_Rule(set_bias_to_zero=r.set_bias_to_zero),
    "identity": lambda r: IdentityRule(),
}
"""A spec's rule name → the Captum rule it makes (``LrpRuleSpec``)."""


def lrp_rule_plan(name: str, rules: dict, model: nn.Module) -> dict[nn.Module, Any]:
    """Every leaf module LRP propagates through with a rule → a maker of its rule: the spec's
    (by module path, else by class name), else the module's own ``rule`` (its author's), else
    Captum's default for its class. Captum deletes every module's rule after a call, the
    author's too, so each call sets them all anew (:func:`attach_lrp_rules`); the plan is made
    when the method is bound, before any call."""
    leaves = leaf_modules(model)
    ruled = {path: m for path, m in leaves.items()
             if type(m) in SUPPORTED_LAYERS_WITH_RULES or getattr(m, "rule", None) is not None}
    classes = {type(m).__name__ for m in ruled.values()}
    for key in rules:
        if key in leaves and key not in ruled:
            raise MethodError(f"{name}: LRP passes relevance through {key!r} ({type(leaves[key]).__name__}) "
                              "without a rule; name a layer with weights or pooling")
        if key not in ruled and key not in classes:
            raise MethodError(f"{name}: rules names {key!r}, which is no module path or class of a layer LRP "
                              f"propagates through; {did_you_mean(key, sorted(ruled) + sorted(classes))}")
    plan = {}
    for path, module in ruled.items():
        chosen = rules.get(path) or rules.get(type(module).__name__)
        own = getattr(module, "rule", None)
        if chosen is not None:
            plan[module] = functools.partial(LRP_RULES[chosen.rule], chosen)
        elif own is not None:
            plan[module] = functools.partial(copy.deepcopy, own)
        else:
            plan[module] = SUPPORTED_LAYERS_WITH_RULES[type(module)]
    return plan


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules without children, by path (what LRP propagates through)."""
    return {path: module for path, module in model.named_modules() if path and not list(module.children())}


def attach_lrp_rules(plan: dict[nn.Module, Any]) -> None:
    """Set every planned module's rule before an LRP call (:func:`lrp_rule_plan`)."""
    for module, make in plan.items():
        module.rule = make()


def grid_feature_mask(input_shape: tuple[int, ...], cell: tuple[int, int]) -> torch.Tensor:
    """An image's grid cells as features, ``cell`` pixels high and wide, all channels together."""
    channels, height, width = input_shape
    rows = torch.arange(height) // cell[0]
    columns = torch.arange(width) // cell[1]
    per_row = -(-width // cell[1])
    cells = rows[:, None] * per_row + columns[None, :]
    return cells.expand(channels, height, width).clone()
