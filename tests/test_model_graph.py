"""The model graph kept in the manifest: torch.fx's nodes, or the module tree when fx fails."""

from __future__ import annotations

import torch
from torch import nn

from netloupe.pipeline import model_graph as graph_module
from netloupe.pipeline.model_graph import model_graph
from tests.tiny_models import tiny_cnn


class Branchy(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.head(self.body(x))


def test_a_traceable_model_gives_its_fx_nodes_in_execution_order():
    graph = model_graph(tiny_cnn())
    assert graph["kind"] == "fx" and graph["reason"] is None and not graph["truncated"]
    ids = [node["id"] for node in graph["nodes"]]
    assert ids == ["x", "conv", "relu", "pool", "flatten", "head", "output"]
    by_id = {node["id"]: node for node in graph["nodes"]}
    assert by_id["conv"] == {"id": "conv", "op": "call_module", "module": "conv", "type": "Conv2d", "inputs": ["x"]}
    assert by_id["head"]["inputs"] == ["flatten"]


def test_an_untraceable_model_gives_its_module_tree_and_why():
    graph = model_graph(Branchy())
    assert graph["kind"] == "modules" and graph["reason"].startswith("TraceError: ")
    parents = {node["id"]: node["inputs"] for node in graph["nodes"]}
    assert parents == {"(model)": [], "body": ["(model)"], "body.0": ["body"], "body.1": ["body"], "head": ["(model)"]}
    assert {node["id"]: node["type"] for node in graph["nodes"]}["body.0"] == "Linear"


def test_a_huge_graph_is_cut_and_says_so(monkeypatch):
    monkeypatch.setattr(graph_module, "MODEL_GRAPH_NODE_LIMIT", 3)
    graph = model_graph(nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)]))
    assert graph["truncated"] and len(graph["nodes"]) == 3


def test_torchscript_models_get_the_module_tree():
    graph = model_graph(torch.jit.script(nn.Sequential(nn.Linear(2, 2))))
    assert graph["kind"] == "modules" and "TorchScript" in graph["reason"]
    assert [node["id"] for node in graph["nodes"]] == ["(model)", "0"]
