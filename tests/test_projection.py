"""The projection stage: fitted on a seeded sample on the driver, applied in the workers.

A seeded MLP over 8 clustered features is run on a real local Ray; the stored coordinates
are checked against scikit-learn's PCA fitted on the same sample, against the fitted
projection applied on the driver, across reruns and shardings, and through the catalog.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from sklearn.decomposition import PCA

from netloupe.contract.errors import SpecError
from netloupe.contract.spec import parse_spec
from netloupe.pipeline.driver import run_job
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.layout import RunLayout
from netloupe.storage.reader import RunReader
from netloupe.workers.projection import fit_projection

FEATURES = [f"f{i}" for i in range(8)]
ROWS = 300
SAMPLE = 120


def clustered_table(n: int = ROWS) -> pa.Table:
    """Three clusters in 8 dimensions, ids 5000.., labels = cluster."""
    rng = np.random.default_rng(3)
    cluster = np.arange(n) % 3
    centers = rng.normal(scale=3.0, size=(3, 8))
    x = (centers[cluster] + rng.normal(size=(n, 8))).astype(np.float32)
    columns = {"row_id": pa.array(np.arange(5000, 5000 + n, dtype=np.int64))}
    columns.update({name: x[:, i] for i, name in enumerate(FEATURES)})
    columns["label"] = pa.array(cluster.astype(np.int64))
    return pa.table(columns)


def mlp_spec(data, root, run_name, **projection):
    batch_size = projection.pop("batch_size", 64)
    return parse_spec({
        "model": {"factory": "tests.tiny_models:seeded_mlp"},
        "dataset": {"source": str(data), "feature_columns": FEATURES, "id_column": "row_id"},
        "layers": [{"name": "fc1"}, {"name": "relu"}],
        "attributions": [{"method": "saliency"}],
        "projection": {"sample_size": SAMPLE, **projection},
        "execution": {"batch_size": batch_size, "num_workers": 2, "threads_per_worker": 1},
        "output": {"root": str(root), "run_name": run_name},
    })


def stored_projection(run_dir, kind: str, name: str) -> pa.Table:
    directory = RunLayout(run_dir).projections_dir(kind, name)
    return pads.dataset(directory, format="parquet").to_table().sort_by("instance_id")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("projection")
    pq.write_table(clustered_table(), root / "data.parquet")
    return root


@pytest.fixture(scope="module")
def pca_run(ray_local, data_dir):
    spec = mlp_spec(data_dir / "data.parquet", data_dir / "runs", "pca", attributions=["saliency"])
    return run_job(spec).layout.root


def test_pca_fitted_on_the_sample_matches_scikit_learn(pca_run):
    reader = RunReader(pca_run)
    sample = pq.read_table(RunLayout(pca_run).projection_sample_path)["instance_id"].to_pylist()
    assert len(sample) == SAMPLE == len(set(sample))
    ids, matrix = reader.activation_matrix("fc1")
    ids = ids.to_pylist()
    rows = {instance: i for i, instance in enumerate(ids)}
    reference = PCA(n_components=2, svd_solver="full").fit(matrix[[rows[i] for i in sample]].astype(np.float64))
    fitted = {(t.kind, t.name): t for t in reader.manifest.projections.tables}[("activations", "fc1")]
    np.testing.assert_allclose(fitted.pca_components, reference.components_, atol=1e-9)
    np.testing.assert_allclose(fitted.explained_variance_ratio, reference.explained_variance_ratio_, atol=1e-9)
    stored = stored_projection(pca_run, "activations", "fc1")
    assert stored["instance_id"].to_pylist() == ids
    expected = reference.transform(matrix.astype(np.float64))
    np.testing.assert_allclose(stored["pca_x"].to_numpy(), expected[:, 0], atol=1e-4)
    np.testing.assert_allclose(stored["pca_y"].to_numpy(), expected[:, 1], atol=1e-4)
    # Three well-separated clusters: the first component carries most of the variance.
    assert fitted.explained_variance_ratio[0] > 0.5


def test_workers_transform_as_the_driver_does(pca_run):
    """Every stored coordinate equals the fitted projection applied on the driver, for
    every projected table (both layers and the attribution maps)."""
    reader = RunReader(pca_run)
    sample = pq.read_table(RunLayout(pca_run).projection_sample_path)["instance_id"]
    tables = reader.manifest.projections.tables
    assert sorted((t.kind, t.name) for t in tables) == [
        ("activations", "fc1"), ("activations", "relu"), ("attributions", "saliency")]
    for fitted in tables:
        if fitted.kind == "activations":
            ids, matrix = reader.activation_matrix(fitted.name)
        else:
            rows, matrix = reader.attribution_maps(fitted.name)
            ids, matrix = rows["instance_id"], matrix.reshape(len(matrix), -1)
        position = {instance: i for i, instance in enumerate(ids.to_pylist())}
        refit = fit_projection(fitted.kind, fitted.name,
                               matrix[[position[i] for i in sample.to_pylist()]], ("pca",), seed=0)
        on_driver = refit.transform(matrix)
        stored = stored_projection(pca_run, fitted.kind, fitted.name)
        assert stored["instance_id"].to_pylist() == ids.to_pylist()
        for column in ("pca_x", "pca_y"):
            np.testing.assert_allclose(stored[column].to_numpy(), on_driver[column], atol=1e-5)


def test_same_seed_same_coordinates_whatever_the_sharding(ray_local, data_dir, pca_run):
    """A rerun with other batch sizes (other parts, other workers per row) stores the same
    coordinates; another seed draws another sample."""
    again = run_job(mlp_spec(data_dir / "data.parquet", data_dir / "runs", "pca-again",
                             attributions=["saliency"], batch_size=37)).layout.root
    first, second = (stored_projection(r, "activations", "fc1") for r in (pca_run, again))
    assert first.equals(second)
    other = run_job(mlp_spec(data_dir / "data.parquet", data_dir / "runs", "pca-seed1", seed=1)).layout.root
    samples = [set(pq.read_table(RunLayout(r).projection_sample_path)["instance_id"].to_pylist())
               for r in (pca_run, again, other)]
    assert samples[0] == samples[1] != samples[2]
    assert not np.allclose(first["pca_x"].to_numpy(), stored_projection(other, "activations", "fc1")["pca_x"].to_numpy())


def test_projections_in_the_catalog(pca_run):
    con = open_catalog(pca_run)
    counts = run_query(con, "SELECT kind, source, count(*) AS n, count(umap_x) AS umap FROM projections "
                            "GROUP BY ALL ORDER BY ALL").to_pylist()
    assert counts == [{"kind": "activations", "source": "fc1", "n": ROWS, "umap": 0},
                      {"kind": "activations", "source": "relu", "n": ROWS, "umap": 0},
                      {"kind": "attributions", "source": "saliency", "n": ROWS, "umap": 0}]
    joined = run_query(con, "SELECT p.instance_id, p.pca_x, i.label FROM projections p JOIN instances i "
                            "USING (instance_id) WHERE p.source = 'fc1' ORDER BY 1")
    stored = stored_projection(pca_run, "activations", "fc1")
    np.testing.assert_array_equal(joined["pca_x"].to_numpy(), stored["pca_x"].to_numpy())
    models = run_query(con, "SELECT source, algorithms, sample_rows FROM projection_models ORDER BY 1").to_pylist()
    assert models[0] == {"source": "fc1", "algorithms": ["pca"], "sample_rows": SAMPLE}


def test_umap_fitted_on_the_sample_and_placed_in_the_workers(ray_local, data_dir):
    spec = mlp_spec(data_dir / "data.parquet", data_dir / "runs", "umap", layers=["fc1"], umap=True,
                    umap_neighbors=10)
    run = run_job(spec).layout.root
    reader = RunReader(run)
    stored = stored_projection(run, "activations", "fc1")
    assert stored.column_names == ["instance_id", "pca_x", "pca_y", "umap_x", "umap_y"]
    ids, matrix = reader.activation_matrix("fc1")
    sample = pq.read_table(RunLayout(run).projection_sample_path)["instance_id"].to_pylist()
    position = {instance: i for i, instance in enumerate(ids.to_pylist())}
    # The same seed refits the same UMAP; placing every row on the driver gives the workers' answer.
    refit = fit_projection("activations", "fc1", matrix[[position[i] for i in sample]], ("pca", "umap"),
                           seed=0, umap_neighbors=10)
    on_driver = refit.transform(matrix)
    np.testing.assert_allclose(stored["umap_x"].to_numpy(), on_driver["umap_x"], atol=1e-4)
    np.testing.assert_allclose(stored["umap_y"].to_numpy(), on_driver["umap_y"], atol=1e-4)
    # UMAP keeps the three clusters apart: each point's nearest other point shares its cluster.
    xy = np.stack([stored["umap_x"].to_numpy(), stored["umap_y"].to_numpy()], axis=1)
    labels = reader.instances()["label"].to_numpy()
    distances = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    assert (labels[distances.argmin(axis=1)] == labels).mean() > 0.95
    assert reader.manifest.projections.tables[0].algorithms == ["pca", "umap"]


def test_pca_by_hand():
    """Points on the diagonal: mean (2, 2), first axis (1, 1)/√2, the second carries nothing."""
    points = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    fitted = fit_projection("activations", "l", points, ("pca",), seed=0)
    np.testing.assert_allclose(fitted.pca_mean, [2.0, 2.0])
    np.testing.assert_allclose(np.abs(fitted.pca_components[0]), [2 ** -0.5, 2 ** -0.5])
    np.testing.assert_allclose(fitted.explained_variance_ratio[0], 1.0)
    coords = fitted.transform(np.array([[0.0, 0.0], [2.0, 2.0], [np.nan, 1.0]]))
    sign = np.sign(fitted.pca_components[0, 0])
    np.testing.assert_allclose(coords["pca_x"][:2], [sign * -2 * 2 ** 0.5, 0.0], atol=1e-6)
    assert np.isnan(coords["pca_x"][2]) and np.isnan(coords["pca_y"][2])
    # One dimension, one row, or a NaN in the sample: no error, a collapsed axis instead.
    single = fit_projection("activations", "l", np.array([[1.0], [3.0], [np.nan]]), ("pca",), seed=0)
    assert single.sample_rows == 2
    np.testing.assert_allclose(single.transform(np.array([[5.0]]))["pca_y"], [0.0])


@pytest.mark.parametrize("projection, storage, message", [
    ({"layers": ["fc2"]}, "full", "projection.layers names 'fc2'"),
    ({"attributions": ["saliency_x"]}, "full", "did you mean 'saliency'"),
    ({"attributions": ["saliency"]}, "summary", "needs stored maps"),
    ({"sample_size": 1}, "full", "sample_size"),
    ({"umpa": True}, "full", "did you mean 'umap'"),
])
def test_bad_projection_settings_are_refused(tmp_path, projection, storage, message):
    data = {
        "model": {"factory": "tests.tiny_models:seeded_mlp"},
        "dataset": {"source": str(tmp_path / "d.parquet"), "feature_columns": FEATURES},
        "layers": [{"name": "fc1"}],
        "attributions": [{"method": "saliency"}],
        "storage": {"attributions": storage},
        "projection": projection,
        "output": {"run_name": "x"},
    }
    with pytest.raises(SpecError, match=message):
        parse_spec(data)
