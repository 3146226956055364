"""End-to-end runs of image models on a real local Ray.

The tiny CNN's activations are checked against a convolution written out in numpy; every
stored attribution is checked against Captum called directly on the same inputs (for
stochastic methods, with the same per-batch seed); Integrated Gradients against
completeness; the MNIST demo spec end to end through the CLI.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from captum.attr import (
    DeepLift,
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)

from netloupe.contract.spec import parse_spec
from netloupe.pipeline.cli import main as cli_main
from netloupe.pipeline.driver import run_job
from netloupe.storage.layout import RunLayout
from netloupe.storage.reader import RunReader
from netloupe.storage.schema import vectors_to_numpy
from netloupe.workers.explain import batch_seed
from tests.helpers import image_table
from tests.tiny_models import CNN_FILTER_BIAS, CNN_FILTERS, tiny_cnn

METHODS = [
    {"method": "integrated_gradients", "params": {"n_steps": 256}},
    {"method": "saliency"},
    {"method": "input_x_gradient"},
    {"method": "deeplift", "baseline": 0.2},
    {"method": "gradient_shap", "params": {"n_samples": 5, "stdevs": 0.1}},
    {"method": "grad_cam", "layer": "conv"},
    {"method": "occlusion", "params": {"sliding_window_shapes": [1, 2, 2], "strides": [1, 2, 2]}},
    {"method": "integrated_gradients", "name": "ig_smoothgrad", "params": {"n_steps": 8},
     "noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 3, "stdevs": 0.2}},
]


def captum_direct(entry: dict, model, x: torch.Tensor, target: torch.Tensor, seed: int) -> torch.Tensor:
    """The attribution Captum gives for ``entry`` when called by hand."""
    method, params = entry["method"], dict(entry.get("params", {}))
    baseline = entry.get("baseline", 0.0)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # GradientSHAP draws its path points from numpy
    x = x.clone().requires_grad_(True)
    if method == "integrated_gradients":
        ig = IntegratedGradients(model)
        if "noise_tunnel" in entry:
            nt = entry["noise_tunnel"]
            return NoiseTunnel(ig).attribute(x, target=target, baselines=baseline, nt_type=nt["nt_type"],
                                             nt_samples=nt["nt_samples"], stdevs=nt["stdevs"],
                                             method="gausslegendre", **params)
        return ig.attribute(x, target=target, baselines=baseline, method="gausslegendre", **params)
    if method == "saliency":
        return Saliency(model).attribute(x, target=target, abs=True)
    if method == "input_x_gradient":
        return InputXGradient(model).attribute(x, target=target)
    if method == "deeplift":
        return DeepLift(model).attribute(x, target=target, baselines=baseline)
    if method == "gradient_shap":
        return GradientShap(model).attribute(x, target=target, baselines=torch.zeros_like(x[:1]), **params)
    if method == "grad_cam":
        return LayerGradCam(model, model.conv).attribute(x, target=target)
    if method == "occlusion":
        return Occlusion(model).attribute(x, target=target, baselines=0.0,
                                          sliding_window_shapes=(1, 2, 2), strides=(1, 2, 2))
    raise AssertionError(method)


@pytest.fixture(scope="module")
def cnn_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    pq.write_table(image_table(40), root / "images.parquet")
    spec = parse_spec({
        "model": {"factory": "tests.tiny_models:tiny_cnn"},
        "dataset": {"source": str(root / "images.parquet"), "input_column": "pixels", "id_column": "key"},
        "preprocess": {"shape": [1, 4, 4]},
        "layers": [{"name": "conv", "pooling": "mean"}, {"name": "relu", "pooling": "max"},
                   {"name": "head"}],
        "attributions": METHODS,
        # chunk_rows above the batch size: one Captum call per batch, as the test makes.
        "execution": {"batch_size": 12, "num_workers": 2, "threads_per_worker": 1, "seed": 7,
                      "chunk_rows": 10_000},
        "output": {"root": str(root / "runs"), "run_name": "cnn"},
    })
    return RunReader(run_job(spec).layout.root), image_table(40)


def _inputs(table) -> np.ndarray:
    return vectors_to_numpy(table["pixels"]).reshape(-1, 1, 4, 4).astype(np.float32)


def _conv_by_hand(images: np.ndarray) -> np.ndarray:
    """(n, 2, 3, 3): each 2×2 filter slid over each 4×4 image, plus its bias."""
    filters = np.array(CNN_FILTERS)
    out = np.zeros((len(images), 2, 3, 3))
    for f in range(2):
        for i in range(3):
            for j in range(3):
                out[:, f, i, j] = (images[:, 0, i:i + 2, j:j + 2] * filters[f]).sum(axis=(1, 2)) + CNN_FILTER_BIAS[f]
    return out


def test_activations_by_hand(cnn_run):
    reader, source = cnn_run
    assert reader.instances()["instance_id"].to_pylist() == sorted(source["key"].to_pylist())
    order = np.argsort(source["key"].to_numpy(zero_copy_only=False))
    conv = _conv_by_hand(_inputs(source))[order]
    _, mean_conv = reader.activation_matrix("conv")
    np.testing.assert_allclose(mean_conv, conv.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    _, max_relu = reader.activation_matrix("relu")
    np.testing.assert_allclose(max_relu, np.maximum(conv, 0).max(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    shapes = reader.manifest.model
    assert shapes.layer_neurons == {"conv": 2, "relu": 2, "head": 2}
    assert shapes.layer_output_shapes["conv"] == (2, 3, 3)


@pytest.mark.parametrize("entry", METHODS, ids=lambda e: e.get("name", e["method"]))
def test_stored_attributions_equal_captum_direct(cnn_run, entry):
    """Each part holds one batch; re-running Captum on that batch, with the seed derived from
    the part's key, must give the stored values."""
    reader, source = cnn_run
    name = entry.get("name", entry["method"])
    model = tiny_cnn().eval()
    by_id = {key: i for i, key in enumerate(source["key"].to_pylist())}
    images = _inputs(source)
    parts = sorted(reader.layout.attributions_dir(name).glob("part-*.parquet"))
    assert len(parts) == reader.manifest.counts.parts >= 2
    for part in parts:
        stored = pq.read_table(part)
        key = part.name[len("part-"):-len(".parquet")]
        rows = [by_id[k] for k in stored["instance_id"].to_pylist()]
        x = torch.from_numpy(images[rows])
        target = torch.from_numpy(stored["target"].to_numpy())
        seed = batch_seed(7, key, name)
        expected = captum_direct(entry, model, x, target, seed).detach().numpy()
        got = vectors_to_numpy(stored["attribution"]).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_completeness(cnn_run):
    reader, source = cnn_run
    model = tiny_cnn().eval()
    order = np.argsort(source["key"].to_numpy(zero_copy_only=False))
    x = torch.from_numpy(_inputs(source)[order])
    rows, maps = reader.attribution_maps("integrated_gradients")
    target = torch.from_numpy(rows["target"].to_numpy())
    with torch.no_grad():
        gap = (model(x).gather(1, target[:, None]) - model(torch.zeros_like(x)).gather(1, target[:, None]))[:, 0]
    totals = maps.reshape(len(maps), -1).sum(axis=1)
    np.testing.assert_allclose(totals, gap.numpy(), atol=1e-3)
    delta = rows["convergence_delta"].to_numpy()
    np.testing.assert_allclose(delta, totals - gap.numpy(), atol=1e-5)
    assert np.abs(delta).max() < 1e-3


def test_heatmap_storage_is_channel_sum_pooled(ray_local, tmp_path):
    pq.write_table(image_table(10), tmp_path / "images.parquet")
    spec = parse_spec({
        "model": {"factory": "tests.tiny_models:tiny_cnn"},
        "dataset": {"source": str(tmp_path / "images.parquet"), "input_column": "pixels", "id_column": "key"},
        "preprocess": {"shape": [1, 4, 4]},
        "attributions": [{"method": "input_x_gradient"}],
        "storage": {"attributions": "heatmap", "heatmap_size": [2, 2]},
        "output": {"root": str(tmp_path / "runs"), "run_name": "hm"},
    })
    reader = RunReader(run_job(spec).layout.root)
    rows, maps = reader.attribution_maps("input_x_gradient")
    assert maps.shape == (10, 2, 2)
    model = tiny_cnn().eval()
    source = image_table(10)
    x = torch.from_numpy(_inputs(source)).requires_grad_(True)
    full = InputXGradient(model).attribute(x, target=torch.from_numpy(rows["target"].to_numpy())).detach().numpy()
    expected = full[:, 0].reshape(10, 2, 2, 2, 2).mean(axis=(2, 4))  # 2×2 blocks of the 4×4 map
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)


def test_mnist_demo_spec_through_cli(ray_local, tmp_path, capsys):
    """The README's demo: trained CNN on mnist-5k (here the first 600 digits), every method."""
    code = cli_main(["run", "examples/mnist.yaml", "--no-progress",
                     "--set", "dataset.limit=600", "--set", "execution.batch_size=256",
                     "--set", f"output.root={tmp_path}"])
    assert code == 0
    out = capsys.readouterr().out
    # A short summary, not the manifest: what ran, how long, where; then commands as typed.
    assert "run 'mnist-demo' committed: 600 instances explained in" in out
    assert "methods: integrated_gradients, saliency, input_x_gradient" in out and "next:" in out
    assert not any(line.startswith(("{", "}", '"')) for line in out.splitlines()) and len(out.splitlines()) < 15
    assert "-m netloupe.pipeline.cli" not in out
    # The first "next" command must work as printed.
    import subprocess

    suggestions = [line.strip() for line in out.split("next:\n")[1].splitlines()[:2]]
    answer = subprocess.run(["bash", "-c", suggestions[0]], capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0 and "accuracy" in answer.stdout, answer.stderr
    answer = subprocess.run(["bash", "-c", suggestions[1]], capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0 and "frac_active" in answer.stdout and "label=1" in answer.stdout, answer.stderr
    reader = RunReader(tmp_path / "mnist-demo")
    instances = reader.instances()
    assert instances.num_rows == 600
    assert np.mean(instances["correct"].to_numpy(zero_copy_only=False)) > 0.9
    assert set(instances["stroke"].to_pylist()) == {"thin", "medium", "heavy"}
    manifest = RunLayout(tmp_path / "mnist-demo").read_manifest()
    assert manifest.model.layer_neurons == {"relu1": 16, "relu2": 32, "relu3": 128}
    assert manifest.model.attribution_shapes["grad_cam"] == (1, 14, 14)
    assert set(manifest.tables.attributions) == {
        "integrated_gradients", "saliency", "input_x_gradient", "deeplift", "gradient_shap",
        "grad_cam", "occlusion", "saliency_smoothgrad"}
    assert manifest.versions["torch"].startswith("2.13")
    ig = reader.attributions("integrated_gradients")
    assert ig.num_rows == 600 and ig["finite"].to_numpy(zero_copy_only=False).all()


def test_sub_batching_changes_nothing_for_deterministic_methods(cnn_run):
    """A worker cuts batches to its chunk size; the result must not depend on the cut."""
    from netloupe.contract.spec import MethodSpec
    from netloupe.workers.methods import bind_method

    reader, source = cnn_run
    model = tiny_cnn().eval()
    x = torch.from_numpy(_inputs(source))
    target = torch.from_numpy(np.arange(len(x)) % 2)
    for entry in METHODS:
        spec = MethodSpec.model_validate(entry)
        whole = bind_method(spec, model, (1, 4, 4), chunk_rows=10_000)
        if whole.stochastic:
            continue
        cut = bind_method(spec, model, (1, 4, 4), chunk_rows=7)
        assert cut.sub_batch_size(x) < len(x)
        a, da = whole(x, target)
        b, db = cut(x, target)
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-5, atol=1e-6)
        if da is not None:
            np.testing.assert_allclose(db.detach().numpy(), da.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_stochastic_methods_cut_into_chunks_reproduce_sequential_captum_calls():
    """With a chunk size below the batch, a stochastic method draws per sub-batch, in
    order, after one seed: the same as calling Captum on each sub-batch in turn."""
    from netloupe.contract.spec import MethodSpec
    from netloupe.workers.methods import bind_method

    model = tiny_cnn().eval()
    x = torch.from_numpy(_inputs(image_table(9)))
    target = torch.from_numpy(np.arange(9) % 2)
    spec = MethodSpec.model_validate({"method": "gradient_shap", "params": {"n_samples": 4, "stdevs": 0.1}})
    bound = bind_method(spec, model, (1, 4, 4), chunk_rows=8)  # 8 rows ÷ 4 samples = 2 instances
    torch.manual_seed(3)
    np.random.seed(3)
    ours, _ = bound(x, target)
    torch.manual_seed(3)
    np.random.seed(3)
    shap = GradientShap(model)
    expected = torch.cat([
        shap.attribute(x[s:s + 2].clone().requires_grad_(True), target=target[s:s + 2],
                       baselines=torch.zeros_like(x[:1]), n_samples=4, stdevs=0.1)
        for s in range(0, 9, 2)])
    np.testing.assert_allclose(ours.detach().numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_tuned_chunk_is_a_candidate_within_the_memory_cap():
    from netloupe.workers.methods import CHUNK_CANDIDATES, MAX_CHUNK_BYTES, tune_chunk_rows

    model = tiny_cnn().eval()
    x = torch.from_numpy(_inputs(image_table(5)))
    assert tune_chunk_rows(model, x, per_instance_bytes=64) in CHUNK_CANDIDATES
    # An instance so large that only the smallest candidate fits the cap.
    assert tune_chunk_rows(model, x, per_instance_bytes=MAX_CHUNK_BYTES // 40) == CHUNK_CANDIDATES[0]
    assert tune_chunk_rows(model, x, per_instance_bytes=MAX_CHUNK_BYTES // 100) in (32, 64)
