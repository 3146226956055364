"""TracIn (Pruthi et al. 2020), its last-layer form, in matrix form: the influence of training
examples on explained instances, a training shard at a time.

TracIn scores a training example z for an instance z' by the sum over checkpoints of the
learning rate times the dot product of their loss gradients. Over the last linear layer's
weights the gradient of a cross-entropy loss is the outer product of J (the loss's gradient
with respect to the layer's output: softmax minus one-hot) and a (the layer's input), so the
dot product factors: (J·J')(a·a') (Captum's ``TracInCPFast``, the paper's appendix F). For a
block of instances against a block of training examples that is two small matrix products
and an element-wise one, summed over checkpoints: no per-pair loop.

Each worker scores a shard of the training set against every instance and keeps, per
instance, its ``k`` largest and ``k`` smallest scores (:class:`TopInfluences`, mergeable: the
driver merges the shards' exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LastLayerGradients:
    """Per example, the two factors of its last-layer loss gradient at one checkpoint."""

    jacobians: torch.Tensor
    """``(n, classes)``: the per-example cross-entropy's gradient with respect to the last
    layer's output, ``softmax(output) - onehot(target)``."""
    inputs: torch.Tensor
    """``(n, features)``: the last layer's input."""


def last_layer_gradients(model: nn.Module, final_layer: nn.Module, x: torch.Tensor,
                         targets: torch.Tensor) -> LastLayerGradients:
    """The factors of ``x``'s loss gradients on ``final_layer`` (a linear layer whose output
    is the model's, as Captum's ``TracInCPFast`` requires)."""
    captured = {}

    def keep_input(_module, args, _output):
        captured["input"] = args[0].detach()

    handle = final_layer.register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        handle.remove()
    jacobians = torch.softmax(output.double(), dim=1)
    jacobians[torch.arange(len(targets)), targets] -= 1.0
    return LastLayerGradients(jacobians, captured["input"].reshape(len(x), -1).double())


def tracin_scores(instances: list[LastLayerGradients], training: list[LastLayerGradients],
                  learning_rates: list[float]) -> torch.Tensor:
    """``(n_instances, n_training)``: Σ over checkpoints of lr · (J J'ᵀ) ∘ (A A'ᵀ), the
    factors of each checkpoint in the same order in both lists."""
    scores = None
    for test, train, rate in zip(instances, training, learning_rates, strict=True):
        term = rate * (test.jacobians @ train.jacobians.T) * (test.inputs @ train.inputs.T)
        scores = term if scores is None else scores + term
    return scores


class TopInfluences:
    """Per instance, the ``k`` training examples of largest score (proponents) and of
    smallest (opponents) among those seen, in the total order of (score, training id): ties
    rank the larger id higher. Mergeable: shards scored apart merge to exactly what one
    pass over all of them keeps."""

    def __init__(self, instances: int, k: int):
        self.k = k
        self.scores = np.empty((instances, 0))
        self.ids = np.empty((instances, 0), dtype=np.int64)

    def add(self, scores: np.ndarray, training_ids: np.ndarray) -> None:
        """Take a block ``(instances, m)`` of scores of the training examples ``training_ids``."""
        self._keep(np.concatenate([self.scores, scores], axis=1),
                   np.concatenate([self.ids, np.broadcast_to(training_ids, scores.shape)], axis=1))

    def merge(self, other: TopInfluences) -> None:
        self._keep(np.concatenate([self.scores, other.scores], axis=1), np.concatenate([self.ids, other.ids], axis=1))

    def _keep(self, scores: np.ndarray, ids: np.ndarray) -> None:
        if scores.shape[1] <= 2 * self.k:
            self.scores, self.ids = scores, ids
            return
        # Both ends of each row in one order: the first k and the last k (disjoint, as there are more than 2k).
        order = np.lexsort((ids, scores), axis=1)
        chosen = np.concatenate([order[:, :self.k], order[:, -self.k:]], axis=1)
        self.scores = np.take_along_axis(scores, chosen, axis=1)
        self.ids = np.take_along_axis(ids, chosen, axis=1)

    def proponents(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` per instance, largest first (at most ``k``)."""
        order = np.lexsort((self.ids, self.scores), axis=1)[:, ::-1][:, :self.k]
        return np.take_along_axis(self.scores, order, axis=1), np.take_along_axis(self.ids, order, axis=1)

    def opponents(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` per instance, smallest first (at most ``k``)."""
        order = np.lexsort((self.ids, self.scores), axis=1)[:, :self.k]
        return np.take_along_axis(self.scores, order, axis=1), np.take_along_axis(self.ids, order, axis=1)
