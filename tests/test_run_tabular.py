"""End-to-end runs of tabular models on a real local Ray, checked against hand arithmetic.

For the linear model logit_c = W[c]·x + B[c] every method has a closed form:
saliency = |W[c]|, input×gradient = IG (zero baseline) = DeepLift = GradientSHAP
(no noise) = occlusion of one feature = x ⊙ W[c].
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from netloupe.contract.spec import parse_spec
from netloupe.pipeline.driver import run_job
from netloupe.storage.reader import RunReader
from netloupe.storage.schema import vectors_to_numpy
from tests.helpers import tabular_spec, tabular_spec_data, tabular_table
from tests.tiny_models import LINEAR_B, LINEAR_W

W = np.array(LINEAR_W)
B = np.array(LINEAR_B)

ALL_METHODS = [
    {"method": "integrated_gradients", "params": {"n_steps": 20}},
    {"method": "saliency"},
    {"method": "input_x_gradient"},
    {"method": "deeplift"},
    {"method": "gradient_shap", "params": {"n_samples": 4, "stdevs": 0.0}},
    {"method": "occlusion", "params": {"sliding_window_shapes": [1], "strides": 1}},
    {"method": "saliency", "noise_tunnel": {"nt_samples": 3, "stdevs": 0.5}},
]


def _features(table):
    return np.stack([table[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1).astype(np.float64)


@pytest.fixture(scope="module")
def linear_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    pq.write_table(tabular_table(50), root / "data.parquet")
    spec = tabular_spec(
        root / "data.parquet", root / "runs",
        attributions=ALL_METHODS,
        execution={"batch_size": 16, "num_workers": 2, "threads_per_worker": 1},
    )
    result = run_job(spec)
    return RunReader(result.layout.root), tabular_table(50)


def test_every_instance_exactly_once_with_two_workers(linear_run):
    reader, source = linear_run
    ids = reader.instances()["instance_id"].to_pylist()
    assert ids == source["row_id"].to_pylist()
    for layer in reader.layers:
        assert reader.activations(layer)["instance_id"].to_pylist() == ids
    for method in reader.methods:
        assert reader.attributions(method)["instance_id"].to_pylist() == ids
    assert reader.manifest.counts.instances == 50
    assert reader.manifest.counts.parts == 4  # 50 rows in batches of 16


def test_an_autoscaling_pool_also_gives_every_instance_exactly_once(ray_local, tmp_path):
    pq.write_table(tabular_table(50), tmp_path / "data.parquet")
    spec = tabular_spec(tmp_path / "data.parquet", tmp_path / "runs",
                        execution={"batch_size": 16, "num_workers": 1, "max_workers": 2, "threads_per_worker": 1})
    reader = RunReader(run_job(spec).layout.root)
    assert sorted(reader.instances()["instance_id"].to_pylist()) == tabular_table(50)["row_id"].to_pylist()
    assert reader.manifest.spec["execution"]["max_workers"] == 2


def test_predictions_and_activations_by_hand(linear_run):
    reader, source = linear_run
    x = _features(source)
    logits = x @ W.T + B
    instances = reader.instances()
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(vectors_to_numpy(instances["probabilities"]), probabilities, rtol=1e-5)
    np.testing.assert_array_equal(instances["prediction"].to_numpy(), logits.argmax(axis=1))
    np.testing.assert_allclose(instances["confidence"].to_numpy(), probabilities.max(axis=1), rtol=1e-5)
    expected_correct = logits.argmax(axis=1) == source["label"].to_numpy()
    np.testing.assert_array_equal(instances["correct"].to_numpy(zero_copy_only=False), expected_correct)
    assert instances["group"].to_pylist() == source["group"].to_pylist()
    _, fc = reader.activation_matrix("fc")
    np.testing.assert_allclose(fc, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["integrated_gradients", "input_x_gradient", "deeplift",
                                    "gradient_shap", "occlusion"])
def test_input_times_weight_methods_by_hand(linear_run, method):
    reader, source = linear_run
    x = _features(source)
    target = (x @ W.T + B).argmax(axis=1)
    rows, maps = reader.attribution_maps(method)
    np.testing.assert_array_equal(rows["target"].to_numpy(), target)
    np.testing.assert_allclose(maps, x * W[target], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows["attr_sum"].to_numpy(), (x * W[target]).sum(axis=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["saliency", "saliency_smoothgrad"])
def test_saliency_is_abs_weight(linear_run, method):
    reader, source = linear_run
    x = _features(source)
    target = (x @ W.T + B).argmax(axis=1)
    _, maps = reader.attribution_maps(method)
    np.testing.assert_allclose(maps, np.abs(W[target]), rtol=1e-5)


def test_convergence_delta_stored_where_captum_gives_one(linear_run):
    reader, _ = linear_run
    ig = reader.attributions("integrated_gradients")["convergence_delta"].to_numpy()
    assert np.abs(ig).max() < 1e-4  # exact for a linear model
    assert reader.attributions("saliency")["convergence_delta"].null_count == 50


def test_top_k_targets_and_summary_storage(ray_local, tmp_path):
    pq.write_table(tabular_table(20), tmp_path / "data.parquet")
    spec = tabular_spec(tmp_path / "data.parquet", tmp_path / "runs",
                        target={"kind": "top_k", "k": 2},
                        storage={"attributions": "summary"},
                        attributions=[{"method": "input_x_gradient"}])
    reader = RunReader(run_job(spec).layout.root)
    rows = reader.attributions("input_x_gradient")
    assert rows.num_rows == 40 and "attribution" not in rows.column_names
    x = _features(tabular_table(20))
    logits = x @ W.T + B
    order = np.argsort(-logits, axis=1)
    rank = rows["target_rank"].to_numpy()
    targets = rows["target"].to_numpy().reshape(20, 2)
    np.testing.assert_array_equal(targets, order)
    expected_sums = np.stack([(x * W[order[:, k]]).sum(axis=1) for k in range(2)], axis=1)
    np.testing.assert_allclose(rows["attr_sum"].to_numpy().reshape(20, 2), expected_sums, rtol=1e-4, atol=1e-5)
    assert rank.tolist() == [0, 1] * 20


def test_label_target_and_force_replaces_run(ray_local, tmp_path):
    pq.write_table(tabular_table(20), tmp_path / "data.parquet")
    data = tabular_spec_data(tmp_path / "data.parquet", tmp_path / "runs", target={"kind": "label"})
    first = run_job(parse_spec(data))
    labels = tabular_table(20)["label"].to_numpy()
    rows = RunReader(first.layout.root).attributions("saliency")
    np.testing.assert_array_equal(rows["target"].to_numpy(), labels)
    created = first.manifest.created_unix
    second = run_job(parse_spec(data), force=True)
    assert second.manifest.created_unix > created
    assert RunReader(second.layout.root).manifest.created_unix == second.manifest.created_unix
    leftovers = [p.name for p in (tmp_path / "runs").iterdir()]
    assert leftovers == ["t"], leftovers  # no staging or replaced copies left behind


def test_breast_cancer_mlp_builtin(ray_local, tmp_path):
    spec = parse_spec({
        "model": {"factory": "netloupe.pipeline.zoo:trained_breast_cancer_mlp", "class_names": ["malignant", "benign"]},
        "dataset": {"source": "breast-cancer"},
        "layers": [{"name": "fc1"}, {"name": "relu2"}],
        "attributions": [{"method": "integrated_gradients", "params": {"n_steps": 64}},
                         {"method": "deeplift"}],
        "execution": {"batch_size": 128, "num_workers": 2, "threads_per_worker": 1},
        "output": {"root": str(tmp_path), "run_name": "bc"},
    })
    reader = RunReader(run_job(spec).layout.root)
    instances = reader.instances()
    assert instances.num_rows == 569
    assert np.mean(instances["correct"].to_numpy(zero_copy_only=False)) > 0.9
    assert set(instances["size_group"].to_pylist()) == {"large", "small"}
    assert reader.manifest.model.layer_neurons == {"fc1": 64, "relu2": 32}
    ig = reader.attributions("integrated_gradients")
    # Completeness: attributions add up to f(x) - f(baseline) up to the stored delta,
    # which is small against the evidence on the path (float32, 64 steps, ReLU kinks).
    delta = np.abs(ig["convergence_delta"].to_numpy())
    evidence = ig["attr_abs_sum"].to_numpy()
    assert (delta <= 5e-3 * evidence).all(), (delta / evidence).max()
    assert reader.manifest.class_names == ["malignant", "benign"]
    parts = pads.dataset(reader.layout.instances_dir).files
    assert len(parts) == 5  # ceil(569 / 128)


def test_error_in_a_later_batch_reaches_the_user_clearly(ray_local, tmp_path, capsys):
    """Validation sees the first rows only; a bad row further on fails in a worker, and the
    user still gets the clear message (not Ray's traceback), and nothing is written."""
    import yaml

    from netloupe.pipeline.cli import main as cli_main

    table = tabular_table(40)
    labels = table["label"].to_pylist()
    labels[33] = None
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    pq.write_table(table, tmp_path / "data.parquet")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tabular_spec_data(
        tmp_path / "data.parquet", tmp_path / "runs", target={"kind": "label"})))
    assert cli_main(["run", str(spec_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("netloupe: error: ")]
    assert len(message) == 1 and "null label" in message[0], err[-2000:]
    assert "Failed to apply UDF" not in err.split("netloupe: error: ")[1]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_nan_inputs_and_infinite_attributions_are_flagged_and_the_run_goes_on(ray_local, tmp_path):
    table = tabular_table(20)
    x0, x1 = table["x0"].to_numpy().copy(), table["x1"].to_numpy().copy()
    x1[3] = np.nan   # a NaN input: the row is flagged, and so is every map it makes NaN
    x1[4] = np.inf
    x0[7] = 0.0      # sqrt(|x0|)'s gradient is infinite here: a finite input, an infinite map
    table = table.set_column(1, "x0", pa.array(x0)).set_column(2, "x1", pa.array(x1))
    pq.write_table(table, tmp_path / "data.parquet")
    spec = tabular_spec(tmp_path / "data.parquet", tmp_path / "runs",
                        model={"factory": "tests.tiny_models:sqrt_linear"},
                        attributions=[{"method": "saliency"}, {"method": "input_x_gradient"}])
    reader = RunReader(run_job(spec).layout.root)
    instances = reader.instances()
    assert instances.num_rows == 20  # every row explained, none dropped
    ids = instances["instance_id"].to_pylist()
    flagged_inputs = {ids[i] for i, ok in enumerate(instances["input_finite"].to_pylist()) if not ok}
    assert flagged_inputs == {1003, 1004}
    flagged = {}
    for method in ("saliency", "input_x_gradient"):
        rows = reader.attributions(method)
        flagged[method] = {i for i, ok in zip(rows["instance_id"].to_pylist(), rows["finite"].to_pylist()) if not ok}
    # A linear model's gradient does not see the NaN; input x gradient carries it.
    assert flagged == {"saliency": {1007}, "input_x_gradient": {1003, 1004, 1007}}
