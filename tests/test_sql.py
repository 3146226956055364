"""SQL over a run made by the pipeline: views over every table, a moved run still queries,
the sandbox holds, and `netloupe sql` prints and exports. (tests/test_operators.py checks
every operator against numpy and pandas on a hand-made run.)"""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from netloupe.pipeline.cli import main as cli_main
from netloupe.pipeline.driver import run_job
from netloupe.storage.catalog import QueryError, open_catalog, run_query
from tests.helpers import tabular_spec, tabular_table
from tests.tiny_models import LINEAR_B, LINEAR_W


@pytest.fixture(scope="module")
def run_dir(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("sqlrun")
    pq.write_table(tabular_table(30), root / "data.parquet")
    spec = tabular_spec(root / "data.parquet", root / "runs",
                        attributions=[{"method": "input_x_gradient"}, {"method": "saliency", "name": "sal.abs"}])
    return run_job(spec).layout.root


def _expected():
    table = tabular_table(30)
    x = np.stack([table[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1)
    logits = x @ np.array(LINEAR_W).T + np.array(LINEAR_B)
    return table, logits


def test_views_cover_every_table(run_dir):
    con = open_catalog(run_dir)
    table, logits = _expected()
    rows = run_query(con, "SELECT instance_id, prediction, correct, \"group\" FROM instances ORDER BY 1")
    assert rows["instance_id"].to_pylist() == table["row_id"].to_pylist()
    assert rows["prediction"].to_pylist() == logits.argmax(axis=1).tolist()
    assert rows["group"].to_pylist() == table["group"].to_pylist()
    fc = run_query(con, "SELECT n0, n1 FROM activations_fc ORDER BY instance_id")
    np.testing.assert_allclose(np.stack([fc["n0"], fc["n1"]], axis=1), logits, rtol=1e-5, atol=1e-6)
    vectors = run_query(con, "SELECT activation FROM activation_vectors_fc ORDER BY instance_id")["activation"]
    np.testing.assert_allclose(np.array(vectors.to_pylist()), logits, rtol=1e-5, atol=1e-6)
    assert run_query(con, "SELECT count(*) AS n FROM attributions_sal_abs")["n"].to_pylist() == [30]
    assert run_query(con, "SELECT layer, neurons FROM layers").to_pylist() == [{"layer": "fc", "neurons": 2}]
    assert sorted(run_query(con, "SELECT method FROM methods")["method"].to_pylist()) == ["input_x_gradient", "sal.abs"]
    meta = dict(zip(*run_query(con, "SELECT key, value FROM run_metadata").to_pydict().values()))
    assert json.loads(meta["counts"])["instances"] == 30


def test_moved_run_still_queries(run_dir, tmp_path):
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run_dir, moved)
    con = open_catalog(moved)
    assert run_query(con, "SELECT count(*) AS n FROM instances")["n"].to_pylist() == [30]
    assert run_query(con, "SELECT count(*) AS n FROM attributions_sal_abs")["n"].to_pylist() == [30]
    # and it reads the copy's Parquet, not the original's
    (moved / "attributions").rename(moved / "gone")
    with pytest.raises(duckdb.IOException, match="elsewhere/copy/attributions/"):
        open_catalog(moved)


@pytest.mark.parametrize("sql, words", [
    ("SELECT * FROM read_csv('/etc/passwd')", "refused"),
    ("COPY instances TO '{run}/leak.csv'", "COPY statements are not allowed"),
    ("COPY (SELECT 1) TO '/tmp/netloupe-leak.csv'", "COPY statements are not allowed"),
    ("INSTALL httpfs", "LOAD statements are not allowed"),
    ("LOAD httpfs", "LOAD statements are not allowed"),
    ("ATTACH '/tmp/netloupe-other.db' AS other", "ATTACH statements are not allowed"),
    ("SET enable_external_access = true", "SET statements are not allowed"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statements are not allowed"),
    ("SELECT 1; DROP VIEW instances", "DROP statements are not allowed"),
    ("SELECT * FROM read_parquet('{outside}')", "refused"),
    # EXPLAIN ANALYZE runs what it explains: a COPY inside it would overwrite the run's files
    ("EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{run}/leak.csv' (FORMAT csv)", "EXPLAIN ANALYZE is not allowed"),
    ("explain  analyze CREATE OR REPLACE TABLE memory.main.instances AS SELECT 1", "EXPLAIN ANALYZE is not allowed"),
    # the fast path's function must not turn a layer name into a path outside the run
    ("SELECT _neuron_moments_fast('../../../../etc/passwd', [1::BIGINT])", "no neuron statistics for layer"),
])
def test_sandbox_refuses(run_dir, tmp_path, sql, words):
    outside = tmp_path / "outside.parquet"
    pq.write_table(tabular_table(3), outside)
    con = open_catalog(run_dir)
    with pytest.raises(QueryError, match=words):
        run_query(con, sql.format(run=run_dir, outside=outside))
    assert not (run_dir / "leak.csv").exists()
    assert (run_dir / "manifest.json").read_text().startswith("{")
    assert run_query(con, "SELECT count(*) AS n FROM instances")["n"].to_pylist() == [30]  # intact


def test_configuration_cannot_be_unlocked_from_python_either(run_dir):
    con = open_catalog(run_dir)
    with pytest.raises(Exception, match="locked"):
        con.execute("SET enable_external_access = true")


def test_cli_formats(run_dir, tmp_path, capsys):
    query = "SELECT prediction, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1"
    _, logits = _expected()
    expected = np.bincount(logits.argmax(axis=1)).tolist()
    assert cli_main(["sql", str(run_dir), query, "--format", "csv", "--output", str(tmp_path / "o.csv")]) == 0
    assert pacsv.read_csv(tmp_path / "o.csv")["n"].to_pylist() == expected
    # A list column (a CSV cell cannot hold one) is written as its JSON text.
    listed = "SELECT list(instance_id ORDER BY instance_id)[1:2] AS first_two, {'n': 1} AS s FROM instances"
    assert cli_main(["sql", str(run_dir), listed, "--format", "csv", "--output", str(tmp_path / "l.csv")]) == 0
    row = pacsv.read_csv(tmp_path / "l.csv").to_pylist()[0]
    first_two = sorted(pq.read_table(run_dir / "instances", columns=["instance_id"])["instance_id"].to_pylist())[:2]
    assert json.loads(row["first_two"]) == first_two and json.loads(row["s"]) == {"n": 1}
    assert cli_main(["sql", str(run_dir), query, "--format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["n"] for row in lines] == expected
    assert cli_main(["sql", str(run_dir), query, "--format", "parquet"]) == 2
    assert "--output" in capsys.readouterr().err
    assert cli_main(["sql", str(run_dir), query, "--format", "parquet", "--output", str(tmp_path / "o.parquet")]) == 0
    assert pq.read_table(tmp_path / "o.parquet")["n"].to_pylist() == expected
    script = tmp_path / "q.sql"
    script.write_text("SELECT 1;\n" + query + ";\n")
    assert cli_main(["sql", str(run_dir), "--file", str(script)]) == 0
    assert "prediction" in capsys.readouterr().out
    assert cli_main(["sql", str(run_dir), "--list"]) == 0
    assert "activations_fc" in capsys.readouterr().out
    assert cli_main(["sql", str(run_dir), "DELETE FROM instances"]) == 2
    assert "not allowed" in capsys.readouterr().err


def test_not_a_run(tmp_path, capsys):
    assert cli_main(["sql", str(tmp_path), "SELECT 1"]) == 2
    assert "not a committed netloupe run" in capsys.readouterr().err


def test_confusion_matrix_and_class_metrics_match_scikit_learn(run_dir):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    table, logits = _expected()
    labels, predictions = table["label"].to_numpy(), logits.argmax(axis=1)
    con = open_catalog(run_dir)
    cells = run_query(con, "SELECT * FROM confusion_matrix()").to_pylist()
    matrix = np.zeros((2, 2), int)
    for cell in cells:
        matrix[cell["label"], cell["prediction"]] = cell["n"]
    np.testing.assert_array_equal(matrix, confusion_matrix(labels, predictions, labels=[0, 1]))
    metrics = run_query(con, "SELECT * FROM class_metrics()").to_pydict()
    precision, recall, _, support = precision_recall_fscore_support(labels, predictions, labels=[0, 1], zero_division=0)
    assert metrics["class"] == [0, 1]
    np.testing.assert_allclose(metrics["precision"], precision)
    np.testing.assert_allclose(metrics["recall"], recall)
    assert metrics["support"] == support.tolist()


def _instances_frame():
    table, logits = _expected()
    frame = table.to_pandas()
    frame["prediction"] = logits.argmax(axis=1)
    frame["correct"] = frame["label"] == frame["prediction"]
    return frame


def test_subset_summary_matches_pandas(run_dir):
    frame = _instances_frame()
    subset = frame[(frame["group"] == "b") & (frame["prediction"] == 1)]
    row = run_query(open_catalog(run_dir),
                    "SELECT * FROM subset_summary('\"group\" = ''b'' AND prediction = 1')").to_pylist()[0]
    assert row["size"] == len(subset)
    assert row["accuracy"] == pytest.approx(subset["correct"].mean())
    assert dict(row["label_counts"]) == subset["label"].value_counts().to_dict()
    assert dict(row["prediction_counts"]) == {1: len(subset)}


@pytest.mark.parametrize("positive", [0, 1])
def test_subgroup_metrics_match_pandas(run_dir, positive):
    frame = _instances_frame()
    rows = run_query(open_catalog(run_dir), f"SELECT * FROM subgroup_metrics(['group'], {positive})").to_pylist()
    assert [r["group"] for r in rows] == ["a", "b"]
    for row in rows:
        part = frame[frame["group"] == row["group"]]
        pos, pred = part["label"] == positive, part["prediction"] == positive
        tp, fp, fn, tn = (pos & pred).sum(), (~pos & pred).sum(), (pos & ~pred).sum(), (~pos & ~pred).sum()
        assert (row["size"], row["tp"], row["fp"], row["fn"], row["tn"]) == (len(part), tp, fp, fn, tn)
        assert row["accuracy"] == pytest.approx(part["correct"].mean())
        assert row["fpr"] == pytest.approx(fp / (fp + tn))
        assert row["fnr"] == pytest.approx(fn / (fn + tp))
        assert row["recall"] == pytest.approx(tp / (tp + fn))
