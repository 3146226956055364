"""What a model's output means, and its class probabilities.

A model may end in logits (the usual), a softmax (exported and Keras-style models) or a
log-softmax. Softmaxing a softmax again flattens it toward uniform, so the spec says which
(``model.output``) and validation checks the claim against the model's actual rows.
Attributions are not touched: they explain the model's own output, as Captum does.
"""

from __future__ import annotations

import torch

from netloupe.contract.errors import ModelError

SUM_TOLERANCE = 5e-3
"""How far from 1 a row of probabilities may sum (half-precision softmaxes are ~1e-3 off)."""


def output_probabilities(outputs: torch.Tensor, kind: str) -> torch.Tensor:
    """``(n, classes)`` class probabilities from the model's ``(n, classes)`` outputs."""
    outputs = outputs.float()
    if kind == "logits":
        return torch.softmax(outputs, dim=1)
    if kind == "probabilities":
        return outputs
    if kind == "log_probabilities":
        return outputs.exp()
    raise ValueError(f"unknown output kind {kind!r}; expected logits, probabilities or log_probabilities")


def looks_like_probabilities(outputs: torch.Tensor) -> bool:
    """Every row non-negative and summing to 1."""
    outputs = outputs.double()
    return bool((outputs >= -SUM_TOLERANCE).all() and ((outputs.sum(dim=1) - 1).abs() <= SUM_TOLERANCE).all())


def looks_like_log_probabilities(outputs: torch.Tensor) -> bool:
    """Every row non-positive with ``logsumexp`` 0 (its exponentials sum to 1)."""
    outputs = outputs.double()
    return bool((outputs <= SUM_TOLERANCE).all() and (outputs.logsumexp(dim=1).abs() <= SUM_TOLERANCE).all())


def observed_kind(outputs: torch.Tensor) -> str:
    """The kind the rows look like: ``logits`` unless they look like (log) probabilities."""
    if looks_like_probabilities(outputs):
        return "probabilities"
    if looks_like_log_probabilities(outputs):
        return "log_probabilities"
    return "logits"


def _describe(outputs: torch.Tensor) -> str:
    outputs = outputs.double()
    sums = outputs.sum(dim=1)
    return (f"values from {outputs.min().item():.4g} to {outputs.max().item():.4g}, row sums from "
            f"{sums.min().item():.4g} to {sums.max().item():.4g}")


def check_output_kind(outputs: torch.Tensor, kind: str) -> None:
    """Raise :class:`ModelError` when the ``(n, classes)`` outputs of the validation rows
    contradict ``model.output``. Rows with a non-finite value (flagged inputs) are left out;
    with one class there is nothing to tell apart. Log-probabilities declared as logits
    pass: softmax of a log-softmax is the same softmax, so the probabilities come out right."""
    outputs = outputs[torch.isfinite(outputs).all(dim=1)]
    if outputs.shape[0] == 0 or outputs.shape[1] < 2:
        return
    seen = observed_kind(outputs)
    if kind == "logits" and seen == "probabilities":
        raise ModelError(
            f"model.output is 'logits', but the model's outputs on the validation rows look like probabilities "
            f"({_describe(outputs)}): the model seems to end in a softmax, and softmaxing them again would "
            "store wrong probabilities. Set model.output: probabilities"
        )
    if kind != "logits" and seen != kind:
        hint = f"set model.output: {seen}" if seen != "logits" else "set model.output: logits (the default)"
        raise ModelError(
            f"model.output is {kind!r}, but the model's outputs on the validation rows are not "
            f"{kind.replace('_', '-')} ({_describe(outputs)}); {hint}"
        )
