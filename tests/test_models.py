"""Model resolution: weights without code execution, TorchScript, and clear failures."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from netloupe.contract.errors import MethodError, ModelError
from netloupe.contract.spec import ModelSpec, parse_spec
from netloupe.pipeline.driver import validate
from netloupe.workers.model_loading import load_model, load_model_reporting
from tests.helpers import tabular_spec
from tests.tiny_models import LINEAR_B, LINEAR_W, Linear3


def _scaled_state(factor: float) -> dict[str, torch.Tensor]:
    return {k: v * factor for k, v in Linear3().state_dict().items()}


def test_safetensors_weights_replace_the_factory_weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_scaled_state(2.0), str(path))
    model = load_model(ModelSpec(factory="tests.tiny_models:linear", weights=str(path)))
    assert torch.equal(model.fc.weight, torch.tensor(LINEAR_W) * 2)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_torch_save_weights_load_with_weights_only(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_scaled_state(3.0), path)
    model = load_model(ModelSpec(factory="tests.tiny_models:linear", weights=str(path)))
    assert torch.equal(model.fc.weight, torch.tensor(LINEAR_W) * 3)


class _Pickled:
    """A class that only a full (code-executing) unpickle could rebuild."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": _Pickled()}, path)
    with pytest.raises(ModelError, match="no pickled classes"):
        load_model(ModelSpec(factory="tests.tiny_models:linear", weights=str(path)))


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.zeros(5, 3), "fc.bias": torch.zeros(5)}, str(path))
    with pytest.raises(ModelError, match="do not fit the model"):
        load_model(ModelSpec(factory="tests.tiny_models:linear", weights=str(path)))


def test_a_checkpoint_that_leaves_parameters_unset_names_them(tmp_path):
    """What the file does not set keeps the factory's value and is named (the workers'
    fingerprint check refuses it if the factory's values are not fixed); a tensor the model
    lacks means another architecture and is refused."""
    path = tmp_path / "backbone.safetensors"
    save_file({"fc.weight": torch.zeros(2, 3)}, str(path))
    model, unset = load_model_reporting(ModelSpec(factory="tests.tiny_models:linear", weights=str(path)))
    assert unset == ["fc.bias"] and torch.equal(model.fc.weight, torch.zeros(2, 3))
    assert torch.equal(model.fc.bias, torch.tensor(LINEAR_B))
    extra = tmp_path / "extra.safetensors"
    save_file({**Linear3().state_dict(), "head.weight": torch.zeros(1)}, str(extra))
    with pytest.raises(ModelError, match=r"the file holds tensors the model does not have \(head\.weight\)"):
        load_model(ModelSpec(factory="tests.tiny_models:linear", weights=str(extra)))


def test_torchscript_model_validates(tmp_path, tabular_parquet):
    path = tmp_path / "linear.pt"
    torch.jit.script(Linear3()).save(str(path))
    spec = tabular_spec(tabular_parquet, tmp_path / "runs", model={"torchscript": str(path)}, layers=[],
                        attributions=[{"method": "integrated_gradients", "params": {"n_steps": 4}}])
    checked = validate(spec)
    assert checked.facts.num_classes == 2
    assert checked.facts.attribution_shapes == {"integrated_gradients": (3,)}
    with pytest.raises(ModelError, match="TorchScript model"):
        validate(tabular_spec(tabular_parquet, tmp_path / "runs", model={"torchscript": str(path)}))
    with pytest.raises(MethodError, match="TorchScript"):
        validate(tabular_spec(tabular_parquet, tmp_path / "runs", model={"torchscript": str(path)},
                              layers=[], attributions=[{"method": "deeplift"}]))


def test_digits_builtin_validates_with_its_own_preprocessing(tmp_path):
    spec = parse_spec({
        "model": {"factory": "tests.tiny_models:tiny_cnn"},
        "dataset": {"source": "digits"},
        "layers": [{"name": "conv", "pooling": "none"}],
        "attributions": [{"method": "grad_cam", "layer": "conv"}],
        "output": {"root": str(tmp_path), "run_name": "d"},
    })
    checked = validate(spec)
    assert checked.dataset.num_rows == 1797
    assert checked.facts.input_shape == (1, 8, 8)
    assert checked.facts.layer_neurons == {"conv": 2 * 7 * 7}
    assert checked.facts.attribution_shapes == {"grad_cam": (1, 7, 7)}
    assert checked.dataset.preprocess.scale == pytest.approx(1 / 16)


def test_a_pickled_checkpoint_loads_only_with_the_named_opt_in(tmp_path):
    whole = Linear3()
    with torch.no_grad():
        whole.fc.weight.mul_(-1)
    torch.save(whole, tmp_path / "whole.pt")  # the module itself: unpickling runs its class
    with pytest.raises(ModelError, match="allow_unsafe_pickle: true"):
        load_model(ModelSpec(factory="tests.tiny_models:linear", weights=str(tmp_path / "whole.pt")))
    model = load_model(ModelSpec(factory="tests.tiny_models:linear", weights=str(tmp_path / "whole.pt"),
                                 allow_unsafe_pickle=True))
    assert torch.equal(model.fc.weight, -torch.tensor(LINEAR_W))
    with pytest.raises(ValueError, match="applies to a 'weights' file"):
        ModelSpec(factory="tests.tiny_models:linear", allow_unsafe_pickle=True)
