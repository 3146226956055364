"""Several runs of the same instances, together (issue 18): the data fingerprint that admits
them, and each comparison operator against numpy on small runs whose answers are computed
here from the models themselves."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr

from netloupe.contract.errors import RunError
from netloupe.contract.spec import parse_spec
from netloupe.pipeline.cli import main as cli_main
from netloupe.pipeline.driver import run_job
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.compare import named_runs, open_runs, rank_correlations, top_k_overlaps
from netloupe.storage.reader import RunReader
from netloupe.storage.schema import vectors_to_numpy
from tests.helpers import tabular_table
from tests.tiny_models import SeededMLP

ROWS = 120


def _run(data, root, name: str, seed: int, batch_size: int, **dataset) -> RunReader:
    return RunReader(run_job(parse_spec({
        "model": {"factory": "tests.tiny_models:SeededMLP",
                  "kwargs": {"features": 3, "hidden": 6, "classes": 2, "seed": seed}},
        "dataset": {"source": str(data), "feature_columns": ["x0", "x1", "x2"], "id_column": "row_id",
                    "metadata_columns": ["group"], **dataset},
        "layers": [{"name": "relu"}],
        "attributions": [{"method": "saliency"}],
        "execution": {"batch_size": batch_size, "num_workers": 1},
        "output": {"root": str(root), "run_name": name},
    })).layout.root)


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """v1 and v2: two models over the same data; v1_again: v1's model in other batches;
    changed: v1's model over the same ids with one input changed; fewer: 100 of the 120 ids."""
    root = tmp_path_factory.mktemp("compare")
    table = tabular_table(ROWS, seed=4)
    pq.write_table(table, root / "data.parquet")
    x = np.stack([table[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1)
    x[7, 1] += 1.0
    changed = table.set_column(table.schema.get_field_index("x1"), "x1", pa.array(x[:, 1]))
    pq.write_table(changed, root / "changed.parquet")
    made = {
        "v1": _run(root / "data.parquet", root / "runs", "v1", 1, 16),
        "v2": _run(root / "data.parquet", root / "runs", "v2", 2, 32),
        "v1_again": _run(root / "data.parquet", root / "runs", "v1_again", 1, 50),
        "changed": _run(root / "changed.parquet", root / "runs", "changed", 1, 16),
    }
    made["fewer"] = _handmade_first(made["v1"], 100, root / "runs")
    return made, table


def _handmade_first(run: RunReader, rows: int, root) -> RunReader:
    """A run of ``run``'s first ``rows`` instances (written directly: only its ids matter)."""
    from netloupe.storage.handmade import write_handmade_run

    instances = run.instances().sort_by("instance_id").slice(0, rows)
    kept = instances.select(["instance_id", "label", "prediction", "probabilities", "group"])
    return RunReader(write_handmade_run(root, "fewer", kept, {"relu": np.zeros((rows, 6), np.float32)}).root)


def _inputs(table: pa.Table) -> torch.Tensor:
    return torch.from_numpy(np.stack([table[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1).astype(np.float32))


def _probabilities(seed: int, table: pa.Table) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(SeededMLP(3, 6, 2, seed=seed).eval()(_inputs(table)), dim=1).numpy()


def _open(made: dict, *names: str):
    return open_runs({name: made[name].layout.root for name in names})


def test_one_dataset_has_one_digest_whatever_the_batches_and_others_are_refused(runs):
    made, _ = runs
    digests = {name: reader.manifest.dataset.input_digest for name, reader in made.items()}
    assert digests["v1"] is not None and digests["v1"].startswith("duckdb-")
    assert digests["v1"] == digests["v2"] == digests["v1_again"]  # 16, 32 and 50 rows a batch
    assert digests["changed"] != digests["v1"]
    with pytest.raises(RunError, match="same instance ids but different inputs"):
        _open(made, "v1", "changed")
    with pytest.raises(RunError, match=r"different instances \(120 and 100\)"):
        _open(made, "v1", "fewer")


def test_disagreements_and_agreement_are_the_two_models_own(runs):
    made, table = runs
    p1, p2 = _probabilities(1, table), _probabilities(2, table)
    ids = table["row_id"].to_numpy()
    labels = table["label"].to_numpy()
    differ = p1.argmax(1) != p2.argmax(1)
    assert 0 < differ.sum() < ROWS, "the two seeds must disagree somewhere and agree somewhere"
    con = _open(made, "v1", "v2")
    got = run_query(con, "SELECT * FROM disagreements('v1', 'v2') ORDER BY instance_id").to_pylist()
    assert [r["instance_id"] for r in got] == ids[differ].tolist()
    for r, i in zip(got, np.flatnonzero(differ)):
        assert (r["prediction_a"], r["prediction_b"], r["label"]) == (p1[i].argmax(), p2[i].argmax(), labels[i])
        assert r["confidence_a"] == pytest.approx(p1[i].max(), abs=1e-6)
        assert r["confidence_b"] == pytest.approx(p2[i].max(), abs=1e-6)
    [summary] = run_query(con, "SELECT * FROM agreement('v1', 'v2')").to_pylist()
    right1, right2 = p1.argmax(1) == labels, p2.argmax(1) == labels
    assert summary == {"instances": ROWS, "same_prediction": ROWS - differ.sum(), "agreement": pytest.approx(1 - differ.mean()),
                       "both_correct": (right1 & right2).sum(), "only_a_correct": (right1 & ~right2).sum(),
                       "only_b_correct": (~right1 & right2).sum(), "both_wrong": (~right1 & ~right2).sum()}
    # Each run's tables under its name; the runs in the order given.
    assert run_query(con, "SELECT run FROM runs ORDER BY position")["run"].to_pylist() == ["v1", "v2"]
    assert run_query(con, "SELECT count(*) AS n FROM v2.attributions_saliency")["n"][0].as_py() == ROWS


def test_map_agreement_is_spearman_and_top_k_overlap_of_the_stored_maps(runs):
    made, _ = runs
    maps = {}
    for name in ("v1", "v2"):
        rows = made[name].attributions("saliency").sort_by("instance_id")
        maps[name] = vectors_to_numpy(rows["attribution"]).astype(np.float64)
    got = run_query(_open(made, "v1", "v2"),
                    "SELECT * FROM map_agreement('v1', 'v2', 'saliency', k := 2) ORDER BY instance_id").to_pylist()
    assert len(got) == ROWS
    constant = 0
    for i, r in enumerate(got):
        expected = spearmanr(maps["v1"][i], maps["v2"][i]).statistic
        if np.isnan(expected):  # a map of zeros (a dead ReLU layer here) has no ranking
            assert r["rank_correlation"] is None
            constant += 1
        else:
            assert r["rank_correlation"] == pytest.approx(expected, abs=1e-9)
        top = [set(np.argsort(-np.abs(m[i]), kind="stable")[:2]) for m in (maps["v1"], maps["v2"])]
        assert r["top_k_overlap"] == len(top[0] & top[1]) / 2
    assert constant < ROWS / 2
    same = run_query(_open(made, "v1", "v1_again"),
                     "SELECT min(rank_correlation) AS rho, min(top_k_overlap) AS top FROM "
                     "map_agreement('v1', 'v1_again', 'saliency')").to_pylist()[0]
    assert same == {"rho": pytest.approx(1.0), "top": 1.0}


def test_rank_correlation_ranks_ties_at_their_mean_and_top_k_breaks_them_by_position():
    a = np.array([[1.0, 2.0, 2.0, 5.0], [3.0, 3.0, 3.0, 3.0]])
    b = np.array([[4.0, 3.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    got = rank_correlations(a, b)
    assert got[0] == pytest.approx(spearmanr(a[0], b[0]).statistic)
    assert np.isnan(got[1])  # a constant map has no ranking
    # |values| largest first: a's top 2 are positions 3 and 1 (1 before 2 among the tied 2s); b's, 0 and 1.
    assert top_k_overlaps(a[:1], b[:1], 2).tolist() == [0.5]
    assert top_k_overlaps(a[:1], b[:1], 10).tolist() == [1.0]  # k beyond the width: the whole map


def test_subset_metrics_by_run_are_each_run_s_own_in_order(runs):
    made, _ = runs
    predicate = "\"group\" = 'a'"
    got = run_query(_open(made, "v2", "v1"), "SELECT * FROM subset_metrics_by_run(?, 1)", [predicate]).to_pylist()
    assert [r["run"] for r in got] == ["v2", "v1"]
    empty = run_query(_open(made, "v2", "v1"), "SELECT run, size, accuracy FROM subset_metrics_by_run('false')").to_pylist()
    assert empty == [{"run": "v2", "size": 0, "accuracy": None}, {"run": "v1", "size": 0, "accuracy": None}]
    for r in got:
        [own] = run_query(open_catalog(made[r["run"]].layout.root), "SELECT * FROM subset_metrics(?, 1)",
                          [predicate]).to_pylist()
        for key in ("size", "accuracy", "tp", "fp", "fn", "tn", "fpr", "fnr", "precision", "recall", "mean_confidence"):
            assert r[key] == pytest.approx(own[key]), key


def _centred(reader: RunReader, only: np.ndarray | None = None) -> np.ndarray:
    """The run's relu activations by instance id (only the ids ``only``), centred."""
    ids, matrix = reader.activation_matrix("relu")
    ids = ids.to_numpy()
    if only is not None:
        matrix, ids = matrix[np.isin(ids, only)], ids[np.isin(ids, only)]
    matrix = matrix[np.argsort(ids)].astype(np.float64)
    return matrix - matrix.mean(axis=0)


def test_representation_change_is_linear_cka_and_neuron_matches_are_correlations(runs):
    made, _ = runs
    x, y = _centred(made["v1"]), _centred(made["v2"])
    cka = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    con = _open(made, "v1", "v2", "v1_again")
    [change] = run_query(con, "SELECT * FROM representation_change('v1', 'v2', 'relu')").to_pylist()
    assert change == {"instances": ROWS, "neurons_a": 6, "neurons_b": 6, "linear_cka": pytest.approx(cka, rel=1e-5)}
    assert 0 < cka < 0.99
    # The Parquet path (a layer wider than the activation index) gives the same.
    from netloupe.storage.compare import _GramSums, _paired_blocks

    moments = _GramSums(selves=True)
    for a, b in _paired_blocks([str(made[n].layout.activations_dir("relu") / "*.parquet") for n in ("v1", "v2")],
                               "BIGINT", None):
        moments.add(a, b)
    assert moments.comparison().linear_cka == pytest.approx(cka, rel=1e-5)
    # A run made before the workers kept each part's Gram matrix: its self-products computed here.
    import shutil

    older = made["v2"].layout.root.parent / "v2_older"
    shutil.copytree(made["v2"].layout.root, older)
    shutil.rmtree(older / "index" / "gram")
    with open_runs({"v1": made["v1"].layout.root, "older": older}) as con_older:
        [again] = run_query(con_older, "SELECT linear_cka FROM representation_change('v1', 'older', 'relu')").to_pylist()
    assert again["linear_cka"] == pytest.approx(cka, rel=1e-5)
    [same] = run_query(con, "SELECT linear_cka FROM representation_change('v1', 'v1_again', 'relu')").to_pylist()
    assert same["linear_cka"] == pytest.approx(1.0, abs=1e-6)
    matches = run_query(con, "SELECT * FROM neuron_matches('v1', 'v2', 'relu') ORDER BY neuron").to_pylist()
    sd_x, sd_y = x.std(axis=0), y.std(axis=0)
    for r in matches:
        i = r["neuron"]
        if sd_x[i] == 0:  # a neuron dead over these instances has no correlation
            assert r["best_match"] is None and r["correlation"] is None
            continue
        correlation = np.array([np.corrcoef(x[:, i], y[:, j])[0, 1] if sd_y[j] > 0 else -np.inf for j in range(6)])
        assert r["best_match"] == int(np.argmax(correlation))
        assert r["correlation"] == pytest.approx(correlation.max(), abs=1e-5)
    sampled = run_query(con, "SELECT * FROM representation_change('v1', 'v2', 'relu', sample := 60)").to_pylist()[0]
    assert 30 < sampled["instances"] < 90
    # A sample smaller than any part's share still reads one part (the one of least hash).
    [tiny] = run_query(con, "SELECT * FROM representation_change('v1', 'v2', 'relu', sample := 1)").to_pylist()
    assert tiny["instances"] == 16 and tiny["linear_cka"] is not None  # v1's parts: 16 rows
    with pytest.raises(Exception, match="recorded no layer 'fc9'; it has relu"):
        run_query(con, "SELECT * FROM representation_change('v1', 'v2', 'fc9')")


def test_a_layer_s_gram_matrix_keeps_a_small_variance_about_a_large_mean():
    """The workers' per-part Gram matrices are raw sums in float64: a neuron of mean 10 and
    deviation 0.01 keeps its variance (float32 products would cancel it)."""
    from netloupe.storage.compare import _centred_gram
    from netloupe.storage.part_statistics import layer_gram

    rng = np.random.default_rng(0)
    values = (10 + 0.01 * rng.normal(size=(20000, 3))).astype(np.float32)
    values[:, 2] = rng.normal(size=20000)
    gram = layer_gram(values[:7000]) + layer_gram(values[7000:])
    expected = np.cov(values.astype(np.float64), rowvar=False, bias=True)
    np.testing.assert_allclose(_centred_gram(gram, 20000), expected, rtol=1e-6, atol=1e-12)


def test_the_cli_opens_several_named_runs_and_refuses_unclear_names(runs, capsys):
    made, _ = runs
    v1, v2 = made["v1"].layout.root, made["v2"].layout.root
    assert cli_main(["sql", f"v1={v1}", f"v2={v2}", "SELECT instances, same_prediction FROM agreement('v1', 'v2')",
                     "--format", "json"]) == 0
    assert '"instances": 120' in capsys.readouterr().out
    assert cli_main(["sql", str(v1), str(v2), "--list"]) == 0  # named by their directories
    listed = capsys.readouterr().out
    assert "disagreements" in listed and "representation_change" in listed
    assert list(named_runs([str(v1), f"other={v1}"])) == ["v1", "other"]
    # A DuckDB keyword is a name like any other (each run's schema is quoted).
    con = open_runs({"end": v1, "all": v2})
    assert run_query(con, "SELECT instances FROM agreement('end', 'all')")["instances"][0].as_py() == ROWS
    uri = "s3://bucket/runs/v3?endpoint_override=127.0.0.1:9000&scheme=http"
    assert named_runs([uri, f"v4={uri}"]) == {"v3": uri, "v4": uri}
    with pytest.raises(RunError, match="two runs are named 'v1'"):
        named_runs([str(v1), f"v1={v2}"])
    with pytest.raises(RunError, match="must be a SQL identifier"):
        named_runs([f"1st={v1}"])


def test_a_spec_over_checkpoints_makes_a_run_group_in_their_order(ray_local, tmp_path, capsys):
    """Three weights files named out of order (step-10, step-2, step-1): one run per file in
    natural order, each explaining its own weights; the group opens as its runs side by side;
    it is not replaced without --force, and a replacement drops the members it no longer has."""
    from safetensors.torch import save_file

    from netloupe.pipeline.run_group import run_checkpoints
    from netloupe.storage.layout import RunExistsError
    from netloupe.storage.run_group import read_group

    table = tabular_table(60, seed=5)
    pq.write_table(table, tmp_path / "data.parquet")
    training = tabular_table(30, seed=6)
    pq.write_table(training, tmp_path / "train.parquet")
    (tmp_path / "ck").mkdir()
    for step, seed in ((10, 3), (2, 2), (1, 1)):
        save_file(SeededMLP(3, 6, 2, seed=seed).state_dict(), str(tmp_path / "ck" / f"step-{step}.safetensors"))
    data = {
        "model": {"factory": "tests.tiny_models:SeededMLP", "kwargs": {"features": 3, "hidden": 6, "classes": 2,
                                                                        "seed": 9},
                  "checkpoints": str(tmp_path / "ck" / "step-*.safetensors")},
        "dataset": {"source": str(tmp_path / "data.parquet"), "feature_columns": ["x0", "x1", "x2"],
                    "id_column": "row_id", "metadata_columns": ["group"]},
        "layers": [{"name": "relu"}],
        "attributions": [{"method": "saliency"}],
        "execution": {"batch_size": 32, "num_workers": 1},
        # TracIn over the three checkpoints at their learning rates, of the training rows labelled 1.
        "influence": {"layer": "head", "k": 2, "learning_rates": [1.0, 0.5, 0.25], "target": "label",
                      "where": "label = 1", "training": {"source": str(tmp_path / "train.parquet"),
                                                         "feature_columns": ["x0", "x1", "x2"], "id_column": "row_id"}},
        "output": {"root": str(tmp_path / "runs"), "run_name": "steps"},
    }
    group = run_checkpoints(parse_spec(data))
    assert list(group.members) == ["step_1", "step_2", "step_10"]
    # One explain pass: each worker explained every batch under the three checkpoints in turn.
    assert [m.manifest.timings["explain_pass_shared_by"] for m in group.members.values()] == [3, 3, 3]
    record = read_group(group.directory)
    assert [m.checkpoint for m in record.members] == [str(tmp_path / "ck" / f"step-{s}.safetensors") for s in (1, 2, 10)]
    for name, seed in (("step_1", 1), ("step_2", 2), ("step_10", 3)):
        instances = RunReader(group.directory / name).instances().sort_by("instance_id")
        expected = _probabilities(seed, table.sort_by("row_id")).argmax(1)
        assert instances["prediction"].to_numpy().tolist() == expected.tolist(), name
    assert cli_main(["sql", str(group.directory), "SELECT run FROM runs ORDER BY position", "--format", "csv"]) == 0
    assert capsys.readouterr().out.replace('"', "").split() == ["run", "step_1", "step_2", "step_10"]
    con = open_runs({"step_1": group.directory / "step_1", "step_2": group.directory / "step_2",
                     "step_10": group.directory / "step_10"})
    assert run_query(con, "SELECT model FROM runs ORDER BY position")["model"].to_pylist() == [
        m.checkpoint for m in record.members]
    _check_group_influence(con, record, table, training, tmp_path / "ck")
    import netloupe

    with netloupe.compare(group.directory) as comparison:
        shown = comparison.influence(1003)
    stored = run_query(con, "SELECT train_id FROM influence WHERE instance_id = 1003 ORDER BY sign DESC, rank")
    assert shown["train_id"].tolist() == stored["train_id"].to_pylist()
    assert set(shown["train_label"]) == {1}  # the training rows chosen: label = 1
    by_run = run_query(con, "SELECT * FROM representation_change_by_run('relu') ORDER BY position").to_pylist()
    assert [(r["run"], r["compared_with"]) for r in by_run] == [("step_1", "step_2"), ("step_2", "step_10"),
                                                                ("step_10", None)]
    pair = run_query(con, "SELECT linear_cka FROM representation_change('step_2', 'step_10', 'relu')")
    assert by_run[1]["linear_cka"] == pytest.approx(pair["linear_cka"][0].as_py())
    to_last = run_query(con, "SELECT * FROM representation_change_by_run('relu', reference := 'step_10')").to_pylist()
    assert to_last[-1]["linear_cka"] == pytest.approx(1.0)
    # A sample of a group's runs (batched alike): whole parts, chosen by their names' hash.
    from netloupe.storage.compare import _hash_fraction

    parts = sorted((group.directory / "step_1" / "activations").rglob("*.parquet"))
    kept = [p.name for p in parts if _hash_fraction(p.name) < 30 / 60]
    sampled = run_query(con, "SELECT * FROM representation_change('step_1', 'step_2', 'relu', sample := 30)").to_pylist()[0]
    assert len(kept) == 1, "the two parts' names hash to 0.90 and 0.41: one is under the half asked"
    ids = np.concatenate([pq.read_table(p, columns=["instance_id"])["instance_id"].to_numpy()
                          for p in parts if p.name in kept])
    assert sampled["instances"] == len(ids) < 60
    x, y = (_centred(RunReader(group.directory / name), ids) for name in ("step_1", "step_2"))
    cka = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert sampled["linear_cka"] == pytest.approx(cka, rel=1e-5)
    with pytest.raises(RunExistsError, match="--force"):
        run_checkpoints(parse_spec(data))
    # A group interrupted before its record (runs, no group.json) is replaced by --force; a
    # list keeps its order; the runs the new group has not are gone.
    (group.directory / "group.json").unlink()
    data["model"]["checkpoints"] = [str(tmp_path / "ck" / "step-2.safetensors"), str(tmp_path / "ck" / "step-1.safetensors")]
    data["influence"] = None
    again = run_checkpoints(parse_spec(data), force=True)
    assert read_group(again.directory).influence is None and not (again.directory / "influence").exists()
    assert list(again.members) == ["step_2", "step_1"]
    assert [m.name for m in read_group(again.directory).members] == ["step_2", "step_1"]
    assert sorted(p.name for p in again.directory.iterdir() if p.is_dir()) == ["step_1", "step_2"]


def _check_group_influence(con, record, table: pa.Table, training: pa.Table, checkpoints) -> None:
    """The group's influence is TracIn summed over its checkpoints: Captum's TracInCPFast top-k
    with the same checkpoints and learning rates, over the training rows labelled 1, of each
    instance's loss at its label."""
    from captum.influence import TracInCPFast
    from safetensors.torch import load_file
    from torch import nn
    from torch.utils.data import TensorDataset

    assert record.influence.learning_rates == [1.0, 0.5, 0.25] and record.influence.training_rows == int(
        (training["label"].to_numpy() == 1).sum())
    rates = {"step-1": 1.0, "step-2": 0.5, "step-10": 0.25}

    def load(model, path):
        model.load_state_dict(load_file(path))
        return rates[path.rsplit("/", 1)[1].split(".")[0]]

    features = ("x0", "x1", "x2")
    chosen = training.filter(pa.compute.equal(training["label"], 1))
    train_x = torch.tensor(np.stack([chosen[c].to_numpy() for c in features], axis=1))
    x = torch.tensor(np.stack([table[c].to_numpy() for c in features], axis=1))
    model = SeededMLP(3, 6, 2, seed=9).eval()
    captum = TracInCPFast(model, model.head, TensorDataset(train_x, torch.tensor(chosen["label"].to_numpy())),
                          [str(checkpoints / f"{name}.safetensors") for name in rates], checkpoints_load_func=load,
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=100)
    indices, scores = captum.influence((x, torch.tensor(table["label"].to_numpy())), k=3, proponents=True)
    stored = run_query(con, "SELECT instance_id, train_id, score FROM influence WHERE sign = 'proponent' "
                            "ORDER BY instance_id, rank").to_pandas()
    order = np.argsort(table["row_id"].to_numpy())  # the stored rows are by instance id
    expected_ids = chosen["row_id"].to_numpy()[indices.numpy()][order]
    expected = scores.double().numpy()[order]
    np.testing.assert_allclose(stored["score"].to_numpy().reshape(-1, 2), expected[:, :2], rtol=1e-4, atol=1e-9)
    # Where scores tie (an instance whose last layer's input is all zeros scores 0 with every
    # example) Captum's order is its sort's; netloupe's is the larger id first.
    distinct = (np.diff(expected, axis=1) < -1e-6 * np.abs(expected[:, :1])).all(axis=1)
    assert distinct.sum() >= 40
    np.testing.assert_array_equal(stored["train_id"].to_numpy().reshape(-1, 2)[distinct], expected_ids[distinct, :2])


def test_checkpoints_are_a_factory_s_weights_files(tmp_path):
    from netloupe.contract.errors import SpecError
    from netloupe.pipeline.run_group import checkpoint_files

    base = {"dataset": {"source": "digits"}, "output": {"root": str(tmp_path), "run_name": "g"}}
    with pytest.raises(SpecError, match="give 'factory' and no 'weights'"):
        parse_spec({**base, "model": {"factory": "tests.tiny_models:seeded_mlp", "weights": "w.safetensors",
                                      "checkpoints": ["a.safetensors"]}})
    from netloupe.pipeline.driver import validate

    with pytest.raises(SpecError, match="is a run group"):
        validate(parse_spec({**base, "model": {"factory": "tests.tiny_models:seeded_mlp",
                                               "checkpoints": ["a.safetensors"]}}))
    with pytest.raises(SpecError, match="the gamma rule takes .*not \\['epsilon'\\]"):
        parse_spec({**base, "model": {"factory": "tests.tiny_models:seeded_mlp"},
                    "attributions": [{"method": "lrp", "rules": {"Linear": {"rule": "gamma", "epsilon": 0.1}}}]})
    with pytest.raises(SpecError, match="no file matches"):
        checkpoint_files(parse_spec({**base, "model": {"factory": "tests.tiny_models:seeded_mlp",
                                                       "checkpoints": str(tmp_path / "none-*.pt")}}))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "last.pt").write_bytes(b"")
    with pytest.raises(SpecError, match="several checkpoints would be named 'last'"):
        checkpoint_files(parse_spec({**base, "model": {"factory": "tests.tiny_models:seeded_mlp",
                                                       "checkpoints": [str(tmp_path / "a" / "last.pt"),
                                                                       str(tmp_path / "b" / "last.pt")]}}))


def test_the_python_api_opens_runs_together_and_one_instance_across_them(runs):
    import netloupe

    made, table = runs
    both = netloupe.compare(v1=made["v1"].layout.root, v2=made["v2"].layout.root)
    assert both.df("SELECT run FROM runs ORDER BY position")["run"].tolist() == ["v1", "v2"]
    first = table["row_id"][0].as_py()
    seen = both.instance(first)
    assert list(seen) == ["v1", "v2"]
    for name, seed in (("v1", 1), ("v2", 2)):
        expected = _probabilities(seed, table.slice(0, 1))[0]
        assert seen[name].row["prediction"] == expected.argmax()
        np.testing.assert_allclose(seen[name].probabilities, expected, atol=1e-6)
        assert seen[name].maps["saliency"].shape == (3,)
    with pytest.raises(RunError, match="no run named 'v3'"):
        both.run("v3")
    both.close()
    with pytest.raises(RunError, match="two runs are named 'v1'"):
        netloupe.compare(made["v1"].layout.root, v1=made["v2"].layout.root)
    with netloupe.compare(made["v1"].layout.root, made["v2"].layout.root) as named:
        assert list(named.runs) == ["v1", "v2"]


def test_a_metadata_column_called_run_keeps_its_values_beside_the_run_names(tmp_path):
    from netloupe.storage import schema as S
    from netloupe.storage.handmade import write_handmade_run

    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    instances = pa.table({"instance_id": np.array([1, 2], np.int64), "label": np.array([0, 0]),
                          "prediction": np.array([0, 1]), "probabilities": S.fixed_vectors(probabilities, 2),
                          "run": ["morning", "evening"]})
    layers = {"fc": np.eye(2, dtype=np.float32)}
    a = write_handmade_run(tmp_path, "a", instances, layers)
    b = write_handmade_run(tmp_path, "b", instances, layers)
    rows = run_query(open_runs({"a": a.root, "b": b.root}),
                     "SELECT run, instance_run FROM instances_by_run ORDER BY run, instance_id").to_pylist()
    assert rows == [{"run": "a", "instance_run": "morning"}, {"run": "a", "instance_run": "evening"},
                    {"run": "b", "instance_run": "morning"}, {"run": "b", "instance_run": "evening"}]
