"""Recording layer activations with forward hooks, pooled to one vector per instance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from netloupe.contract.errors import ModelError, did_you_mean
from netloupe.contract.spec import AUTO_POOLING

TOKEN_POOLINGS = ("token_mean", "first_token")
"""Poolings over the tokens of a transformer's ``(n, tokens, hidden)`` vectors."""


def pool_activation(output: torch.Tensor, pooling: str, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, c, *spatial)`` → ``(n, c)`` by mean or max, or ``(n, c·spatial)`` for ``none``;
    ``(n, tokens, hidden)`` → ``(n, hidden)`` by ``token_mean`` or ``first_token``.

    Outputs without spatial dimensions (``(n, features)``) pass through unchanged.
    ``auto`` (a checkpoint's layers by default: they mix token blocks, poolers and heads) is
    ``token_mean`` for token vectors and ``mean`` for any other output.

    With ``token_mask`` (a padded batch of texts, ``(n, tokens)``), token vectors are pooled
    over each instance's own tokens only: a plain mean would count the padding, which depends
    on the batch.
    """
    if pooling == AUTO_POOLING:
        pooling = "token_mean" if output.dim() == 3 else "mean"
    if token_mask is not None and output.dim() == 3 and output.shape[1] == token_mask.shape[1]:
        if pooling == "first_token":
            return output[:, 0]
        if pooling != "token_mean":
            raise ValueError(f"pooling {pooling!r} of token vectors {tuple(output.shape)} would depend on the "
                             "batch's padding; use token_mean or first_token")
        weights = token_mask.to(output.dtype).unsqueeze(-1)
        return (output * weights).sum(dim=1) / weights.sum(dim=1)
    if pooling in TOKEN_POOLINGS:
        if output.dim() != 3:
            raise ValueError(f"pooling {pooling!r} takes token vectors (n, tokens, hidden), "
                             f"got an output of shape {tuple(output.shape)}")
        return output.mean(dim=1) if pooling == "token_mean" else output[:, 0]
    if output.dim() <= 2 or pooling == "none":
        return output.reshape(output.shape[0], -1)
    flat = output.reshape(output.shape[0], output.shape[1], -1)
    if pooling == "mean":
        return flat.mean(dim=2)
    if pooling == "max":
        return flat.amax(dim=2)
    raise ValueError(f"pooling must be 'mean', 'max', 'none', 'token_mean' or 'first_token', got {pooling!r}")


def find_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The modules called ``names``; an unknown name is a :class:`ModelError` naming close ones."""
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in modules or name == "":
            raise ModelError(
                f"the model has no layer {name!r}; {did_you_mean(name, [n for n in modules if n])} "
                "(names are those of model.named_modules(); `netloupe layers SPEC` lists them)"
            )
        found[name] = modules[name]
    return found


class LayerCapture:
    """Forward hooks that keep the pooled output of chosen layers during one forward pass.

    Use as a context manager around the forward pass; :attr:`activations` then maps each
    layer name to a detached ``(n, neurons)`` float32 tensor.
    """

    def __init__(self, model: nn.Module, layers: Sequence[tuple[str, str]]):
        self.layers = list(layers)
        if self.layers and isinstance(model, torch.jit.ScriptModule):
            raise ModelError(
                "layers cannot be recorded from a TorchScript model (it does not support "
                "forward hooks); give model.factory with the Python model instead, or drop 'layers'"
            )
        self.modules = find_modules(model, [name for name, _ in self.layers])
        self.activations: dict[str, torch.Tensor] = {}
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        """Per-instance output shape of each layer before pooling (from the last pass)."""
        self._handles = []
        self.token_mask: torch.Tensor | None = None
        """The attention mask of the batch of texts being run (masked token pooling), else None."""

    def __enter__(self) -> "LayerCapture":
        self.activations = {}
        for name, pooling in self.layers:
            self._handles.append(self.modules[name].register_forward_hook(self._hook(name, pooling)))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        missing = [name for name, _ in self.layers if name not in self.activations]
        if exc_type is None and missing:
            raise ModelError(
                f"layer(s) {missing} did not run in the forward pass, so they have no "
                "activations; record modules that the model's forward() calls"
            )

    def _hook(self, name: str, pooling: str):
        def hook(_module, _inputs, output):
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                output = output[0]  # a transformer block's (hidden states, attentions, ...)
            if not isinstance(output, torch.Tensor):
                raise ModelError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor; "
                    "record one of its submodules instead"
                )
            if name in self.activations:
                raise ModelError(
                    f"layer {name!r} ran twice in one forward pass, so its activation is "
                    "ambiguous; record a module that is used once"
                )
            self.output_shapes[name] = tuple(output.shape[1:])
            try:
                self.activations[name] = pool_activation(output.detach(), pooling, self.token_mask).float()
            except ValueError as error:
                raise ModelError(f"layer {name!r}: {error}; choose its pooling among mean, max and none "
                                 "(channels first), or token_mean and first_token (tokens)") from None
        return hook
