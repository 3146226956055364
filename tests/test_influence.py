"""TracIn's last-layer form (workers/influence.py): equal to Captum's TracInCPFast, to the
gradient dot products worked out by hand on a linear model, and top-k lists that merge
across shards exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from captum.influence import TracInCPFast
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

from netloupe.workers.influence import TopInfluences, last_layer_gradients, tracin_scores
from tests.tiny_models import SeededMLP

RATES = {1: 1.0, 2: 0.5}


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator), torch.randint(0, 2, (n,), generator=generator)


def test_scores_equal_captum_s_tracin_cp_fast(tmp_path):
    checkpoints = []
    for seed in RATES:
        path = tmp_path / f"ckpt-{seed}.safetensors"
        save_file(SeededMLP(3, 6, 2, seed=seed).state_dict(), str(path))
        checkpoints.append(str(path))

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(load_file(path))
        return RATES[int(path.rsplit("-", 1)[1].split(".")[0])]

    train_x, train_y = _data(20, 0)
    test_x, test_y = _data(5, 1)
    model = SeededMLP(3, 6, 2, seed=9).eval()
    captum = TracInCPFast(model, model.head, TensorDataset(train_x, train_y), checkpoints, checkpoints_load_func=load,
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=20)
    expected = captum.influence((test_x, test_y)).double()
    ours_test, ours_train, rates = [], [], []
    for path in checkpoints:
        rates.append(load(model, path))
        ours_test.append(last_layer_gradients(model, model.head, test_x, test_y))
        ours_train.append(last_layer_gradients(model, model.head, train_x, train_y))
    np.testing.assert_allclose(tracin_scores(ours_test, ours_train, rates).numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_on_a_linear_model_scores_are_the_gradient_dot_products_by_hand():
    """One linear layer: the loss gradient on W is (p - e) xᵀ, so a pair's score at a
    checkpoint is ((p - e)·(p' - e')) (x·x'); summed over checkpoints with their rates."""
    x, y = _data(4, 2)
    rates = [1.0, 0.25]
    layers = [nn.Linear(3, 2) for _ in rates]
    expected = np.zeros((4, 4))
    factors = []
    for layer, rate in zip(layers, rates):
        w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
        logits = x.double().numpy() @ w.T + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = p - np.eye(2)[y.numpy()]
        for i in range(4):
            for j in range(4):
                expected[i, j] += rate * float(np.outer(g[i], x[i].double().numpy()).ravel()
                                               @ np.outer(g[j], x[j].double().numpy()).ravel())
        factors.append(last_layer_gradients(layer, layer, x, y))
    np.testing.assert_allclose(tracin_scores(factors, factors, rates).numpy(), expected, rtol=1e-6)  # a float32 forward


def test_top_influences_merge_across_shards_exactly():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 40))
    # Ties at the k-th place of both ends, across shards: the larger id ranks higher.
    top = np.argsort(scores[0])
    scores[0, top[-5]] = scores[0, top[-4]]
    scores[0, 35] = scores[0, top[-4]]
    scores[1, top[0] if top[0] != 3 else top[1]] = scores[1, 3]
    ids = np.arange(100, 140)
    whole = TopInfluences(3, 4)
    whole.add(scores, ids)
    shards = [TopInfluences(3, 4) for _ in range(3)]
    for shard, columns in zip(shards, np.array_split(np.arange(40), 3)):
        for block in np.array_split(columns, 2):  # several blocks per shard
            shard.add(scores[:, block], ids[block])
    shards[0].merge(shards[1])
    shards[0].merge(shards[2])
    for got, want in ((shards[0].proponents(), whole.proponents()), (shards[0].opponents(), whole.opponents())):
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    top_scores, top_ids = whole.proponents()
    for row in range(3):
        order = sorted(range(40), key=lambda j: (scores[row, j], ids[j]), reverse=True)[:4]
        assert top_ids[row].tolist() == ids[order].tolist()
        assert top_scores[row].tolist() == pytest.approx(scores[row, order].tolist())
    low_scores, low_ids = whole.opponents()
    for row in range(3):
        order = sorted(range(40), key=lambda j: (scores[row, j], ids[j]))[:4]
        assert low_ids[row].tolist() == ids[order].tolist()
    # The first row has a tie at its 4th proponent: the larger id of the two is kept.
    tied = [j for j in range(40) if scores[0, j] == scores[0, top[-4]]]
    assert len(tied) >= 2 and top_ids[0, 3] in ids[tied]


def test_a_tie_gives_the_same_proponent_however_the_examples_are_split():
    scores, ids = np.array([[5.0, 5.0, 1.0]]), np.array([0, 1, 2])
    whole = TopInfluences(1, 1)
    whole.add(scores, ids)
    split = TopInfluences(1, 1)
    split.add(scores[:, :2], ids[:2])  # two columns: nothing pruned yet
    split.add(scores[:, 2:], ids[2:])
    for influences in (whole, split):
        assert influences.proponents()[1].tolist() == [[1]]  # of the tied, the larger id
        assert influences.opponents()[1].tolist() == [[2]]
    unpruned = TopInfluences(1, 1)
    unpruned.add(scores[:, :2], ids[:2])
    assert unpruned.proponents()[1].tolist() == [[1]]


def _influence_spec(data, root, name: str, **influence) -> dict:
    return {
        "model": {"factory": "tests.tiny_models:SeededMLP", "kwargs": {"features": 3, "hidden": 6, "classes": 2, "seed": 1}},
        "dataset": {"source": str(data), "feature_columns": ["x0", "x1", "x2"], "id_column": "row_id"},
        "influence": {"layer": "head", **influence},
        "execution": {"batch_size": 32, "num_workers": 1},
        "output": {"root": str(root), "run_name": name},
    }


def test_a_run_s_influence_table_is_captum_s_top_k_over_the_training_set(ray_local, tmp_path):
    """60 instances explained, the same 60 as the training set, scored in 4 shards of 16 rows:
    each instance's 3 proponents and 3 opponents are Captum's TracInCPFast top-k (of the loss
    at the predicted class, the learning rate 0.5), and the SQL operator lists them in order."""
    from netloupe.contract.spec import parse_spec
    from netloupe.pipeline.driver import run_job
    from netloupe.storage.catalog import open_catalog, run_query
    from tests.helpers import tabular_table

    table = tabular_table(60, seed=4)
    pq.write_table(table, tmp_path / "data.parquet")
    result = run_job(parse_spec(_influence_spec(tmp_path / "data.parquet", tmp_path / "runs", "one", k=3,
                                                learning_rates=0.5, batch_size=16)))
    assert result.manifest.influence.training_rows == 60 and result.manifest.influence.learning_rates == [0.5]
    stored = pq.read_table(result.layout.influence_path).to_pandas()
    assert len(stored) == 60 * 2 * 3

    x = torch.tensor(np.stack([table[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1))
    ids = table["row_id"].to_numpy()
    model = SeededMLP(3, 6, 2, seed=1).eval()
    predicted = model(x).argmax(1)
    captum = TracInCPFast(model, model.head, TensorDataset(x, torch.tensor(table["label"].to_numpy())), ["only"],
                          checkpoints_load_func=lambda _model, _path: 0.5,
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=60)
    for sign, proponents in (("proponent", True), ("opponent", False)):
        indices, scores = captum.influence((x, predicted), k=3, proponents=proponents)
        ours = stored[stored["sign"] == sign].sort_values(["instance_id", "rank"])
        assert ours["rank"].tolist() == [1, 2, 3] * 60
        np.testing.assert_array_equal(ours["train_id"].to_numpy().reshape(60, 3), ids[indices.numpy()])
        np.testing.assert_allclose(ours["score"].to_numpy().reshape(60, 3), scores.double().numpy(), rtol=1e-4, atol=1e-7)
    con = open_catalog(result.layout.root)
    listed = run_query(con, "SELECT sign, rank, train_id FROM influential_examples(1007)").to_pylist()
    first = stored[stored["instance_id"] == 1007].sort_values(["sign", "rank"], ascending=[False, True])
    assert [(r["sign"], r["rank"], r["train_id"]) for r in listed] == list(
        zip(first["sign"], first["rank"], first["train_id"]))
    # From Python, with the training examples themselves (their label and features).
    import netloupe

    shown = netloupe.open_run(result.layout.root).influence(1007)
    assert shown["train_id"].tolist() == [r["train_id"] for r in listed]
    rows = table.to_pandas().set_index("row_id").loc[shown["train_id"]]
    assert shown["train_label"].tolist() == rows["label"].tolist() and shown["x1"].tolist() == rows["x1"].tolist()
    leaned_on = run_query(con, "SELECT train_id, instances FROM top_proponents('prediction = 1', top := 1)").to_pylist()
    by_hand = stored[(stored["sign"] == "proponent") & (stored["rank"] == 1)
                     & stored["instance_id"].isin(ids[predicted.numpy() == 1])]["train_id"].value_counts()
    assert {r["train_id"]: r["instances"] for r in leaned_on} == by_hand.to_dict()


def test_influence_settings_that_cannot_work_are_refused_before_ray(tmp_path):
    from netloupe.contract.errors import DatasetError, SpecError
    from netloupe.contract.spec import parse_spec
    from netloupe.pipeline.driver import validate
    from tests.helpers import tabular_table

    pq.write_table(tabular_table(20, seed=4), tmp_path / "data.parquet")
    unlabelled = tabular_table(20, seed=5).drop_columns(["label"])
    pq.write_table(unlabelled, tmp_path / "unlabelled.parquet")
    keyed = tabular_table(20, seed=4)
    pq.write_table(keyed.append_column("key", pa.array([f"k{i}" for i in range(20)])), tmp_path / "keyed.parquet")
    data = tmp_path / "data.parquet"
    cases = [
        ({"layer": "fc9"}, SpecError, r"no module of; its linear layers: \['fc1', 'head'\]"),
        ({"layer": "relu"}, SpecError, "is a ReLU; TracIn's last-layer form needs the final nn.Linear"),
        ({"layer": "fc1"}, SpecError, "'fc1' is not the model's last layer"),
        ({"layer": "head", "where": "colour = 'red'"}, SpecError, "influence.where .* does not work on the training set"),
        ({"layer": "head", "where": "x0 > 100"}, DatasetError, "chooses no training rows"),
        ({"layer": "head", "training": {"source": str(tmp_path / "unlabelled.parquet"),
                                        "feature_columns": ["x0", "x1", "x2"], "id_column": "row_id"}},
         DatasetError, "influence.training: dataset.label_column names column 'label'"),
        ({"layer": "head", "training": {"source": str(data), "feature_columns": ["x0", "x1"], "id_column": "row_id"}},
         DatasetError, "the model cannot take the training rows' inputs"),
        ({"layer": "head", "training": {"source": str(tmp_path / "keyed.parquet"), "feature_columns": ["x0", "x1", "x2"],
                                        "id_column": "key"}}, DatasetError, r"ids \('key'\) are string"),
    ]
    outside = tabular_table(20, seed=6)
    labels = outside["label"].to_numpy().copy()
    labels[3] = -1  # an "unknown" marker would index the last class
    pq.write_table(outside.set_column(outside.schema.get_field_index("label"), "label", pa.array(labels)),
                   tmp_path / "minus-one.parquet")
    cases += [
        ({"layer": "head", "learning_rates": [1.0, 0.5]}, SpecError, "2 rates for 1 checkpoint"),
        ({"layer": "head", "training": {"source": str(tmp_path / "minus-one.parquet"),
                                        "feature_columns": ["x0", "x1", "x2"], "id_column": "row_id"}},
         DatasetError, r"training rows' labels run from -1 to 1, but the model scores 2 classes"),
    ]
    for settings, error, message in cases:
        spec = _influence_spec(data, tmp_path / "runs", "bad")
        spec["influence"] = settings
        with pytest.raises(error, match=message):
            validate(parse_spec(spec))
    # Of the loss at the label: the explained instances need labels, class indices all.
    for source, changes, error, message in (
            (data, {"label_column": None}, SpecError, "target 'label' .* no label_column"),
            (tmp_path / "minus-one.parquet", {}, DatasetError, "explained instances' labels run from -1")):
        spec = _influence_spec(source, tmp_path / "runs", "bad", target="label")
        spec["dataset"].update(changes)
        with pytest.raises(error, match=message):
            validate(parse_spec(spec))
    spec = _influence_spec(data, tmp_path / "runs", "bad")
    spec["model"] = {"factory": "tests.tiny_models:linear_softmax", "output": "probabilities"}
    spec["influence"]["layer"] = "fc"
    with pytest.raises(SpecError, match="needs a model that outputs logits"):
        validate(parse_spec(spec))
    with pytest.raises(SpecError, match="2 rates for 3 checkpoint"):
        parse_spec(_influence_spec(data, tmp_path / "runs", "bad", learning_rates=[1.0, 0.5])).influence.rate_of(3)
