"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020)
for a Hugging Face vision transformer: how much each image patch feeds the [CLS] token
through every layer's attention.

Each layer's attention is averaged over its heads, the residual connection added as the
identity (``0.5·A + 0.5·I``, rows renormalised), and the layers multiplied from the first up;
the [CLS] row over the patch tokens, laid out on the patch grid, is the map. No Captum class
computes it, so :class:`AttentionRollout` takes Captum's shape (``attribute(inputs, target)``)
to sit in the method registry beside the others; the map does not depend on the target.
"""

from __future__ import annotations

from typing import Literal

import torch

from netloupe.contract.errors import MethodError

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
        size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
        if size is None or patch is None or not hasattr(config, "num_hidden_layers"):
            raise MethodError(f"{wanted}; this one is a {type(self.model).__name__}")
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.grid = (size[0] // patch[0], size[1] // patch[1])
        # Every layer's attention is held until the rollout: rows at a time so that they stay
        # within ATTENTION_BYTES (ViT-B at 224: 22 MB per image).
        tokens = self.grid[0] * self.grid[1] + 1
        per_row = 4 * config.num_hidden_layers * getattr(config, "num_attention_heads", 1) * tokens * tokens
        self.rows_per_call = max(1, ATTENTION_BYTES // per_row)

    def attribute(self, inputs: torch.Tensor, target=None,
                  head_fusion: Literal["mean", "max", "min"] = "mean") -> torch.Tensor:
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
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
        identity = torch.eye(tokens, dtype=attentions[0].dtype, device=inputs.device)
        rollout = identity.expand(inputs.shape[0], tokens, tokens)
        for attention in attentions:
            fused = getattr(attention, head_fusion)(dim=1)
            fused = fused.values if head_fusion != "mean" else fused
            flow = 0.5 * fused + 0.5 * identity
            rollout = (flow / flow.sum(dim=-1, keepdim=True)) @ rollout
        # The patch tokens are the last ones: a model may put more than [CLS] before them.
        return rollout[:, 0, tokens - patches:].reshape(-1, 1, *self.grid)

    def _attentions(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every layer's ``(n, heads, tokens, tokens)`` attention, from the eager implementation
        (SDPA returns none), the model's own restored after."""
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                return self.model(pixel_values=inputs, output_attentions=True).attentions
        finally:
            self.model.set_attn_implementation(previous)
