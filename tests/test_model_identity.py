"""Every worker explains the model the driver validated: fingerprints, and runs that refuse
a factory whose weights are not fixed."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn

from netloupe.contract.errors import ModelError
from netloupe.pipeline.cli import main as cli_main
from netloupe.pipeline.driver import run_job
from netloupe.storage.layout import RunLayout
from netloupe.storage.reader import RunReader
from netloupe.storage.schema import vectors_to_numpy
from netloupe.workers.model_identity import check_same_model, model_fingerprint
from tests.helpers import tabular_spec, tabular_spec_data, tabular_table
from tests.tiny_models import Linear3, seeded_captum_softmax

CAPTUM_SOFTMAX = "captum.testing.helpers.classification_models:SoftmaxModel"
"""Captum's own test model: random initialisation with no seed, softmax output."""


def test_the_same_weights_give_the_same_fingerprint_and_a_change_names_the_tensor():
    first, second = model_fingerprint(Linear3()), model_fingerprint(Linear3())
    assert first == second and first.digest.startswith("blake2b-128:")
    assert set(first.tensors) == {"fc.weight", "fc.bias"}

    changed = Linear3()
    with torch.no_grad():
        changed.fc.bias[1] += 1e-6  # the smallest change still counts
    other = model_fingerprint(changed)
    assert other.digest != first.digest and other.differing(first) == ["fc.bias"]
    check_same_model(first, second, "by a worker")
    with pytest.raises(ModelError, match=r"1 of 2 parameters and buffers differ \(fc\.bias\).*Seed the factory"):
        check_same_model(first, other, "by a worker")


def test_buffers_and_dtypes_are_part_of_the_fingerprint():
    class Scaled(Linear3):
        def __init__(self, scale: float):
            super().__init__()
            # Not in state_dict, yet it changes every output.
            self.register_buffer("scale", torch.tensor(scale), persistent=False)

    one, two = model_fingerprint(Scaled(1.0)), model_fingerprint(Scaled(2.0))
    assert "scale" in one.tensors and one.differing(two) == ["scale"]
    as_double = model_fingerprint(Linear3().double())
    assert as_double.differing(model_fingerprint(Linear3())) == ["fc.bias", "fc.weight"]


def test_names_follow_the_module_tree_and_a_gpu_copy_keeps_the_fingerprint():
    model = Linear3()
    before = model_fingerprint(model)
    assert set(model_fingerprint(nn.Sequential(model, nn.Identity())).tensors) == {"0.fc.weight", "0.fc.bias"}
    if torch.cuda.is_available():  # a worker on a GPU fingerprints the same bytes
        assert model_fingerprint(Linear3().cuda()) == before


def test_extra_state_and_lazy_modules():
    class WithExtraState(Linear3):
        def __init__(self, note):
            super().__init__()
            self.note = note

        def get_extra_state(self):
            return {"note": self.note, "table": torch.arange(3)}

        def set_extra_state(self, state):
            self.note = state["note"]

    one, two = model_fingerprint(WithExtraState("a")), model_fingerprint(WithExtraState("b"))
    assert one.differing(two) == ["_extra_state"]
    with pytest.raises(ModelError, match="lazy modules that are not initialised"):
        model_fingerprint(nn.LazyLinear(2))


def _spec_file(tmp_path, **changes):
    pq.write_table(tabular_table(64), tmp_path / "data.parquet")
    data = tabular_spec_data(tmp_path / "data.parquet", tmp_path / "runs",
                             execution={"batch_size": 16, "num_workers": 2, "threads_per_worker": 1}, **changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_unseeded_factory_is_refused_before_any_batch_is_written(ray_local, tmp_path, capsys, monkeypatch):
    from netloupe.storage.layout import LocalStaging

    spec = _spec_file(tmp_path, model={"factory": CAPTUM_SOFTMAX, "output": "probabilities",
                                       "kwargs": {"num_in": 3, "num_hidden": 8, "num_out": 2}},
                      layers=[{"name": "lin1"}])
    monkeypatch.setattr(LocalStaging, "abort", lambda self: None)  # keep the staging, to look inside
    assert cli_main(["run", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not the model validated on the driver: 6 of 6 parameters and buffers differ" in err
    assert "lin1.weight" in err and "Seed the factory" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "t").exists()
    [staged] = (tmp_path / "runs" / ".staging").glob("t-*")
    assert (staged / "job.json").is_file() and not list(staged.rglob("part-*.parquet"))


def test_a_base_checkpoint_with_a_fresh_random_head_is_refused_naming_the_head(ray_local, tmp_path, capsys):
    """As when a Hugging Face base checkpoint gets a new classification head: the file sets
    the body, the factory draws the head anew in every process."""
    from safetensors.torch import save_file

    body = {k: v for k, v in seeded_captum_softmax().state_dict().items() if not k.startswith("lin3.")}
    save_file(body, str(tmp_path / "body.safetensors"))
    spec = _spec_file(tmp_path, model={"factory": CAPTUM_SOFTMAX, "output": "probabilities",
                                       "kwargs": {"num_in": 3, "num_hidden": 8, "num_out": 2},
                                       "weights": str(tmp_path / "body.safetensors")},
                      layers=[{"name": "lin1"}])
    assert cli_main(["run", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 of 6 parameters and buffers differ (lin3.bias, lin3.weight)" in err


def test_weights_that_leave_fixed_values_to_the_factory_are_reported_and_run(ray_local, tmp_path, capsys):
    """A file without ``fc.bias``: the factory's own bias is fixed, so every worker agrees;
    validation names what the file did not set, and the manifest keeps it."""
    from safetensors.torch import save_file

    save_file({"fc.weight": Linear3().fc.weight.detach().clone()}, str(tmp_path / "w.safetensors"))
    spec = _spec_file(tmp_path, model={"factory": "tests.tiny_models:linear", "weights": str(tmp_path / "w.safetensors")})
    assert cli_main(["run", str(spec)]) == 0
    assert "did not set fc.bias; they keep the values tests.tiny_models:linear gives them" in capsys.readouterr().out
    manifest = RunLayout(tmp_path / "runs" / "t").read_manifest()
    assert manifest.model_identity.weights_unset == ["fc.bias"]


def test_a_seeded_factory_runs_and_the_manifest_keeps_its_fingerprint(ray_local, tmp_path):
    pq.write_table(tabular_table(64), tmp_path / "data.parquet")
    spec = tabular_spec(tmp_path / "data.parquet", tmp_path / "runs",
                        model={"factory": "tests.tiny_models:seeded_captum_softmax", "output": "probabilities"},
                        layers=[{"name": "lin1"}],
                        execution={"batch_size": 16, "num_workers": 2, "threads_per_worker": 1})
    result = run_job(spec)
    model = seeded_captum_softmax()
    assert result.manifest.model_identity.fingerprint == model_fingerprint(model).digest
    manifest = RunLayout(result.layout.root).read_manifest()
    assert manifest.model_identity.fingerprint == model_fingerprint(model).digest
    # Every batch, whichever worker took it, is the one model's answer.
    instances = RunReader(result.layout.root).instances()
    source = tabular_table(64)
    x = torch.tensor(np.stack([source[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1))
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(vectors_to_numpy(instances["probabilities"]), expected, rtol=1e-6, atol=1e-7)
