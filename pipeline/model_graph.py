"""The model's graph for the dashboard's overview, taken on the driver at validation."""

from __future__ import annotations

import torch
from torch import nn

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
