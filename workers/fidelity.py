"""How faithful an explanation is: the checks the explain workers run beside each method.

* **Deletion and insertion curves** (Petsiuk et al. 2018, RISE), per instance: rank the
  input's features by attribution, most positive first; the deletion curve is the target
  class's probability as the top ``k/K`` of them are set to a baseline, ``k = 0..K``; the
  insertion curve starts from the baseline and puts the top features back. A faithful map
  makes deletion fall fast (small area) and insertion rise fast (large area). Image
  features are pixels (channels summed; a layer map such as Grad-CAM's is upsampled to the
  input first), tabular features are the input's values.
* **Infidelity** and **sensitivity-max** (Yeh et al. 2019, Captum's ``captum.metrics``),
  per sampled instance: how well ``perturbation · attribution`` predicts the change of the
  target output (the model's own: a logit, probability or log-probability) under Gaussian
  perturbations, and how much the map moves under small uniform ones.
* **Model randomization** (Adebayo et al. 2018), per sampled instance: Spearman's rank
  correlation between the map for the trained model and for a copy whose weights were
  re-initialised. A method whose maps barely change is explaining the input, not the model.

Sampled instances are chosen by a seeded hash of their ids (:func:`in_sample`), so a batch
decides alone, the same instances are chosen however the run is sharded, and a retried
batch recomputes the same rows.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from netloupe.workers.model_output import output_probabilities


def in_sample(ids: list, seed: int, rate: float) -> np.ndarray:
    """Boolean mask of the ids whose seeded hash falls below ``rate`` (about ``rate`` of them)."""
    if rate <= 0:
        return np.zeros(len(ids), dtype=bool)
    threshold = min(rate, 1.0) * 2**64
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=8).digest(), "little")
                     < threshold for i in ids], dtype=bool)


def feature_scores(attributions: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor | None:
    """``(n, features)`` scores to rank an input's features by, or None when the map cannot be
    laid over the input (a layer map of a non-image input)."""
    n = attributions.shape[0]
    maps = attributions.detach().float()
    if len(input_shape) == 3:  # (channels, height, width): pixels
        if maps.dim() == 4:
            maps = maps.sum(dim=1, keepdim=True)
            if tuple(maps.shape[2:]) != tuple(input_shape[1:]):
                maps = F.interpolate(maps, size=tuple(input_shape[1:]), mode="bilinear", align_corners=False)
            return maps.reshape(n, -1)
        return None
    if tuple(maps.shape[1:]) == tuple(input_shape):
        return maps.reshape(n, -1)
    return None


def _masked(x: torch.Tensor, keep: torch.Tensor, baseline: float) -> torch.Tensor:
    """``x`` where ``keep`` (``(n, features)``, broadcast over an image's channels), else the baseline."""
    if x.dim() == 4:
        keep = keep.reshape(x.shape[0], 1, x.shape[2], x.shape[3])
    else:
        keep = keep.reshape(x.shape)
    return torch.where(keep, x, torch.full_like(x, baseline))


@torch.inference_mode()
def curve_ends(model: nn.Module, x: torch.Tensor, baseline: float, output: str,
               whole: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, classes)`` probabilities of the whole input (``whole`` when the caller has them)
    and of the all-baseline input: both ends of every deletion and insertion curve, whatever
    the map, so a batch computes them once. ``output``: what the model returns (``model.output``)."""
    if whole is None:
        whole = output_probabilities(model(x), output)
    return whole, output_probabilities(model(torch.full_like(x, baseline)), output)


@torch.inference_mode()
def deletion_insertion(model: nn.Module, x: torch.Tensor, scores: torch.Tensor, target: torch.Tensor,
                       steps: int, baseline: float, output: str,
                       ends: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(n, steps + 1)`` deletion and insertion curves of the target's probability.

    ``ends`` is :func:`curve_ends` of ``x`` when the caller has it (computed here otherwise):
    only the ``steps - 1`` inner points of each curve depend on the map.
    """
    n, features = scores.shape
    whole, empty = ends if ends is not None else curve_ends(model, x, baseline, output)
    # Rank of each feature, 0 = most attributed; ties broken by position (stable sort).
    order = torch.argsort(-scores, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(features, device=order.device).expand(n, -1))
    rows = torch.arange(n, device=x.device)
    deletion, insertion = [whole[rows, target]], [empty[rows, target]]
    for step in range(1, steps):
        top = rank < round(step * features / steps)
        for curve, keep in ((deletion, ~top), (insertion, top)):
            probabilities = output_probabilities(model(_masked(x, keep, baseline)), output)
            curve.append(probabilities[rows, target])
    deletion.append(empty[rows, target])
    insertion.append(whole[rows, target])
    return (torch.stack(deletion, 1).cpu().numpy().astype(np.float32),
            torch.stack(insertion, 1).cpu().numpy().astype(np.float32))


def curve_area(curves: np.ndarray) -> np.ndarray:
    """Area under each ``(n, K + 1)`` curve over feature fraction 0..1 (trapezoids)."""
    steps = curves.shape[1] - 1
    return ((curves[:, 1:] + curves[:, :-1]).sum(axis=1) / (2 * steps)).astype(np.float32)


def randomized_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every weight re-drawn: modules with ``reset_parameters`` get
    PyTorch's own initialisation (as Adebayo et al. re-initialise), other parameters a random
    permutation of their values (same distribution, no learned structure)."""
    randomized = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            reset = set()
            for module in randomized.modules():
                if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                    module.reset_parameters()
                    reset.update(id(p) for p in module.parameters(recurse=False))
            for parameter in randomized.parameters():
                if id(parameter) not in reset:
                    flat = parameter.reshape(-1)
                    flat.copy_(flat[torch.randperm(flat.numel(), generator=generator).to(flat.device)])
        finally:
            torch.random.set_rng_state(state)
    return randomized.eval()


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each row of ``a`` with the same row of ``b`` (average
    ranks for ties; NaN where a row is constant)."""
    from scipy.stats import rankdata

    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(axis=1) / denominator, np.nan)


def infidelity(model: nn.Module, x: torch.Tensor, attributions: torch.Tensor, target: torch.Tensor,
               perturbations: int, std: float) -> np.ndarray:
    """Captum's infidelity of each row's map under Gaussian perturbations of ``std``."""
    from captum.metrics import infidelity as captum_infidelity

    if tuple(attributions.shape) != tuple(x.shape):
        return np.full(x.shape[0], np.nan)  # a layer map is not comparable to input perturbations

    def perturb(inputs):
        noise = torch.randn_like(inputs) * std
        return noise, inputs - noise

    with torch.no_grad():
        values = captum_infidelity(model, perturb, x.detach(), attributions.detach(), target=target,
                                   n_perturb_samples=perturbations)
    return values.double().cpu().numpy()


def sensitivity_max(explain, x: torch.Tensor, target: torch.Tensor, perturbations: int, radius: float) -> np.ndarray:
    """Captum's sensitivity-max: the largest change of the map (Frobenius norm, relative to
    the map's own norm) over ``perturbations`` uniform perturbations of radius ``radius``."""
    from captum.metrics import sensitivity_max as captum_sensitivity

    def explanation(inputs, target):
        if isinstance(inputs, tuple):  # Captum passes perturbed inputs as a tuple
            (inputs,) = inputs
        # Captum expands a target per perturbed copy, except a single-instance one: give every
        # row its target, since the method cuts the rows into sub-batches.
        target = torch.as_tensor(target, device=inputs.device).reshape(-1)
        if target.numel() == 1:
            target = target.expand(inputs.shape[0])
        # Captum calls this under no_grad; gradient methods need autograd back.
        with torch.enable_grad():
            return (explain(inputs, target)[0].detach(),)  # Captum zips over a tuple of maps

    return captum_sensitivity(explanation, x.detach(), perturb_radius=radius, n_perturb_samples=perturbations,
                              target=target).double().cpu().numpy()
