"""Attribution methods on a text classifier's tokens: Captum's classes on the embedding layer
(token ids are not differentiable), one value per token.

* ``integrated_gradients``: Captum's ``LayerIntegratedGradients`` on the input embeddings, from
  the baseline text (each own non-special token replaced by ``text.baseline_token``) with the
  attention mask as an additional forward argument; completeness holds for the summed values,
  and the convergence delta is stored as for images;
* ``input_x_gradient``: ``LayerGradientXActivation`` (gradient × embedding);
* ``saliency``: the embedding gradient (``LayerGradientXActivation`` without the
  multiplication), its absolute value unless ``params.abs`` is false;
* ``occlusion``: Captum's ``FeatureAblation`` with one feature per token: the target output's
  drop when that token alone is replaced by the baseline token;
* ``attention`` and ``attention_rollout`` (:mod:`netloupe.workers.attention`, not Captum): one
  layer's attention from the first token, and the rollout's flow into it through every layer,
  each over the text's tokens; the target plays no part.

An embedding-level map ``(n, tokens, hidden)`` becomes one value per token by
``text.hidden_reduction``: ``sum`` (what completeness adds up) or ``l2`` (the norm, unsigned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from captum.attr import FeatureAblation, LayerGradientXActivation, LayerIntegratedGradients

from netloupe.contract.errors import MethodError, did_you_mean
from netloupe.workers.attention import check_head_fusion, eager_attentions, first_token_attention, rollout
from netloupe.workers.methods import METHODS
from netloupe.workers.text import TextEncoder, TokenBatch, length_chunks


@dataclass(frozen=True)
class TokenMethod:
    """How one registered method runs on tokens."""

    name: str
    description: str
    """What it computes, in Captum's terms."""
    parameters: dict[str, Any]
    """The ``params`` a spec may set, with netloupe's defaults."""
    on_embeddings: bool = True
    """Computed on the embedding layer's output (else on the token ids: occlusion)."""
    reads_attention: bool = False
    """Reads the checkpoint's attention weights (a Hugging Face model's ``output_attentions``)."""
    has_convergence_delta: bool = False
    rows_per_instance_parameter: str | None = None
    """The parameter that multiplies an instance's rows in one pass (``n_steps``)."""
    takes_baseline_token: bool = False
    """Compares the text with its words replaced by ``text.baseline_token``."""


TOKEN_METHODS = {m.name: m for m in (
    TokenMethod("integrated_gradients", "LayerIntegratedGradients on the input embeddings, from text.baseline_token",
                {"n_steps": METHODS["integrated_gradients"].defaults["n_steps"], "method": "gausslegendre"},
                has_convergence_delta=True, rows_per_instance_parameter="n_steps", takes_baseline_token=True),
    TokenMethod("input_x_gradient", "LayerGradientXActivation on the input embeddings (gradient x embedding)", {}),
    TokenMethod("saliency", "the input embeddings' gradient (LayerGradientXActivation, not multiplied)",
                {"abs": True}),
    TokenMethod("occlusion", "FeatureAblation, each token replaced by text.baseline_token in turn", {},
                on_embeddings=False, takes_baseline_token=True),
    TokenMethod("attention", "one layer's attention from the first token ([CLS]), heads fused (not Captum)",
                {"layer": -1, "head_fusion": "mean"}, on_embeddings=False, reads_attention=True),
    TokenMethod("attention_rollout", "the attention flow into the first token through every layer "
                "(Abnar & Zuidema 2020; not Captum)", {"head_fusion": "mean"}, on_embeddings=False,
                reads_attention=True),
)}
"""The methods that explain text, by their registry name."""


@dataclass
class BoundTokenMethod:
    """A token method bound to one model: ``(batch, target) → ((n, tokens) values, delta)``."""

    method: TokenMethod
    table_name: str
    model: torch.nn.Module
    encoder: TextEncoder
    params: dict[str, Any]
    baseline_token: str
    hidden_reduction: str
    chunk_rows: int

    @property
    def stochastic(self) -> bool:
        return False

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def __call__(self, batch: TokenBatch, target: torch.Tensor):
        """``(n, tokens)`` values (0 at padding) and the delta per text (or None), in the batch's order.

        The texts go through Captum in chunks of similar length (shortest first), each chunk
        padded only to its own longest: padding a whole batch to its longest text computed
        about as many padding positions as tokens on real snippets (54% of positions, rt-bert).
        A text's values do not depend on its chunk (the mask hides the padding).
        """
        rows = self.params.get(self.method.rows_per_instance_parameter, 1) if self.method.rows_per_instance_parameter else 1
        width = batch.input_ids.shape[1]
        order = np.argsort(batch.lengths, kind="stable")
        values, deltas = [], []
        # Budget: chunk_rows texts of max_length (what the chunk size was measured for), so
        # short texts go many at a time and long ones few.
        for chosen in length_chunks(batch.lengths[order], rows, self.chunk_rows * self.encoder.max_length):
            chosen = order[chosen]
            result, delta = self._attribute(batch.take(chosen), target[torch.as_tensor(chosen, device=target.device)])
            values.append(torch.nn.functional.pad(result, (0, width - result.shape[1])))
            if delta is not None:
                deltas.append(delta)
        back = torch.as_tensor(np.argsort(order, kind="stable"), device=target.device)
        return torch.cat(values)[back], torch.cat(deltas)[back] if deltas else None

    def _attribute(self, batch: TokenBatch, target: torch.Tensor):
        name, params = self.method.name, dict(self.params)
        ids, mask = batch.input_ids, batch.attention_mask
        embeddings = self.model.get_input_embeddings()
        delta = None
        if name == "integrated_gradients":
            method = LayerIntegratedGradients(self._forward, embeddings)
            # The chunk was cut to fit the budget with all its steps: one pass.
            params.setdefault("internal_batch_size", len(batch) * params["n_steps"])
            result, delta = method.attribute(ids, baselines=self.encoder.baseline_ids(batch, self.baseline_token),
                                             additional_forward_args=(mask,), target=target,
                                             return_convergence_delta=True, **params)
        elif name in ("input_x_gradient", "saliency"):
            method = LayerGradientXActivation(self._forward, embeddings, multiply_by_inputs=name == "input_x_gradient")
            result = method.attribute(ids, target=target, additional_forward_args=(mask,))
            if name == "saliency" and params["abs"]:
                result = result.abs()
        elif self.method.reads_attention:
            attentions = eager_attentions(self.model.checkpoint_model, input_ids=ids, attention_mask=mask)
            if name == "attention":
                result = first_token_attention(attentions, params["layer"], params["head_fusion"])
            else:
                result = rollout(attentions, params["head_fusion"])[:, 0, :]
            return result * mask, None
        else:
            method = FeatureAblation(self._forward)
            feature_mask = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            budget = self.chunk_rows * self.encoder.max_length  # tokens per pass, as in __call__
            per_eval = max(1, min(ids.shape[1], budget // max(1, len(batch) * ids.shape[1])))
            return method.attribute(ids, baselines=self.encoder.baseline_ids(batch, self.baseline_token),
                                    additional_forward_args=(mask,), target=target, feature_mask=feature_mask,
                                    perturbations_per_eval=per_eval) * mask, None
        reduced = result.sum(dim=-1) if self.hidden_reduction == "sum" else result.norm(dim=-1)
        return reduced * mask, delta


def bind_token_method(spec, model: torch.nn.Module, encoder: TextEncoder, baseline_token: str,
                      hidden_reduction: str, chunk_rows: int, example: TokenBatch) -> BoundTokenMethod:
    """One ``MethodSpec`` bound to a text classifier, its parameters checked (on the texts of ``example``)."""
    method = TOKEN_METHODS.get(spec.method)
    if method is None:
        raise MethodError(f"{spec.table_name}: {spec.method} does not explain text yet; the methods on tokens are "
                          f"{sorted(TOKEN_METHODS)}")
    for field, value in (("layer", spec.layer), ("noise_tunnel", spec.noise_tunnel)):
        if value is not None:
            raise MethodError(f"{spec.table_name}: {field} does not apply to a method on tokens; remove it")
    if spec.baseline != 0.0:
        raise MethodError(f"{spec.table_name}: 'baseline' is a constant input value; on tokens the baseline is "
                          "text.baseline_token (pad or mask)")
    for key in spec.params:
        if key not in method.parameters and not (key == "internal_batch_size" and method.has_convergence_delta):
            raise MethodError(f"{spec.table_name}: {spec.method} on tokens has no parameter {key!r}; "
                              f"{did_you_mean(key, list(method.parameters))}")
    if method.on_embeddings and not hasattr(model, "get_input_embeddings"):
        raise MethodError(f"{spec.table_name}: {spec.method} needs the model's input embeddings "
                          "(get_input_embeddings)")
    if (method.takes_baseline_token and encoder.baseline_id(baseline_token) == encoder.tokenizer.pad_token_id
            and reads_last_token_not_pad(model, example, encoder.tokenizer.pad_token_id)):
        raise MethodError(
            f"{spec.table_name}: this classifier reads the last token that is not its pad token (as GPT-2 and Llama "
            f"do), so a baseline of pad tokens moves the token it reads and {spec.method}'s values would not add up "
            "to the output's change; set text.baseline_token to 'unk' or 'mask' (a token that is not the pad token)")
    params = {**method.parameters, **spec.params}
    if method.reads_attention:
        _check_attention(spec, model, params)
    return BoundTokenMethod(method, spec.table_name, model, encoder, params, baseline_token, hidden_reduction,
                            chunk_rows)


def reads_last_token_not_pad(model: torch.nn.Module, example: TokenBatch, pad_id: int) -> bool:
    """Whether the classifier reads the last token that is not ``pad_id`` (a decoder's
    ``...ForSequenceClassification``: causal attention, ``config.pad_token_id``): its output
    ignores a pad token appended unmasked, where an encoder's changes (every token sees it)."""
    ids = example.input_ids[:1, : int(example.lengths[0])]
    longer = torch.cat([ids, torch.full_like(ids[:, :1], pad_id)], dim=1)
    with torch.no_grad():
        alone, appended = model(ids, torch.ones_like(ids)), model(longer, torch.ones_like(longer))
    return torch.allclose(alone, appended, rtol=1e-5, atol=1e-6)


def _check_attention(spec, model: torch.nn.Module, params: dict[str, Any]) -> None:
    """An attention method's model (a Hugging Face checkpoint) and parameters."""
    checkpoint = getattr(model, "checkpoint_model", None)
    layers = getattr(getattr(checkpoint, "config", None), "num_hidden_layers", None)
    if layers is None:
        raise MethodError(f"{spec.table_name}: {spec.method} reads a Hugging Face transformer's attention weights "
                          "(model.huggingface); this model is not one")
    try:
        check_head_fusion(params["head_fusion"])
    except MethodError as error:
        raise MethodError(f"{spec.table_name}: {error}") from None
    layer = params.get("layer", -1)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -layers <= layer < layers:
        raise MethodError(f"{spec.table_name}: params.layer is the index of an attention layer, 0 to {layers - 1} "
                          f"(or -1 for the last); got {layer!r}")
