"""Which model was explained: a fingerprint of every parameter and buffer.

Every worker builds its own copy of the model. A factory whose weights are not all fixed
(random initialisation without a seed, a checkpoint that leaves a fresh classification
head) builds a different model in every process, and a run would silently mix their
answers. So the driver fingerprints the model it validated, each worker checks its own
against it before its first batch, and the manifest keeps the fingerprint, so that runs of
the same model can be recognised later.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from netloupe.contract.errors import ModelError

FINGERPRINT_ALGORITHM = "blake2b-128"
"""Prefix of :attr:`ModelFingerprint.digest`, so that a later change of hash is visible."""

SHOWN_DIFFERENCES = 8
"""Differing tensor names an error message lists before it says how many more there are."""


@dataclass(frozen=True)
class ModelFingerprint:
    """A model's identity: one digest per named tensor, and one over all of them."""

    digest: str
    """``blake2b-128:<hex>`` over every tensor's name, dtype, shape and bytes, in name order."""
    tensors: dict[str, str]
    """Name (as in ``state_dict``, plus non-persistent buffers) → its own digest."""

    def to_json(self) -> dict:
        return {"digest": self.digest, "tensors": dict(self.tensors)}

    @classmethod
    def from_json(cls, data: dict) -> "ModelFingerprint":
        return cls(digest=data["digest"], tensors=dict(data["tensors"]))

    def differing(self, other: "ModelFingerprint") -> list[str]:
        """Names of the tensors whose values (or presence) differ between the two, sorted."""
        names = set(self.tensors) | set(other.tensors)
        return sorted(n for n in names if self.tensors.get(n) != other.tensors.get(n))


def _named_state(model: nn.Module) -> dict[str, object]:
    """Every parameter and buffer (and any extra state a module keeps), by name.
    Non-persistent buffers (not in ``state_dict``, such as precomputed position ids) shape
    the output as much as weights do."""
    state = dict(model.state_dict(keep_vars=False))
    for name, buffer in model.named_buffers():
        state.setdefault(name, buffer)
    return state


def _hash_value(h, value) -> None:
    """Feed ``value`` (a tensor, or a module's extra state: containers, numbers) into ``h``."""
    if isinstance(value, torch.Tensor):
        if isinstance(value, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
            raise ModelError("the model has lazy modules that are not initialised yet (nn.LazyLinear and the "
                             "like); have the factory run one forward pass on an example input before returning it")
        tensor = value.detach()
        if tensor.is_quantized:
            tensor = tensor.dequantize()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        h.update(f"tensor\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        # Bytes as stored, on the CPU: a GPU copy of the same weights has the same fingerprint.
        h.update(memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        h.update(f"dict\0{len(value)}\0".encode())
        for key in sorted(value, key=repr):
            h.update(f"{key!r}\0".encode())
            _hash_value(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}\0{len(value)}\0".encode())
        for item in value:
            _hash_value(h, item)
    else:
        h.update(f"{type(value).__name__}\0{value!r}\0".encode())


def _digest(name: str, value) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{name}\0".encode())
    _hash_value(h, value)
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> ModelFingerprint:
    """The fingerprint of ``model``'s current parameters and buffers."""
    tensors = {name: _digest(name, value) for name, value in sorted(_named_state(model).items())}
    whole = hashlib.blake2b(digest_size=16)
    for name, digest in tensors.items():
        whole.update(f"{name}\0{digest}\n".encode())
    return ModelFingerprint(f"{FINGERPRINT_ALGORITHM}:{whole.hexdigest()}", tensors)


def check_same_model(expected: ModelFingerprint, actual: ModelFingerprint, where: str) -> None:
    """Raise :class:`ModelError` unless ``actual`` (the model built ``where``) is the model
    the driver validated."""
    if actual.digest == expected.digest:
        return
    differing = actual.differing(expected)
    shown = ", ".join(differing[:SHOWN_DIFFERENCES])
    if len(differing) > SHOWN_DIFFERENCES:
        shown += f" and {len(differing) - SHOWN_DIFFERENCES} more"
    raise ModelError(
        f"the model built {where} is not the model validated on the driver: {len(differing)} of "
        f"{len(expected.tensors)} parameters and buffers differ ({shown}). The model's weights are not "
        "fixed: each build gives other values (random initialisation without a seed, a checkpoint that "
        "does not set every parameter, or a factory that reads or computes differently on that node). Seed "
        "the factory (torch.manual_seed before building the model), or give model.weights with every "
        "parameter; nothing was committed"
    )
