"""Model resolution: an entry point (plus optional weights) or a TorchScript file → ``nn.Module``.

Weights are read without executing code: safetensors, or ``torch.load(weights_only=True)``;
full pickle only when the spec opts in by name (``model.allow_unsafe_pickle``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.spec import ModelSpec


def import_entry_point(entry_point: str):
    """``package.module:attribute`` → the attribute, with errors that say what to fix."""
    module_name, _, attribute = entry_point.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(
            f"cannot import module {module_name!r} of model.factory {entry_point!r}: {error}. "
            "Install the package that defines it, or add its directory to PYTHONPATH"
        ) from None
    except Exception as error:  # noqa: BLE001 - user code failed while importing
        raise ModelError(
            f"importing module {module_name!r} of model.factory {entry_point!r} raised "
            f"{type(error).__name__}: {error}"
        ) from error
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            from pipeline.errors import did_you_mean

            raise ModelError(
                f"module {module_name!r} has no {attribute!r} (from model.factory "
                f"{entry_point!r}); {did_you_mean(attribute, public)}"
            )
        target = getattr(target, part)
    return target


def _is_safetensors(file: Path) -> bool:
    """Safetensors files start with an 8-byte header length and a JSON header."""
    with open(file, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_state_dict(path: str, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, executing no code
    unless ``allow_unsafe_pickle`` (then a pickled module gives its state dict)."""
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"weights file {path} does not exist; check model.weights")
    try:
        if _is_safetensors(file):
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        state = torch.load(file, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except Exception as error:  # noqa: BLE001 - any failure to parse is the same user problem
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelError(
            f"cannot read weights file {path}: {type(error).__name__}: {first_line}. It must be a "
            ".safetensors file or a state dict saved with torch.save (no pickled classes); a checkpoint "
            "that pickles classes loads only with model.allow_unsafe_pickle: true, which runs code from "
            "the file: set it only for files you trust"
        ) from None
    if allow_unsafe_pickle and isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path} holds a {type(state).__name__}, expected a state dict")
    return state


def _names(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: nn.Module, spec: ModelSpec) -> list[str]:
    """Load ``spec.weights`` into the factory's ``model``; return the names of the parameters
    and buffers the file did not set (they keep the factory's values: fine when the factory
    fixes them, as with computed position ids; a fresh random head otherwise, which every
    worker's fingerprint check then refuses). A tensor the model lacks, or of another shape,
    means another architecture and is refused."""
    state = load_state_dict(spec.weights, spec.allow_unsafe_pickle)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that do not match
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise ModelError(
            f"weights {spec.weights} do not fit the model from {spec.factory!r}: {' '.join(lines)[:600]}. "
            "Check that the file was saved from this architecture"
        ) from None
    if result.unexpected_keys:
        raise ModelError(
            f"weights {spec.weights} do not fit the model from {spec.factory!r}: the file holds tensors "
            f"the model does not have ({_names(result.unexpected_keys)}). "
            "Check that the file was saved from this architecture"
        )
    return sorted(result.missing_keys)


def weights_report(unset: list[str], spec: ModelSpec) -> str | None:
    """A line saying which parameters ``model.weights`` left to the factory, or None."""
    if not unset:
        return None
    return (f"note: model.weights {spec.weights} did not set {_names(unset)}; they keep the values "
            f"{spec.factory} gives them (every worker is checked to build the same)")


def load_model(spec: ModelSpec) -> nn.Module:
    """Build the model the spec names, load its weights, and put it in eval mode."""
    return load_model_reporting(spec)[0]


def load_model_reporting(spec: ModelSpec) -> tuple[nn.Module, list[str]]:
    """:func:`load_model`, and the names of the parameters and buffers ``model.weights``
    did not set (:func:`load_weights`)."""
    unset: list[str] = []
    if spec.torchscript is not None:
        path = Path(spec.torchscript)
        if not path.is_file():
            raise ModelError(f"TorchScript file {path} does not exist; check model.torchscript")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # noqa: BLE001 - reported to the user with its cause
            raise ModelError(f"cannot load TorchScript file {path}: {error}") from None
    else:
        factory = import_entry_point(spec.factory)
        if not callable(factory):
            raise ModelError(f"model.factory {spec.factory!r} is a {type(factory).__name__}, not a callable")
        try:
            model = factory(**spec.kwargs)
        except Exception as error:  # noqa: BLE001 - user code: report what it raised
            raise ModelError(
                f"model.factory {spec.factory!r} raised {type(error).__name__}: {error}"
            ) from error
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"model.factory {spec.factory!r} returned a {type(model).__name__}; it must "
                "return a torch.nn.Module"
            )
        if spec.weights is not None:
            unset = load_weights(model, spec)
    model.eval()
    for parameter in model.parameters():
        # Attribution methods need gradients of the input only; parameter gradients
        # would double the backward work.
        parameter.requires_grad_(False)
    return model, unset


MODEL_GRAPH_NODE_LIMIT = 2000
"""Nodes kept of a model's graph in the manifest; a larger graph is cut (and says so)."""


def model_graph(model: nn.Module) -> dict:
    """The model's structure for the dashboard's overview, as JSON-able data.

    ``{"kind": "fx", ...}`` when ``torch.fx`` traces the model: one node per operation in
    execution order, ``inputs`` naming the nodes it reads, ``module`` the qualified name of
    the submodule it calls (what ``layers`` name). Otherwise ``{"kind": "modules", ...}``:
    the module tree, each module's parent as its only input. ``reason`` says why fx failed.
    """
    nodes, kind, reason = None, "fx", None
    if not isinstance(model, torch.jit.ScriptModule):
        try:
            traced = torch.fx.symbolic_trace(model)
            nodes = [
                {
                    "id": node.name,
                    "op": node.op,
                    "module": node.target if node.op == "call_module" else None,
                    "type": (type(traced.get_submodule(node.target)).__name__ if node.op == "call_module"
                             else getattr(node.target, "__name__", str(node.target))),
                    "inputs": [n.name for n in node.all_input_nodes],
                }
                for node in traced.graph.nodes
            ]
        except Exception as error:  # noqa: BLE001 - any model fx cannot trace gets the module tree
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    else:
        reason = "TorchScript models are not traced"
    if nodes is None:
        kind = "modules"
        nodes = [
            {
                "id": name or "(model)",
                "op": "module",
                "module": name or None,
                "type": type(module).__name__,
                "inputs": [name.rpartition(".")[0] or "(model)"] if name else [],
            }
            for name, module in model.named_modules()
        ]
    truncated = len(nodes) > MODEL_GRAPH_NODE_LIMIT
    return {"kind": kind, "reason": reason, "truncated": truncated, "nodes": nodes[:MODEL_GRAPH_NODE_LIMIT]}
