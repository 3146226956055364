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


class AttentionRollout:
    """Captum-shaped: ``AttentionRollout(model).attribute(inputs)`` → ``(n, 1, rows, cols)``."""

    def __init__(self, forward_func):
        from netloupe.workers.huggingface import HuggingFaceClassifier

        if not (isinstance(forward_func, HuggingFaceClassifier) and forward_func.input_name == "pixel_values"):
            raise MethodError("attention_rollout explains a Hugging Face vision transformer (model.huggingface: "
                              "an image classifier's checkpoint); this model is not one")
        self.model = forward_func.checkpoint_model
        config = self.model.config
        size, patch = config.image_size, config.patch_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.grid = (size[0] // patch[0], size[1] // patch[1])

    def attribute(self, inputs: torch.Tensor, target=None,
                  head_fusion: Literal["mean", "max", "min"] = "mean") -> torch.Tensor:
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
        attentions = self._attentions(inputs.detach())
        tokens = attentions[0].shape[-1]
        identity = torch.eye(tokens, dtype=attentions[0].dtype, device=inputs.device)
        rollout = identity.expand(inputs.shape[0], tokens, tokens)
        for attention in attentions:
            fused = getattr(attention, head_fusion)(dim=1)
            fused = fused.values if head_fusion != "mean" else fused
            flow = 0.5 * fused + 0.5 * identity
            rollout = (flow / flow.sum(dim=-1, keepdim=True)) @ rollout
        patches = self.grid[0] * self.grid[1]
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
