"""Loading the model a spec names, as the driver (to validate) and every worker do: an entry
point (plus optional weights), a TorchScript file or a local Hugging Face checkpoint
(:mod:`netloupe.workers.huggingface`) → ``nn.Module`` in eval mode.

Weights are read without executing code: safetensors, or ``torch.load(weights_only=True)``;
full pickle only when the spec opts in by name (``model.allow_unsafe_pickle``).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from netloupe.contract.errors import ModelError
from netloupe.contract.spec import ModelSpec

OLD_TOP_LEVEL_NAMES = ("pipeline", "workers", "storage", "dashboards")
"""The names netloupe's packages were installed under before they moved into ``netloupe``."""


def _moved_into_netloupe(module_name: str) -> str | None:
    """``netloupe.<module_name>`` when ``module_name`` is an old spelling of a netloupe module:
    not importable any more, or (from a checkout's root) importable only as the same file
    under a second name. A user's own package called ``pipeline`` is left alone."""
    if module_name.split(".")[0] not in OLD_TOP_LEVEL_NAMES:
        return None
    try:
        new = importlib.util.find_spec(f"netloupe.{module_name}")
    except ImportError:
        return None
    if new is None:
        return None
    try:
        old = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        old = None
    return f"netloupe.{module_name}" if old is None or old.origin == new.origin else None


def import_entry_point(entry_point: str):
    """``package.module:attribute`` → the attribute, with errors that say what to fix."""
    module_name, _, attribute = entry_point.partition(":")
    moved = _moved_into_netloupe(module_name)
    if moved:
        raise ModelError(
            f"model.factory {entry_point!r} names netloupe's module by its old path; netloupe now installs "
            f"as one package: write {moved + ':' + attribute!r}"
        )
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
            from netloupe.contract.errors import did_you_mean

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
    if spec.huggingface is not None:
        from netloupe.workers.huggingface import load_huggingface_model

        model = load_huggingface_model(spec)
    elif spec.torchscript is not None:
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
