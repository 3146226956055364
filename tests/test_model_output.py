"""Models that end in logits, a softmax or a log-softmax: the stored probabilities are the
model's own, checked by hand; a spec that misnames the output is refused at validation."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from captum.attr import InputXGradient

from netloupe.contract.errors import ModelError
from netloupe.pipeline.driver import run_job, validate
from netloupe.storage.reader import RunReader
from netloupe.storage.schema import vectors_to_numpy
from netloupe.workers.model_output import check_output_kind, output_probabilities
from tests.helpers import tabular_spec, tabular_table
from tests.tiny_models import LINEAR_B, LINEAR_W, LinearSoftmax

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
SOFTMAX = torch.softmax(LOGITS, dim=1)
LOG_SOFTMAX = torch.log_softmax(LOGITS, dim=1)

FACTORIES = {
    "logits": "tests.tiny_models:linear",
    "probabilities": "tests.tiny_models:linear_softmax",
    "log_probabilities": "tests.tiny_models:linear_log_softmax",
}


@pytest.mark.parametrize("kind, outputs", [("logits", LOGITS), ("probabilities", SOFTMAX),
                                           ("log_probabilities", LOG_SOFTMAX),
                                           ("logits", LOG_SOFTMAX)])  # softmax(log_softmax(z)) = softmax(z)
def test_each_kind_gives_the_same_probabilities(kind, outputs):
    check_output_kind(outputs, kind)
    torch.testing.assert_close(output_probabilities(outputs, kind), SOFTMAX)


@pytest.mark.parametrize("kind, outputs, fix", [
    ("logits", SOFTMAX, "model.output: probabilities"),
    ("probabilities", LOGITS, "model.output: logits"),
    ("probabilities", LOG_SOFTMAX, "model.output: log_probabilities"),
    ("log_probabilities", SOFTMAX, "model.output: probabilities"),
    ("log_probabilities", LOGITS, "model.output: logits"),
])
def test_outputs_that_contradict_the_spec_are_refused_with_the_fix(kind, outputs, fix):
    with pytest.raises(ModelError, match=fix):
        check_output_kind(outputs, kind)


def test_rows_with_non_finite_outputs_do_not_hide_the_others():
    with pytest.raises(ModelError, match="model.output: probabilities"):
        check_output_kind(torch.cat([SOFTMAX, torch.tensor([[float("nan"), 0.5, 0.5]])]), "logits")
    check_output_kind(torch.full((2, 3), float("nan")), "probabilities")  # nothing left to judge by


def test_validation_finds_a_softmax_model_declared_as_logits(tmp_path, tabular_parquet):
    spec = tabular_spec(tabular_parquet, tmp_path / "runs", model={"factory": FACTORIES["probabilities"]})
    with pytest.raises(ModelError, match=r"look like probabilities.*Set model.output: probabilities"):
        validate(spec)
    spec = tabular_spec(tabular_parquet, tmp_path / "runs",
                        model={"factory": FACTORIES["logits"], "output": "probabilities"})
    with pytest.raises(ModelError, match=r"are not probabilities.*set model.output: logits"):
        validate(spec)


@pytest.fixture(scope="module")
def runs_of_each_kind(ray_local, tmp_path_factory):
    """The same linear model ending in logits, a softmax and a log-softmax, one run each."""
    root = tmp_path_factory.mktemp("kinds")
    pq.write_table(tabular_table(40), root / "data.parquet")
    readers = {}
    for kind, factory in FACTORIES.items():
        spec = tabular_spec(root / "data.parquet", root / "runs", model={"factory": factory, "output": kind},
                            attributions=[{"method": "input_x_gradient"}], fidelity={"curve_steps": 2},
                            output={"root": str(root / "runs"), "run_name": kind})
        result = run_job(spec)
        assert result.manifest.model_identity.output == kind
        readers[kind] = RunReader(result.layout.root)
    return readers, tabular_table(40)


def test_stored_probabilities_are_the_models_own_whatever_it_ends_in(runs_of_each_kind):
    readers, source = runs_of_each_kind
    x = np.stack([source[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1).astype(np.float64)
    logits = x @ np.array(LINEAR_W).T + np.array(LINEAR_B)
    by_hand = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for kind, reader in readers.items():
        instances = reader.instances()
        probabilities = vectors_to_numpy(instances["probabilities"])
        np.testing.assert_allclose(probabilities, by_hand, rtol=1e-5, atol=1e-6, err_msg=kind)
        np.testing.assert_allclose(instances["confidence"].to_numpy(), by_hand.max(axis=1), rtol=1e-5, err_msg=kind)
        assert instances["prediction"].to_pylist() == by_hand.argmax(axis=1).tolist()
        # The deletion curve starts at the whole input's probability of the explained class.
        curves = vectors_to_numpy(reader.attributions("input_x_gradient")["deletion_curve"])
        np.testing.assert_allclose(curves[:, 0], by_hand.max(axis=1), rtol=1e-5, err_msg=kind)


def test_attributions_explain_the_models_own_output(runs_of_each_kind):
    """A softmax model's input×gradient is that of its softmax output, as Captum computes it."""
    readers, source = runs_of_each_kind
    rows = readers["probabilities"].attributions("input_x_gradient")
    x = torch.tensor(np.stack([source[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1)).requires_grad_(True)
    expected = InputXGradient(LinearSoftmax()).attribute(x, target=torch.tensor(rows["target"].to_numpy()))
    np.testing.assert_allclose(vectors_to_numpy(rows["attribution"]), expected.detach().numpy(), rtol=1e-5, atol=1e-7)
    logits_map = vectors_to_numpy(readers["logits"].attributions("input_x_gradient")["attribution"])
    assert not np.allclose(logits_map, vectors_to_numpy(rows["attribution"]))
