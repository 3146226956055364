"""A small run made to be looked at: the dashboard tests' data.

:class:`tests.tiny_models.TinyCNN` over ``ROWS`` random 1×4×4 images, labels chosen so that
the answers are known without running netloupe: the model is right on every instance of
group ``a`` (label = its prediction) and wrong on every one of group ``b`` (label = the
other class). ``noise`` is a second metadata column that cuts across both groups, and
``rotation`` a continuous one (every value its own: the subgroups bin it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from netloupe.contract.spec import parse_spec
from netloupe.pipeline.driver import run_job
from tests.tiny_models import tiny_cnn

ROWS = 240
"""Instances of the run the session tests check by hand."""
SCREEN_ROWS = 4800
"""Instances of the run the browser tests look at: as many points as a new user's first run
(the 5,000 of the MNIST demo), where one point per pixel must still be seen; under the
scatter's hover limit (5,000), so that every point can be hovered."""


def dashboard_images(rows: int = ROWS) -> tuple[pa.Table, np.ndarray]:
    """The dataset, and the model's predictions on it (computed directly)."""
    rng = np.random.default_rng(11)
    images = rng.uniform(0, 1, size=(rows, 1, 4, 4)).astype(np.float32)
    with torch.no_grad():
        predictions = tiny_cnn().eval()(torch.from_numpy(images)).argmax(dim=1).numpy()
    group = np.where(np.arange(rows) % 2 == 0, "a", "b")
    labels = np.where(group == "a", predictions, 1 - predictions)
    table = pa.table({
        "id": pa.array(np.arange(100, 100 + rows, dtype=np.int64)),
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 16),
        "label": pa.array(labels.astype(np.int64)),
        "group": pa.array(group.astype(object)),
        "noise": pa.array(np.where(np.arange(rows) % 3 == 0, "high", "low").astype(object)),
        "rotation": pa.array(np.random.default_rng(12).uniform(-45, 45, rows).astype(np.float32)),
    })
    return table, predictions


def make_dashboard_run(root: Path, rows: int = ROWS) -> Path:
    """Write the dataset of ``rows`` instances under ``root`` and run the job on the current
    Ray; return the run."""
    table, _ = dashboard_images(rows)
    pq.write_table(table, root / "images.parquet")
    spec = parse_spec({
        "model": {"factory": "tests.tiny_models:tiny_cnn", "class_names": ["left", "right"]},
        "dataset": {"source": str(root / "images.parquet"), "input_column": "pixels", "id_column": "id",
                    "metadata_columns": ["group", "noise", "rotation"]},
        "preprocess": {"shape": [1, 4, 4]},
        "layers": [{"name": "conv", "pooling": "mean"}, {"name": "relu", "pooling": "max"}, {"name": "head"}],
        "attributions": [{"method": "saliency"}, {"method": "integrated_gradients"}],
        "projection": {"sample_size": 100},
        "fidelity": {"curve_steps": 4, "sample_size": 24, "perturbations": 4},
        "execution": {"batch_size": max(64, rows // 8), "num_workers": 1, "threads_per_worker": 1},
        "output": {"root": str(root / "runs"), "run_name": "look"},
    })
    return run_job(spec).layout.root
