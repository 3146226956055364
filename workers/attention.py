"""Attention as an explanation of a Hugging Face transformer: how much each token (an image's
patches, a text's tokens) feeds the first token ([CLS]), which the classifier reads.

* :func:`first_token_attention`: one layer's attention from the first token, its heads fused
  (averaged by default);
* :func:`rollout` (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020): each
  layer's fused attention with the residual connection added as the identity
  (``0.5·A + 0.5·I``, rows renormalised), the layers multiplied from the first up; its first
  row is the flow from every token into the first token through every layer.

No Captum class computes either, so :class:`AttentionRollout` (vision transformers: the map on
the patch grid) takes Captum's shape (``attribute(inputs, target)``) to sit in the method
registry beside the others; text runs call the functions from
:mod:`netloupe.workers.token_methods`. Neither depends on the target.
"""

from __future__ import annotations

from typing import Literal

import torch

from netloupe.contract.errors import MethodError
from netloupe.workers.patch_grid import patch_grid_of

HEAD_FUSIONS = ("mean", "max", "min")
ATTENTION_BYTES = 256 * 2**20
"""Most bytes of attention weights held at once (every layer's, for the rows of one call)."""


class AttentionRollout:
    """Captum-shaped: ``AttentionRollout(model).attribute(inputs)`` → ``(n, 1, rows, cols)``."""

    def __init__(self, forward_func):
        from netloupe.workers.huggingface import HuggingFaceClassifier

        wanted = ("attention_rollout explains a Hugging Face vision transformer (model.huggingface: an image "
                  "classifier's checkpoint whose config has image_size and patch_size, such as ViT or DeiT)")
        if not (isinstance(forward_func, HuggingFaceClassifier) and forward_func.input_name == "pixel_values"):
            raise MethodError(f"{wanted}; this model is not one")
        self.model = forward_func.checkpoint_model
        config = self.model.config
        grid = patch_grid_of(forward_func)
        if grid is None or not hasattr(config, "num_hidden_layers"):
            raise MethodError(f"{wanted}; this one is a {type(self.model).__name__}")
        self.grid = grid
        # Every layer's attention is held until the rollout: rows at a time so that they stay
        # within ATTENTION_BYTES (ViT-B at 224: 22 MB per image).
        tokens = self.grid[0] * self.grid[1] + 1
        per_row = 4 * config.num_hidden_layers * getattr(config, "num_attention_heads", 1) * tokens * tokens
        self.rows_per_call = max(1, ATTENTION_BYTES // per_row)

    def attribute(self, inputs: torch.Tensor, target=None,
                  head_fusion: Literal["mean", "max", "min"] = "mean") -> torch.Tensor:
        check_head_fusion(head_fusion)
        return torch.cat([self._rollout(rows, head_fusion) for rows in inputs.detach().split(self.rows_per_call)])

    def _rollout(self, inputs: torch.Tensor, head_fusion: str) -> torch.Tensor:
        attentions = self._attentions(inputs)
        if not attentions:
            raise MethodError(f"attention_rollout needs the model's attention weights; {type(self.model).__name__} "
                              "returns none (output_attentions)")
        patches = self.grid[0] * self.grid[1]
        tokens = attentions[0].shape[-1]
        shape = (inputs.shape[0], attentions[0].shape[1], tokens, tokens)
        if tokens < patches or any(tuple(attention.shape) != shape for attention in attentions):
            # Windowed attention (Swin) or pooled tokens: no single [CLS] row over the patches.
            raise MethodError(f"attention_rollout needs every layer's attention over all {patches} patches "
                              f"(n, heads, tokens, tokens); {type(self.model).__name__} returned "
                              f"{[tuple(a.shape) for a in attentions[:2]]}...")
        # The patch tokens are the last ones: a model may put more than [CLS] before them.
        flow = rollout(attentions, head_fusion)[:, 0, tokens - patches:]
        return flow.reshape(-1, 1, *self.grid)

    def _attentions(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return eager_attentions(self.model, pixel_values=inputs)


def check_head_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise MethodError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def fused_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """``(n, heads, tokens, tokens)`` → ``(n, tokens, tokens)``: the heads' mean, max or min."""
    fused = getattr(attention, head_fusion)(dim=1)
    return fused if head_fusion == "mean" else fused.values


def first_token_attention(attentions: tuple[torch.Tensor, ...], layer: int, head_fusion: str) -> torch.Tensor:
    """``(n, tokens)``: layer ``layer``'s attention from the first token over every token."""
    return fused_heads(attentions[layer], head_fusion)[:, 0, :]


def rollout(attentions: tuple[torch.Tensor, ...], head_fusion: str) -> torch.Tensor:
    """``(n, tokens, tokens)``: the attention flow through every layer (Abnar & Zuidema).

    A padded position gets no attention (the mask), so nothing flows through it into a real
    token's row: an instance's rollout does not depend on its batch's padding.
    """
    first = attentions[0]
    tokens = first.shape[-1]
    identity = torch.eye(tokens, dtype=first.dtype, device=first.device)
    flowed = identity.expand(first.shape[0], tokens, tokens)
    for attention in attentions:
        flow = 0.5 * fused_heads(attention, head_fusion) + 0.5 * identity
        flowed = (flow / flow.sum(dim=-1, keepdim=True)) @ flowed
    return flowed


def eager_attentions(model: torch.nn.Module, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every layer's ``(n, heads, tokens, tokens)`` attention, from the eager implementation
    (SDPA returns none), the model's own restored after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
