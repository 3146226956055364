"""Kernel SHAP for a whole batch at once, with Captum's own sampling and weights.

Captum's :class:`~captum.attr.KernelShap` fits one scikit-learn regression per instance, in a
Python loop (it warns so for any batch larger than one): milliseconds per instance, which at
a million instances is the whole time budget. The regression is the only per-instance part.
:class:`BatchedKernelShap` draws the coalitions with Captum's generator
(``KernelShap.kernel_shap_perturb_generator``, the same random draws in the same order),
weights them with Captum's kernel (``kernel_shap_similarity_kernel``), evaluates the model on
every instance's perturbations in large chunks, and solves every instance's weighted least
squares in one ``lstsq`` on the shared design matrix. Called on one instance after
``torch.manual_seed(s)``, it gives what Captum's ``KernelShap.attribute`` gives after the
same seed; on a batch, every instance uses the batch's coalitions (Captum draws new ones per
instance), which changes which sampling error an instance gets, not its expectation.

A batch shares its coalitions: drawing one costs Captum's generator ~50 µs of Python, which
per instance would take half the time of a tabular model. A coalition drawn twice is
evaluated once, with the sum of the draws' weights (the same least squares).

A background set (``baselines`` with more than one row) gives the expected value over the
background, as ``shap.KernelExplainer`` does: each coalition's output is the mean over the
background rows of the model on the instance's chosen features and the row's others. Since
the regression is linear in the outputs, that equals the mean over background rows of Captum's
attribution with that row as the baseline (same seed).
"""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import KernelShap
from torch.distributions.categorical import Categorical

from netloupe.contract.errors import MethodError


class BatchedKernelShap:
    """Captum-shaped (``attribute(inputs, baselines, target, ...)``) Kernel SHAP over a batch."""

    def __init__(self, forward_func) -> None:
        self.forward_func = forward_func
        self._captum = KernelShap(forward_func)
        """Captum's own object, for its coalition generator and kernel."""

    def attribute(
        self,
        inputs: torch.Tensor,
        baselines: float | torch.Tensor | None = None,
        target: torch.Tensor | int | None = None,
        additional_forward_args: Any = None,
        feature_mask: torch.Tensor | None = None,
        n_samples: int = 25,
        perturbations_per_eval: int = 1,
        return_input_shape: bool = True,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Each instance's Shapley values per feature (group), repeated over the group's
        inputs when ``return_input_shape`` (as Captum returns them), else ``(n, groups)``.

        ``perturbations_per_eval`` coalitions are evaluated per model call, for every
        instance and background row at once.
        """
        mask = _feature_mask(feature_mask, inputs)  # one per instance, or one for all
        if mask.dim() == inputs.dim():
            # Each instance its own features (superpixels, a number of them per image): one
            # instance at a time, each drawing its own coalitions (one image's segments are not
            # another's). Captum's own loop draws the same way but also draws for the model it
            # fits per instance, so from the second instance on the draws differ from its.
            targets = _target_column(target, inputs.shape[0], inputs.device)
            pieces = []
            for i in range(inputs.shape[0]):
                pieces.append(self.attribute(inputs[i : i + 1], baselines, targets[i : i + 1], additional_forward_args,
                                             mask[i : i + 1], n_samples, perturbations_per_eval, return_input_shape))
            return torch.cat(pieces)
        groups = int(mask.max().item()) + 1
        background = _background(baselines, inputs)
        if groups == 1:  # one feature takes the whole gap (Captum's sampler cannot draw from one)
            coalitions, weights = torch.tensor([[1], [0]], device=inputs.device), torch.ones(2, device=inputs.device)
        else:
            coalitions, weights = _merge_repeats(*self._coalitions(inputs, groups, n_samples))
        outputs = self._outputs(inputs, background, coalitions, mask, target, additional_forward_args,
                                max(1, perturbations_per_eval))
        coefficients = _weighted_least_squares(coalitions, weights, outputs)  # (n, groups)
        if not return_input_shape:
            return coefficients.to(inputs.dtype)
        per_value = mask.reshape(mask.shape[0] if mask.dim() == inputs.dim() else 1, -1).expand(inputs.shape[0], -1)
        return coefficients.gather(1, per_value).reshape(inputs.shape).to(inputs.dtype)

    def _coalitions(self, inputs: torch.Tensor, groups: int, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_samples`` coalitions (0/1 per group) and their kernel weights, drawn as Captum's
        ``KernelShap.attribute`` draws them (the same distribution, the same generator)."""
        sizes = torch.arange(groups, dtype=torch.float)
        probs = torch.tensor(groups - 1) / (sizes * (groups - sizes))
        probs[0] = 0.0
        generator = self._captum.kernel_shap_perturb_generator(
            inputs[:1], num_select_distribution=Categorical(probs), num_interp_features=groups)
        drawn = [next(generator) for _ in range(n_samples)]
        weights = [self._captum.kernel_shap_similarity_kernel(None, None, z, num_interp_features=groups)
                   for z in drawn]
        return torch.cat(drawn).to(inputs.device), torch.cat(weights).to(inputs.device)

    def _outputs(self, inputs, background, coalitions, mask, target, additional_forward_args,
                 per_eval: int) -> torch.Tensor:
        """``(n, samples)``: each instance's target output on each coalition, averaged over
        the background rows."""
        n, samples, rows = inputs.shape[0], coalitions.shape[0], background.shape[0]
        # (n or 1, width): an instance's own mask (superpixels), or one for the batch.
        flat_mask = mask.reshape(mask.shape[0] if mask.dim() == inputs.dim() else 1, -1)
        x = inputs.reshape(n, 1, 1, -1)
        b = background.reshape(1, 1, rows, -1)
        target = _target_column(target, n, inputs.device)
        pieces = []
        for start in range(0, samples, per_eval):
            chosen = coalitions[start : start + per_eval][:, flat_mask].bool()  # (k, n or 1, width)
            k = chosen.shape[0]
            keep = chosen.transpose(0, 1).unsqueeze(2)  # (n or 1, k, 1, width)
            perturbed = torch.where(keep, x, b).reshape((n * k * rows,) + tuple(inputs.shape[1:]))
            args = () if additional_forward_args is None else tuple(
                a.repeat_interleave(k * rows, dim=0) if isinstance(a, torch.Tensor) else a
                for a in (additional_forward_args if isinstance(additional_forward_args, tuple)
                          else (additional_forward_args,)))
            with torch.inference_mode():
                out = self.forward_func(perturbed, *args)
            out = out.reshape(n, k * rows, -1)
            picked = out.gather(2, target.reshape(n, 1, 1).expand(n, k * rows, 1)) if out.shape[2] > 1 else out
            pieces.append(picked.reshape(n, k, rows).mean(dim=2))
        return torch.cat(pieces, dim=1)


def _merge_repeats(coalitions: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each coalition once, weighted by the sum of its draws' weights: the same least squares
    (a repeated coalition has the same outputs), evaluated once. The sampler favours the
    smallest and largest coalitions, of which there are few: with 12 features, about a
    quarter of 256 draws repeat one."""
    unique, inverse = torch.unique(coalitions, dim=0, return_inverse=True)
    summed = torch.zeros(unique.shape[0], dtype=weights.dtype, device=weights.device).index_add_(0, inverse, weights)
    return unique, summed


def _feature_mask(feature_mask: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    """Group index per input value: shaped like one instance (every value its own by default),
    or ``(n, *instance shape)``, each instance its own (superpixels)."""
    width = inputs[0].numel()
    if feature_mask is None:
        return torch.arange(width, device=inputs.device).reshape(inputs.shape[1:])
    mask = feature_mask.to(inputs.device)
    if mask.shape[0] == 1 and mask.dim() == inputs.dim():
        mask = mask[0]
    per_instance = mask.dim() == inputs.dim()
    if (mask[0].numel() if per_instance else mask.numel()) != width or (per_instance and mask.shape[0] != inputs.shape[0]):
        raise MethodError(f"the feature mask has shape {tuple(mask.shape)}; the inputs {tuple(inputs.shape)}")
    return mask.long()


def _background(baselines: float | torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    """The background rows ``(rows, *instance shape)``: a constant, one row, or several."""
    if baselines is None:
        baselines = 0.0
    if not isinstance(baselines, torch.Tensor):
        return torch.full_like(inputs[:1], float(baselines))
    rows = baselines.to(inputs.device, inputs.dtype)
    if rows.dim() == inputs.dim() - 1:
        rows = rows.unsqueeze(0)
    return rows.expand((rows.shape[0],) + tuple(inputs.shape[1:]))


def _target_column(target, n: int, device) -> torch.Tensor:
    if target is None:
        return torch.zeros(n, dtype=torch.long, device=device)
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=device)
    return torch.as_tensor(target, device=device).reshape(-1).long().expand(n)


def _weighted_least_squares(coalitions: torch.Tensor, weights: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``(n, groups)``: per instance, the linear model with intercept fitted to its outputs
    on the coalitions under the kernel weights (what Captum fits with scikit-learn's
    ``LinearRegression(sample_weight=...)``), for every instance in one solve."""
    z = coalitions.double()
    design = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], dim=1)
    root = weights.double().sqrt().reshape(-1, 1)
    solution = torch.linalg.lstsq(design * root, outputs.double().T * root).solution  # (groups + 1, n)
    return solution[:-1].T
