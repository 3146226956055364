"""A vision transformer's token layers as maps over its patch grid, for Captum's layer methods.

A ViT block outputs ``(n, tokens, hidden)``: [CLS] (and any other leading tokens) then one
token per image patch. Grad-CAM weighs a layer's channels by their mean gradient over its
spatial positions, which a token tensor does not have; laid out as ``(n, hidden, rows, cols)``
its patches are a conv map, and Grad-CAM means there what it means on a CNN (the reshape of
Chefer et al. and of pytorch-grad-cam's ViT recipe).

:class:`PatchGrid` is that layout as a module, so Captum can hook it like any layer: a forward
hook on the token layer passes the patch tokens through it and puts its output back in their
place (the same numbers), so the model computes exactly what it did and gradients reach the
layer through the grid.
"""

from __future__ import annotations

import torch
from torch import nn

from netloupe.contract.errors import MethodError


def patch_grid_of(model: nn.Module) -> tuple[int, int] | None:
    """``(rows, cols)`` of patches of a Hugging Face image checkpoint whose config states
    ``image_size`` and ``patch_size`` (ViT, DeiT); None for any other model."""
    config = getattr(getattr(model, "checkpoint_model", None), "config", None)
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if getattr(model, "input_name", None) != "pixel_values" or size is None or patch is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return size[0] // patch[0], size[1] // patch[1]


class PatchGrid(nn.Module):
    """``(n, patches, hidden)`` → ``(n, hidden, rows, cols)``: the patch tokens as a map."""

    def __init__(self, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *self.grid)


def patch_grid_layer(layer_name: str, layer: nn.Module, grid: tuple[int, int]) -> PatchGrid:
    """A :class:`PatchGrid` that ``layer``'s output runs through on every forward pass, for
    Captum to hook in its place; the hook stays for the model's life (it changes no number)."""
    adaptor = PatchGrid(grid)
    patches = grid[0] * grid[1]

    def hook(_module, _inputs, output):
        tokens = output[0] if isinstance(output, tuple) else output
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[1] < patches:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise MethodError(f"a layer method on a vision transformer takes a layer that outputs its tokens "
                              f"(n, tokens, hidden), {patches} of them patches; {layer_name!r} outputs {shape}: "
                              "choose a block (such as vit.layers.N) or its layer norm")
        mapped = adaptor(tokens[:, -patches:]).flatten(2).transpose(1, 2)
        rebuilt = torch.cat([tokens[:, :-patches], mapped], dim=1)
        return (rebuilt, *output[1:]) if isinstance(output, tuple) else rebuilt

    layer.register_forward_hook(hook)
    return adaptor
