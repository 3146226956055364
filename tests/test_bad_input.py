"""Every bad input fails on the driver, before Ray, with a clear message, a non-zero exit,
and nothing written or touched. One table drives them all through the CLI. (Bad values
inside the data, NaN/Inf inputs and attributions, are flagged and the run goes on:
tests/test_run_tabular.py.)"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from netloupe.pipeline.cli import main as cli_main
from tests.helpers import tabular_spec_data, tabular_table

CASES = {
    # name: (spec changes, words the message must contain)
    "wrong layer name": (
        {"layers": [{"name": "fcc"}]},
        ["no layer 'fcc'", "did you mean 'fc'"],
    ),
    "unknown method": (
        {"attributions": [{"method": "integrated_gradient"}]},
        ["unknown attribution method 'integrated_gradient'", "did you mean 'integrated_gradients'"],
    ),
    "unknown method parameter": (
        {"attributions": [{"method": "integrated_gradients", "params": {"nsteps": 8}}]},
        ["no parameter 'nsteps'", "did you mean 'n_steps'"],
    ),
    "missing column": (
        {"dataset__feature_columns": ["x0", "x1", "x3"]},
        ["column 'x3'", "did you mean"],
    ),
    "no input columns named": (
        {"dataset__feature_columns": None},
        ["give dataset.input_column (a list/tensor column), dataset.feature_columns (numeric columns) or "
         "dataset.text_column (strings)"],
    ),
    "rows for a dataset that is not generated": (
        {"dataset__rows": 100},
        ["dataset.rows sizes a generated built-in (mnist-variants)", "use dataset.limit"],
    ),
    "shape mismatch": (
        {"preprocess": {"shape": [2, 2]}},
        ["preprocess.shape [2, 2] holds 4 values", "each stored input has 3"],
    ),
    "model rejects the input shape": (
        {"dataset__feature_columns": ["x0", "x1"]},
        ["model failed on a validation batch of shape (4, 2)"],
    ),
    "factory raises": (
        {"model": {"factory": "tests.tiny_models:raising_factory"}},
        ["raised ValueError: checkpoint server unreachable"],
    ),
    "factory returns no module": (
        {"model": {"factory": "tests.tiny_models:not_a_module"}},
        ["returned a dict", "torch.nn.Module"],
    ),
    "factory not importable": (
        {"model": {"factory": "tests.no_such_module:model"}},
        ["cannot import module 'tests.no_such_module'"],
    ),
    "deeplift on a reused ReLU": (
        {"model": {"factory": "tests.tiny_models:reused_relu"}, "layers": [],
         "attributions": [{"method": "deeplift"}]},
        ["deeplift cannot explain this model", "['relu']", "more than once"],
    ),
    "unknown spec key": (
        {"executon": {"num_workers": 2}},
        ["unknown key 'executon'", "did you mean 'execution'"],
    ),
    "unknown nested key": (
        {"execution": {"batch_sise": 8}},
        ["execution", "unknown key 'batch_sise'", "did you mean 'batch_size'"],
    ),
    "layer method without layer": (
        {"attributions": [{"method": "grad_cam"}]},
        ["grad_cam needs 'layer"],
    ),
    "label target out of range": (
        {"target": {"kind": "label"}, "dataset__label_column": "big_label"},
        ["class indices 0..1", "found [5]"],
    ),
    "heatmap of tabular input": (
        {"storage": {"attributions": "heatmap"}},
        ["'heatmap' needs image-shaped maps"],
    ),
    "top-k larger than classes": (
        {"target": {"kind": "top_k", "k": 3}},
        ["target.k is 3 but the model has only 2 classes"],
    ),
    "run name with a space": (
        {"output__run_name": "my run"},
        ["output.run_name", "run name 'my run' is not allowed"],
    ),
    "duplicate ids": (
        {"dataset__id_column": "dup_id"},
        ["id column 'dup_id'", "repeated values", "e.g. [7]"],
    ),
    "metadata column named like a netloupe column": (
        {"dataset__metadata_columns": ["device"]},
        ["metadata columns ['device'] clash"],
    ),
    "string label column": (
        {"dataset__label_column": "group"},
        ["label column 'group' has type string", "integer class indices"],
    ),
    "occlusion window larger than the input": (
        {"attributions": [{"method": "occlusion", "params": {"sliding_window_shapes": [5]}}]},
        ["attribution method rejected its parameters"],
    ),
    "missing weights file": (
        {"model": {"factory": "tests.tiny_models:linear", "weights": "nowhere.safetensors"}},
        ["weights file nowhere.safetensors does not exist"],
    ),
    "unreadable weights file": (
        {"model": {"factory": "tests.tiny_models:linear", "weights": "{tmp}/garbage.pt"}},
        ["cannot read weights file", "garbage.pt", ".safetensors file or a state dict"],
    ),
    "weights that do not fit the model": (
        {"model": {"factory": "tests.tiny_models:linear", "weights": "{tmp}/wrong-shape.pt"}},
        ["do not fit the model", "size mismatch for fc.weight", "saved from this architecture"],
    ),
    "pickled module without opting in": (
        {"model": {"factory": "tests.tiny_models:linear", "weights": "{tmp}/module.pt"}},
        ["cannot read weights file", "allow_unsafe_pickle: true", "runs code from the file"],
    ),
    "unreadable TorchScript file": (
        {"model": {"torchscript": "{tmp}/garbage.torchscript"}},
        ["cannot load TorchScript file", "garbage.torchscript"],
    ),
    "Hugging Face hub name": (
        {"model": {"huggingface": "bert-base-uncased"}},
        ["'bert-base-uncased' is not a local directory", "downloads nothing", "save_pretrained(DIR)"],
    ),
    "Hugging Face directory without a config": (
        {"model": {"huggingface": "{tmp}/no-config"}},
        ["no-config holds no config.json"],
    ),
    "Hugging Face checkpoint with its own code, no opt-in": (
        {"model": {"huggingface": "{tmp}/remote-code"}},
        ["ships its own modelling code", "model.trust_remote_code: true"],
    ),
    "Hugging Face model that is not a classifier": (
        {"model": {"huggingface": "{tmp}/bare-encoder"}},
        ["is a BertModel", "netloupe explains classifiers", "...ForSequenceClassification"],
    ),
    "token pooling of a layer without tokens": (
        {"layers": [{"name": "fc", "pooling": "first_token"}]},
        ["layer 'fc'", "pooling 'first_token' takes token vectors (n, tokens, hidden)", "shape (4, 2)"],
    ),
    "Hugging Face checkpoint without weights": (
        {"model": {"huggingface": "{tmp}/text-classifier"}},
        ["cannot load the Hugging Face checkpoint", "text-classifier", "no file named model.safetensors"],
    ),
    "attention rollout of a model without attention": (
        {"attributions": [{"method": "attention_rollout"}]},
        ["attention_rollout explains a Hugging Face vision transformer"],
    ),
    "trust_remote_code without a checkpoint": (
        {"model": {"factory": "tests.tiny_models:linear", "trust_remote_code": True}},
        ["trust_remote_code applies to a 'huggingface' checkpoint"],
    ),
    "input of the wrong dtype": (
        {"dataset__feature_columns": ["x0", "x1", "group"]},
        ["'group'", "string", "numeric"],
    ),
    "corrupt Parquet input": (
        {"dataset__source": "{tmp}/bad.parquet"},
        ["cannot read", "bad.parquet"],
    ),
    "existing run name without --force": (
        {"output__run_name": "taken"},
        ["run 'taken' already exists", "--force"],
    ),
}


@pytest.fixture
def data_path(tmp_path):
    """The dataset, and beside it the bad files the cases name as ``{tmp}/...``."""
    torch.save({"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4)}, tmp_path / "wrong-shape.pt")
    torch.save(torch.nn.Linear(3, 2), tmp_path / "module.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    (tmp_path / "garbage.torchscript").write_bytes(b"PK\x03\x04 not a zip")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not really parquet")
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-config" / "model.safetensors").write_bytes(b"{}")
    for name, config in (("remote-code", {"architectures": ["NovelForImageClassification"],
                                          "auto_map": {"AutoConfig": "modeling_novel.NovelConfig"}}),
                         ("bare-encoder", {"architectures": ["BertModel"], "model_type": "bert"}),
                         ("text-classifier", {"architectures": ["BertForSequenceClassification"],
                                              "model_type": "bert"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "manifest.json").write_text("{}")
    table = tabular_table(12)
    table = table.append_column("big_label", pa.array([5] * 12, pa.int64()))
    table = table.append_column("dup_id", pa.array([7] * 12, pa.int64()))
    table = table.append_column("device", pa.array(["gpu"] * 12))
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_clearly_and_writes_nothing(case, data_path, tmp_path, capsys):
    changes, expected = CASES[case]
    out_root = tmp_path / "runs"
    before = sorted(p.relative_to(out_root) for p in out_root.rglob("*"))
    data = tabular_spec_data(data_path, out_root, **changes)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data).replace("{tmp}", str(tmp_path)))
    code = cli_main(["run", str(spec_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("netloupe: error: ")
    for words in expected:
        assert words in err, f"{words!r} not in: {err}"
    assert "Traceback" not in err
    # Nothing written, nothing earlier touched.
    assert sorted(p.relative_to(out_root) for p in out_root.rglob("*")) == before
    assert (out_root / "taken" / "manifest.json").read_text() == "{}"


def test_missing_spec_file(tmp_path, capsys):
    assert cli_main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_set_into_a_list_is_a_clear_error(data_path, tmp_path, capsys):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tabular_spec_data(data_path, tmp_path / "runs")))
    assert cli_main(["run", str(spec_path), "--set", "layers.0.pooling=max"]) == 2
    assert "--set reaches mapping keys only" in capsys.readouterr().err
