"""Hugging Face checkpoints as netloupe models (``model.huggingface``).

A checkpoint is a local directory as ``save_pretrained`` writes it (``config.json``, weights
as safetensors), loaded with ``transformers``' Auto class for its task: image classification
(``...ForImageClassification``: the model takes ``pixel_values``) or sequence classification
(``...ForSequenceClassification``: ``input_ids``). Nothing is fetched (``local_files_only``):
this machine, like a cluster's nodes, may have no route to the hub, and a run must not depend
on what the hub serves today. Code shipped with a checkpoint (``auto_map``) runs only when the
spec opts in by name (``model.trust_remote_code``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from netloupe.contract.errors import ModelError
from netloupe.contract.spec import ModelSpec

TASKS = {
    "ForImageClassification": ("AutoModelForImageClassification", "pixel_values"),
    "ForSequenceClassification": ("AutoModelForSequenceClassification", "input_ids"),
}
"""Architecture name suffix → the Auto class that loads it and the input its forward takes."""
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
"""What a hub model id looks like (``bert-base-uncased``, ``google/vit-base-patch16-224``)."""


class HuggingFaceClassifier(nn.Module):
    """A Hugging Face classifier as netloupe calls every model: ``forward(inputs) → logits``.

    Its parameters, buffers and submodules are the checkpoint model's own, under the same
    names (``vit.layers.0``, not ``model.vit...``): layer names are those of the model's
    code and card, and its fingerprint is that of the checkpoint's state dict.
    """

    def __init__(self, model: nn.Module, input_name: str):
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        object.__setattr__(self, "checkpoint_model", model)  # not a submodule: its children are ours
        self.input_name = input_name

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``inputs`` (pixel values or token ids, with their attention mask)."""
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self.checkpoint_model(**{self.input_name: inputs}, **extra).logits

    @property
    def reads_text(self) -> bool:
        return self.input_name == "input_ids"

    def get_input_embeddings(self) -> nn.Module:
        return self.checkpoint_model.get_input_embeddings()

    def train(self, mode: bool = True) -> HuggingFaceClassifier:
        self.checkpoint_model.training = mode  # its own flag too: its forward reads it
        return super().train(mode)


def load_huggingface_model(spec: ModelSpec) -> HuggingFaceClassifier:
    """The classifier in the local checkpoint directory ``spec.huggingface``."""
    directory = Path(spec.huggingface).expanduser()
    config = _checkpoint_config(directory, spec.huggingface)
    architectures = config.get("architectures") or []
    task = next((TASKS[suffix] for name in architectures for suffix in TASKS if name.endswith(suffix)), None)
    if task is None:
        raise ModelError(
            f"the Hugging Face checkpoint {directory} is a {', '.join(architectures) or 'model of no architecture'} "
            f"(config.json's 'architectures'); netloupe explains classifiers: "
            f"{' or '.join('...' + suffix for suffix in TASKS)}. Save the classification model "
            "(e.g. AutoModelForSequenceClassification) with save_pretrained"
        )
    if config.get("auto_map") and not spec.trust_remote_code:
        raise ModelError(
            f"the Hugging Face checkpoint {directory} ships its own modelling code (auto_map in its "
            "config.json), which netloupe runs only when the spec opts in: set model.trust_remote_code: "
            "true if you trust the code in that directory"
        )
    try:
        import transformers
    except ImportError:
        raise ModelError("model.huggingface needs the transformers package: "
                         "pip install 'netloupe[transformers]'") from None
    auto_class, input_name = task
    transformers.utils.logging.disable_progress_bar()  # a bar per worker on the run's output otherwise
    try:
        model = getattr(transformers, auto_class).from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=spec.trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any failure to load is the same user problem
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ModelError(f"cannot load the Hugging Face checkpoint {directory}: {type(error).__name__}: "
                         f"{first_line[:400]}") from None
    # Outputs with names (.logits, .attentions): a config saved with return_dict false gives
    # tuples, which its own inner modules then misread (transformers 5).
    model.config.return_dict = True
    return HuggingFaceClassifier(model, input_name)


def _checkpoint_config(directory: Path, given: str) -> dict:
    """The checkpoint's ``config.json``, with an error that says what to fix."""
    if not directory.is_dir():
        if not directory.exists() and HUB_NAME.match(given):
            raise ModelError(
                f"model.huggingface {given!r} is not a local directory; netloupe loads checkpoints from "
                "local directories only and downloads nothing. Where the hub is reachable, save the model "
                "(and its tokenizer) with save_pretrained(DIR), copy DIR here and give its path"
            )
        raise ModelError(f"model.huggingface {given!r} is not a directory; give the directory that "
                         "save_pretrained wrote (it holds config.json and the weights)")
    path = directory / "config.json"
    if not path.is_file():
        raise ModelError(f"{directory} holds no config.json, so it is not a checkpoint as save_pretrained "
                         "writes it; give that directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{path} is not JSON ({error}); the checkpoint is damaged") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} holds a JSON {type(config).__name__}, not an object; the checkpoint is damaged")
    return config
