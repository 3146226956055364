"""The Python API (``import netloupe``), checked against hand arithmetic on the linear model,
and run as a notebook in a real Jupyter kernel."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import netloupe
from netloupe.contract.errors import RunError, SpecError
from netloupe.storage.catalog import QueryError
from tests.helpers import tabular_spec_data, tabular_table
from tests.tiny_models import LINEAR_B, LINEAR_W

W, B = np.array(LINEAR_W), np.array(LINEAR_B)


@pytest.fixture(scope="module")
def api_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    pq.write_table(tabular_table(50), root / "data.parquet")
    spec = tabular_spec_data(root / "data.parquet", root / "runs",
                             attributions=[{"method": "saliency"}, {"method": "input_x_gradient"}])
    return netloupe.explain(spec, progress=False), tabular_table(50)


def _by_hand(source):
    x = np.stack([source[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1).astype(np.float64)
    logits = x @ W.T + B
    return x, logits, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_explain_returns_the_committed_run(api_run):
    run, _ = api_run
    assert isinstance(run, netloupe.Run)
    assert len(run) == 50 and run.layers == ["fc"] and run.methods == ["saliency", "input_x_gradient"]
    assert run.instances()["instance_id"].to_pylist() == list(range(1000, 1050))  # whole tables too
    assert {"neuron_matrix", "suggested_subgroups", "confusion_matrix"} <= set(run.operators)
    assert "50 instances" in repr(run)


def test_sql_as_arrow_pandas_and_a_relation(api_run):
    run, source = api_run
    _, logits, _ = _by_hand(source)
    predicted = logits.argmax(axis=1)
    labels = source["label"].to_numpy()
    table = run.sql("SELECT count(*) AS n, sum(correct::INT) AS right FROM instances")
    assert table.to_pylist() == [{"n": 50, "right": int((predicted == labels).sum())}]
    frame = run.df("SELECT prediction, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1")
    assert frame["n"].tolist() == np.bincount(predicted, minlength=2).tolist()
    wrong = run.relation("SELECT instance_id, correct FROM instances").filter("NOT correct").aggregate("count(*)")
    assert wrong.fetchall() == [(int((predicted != labels).sum()),)]
    assert run.sql("SELECT * FROM instances WHERE instance_id = ?", [1007]).num_rows == 1
    with pytest.raises(QueryError, match="not allowed"):
        run.relation("DROP VIEW instances")


def test_one_instance_as_arrays(api_run):
    run, source = api_run
    x, logits, probabilities = _by_hand(source)
    one = run.instance(1007)
    target = int(logits[7].argmax())
    np.testing.assert_allclose(one.probabilities, probabilities[7], rtol=1e-5)
    np.testing.assert_allclose(one.activations["fc"], logits[7], rtol=1e-5)
    np.testing.assert_allclose(one.maps["saliency"], np.abs(W[target]), rtol=1e-6)
    np.testing.assert_allclose(one.maps["input_x_gradient"], x[7] * W[target], rtol=1e-5)
    assert one.input == pytest.approx({"x0": x[7, 0], "x1": x[7, 1], "x2": x[7, 2]})
    assert one.row["group"] == source["group"][7].as_py()
    with pytest.raises(RunError, match="no instance with id 99"):
        run.instance(99)


def test_open_run_reads_the_same_run_and_bad_input_is_clear(api_run, tmp_path):
    run, _ = api_run
    again = netloupe.open_run(run.location)
    assert again.manifest == run.manifest
    with pytest.raises(SpecError, match="takes a spec file's path or a dict, got int"):
        netloupe.explain(42)
    with pytest.raises(RunError, match="is not a committed netloupe run"):
        netloupe.open_run(tmp_path)
    assert set(netloupe.methods()["method"]) >= {"integrated_gradients", "saliency", "grad_cam"}


def test_a_second_job_in_the_same_process_does_not_land_on_another_cluster(api_run, tmp_path):
    """A notebook connected to one Ray cannot silently run a spec meant for another cluster."""
    run, _ = api_run
    spec = tabular_spec_data(run.manifest.dataset.path, tmp_path / "runs", execution={"ray_address": "127.0.0.1:1"})
    with pytest.raises(RunError, match=r"already connected to Ray \(a local Ray\).*ray_address is 127.0.0.1:1"):
        netloupe.explain(spec, progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.parquet"))


@pytest.mark.timeout(600)
def test_the_api_in_a_jupyter_kernel_shows_the_dashboard_inline(api_run, tmp_path):
    """A notebook, executed cell by cell in a real kernel: SQL, an instance, the dashboard."""
    import nbclient
    import nbformat

    run, _ = api_run
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(code) for code in (
        f"import netloupe\nrun = netloupe.open_run({str(run.location)!r})\nrun",
        "run.df('SELECT label, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1')",
        "run.instance(1007).maps['saliency'].round(3).tolist()",
        "run.dashboard()",
    )]
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [cell.outputs for cell in notebook.cells]
    assert not [o for cell in outputs for o in cell if o.output_type == "error"]
    assert "50 instances" in outputs[0][-1]["data"]["text/plain"]
    assert "<table" in outputs[1][-1]["data"]["text/html"]
    target = int((np.stack([tabular_table(50)[c].to_numpy() for c in ("x0", "x1", "x2")], axis=1)[7] @ W.T + B).argmax())
    assert outputs[2][-1]["data"]["text/plain"] == str(np.abs(W[target]).round(3).tolist())
    shown = outputs[3][-1]["data"]
    # Panel's notebook rendering: a Bokeh document the notebook extension executes, its
    # scripts inlined (no CDN) by the loading outputs before it.
    assert "application/vnd.holoviews_exec.v0+json" in shown and "Tabs" in shown["text/plain"]
    loaded = "".join(str(o.get("data", {})) for o in outputs[3])
    assert "cdn.bokeh.org" not in loaded and "Bokeh" in loaded
