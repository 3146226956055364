"""The job spec: typed, frozen, unknown keys rejected with the closest valid name."""

from __future__ import annotations

import pydantic
import pytest

from netloupe.contract import spec as spec_module
from netloupe.contract.errors import SpecError
from netloupe.contract.spec import StrictModel, load_spec, parse_spec

MINIMAL = {
    "model": {"factory": "netloupe.pipeline.zoo:trained_mnist_cnn"},
    "dataset": {"source": "mnist-5k"},
    "output": {"run_name": "r"},
}


def test_minimal_spec_gets_documented_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.execution.batch_size == 1024
    assert spec.target.kind == "predicted"
    assert spec.storage.attributions == "full"
    assert spec.output.root == "runs"
    assert spec.projection.sample_size == 20000 and spec.projection.algorithms == ("pca",)
    # Every field of every spec model carries its docstring as its description.
    models = [m for m in vars(spec_module).values()
              if isinstance(m, type) and issubclass(m, StrictModel) and m is not StrictModel]
    assert {m.__name__ for m in models} >= {"JobSpec", "ProjectionSpec", "DatasetSpec"}
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"


def test_spec_is_frozen():
    spec = parse_spec(MINIMAL)
    with pytest.raises(pydantic.ValidationError):
        spec.execution.batch_size = 3


@pytest.mark.parametrize("data, words", [
    ({**MINIMAL, "layer": []}, ["(top level)", "unknown key 'layer'", "did you mean 'layers'"]),
    ({**MINIMAL, "model": {"factory": "a.b:c", "wieghts": "w"}}, ["model", "did you mean 'weights'"]),
    ({**MINIMAL, "model": {"factory": "no_colon"}}, ["package.module:callable"]),
    ({**MINIMAL, "model": {}}, ["exactly one of 'factory'"]),
    ({"model": MINIMAL["model"], "dataset": MINIMAL["dataset"]}, ["output: required key is missing"]),
    ({**MINIMAL, "execution": {"batch_size": 0}}, ["execution.batch_size", "greater than 0"]),
    ({**MINIMAL, "layers": [{"name": "fc1", "pooling": "median"}]}, ["layers.0.pooling", "'mean', 'max', 'none', 'token_mean' or 'first_token'"]),
    ({**MINIMAL, "attributions": [{"method": "saliency"}, {"method": "saliency"}]}, ["['saliency'] repeat"]),
    ({**MINIMAL, "dataset": {"source": "d.parquet", "input_column": "x", "feature_columns": ["a"]}},
     ["exactly one of 'input_column'"]),
    ({**MINIMAL, "execution": {"num_workers": 3, "max_workers": 2}}, ["max_workers (2) is below num_workers (3)"]),
])
def test_bad_specs_name_the_problem(data, words):
    with pytest.raises(SpecError) as error:
        parse_spec(data)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_noise_tunnel_table_name_and_explicit_name():
    spec = parse_spec({**MINIMAL, "attributions": [
        {"method": "saliency", "noise_tunnel": {"nt_type": "vargrad"}},
        {"method": "saliency", "name": "plain"},
    ]})
    assert [m.table_name for m in spec.attributions] == ["saliency_vargrad", "plain"]


def test_load_spec_applies_dotted_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: {factory: 'a.b:c'}\ndataset: {source: digits}\noutput: {run_name: x}\n")
    spec = load_spec(path, {"execution.num_workers": 2, "output.run_name": "y"})
    assert spec.execution.num_workers == 2 and spec.output.run_name == "y"


def test_load_spec_reports_yaml_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_the_worker_pool_is_fixed_or_autoscaling():
    from netloupe.pipeline.ray_cluster import worker_pool

    fixed = worker_pool(parse_spec({**MINIMAL, "execution": {"num_workers": 3}}).execution)
    assert (fixed.min_size, fixed.max_size) == (3, 3)
    same = worker_pool(parse_spec({**MINIMAL, "execution": {"num_workers": 2, "max_workers": 2}}).execution)
    assert (same.min_size, same.max_size) == (2, 2)
    growing = worker_pool(parse_spec({**MINIMAL, "execution": {"num_workers": 1, "max_workers": 4}}).execution)
    assert (growing.min_size, growing.max_size) == (1, 4)


def test_spec_help_documents_every_key(capsys):
    """Every field of every section carries its docstring, and spec-help shows them all."""
    from netloupe.contract.spec import spec_help
    from netloupe.pipeline.cli import main as cli_main

    text = spec_help()
    keys = [line.split("  [")[0] for line in text.splitlines() if not line.startswith(" ")]
    docs = [line for line in text.splitlines() if line.startswith("    ")]
    assert len(keys) == len(docs) > 60 and all(doc.strip() for doc in docs)
    assert "model.output  ['logits' | 'probabilities' | 'log_probabilities'; default 'logits']" in text
    assert "execution.driver_sql_memory_mib  [int; default 512]" in text
    assert cli_main(["spec-help", "fidelity"]) == 0
    assert capsys.readouterr().out.startswith("fidelity.curve_steps  [int; default 0]")
    assert cli_main(["spec-help", "fidelty"]) == 2
    assert "did you mean 'fidelity'" in capsys.readouterr().err
