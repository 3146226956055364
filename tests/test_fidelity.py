"""Explanation fidelity where the right answer is known, then stored by a real run.

* a linear model: Integrated Gradients equals (x - baseline) · w exactly, its convergence
  delta is 0, and the deletion/insertion curves can be computed by hand;
* a model that sees only one region of the image: every method's attribution mass falls
  inside it, and deleting by attribution destroys the prediction faster than inserting;
* a model with structured weights against its randomly re-initialised copy: saliency maps
  decorrelate (the model-randomization check), while the same model agrees with itself;
* infidelity of an exact explanation is 0, and the run stores all of it for SQL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from netloupe.contract.spec import parse_spec
from netloupe.pipeline.datasets import resolve_dataset
from netloupe.pipeline.driver import run_job
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.layout import RunLayout
from netloupe.storage.schema import vectors_to_numpy
from netloupe.workers import fidelity as fid
from netloupe.workers.explain import BatchExplainer
from netloupe.workers.model_loading import load_model
from tests.helpers import image_table, tabular_spec, tabular_table
from tests.tiny_models import LINEAR_B, LINEAR_W, REGION, ramp_weights

W = np.array(LINEAR_W)
B = np.array(LINEAR_B)
RELATIVE = RunLayout(Path("."))


def _explain(spec, table):
    """One batch explained on this process, as the driver's validation does (no Ray)."""
    dataset = resolve_dataset(spec)
    explainer = BatchExplainer(spec, dataset, load_model(spec.model), torch.device("cpu"))
    return explainer.explain(table).tables


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_linear_ig_is_exact_and_its_curves_match_the_hand_computation(tmp_path):
    table = tabular_table(12)
    pq.write_table(table, tmp_path / "data.parquet")
    baseline, steps = 0.5, 3
    spec = tabular_spec(tmp_path / "data.parquet", tmp_path / "runs", layers=[],
                        attributions=[{"method": "integrated_gradients", "baseline": baseline,
                                       "params": {"n_steps": 16}}],
                        fidelity={"curve_steps": steps, "curve_baseline": baseline})
    rows = _explain(spec, table)[RELATIVE.attributions_dir("integrated_gradients")]
    x = np.stack([table[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1).astype(np.float64)
    target = rows["target"].to_numpy()
    expected = (x - baseline) * W[target]
    np.testing.assert_allclose(vectors_to_numpy(rows["attribution"]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["convergence_delta"].to_numpy(), 0, atol=1e-5)

    # By hand: features ordered by attribution (largest first), the top k set to the baseline
    # (deletion) or kept over a baseline input (insertion), k = 0..3 of 3 features.
    order = np.argsort(-expected, axis=1, kind="stable")
    deletion = np.zeros((len(x), steps + 1))
    insertion = np.zeros((len(x), steps + 1))
    for k in range(steps + 1):
        top = np.zeros_like(x, dtype=bool)
        np.put_along_axis(top, order[:, :k], True, axis=1)
        for curve, kept in ((deletion, ~top), (insertion, top)):
            probabilities = _softmax(np.where(kept, x, baseline) @ W.T + B)
            curve[:, k] = probabilities[np.arange(len(x)), target]
    np.testing.assert_allclose(vectors_to_numpy(rows["deletion_curve"]), deletion, rtol=1e-5)
    np.testing.assert_allclose(vectors_to_numpy(rows["insertion_curve"]), insertion, rtol=1e-5)
    # Area by trapezoids over the fraction of features removed, 0..1.
    area = lambda c: (c[:, 1:] + c[:, :-1]).sum(axis=1) / (2 * steps)
    np.testing.assert_allclose(rows["deletion_auc"].to_numpy(), area(deletion), rtol=1e-5)
    np.testing.assert_allclose(rows["insertion_auc"].to_numpy(), area(insertion), rtol=1e-5)
    # The predicted class's probability starts at the model's own and (deletion) ends at the
    # all-baseline input's.
    np.testing.assert_allclose(deletion[:, 0], _softmax(x @ W.T + B)[np.arange(len(x)), target], rtol=1e-6)


REGION_METHODS = [
    {"method": "saliency"},
    {"method": "integrated_gradients", "params": {"n_steps": 16}},
    {"method": "input_x_gradient"},
    {"method": "deeplift"},
    {"method": "gradient_shap", "params": {"n_samples": 4}},
    {"method": "occlusion", "params": {"sliding_window_shapes": [1, 1, 1]}},
]


def _image_spec(tmp_path, factory, methods, **fidelity):
    pq.write_table(image_table(16), tmp_path / "images.parquet")
    return parse_spec({
        "model": {"factory": factory},
        "dataset": {"source": str(tmp_path / "images.parquet"), "input_column": "pixels", "id_column": "key"},
        "preprocess": {"shape": [1, 4, 4]},
        "attributions": methods,
        "fidelity": fidelity,
        "output": {"root": str(tmp_path / "runs"), "run_name": "region"},
    })


def test_attribution_mass_falls_in_the_only_region_the_model_sees(tmp_path):
    spec = _image_spec(tmp_path, "tests.tiny_models:region_cnn", REGION_METHODS, curve_steps=4)
    tables = _explain(spec, image_table(16))
    inside = np.zeros((4, 4), dtype=bool)
    inside[REGION] = True
    for method in REGION_METHODS:
        rows = tables[RELATIVE.attributions_dir(method["method"])]
        maps = np.abs(vectors_to_numpy(rows["attribution"]).reshape(-1, 4, 4))
        assert maps[:, inside].sum() > 0, method
        assert maps[:, ~inside].sum() <= 1e-6 * maps[:, inside].sum(), method
        if method["method"] != "saliency":  # saliency is |gradient|: its ranking ignores sign
            deletion, insertion = rows["deletion_auc"].to_numpy(), rows["insertion_auc"].to_numpy()
            # Removing the 4 seen pixels first (the top quarter) leaves the model nothing to see,
            # so from the first quarter on deletion sits at the all-baseline probability.
            curves = vectors_to_numpy(rows["deletion_curve"])
            np.testing.assert_allclose(curves[:, 1:], curves[:, -1:].repeat(4, axis=1), rtol=1e-5)
            assert np.all(insertion >= deletion - 1e-6), method


def test_model_randomization_decorrelates_saliency_but_not_a_copy_of_the_model():
    model = load_model(parse_spec({"model": {"factory": "tests.tiny_models:ramp_linear"},
                                   "dataset": {"source": "digits"},
                                   "output": {"run_name": "x"}}).model)
    randomized = fid.randomized_copy(model, seed=0)
    assert not torch.allclose(randomized.fc.weight, model.fc.weight)
    # Same seed, same randomized weights: the check is reproducible.
    assert torch.equal(fid.randomized_copy(model, seed=0).fc.weight, randomized.fc.weight)
    trained = ramp_weights().numpy()
    # Saliency without abs of a linear model is its weight row: the ramp vs. the re-drawn row.
    rho = fid.spearman(trained, randomized.fc.weight.detach().numpy())
    assert np.all(np.abs(rho) < 0.3), rho
    np.testing.assert_allclose(fid.spearman(trained, trained), 1.0)
    # Ties get average ranks: a constant row has no correlation, not a spurious one.
    assert np.isnan(fid.spearman(np.ones((1, 5)), np.arange(5.0)[None]))[0]


def test_infidelity_of_an_exact_explanation_is_zero_and_sensitivity_is_bounded():
    model = load_model(parse_spec({"model": {"factory": "tests.tiny_models:linear"},
                                   "dataset": {"source": "digits"}, "output": {"run_name": "x"}}).model)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    target = torch.tensor([0, 1] * 4)
    weights = torch.tensor(LINEAR_W)[target]
    torch.manual_seed(0)
    # The gradient of a linear logit is its weight row, and perturbation · weight is exactly
    # the logit's change: infidelity 0.
    assert np.abs(fid.infidelity(model, x, weights, target, 10, 0.1)).max() < 1e-8
    # Integrated Gradients (zero baseline) of a linear model is x ⊙ w: a perturbation of at
    # most r per feature moves the map by at most r * ||w||, relative to the map's ||x ⊙ w||.
    explain = lambda inputs, t: (inputs * torch.tensor(LINEAR_W)[t], None)
    sensitivity = fid.sensitivity_max(explain, x, target, 10, 0.02)
    w = np.array(LINEAR_W)[target.numpy()]
    bound = 0.02 * np.linalg.norm(w, axis=1) / np.linalg.norm(x.numpy() * w, axis=1)
    assert np.all(sensitivity > 0) and np.all(sensitivity <= bound + 1e-6)


def test_sensitivity_of_one_instance_through_a_method_cut_into_sub_batches():
    from netloupe.contract.spec import MethodSpec
    from netloupe.workers.methods import bind_method

    model = load_model(parse_spec({"model": {"factory": "tests.tiny_models:linear"},
                                   "dataset": {"source": "digits"}, "output": {"run_name": "x"}}).model)
    # Two rows per Captum call: the 10 perturbed copies of the one instance take five calls,
    # each of which needs the instance's target.
    saliency = bind_method(MethodSpec(method="saliency", params={"abs": False}), model, (3,), chunk_rows=2)
    sensitivity = fid.sensitivity_max(saliency, torch.ones(1, 3), torch.tensor([1]), 10, 0.02)
    assert sensitivity.shape == (1,) and sensitivity[0] == pytest.approx(0, abs=1e-7)  # a constant gradient


def test_in_sample_is_seeded_and_close_to_its_rate():
    ids = list(range(20_000))
    chosen = fid.in_sample(ids, seed=3, rate=0.05)
    assert abs(chosen.sum() - 1000) < 150
    assert np.array_equal(chosen, fid.in_sample(ids, seed=3, rate=0.05))
    # A batch decides alone: the same ids are chosen in any slice.
    assert np.array_equal(chosen[7000:7100], fid.in_sample(ids[7000:7100], seed=3, rate=0.05))
    assert not np.array_equal(chosen, fid.in_sample(ids, seed=4, rate=0.05))


@pytest.fixture(scope="module")
def fidelity_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    pq.write_table(image_table(40), root / "images.parquet")
    spec = parse_spec({
        "model": {"factory": "tests.tiny_models:tiny_cnn"},
        "dataset": {"source": str(root / "images.parquet"), "input_column": "pixels", "id_column": "key"},
        "preprocess": {"shape": [1, 4, 4]},
        "layers": [{"name": "conv"}],
        "attributions": [{"method": "integrated_gradients", "params": {"n_steps": 16}},
                         {"method": "saliency", "params": {"abs": False}},
                         {"method": "grad_cam", "layer": "conv"}],
        "fidelity": {"curve_steps": 4, "sample_size": 12, "perturbations": 5},
        "execution": {"batch_size": 8, "num_workers": 2, "threads_per_worker": 1},
        "output": {"root": str(root / "runs"), "run_name": "fid"},
    })
    return run_job(spec), spec


def test_a_run_stores_fidelity_and_answers_it_in_sql(fidelity_run):
    result, spec = fidelity_run
    layout = result.layout
    con = open_catalog(layout.root)
    ids = image_table(40)["key"].to_pylist()
    expected = set(np.array(ids)[fid.in_sample(ids, 0, 12 / 40)])
    for method in ("integrated_gradients", "saliency", "grad_cam"):
        sample = run_query(con, f"SELECT * FROM fidelity_{method} ORDER BY instance_id")
        # The hash-chosen instances, each once, whatever worker explained them.
        assert set(sample["instance_id"].to_pylist()) == expected and sample.num_rows == len(expected)
        curves = run_query(con, f"SELECT deletion_curve, deletion_auc FROM attributions_{method}")
        assert curves.num_rows == 40 and curves["deletion_auc"].null_count == 0
    summary = {row["method"]: row for row in run_query(con, "SELECT * FROM fidelity_summary").to_pylist()}
    # The summary is the mean of the stored per-instance and per-sample values.
    ig = run_query(con, "SELECT avg(abs(convergence_delta)) AS d, avg(insertion_auc) AS i FROM attributions_integrated_gradients")
    assert summary["integrated_gradients"]["mean_abs_convergence_delta"] == pytest.approx(ig["d"][0].as_py())
    assert summary["integrated_gradients"]["mean_insertion_auc"] == pytest.approx(ig["i"][0].as_py())
    assert summary["saliency"]["sampled"] == len(expected)
    # Infidelity compares input perturbations with input maps; Grad-CAM's layer map has none.
    assert summary["grad_cam"]["mean_infidelity"] is None
    assert summary["saliency"]["mean_infidelity"] >= 0
    assert -1 <= summary["saliency"]["mean_randomization_spearman"] <= 1
    assert result.manifest.fidelity.sampled_rows == {m: len(expected) for m in summary}


def test_stored_fidelity_equals_the_direct_computation(fidelity_run):
    result, spec = fidelity_run
    con = open_catalog(result.layout.root)
    sample = run_query(con, "SELECT f.instance_id, f.target, f.randomization_spearman, i.pixels FROM "
                            "fidelity_saliency f JOIN inputs i USING (instance_id) ORDER BY 1")
    x = torch.from_numpy(vectors_to_numpy(sample["pixels"]).reshape(-1, 1, 4, 4))
    target = torch.from_numpy(sample["target"].to_numpy())
    model = load_model(spec.model)
    trained = torch.autograd.grad(model(x.requires_grad_())[torch.arange(len(x)), target].sum(), x)[0]
    randomized = fid.randomized_copy(model, spec.fidelity.seed)
    x2 = x.detach().requires_grad_()
    random_maps = torch.autograd.grad(randomized(x2)[torch.arange(len(x)), target].sum(), x2)[0]
    expected = fid.spearman(trained.reshape(len(x), -1).numpy().astype(np.float64),
                            random_maps.reshape(len(x), -1).numpy().astype(np.float64))
    np.testing.assert_allclose(sample["randomization_spearman"].to_numpy(zero_copy_only=False), expected,
                               rtol=1e-6, equal_nan=True)
