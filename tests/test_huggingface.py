"""Hugging Face checkpoints (issue 16): a vision transformer saved with ``save_pretrained`` is
explained end to end on a real local Ray from its directory alone, its layers named as in its
own code; token layers pooled over tokens equal the model's own hidden states, and every
stored attribution equals Captum's called directly on the checkpoint model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from captum.attr import IntegratedGradients, Saliency

from netloupe.contract.errors import NetloupeError
from netloupe.contract.spec import parse_spec
from netloupe.pipeline.driver import run_job
from netloupe.storage.reader import RunReader
from netloupe.workers.huggingface import HuggingFaceClassifier
from netloupe.workers.model_loading import load_model

N, SIDE, CLASSES = 24, 8, 3


def _images() -> pa.Table:
    rng = np.random.default_rng(4)
    pixels = rng.uniform(0, 1, size=(N, SIDE * SIDE)).astype(np.float32)
    return pa.table({
        "key": pa.array([f"img-{i:02d}" for i in range(N)]),
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), SIDE * SIDE),
        "label": pa.array(rng.integers(0, CLASSES, N).astype(np.int64)),
    })


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A two-block ViT on 8×8 one-channel images (4 patches of 4×4 and [CLS]), saved as
    ``save_pretrained`` writes it: what a user's own fine-tuned checkpoint looks like."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=SIDE, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                    num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    directory = tmp_path_factory.mktemp("vit") / "checkpoint"
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vit_run(ray_local, checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("vitrun")
    pq.write_table(_images(), root / "images.parquet")
    spec = parse_spec({
        "model": {"huggingface": str(checkpoint)},
        "dataset": {"source": str(root / "images.parquet"), "input_column": "pixels", "id_column": "key"},
        "preprocess": {"shape": [1, SIDE, SIDE]},
        "layers": [{"name": "vit.layers.1"}, {"name": "vit.layernorm", "pooling": "first_token"}],
        "attributions": [{"method": "saliency"}, {"method": "integrated_gradients", "params": {"n_steps": 16}},
                         {"method": "attention_rollout"}, {"method": "grad_cam", "layer": "vit.layers.0"}],
        "execution": {"batch_size": 8, "num_workers": 2, "threads_per_worker": 1, "chunk_rows": 10_000},
        "output": {"root": str(root / "runs"), "run_name": "vit"},
    })
    return RunReader(run_job(spec).layout.root)


def _checkpoint_model(checkpoint):
    return transformers.ViTForImageClassification.from_pretrained(checkpoint, local_files_only=True).eval()


def _pixels(ids: list[str]) -> torch.Tensor:
    table = _images()
    row = {key: i for i, key in enumerate(table["key"].to_pylist())}
    pixels = np.stack(table["pixels"].to_numpy(zero_copy_only=False))[[row[i] for i in ids]]
    return torch.from_numpy(pixels.reshape(-1, 1, SIDE, SIDE))


def test_the_checkpoint_loads_under_its_own_layer_names(checkpoint):
    spec = parse_spec({"model": {"huggingface": str(checkpoint)}, "dataset": {"source": "x.parquet"},
                       "output": {"run_name": "t"}})
    model = load_model(spec.model)
    own = _checkpoint_model(checkpoint)
    assert isinstance(model, HuggingFaceClassifier) and not model.training
    assert [name for name, _ in model.named_modules()][1:] == [name for name, _ in own.named_modules()][1:]
    assert model.state_dict().keys() == own.state_dict().keys()
    x = _pixels(["img-00", "img-01"])
    torch.testing.assert_close(model(x), own(pixel_values=x).logits, rtol=0, atol=0)


def test_token_layers_pool_the_models_own_hidden_states(vit_run, checkpoint):
    model = _checkpoint_model(checkpoint)
    assert vit_run.manifest.model.layer_output_shapes["vit.layers.1"] == (5, 16)  # [CLS] + 4 patches
    assert vit_run.manifest.model_identity.fingerprint is not None
    for layer, expected in (
        ("vit.layers.1", lambda out: out.hidden_states[2].mean(dim=1)),  # the mean over its 5 tokens
        ("vit.layernorm", lambda out: model.vit.layernorm(out.hidden_states[2])[:, 0]),  # [CLS] after the norm
    ):
        ids, stored = vit_run.activation_matrix(layer)
        with torch.no_grad():
            want = expected(model(pixel_values=_pixels(ids.to_pylist()), output_hidden_states=True))
        np.testing.assert_allclose(stored, want.numpy(), rtol=1e-5, atol=1e-6)


def test_stored_attributions_equal_captum_on_the_checkpoint(vit_run, checkpoint):
    model = _checkpoint_model(checkpoint)

    def logits(x):
        return model(pixel_values=x).logits

    instances = vit_run.instances()
    ids = instances["instance_id"].to_pylist()
    x = _pixels(ids).requires_grad_(True)
    target = torch.tensor(instances["prediction"].to_pylist())
    expected = {
        "saliency": Saliency(logits).attribute(x, target=target, abs=True),
        "integrated_gradients": IntegratedGradients(logits).attribute(
            x, target=target, baselines=0.0, n_steps=16, method="gausslegendre"),
    }
    for method, maps in expected.items():
        table = vit_run.attributions(method)
        assert table["instance_id"].to_pylist() == ids
        stored = np.stack(table["attribution"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(stored, maps.detach().reshape(len(ids), -1).numpy(), rtol=1e-4, atol=1e-6)
    # Completeness: IG's maps sum to the logit's rise from the black image, up to the stored delta.
    table = vit_run.attributions("integrated_gradients")
    with torch.no_grad():
        rise = (logits(x) - logits(torch.zeros_like(x))).gather(1, target[:, None])[:, 0].numpy()
    delta = np.array(table["convergence_delta"].to_pylist())
    np.testing.assert_allclose(np.array(table["attr_sum"].to_pylist()) - rise, delta, atol=1e-5)


CONFIGURATION_CODE = '''
from transformers import PretrainedConfig


class NovelConfig(PretrainedConfig):
    model_type = "novel"

    def __init__(self, side=2, **kwargs):
        self.side = side
        super().__init__(**kwargs)
'''
MODELING_CODE = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_novel import NovelConfig


class NovelForImageClassification(PreTrainedModel):
    config_class = NovelConfig

    def __init__(self, config):
        super().__init__(config)
        self.head = torch.nn.Linear(config.side * config.side, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, **kwargs):
        return ImageClassifierOutput(logits=self.head(pixel_values.flatten(1)))
'''


def test_a_checkpoint_with_its_own_code_loads_only_when_the_spec_opts_in(tmp_path):
    """A checkpoint that ships its modelling code (``auto_map``), as save_pretrained writes it
    for a class registered for an Auto class: refused by default, loaded with the opt-in."""
    import importlib
    import sys

    from netloupe.contract.errors import ModelError

    package = tmp_path / "novel_code"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "configuration_novel.py").write_text(CONFIGURATION_CODE)
    (package / "modeling_novel.py").write_text(MODELING_CODE)
    sys.path.insert(0, str(tmp_path))
    try:
        configuration = importlib.import_module("novel_code.configuration_novel")
        modeling = importlib.import_module("novel_code.modeling_novel")
        configuration.NovelConfig.register_for_auto_class()
        modeling.NovelForImageClassification.register_for_auto_class("AutoModelForImageClassification")
        torch.manual_seed(1)
        saved = modeling.NovelForImageClassification(configuration.NovelConfig(num_labels=2)).eval()
        saved.save_pretrained(tmp_path / "checkpoint")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n.startswith("novel_code")]:
            del sys.modules[name]

    def spec(**model):
        return parse_spec({"model": {"huggingface": str(tmp_path / "checkpoint"), **model},
                           "dataset": {"source": "x.parquet"}, "output": {"run_name": "t"}}).model

    with pytest.raises(ModelError, match="ships its own modelling code"):
        load_model(spec())
    model = load_model(spec(trust_remote_code=True))
    x = torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2)
    expected = x.flatten(1) @ saved.head.weight.T + saved.head.bias
    torch.testing.assert_close(model(x), expected)
    assert [name for name, _ in model.named_modules()] == ["", "head"]


def test_the_vit_demo_through_the_cli(ray_local, tmp_path, capsys):
    """README's second example: the zoo writes a trained ViT checkpoint, the example spec
    explains the digits from that directory (here the first 400), and the model it explains is
    the trained one (most predictions right)."""
    from netloupe.pipeline.cli import main as cli_main
    from netloupe.storage.catalog import open_catalog, run_query

    checkpoint = tmp_path / "checkpoints" / "mnist-vit"
    assert cli_main(["zoo", "mnist-vit", "--out", str(checkpoint)]) == 0
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    assert cli_main(["zoo", "mnist-vit", "--out", str(checkpoint)]) == 2  # never over a directory
    assert "exists; give a directory that does not" in capsys.readouterr().err
    code = cli_main(["run", "examples/mnist-vit.yaml", "--no-progress", "--set", f"model.huggingface={checkpoint}",
                     "--set", "dataset.limit=400", "--set", f"output.root={tmp_path}"])
    assert code == 0
    assert "run 'mnist-vit' committed: 400 instances explained" in capsys.readouterr().out
    catalog = open_catalog(tmp_path / "mnist-vit")
    accuracy = run_query(catalog, "SELECT avg(correct::INT) AS a FROM instances")["a"][0].as_py()
    assert accuracy > 0.8
    layers = run_query(catalog, "SELECT layer, neurons FROM layers ORDER BY layer").to_pylist()
    assert layers == [{"layer": "vit.layernorm", "neurons": 64}, {"layer": "vit.layers.0", "neurons": 64},
                      {"layer": "vit.layers.1", "neurons": 64}]


def _rollout_by_formula(attentions) -> torch.Tensor:
    """Abnar & Zuidema's rollout from the model's own attentions: heads averaged, the identity
    added for the residual, rows renormalised, layers multiplied; [CLS]'s row over the patches."""
    rollout = None
    for attention in attentions:
        a = attention.mean(dim=1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, 1:]


def test_attention_rollout_is_stored_on_the_patch_grid(vit_run, checkpoint):
    model = transformers.ViTForImageClassification.from_pretrained(
        checkpoint, local_files_only=True, attn_implementation="eager").eval()
    table, maps = vit_run.attribution_maps("attention_rollout")
    assert vit_run.manifest.model.attribution_shapes["attention_rollout"] == (1, 2, 2)  # 8x8 in 4x4 patches
    with torch.no_grad():
        attentions = model(pixel_values=_pixels(table["instance_id"].to_pylist()), output_attentions=True).attentions
    np.testing.assert_allclose(maps.reshape(len(table), -1), _rollout_by_formula(attentions).numpy(),
                               rtol=1e-5, atol=1e-7)


def test_grad_cam_on_a_token_layer_is_worked_out_on_the_patch_grid(vit_run, checkpoint):
    """Grad-CAM of block 0: its 4 patch tokens laid out as a 2x2 map of 16 channels, each
    channel weighted by its mean gradient of the target logit over the patches, summed."""
    model = _checkpoint_model(checkpoint)
    table, maps = vit_run.attribution_maps("grad_cam")
    assert vit_run.manifest.model.attribution_shapes["grad_cam"] == (1, 2, 2)
    kept = {}
    handle = model.vit.layers[0].register_forward_hook(
        lambda _m, _i, out: kept.update(tokens=(out[0] if isinstance(out, tuple) else out)))
    logits = model(pixel_values=_pixels(table["instance_id"].to_pylist())).logits
    handle.remove()
    target = torch.tensor(table["target"].to_pylist())
    (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), kept["tokens"])
    grid = lambda t: t[:, 1:].transpose(1, 2).reshape(len(target), 16, 2, 2)  # noqa: E731 - [CLS] dropped
    want = (grid(gradient).mean(dim=(2, 3), keepdim=True) * grid(kept["tokens"])).sum(dim=1, keepdim=True)
    np.testing.assert_allclose(maps, want.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(maps).max() > 1e-3  # not the all-zero map of a layer the logit does not read


def test_grad_cam_on_a_vision_transformer_layer_without_tokens_is_refused(checkpoint, tmp_path):
    pq.write_table(_images(), tmp_path / "images.parquet")
    spec = parse_spec({
        "model": {"huggingface": str(checkpoint)},
        "dataset": {"source": str(tmp_path / "images.parquet"), "input_column": "pixels", "id_column": "key"},
        "preprocess": {"shape": [1, SIDE, SIDE]},
        "attributions": [{"method": "grad_cam", "layer": "classifier"}],
        "output": {"root": str(tmp_path / "runs"), "run_name": "bad"},
    })
    with pytest.raises(NetloupeError, match=r"takes a layer that outputs its tokens .* 'classifier' outputs \(\d+, 3\)"):
        run_job(spec)
    assert not (tmp_path / "runs" / "bad").exists()


def test_attention_rollout_of_uniform_attention_is_known(checkpoint):
    """With every query and key weight zero, each head attends uniformly (1/5 to each of the
    5 tokens), so each layer's flow is 0.5·U + 0.5·I and two layers give [CLS] 0.25 of itself
    and (1 - 0.25) / 5 = 0.15 from every patch, whatever the image."""
    from netloupe.workers.attention import AttentionRollout

    spec = parse_spec({"model": {"huggingface": str(checkpoint)}, "dataset": {"source": "x.parquet"},
                       "output": {"run_name": "t"}})
    model = load_model(spec.model)
    for name, parameter in model.named_parameters():
        if any(part in name for part in ("q_proj", "k_proj", "query", "key")):
            parameter.data.zero_()
    rollout = AttentionRollout(model).attribute(_pixels(["img-03", "img-07"]))
    torch.testing.assert_close(rollout, torch.full((2, 1, 2, 2), 0.15))
    with pytest.raises(Exception, match="head_fusion must be one of"):
        AttentionRollout(model).attribute(_pixels(["img-03"]), head_fusion="median")


def _resnet_checkpoint(directory):
    """A tiny convolutional checkpoint (Hugging Face's ResNet): no tokens, no attention."""
    torch.manual_seed(1)
    config = transformers.ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1],
                                       layer_type="basic", num_labels=CLASSES)
    transformers.ResNetForImageClassification(config).save_pretrained(directory)
    return directory


def test_a_checkpoint_s_default_pooling_follows_each_layer_s_output(checkpoint, tmp_path):
    """Token blocks are averaged over tokens, a conv stage over its positions, a head's
    (n, features) kept as it is: one default for every layer of any checkpoint."""
    from netloupe.workers.capture import LayerCapture

    pixels = _pixels(["img-01", "img-02", "img-05"])
    for directory, layers, expected in (
        (checkpoint, ["vit.layers.0", "classifier"],
         lambda model, out: [out.hidden_states[1].mean(dim=1), out.logits]),
        (_resnet_checkpoint(tmp_path / "resnet"), ["resnet.encoder.stages.1", "classifier.1"],
         lambda model, out: [out.hidden_states[2].mean(dim=(2, 3)), out.logits]),
    ):
        spec = parse_spec({"model": {"huggingface": str(directory)}, "dataset": {"source": "x.parquet"},
                           "layers": [{"name": name} for name in layers], "output": {"run_name": "t"}})
        model = load_model(spec.model).eval()
        with torch.no_grad():
            want = expected(model, model.checkpoint_model(pixel_values=pixels, output_hidden_states=True))
            with LayerCapture(model, [(layer.name, spec.pooling_of(layer)) for layer in spec.layers]) as capture:
                model(pixels)
        for name, value in zip(layers, want):
            torch.testing.assert_close(capture.activations[name], value)


def test_attention_rollout_refuses_what_it_cannot_explain(checkpoint, tmp_path):
    from netloupe.contract.errors import MethodError
    from netloupe.workers.attention import AttentionRollout
    from netloupe.workers.methods import bind_method

    spec = parse_spec({"model": {"huggingface": str(_resnet_checkpoint(tmp_path / "resnet"))},
                       "dataset": {"source": "x.parquet"}, "output": {"run_name": "t"}})
    with pytest.raises(MethodError, match="whose config has image_size and patch_size.*ResNetForImageClassification"):
        AttentionRollout(load_model(spec.model))
    spec = parse_spec({"model": {"huggingface": str(checkpoint)}, "dataset": {"source": "x.parquet"},
                       "attributions": [{"method": "attention_rollout", "noise_tunnel": {}}],
                       "output": {"run_name": "t"}})
    with pytest.raises(MethodError, match="attention_rollout takes no noise_tunnel.*'saliency'"):
        bind_method(spec.attributions[0], load_model(spec.model), (1, SIDE, SIDE), 100)


def test_a_checkpoint_saved_without_return_dict_is_explained_alike(checkpoint, tmp_path):
    model, pixels = _checkpoint_model(checkpoint), _pixels(["img-04"])
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    model.config.return_dict = False  # its forward then returns a tuple
    model.save_pretrained(tmp_path / "tuple-output")
    spec = parse_spec({"model": {"huggingface": str(tmp_path / "tuple-output")}, "dataset": {"source": "x.parquet"},
                       "output": {"run_name": "t"}})
    with torch.no_grad():
        torch.testing.assert_close(load_model(spec.model).eval()(pixels), logits)
