"""Streaming: the driver's memory does not grow with the number of instances.

Two runs of the same job, 50,000 and 200,000 instances of 256 float features (inputs,
64-unit activations of two layers, full saliency maps and PCA of both layers: about
2.5 KB a row, 375 MB more data in the larger run), each driven by its own ``netloupe run``
process attached to this module's Ray cluster, with the driver's resident memory sampled
every 0.1 s. Were any stage to gather rows on the driver, its peak would grow by hundreds
of MB between the two; bounded, it stays within noise.

The driver's DuckDB work (id check, exactly-once checks, catalog build) may use up to
``execution.driver_sql_memory_mib`` and spills beyond it; both runs set it to 64 MiB so
that both fill it, and what is left to compare is everything else the driver holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from netloupe.pipeline.ray_cluster import LOCAL_RAY_ENVIRONMENT
from netloupe.storage.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
SMALL, LARGE = 25_000, 100_000
ALLOWED_GROWTH = 100 * 2**20
"""Peak driver RSS the larger run may add over the smaller; gathering its extra rows would add ~190 MB."""


def write_features(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, pa.schema([("instance_id", pa.int64()), ("x", pa.list_(pa.float32(), 256)),
                                           ("label", pa.int64())])) as writer:
        for first in range(0, rows, 25_000):
            n = min(25_000, rows - first)
            x = rng.normal(size=n * 256).astype(np.float32)
            writer.write_table(pa.table({
                "instance_id": pa.array(np.arange(first, first + n, dtype=np.int64)),
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x), 256),
                "label": pa.array(rng.integers(0, 4, n).astype(np.int64)),
            }))


def peak_driver_rss(spec_path: Path) -> tuple[int, dict]:
    """Run ``netloupe run`` as its own process; return its peak RSS and the manifest."""
    process = subprocess.Popen([sys.executable, "-m", "netloupe.pipeline.cli", "run", str(spec_path), "--no-progress"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**LOCAL_RAY_ENVIRONMENT, **os.environ})
    driver = psutil.Process(process.pid)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], driver.memory_info().rss)
            except psutil.Error:
                return
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate(timeout=900)
    done.set()
    sampler.join()
    assert process.returncode == 0, err.decode()[-3000:]
    spec = yaml.safe_load(spec_path.read_text())
    manifest = RunLayout(Path(spec["output"]["root"]) / spec["output"]["run_name"]).read_manifest()
    return peak[0], manifest


@pytest.mark.slow
def test_driver_memory_stays_bounded_from_25k_to_100k(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    peaks = {}
    for rows in (SMALL, LARGE):
        data = tmp_path / f"features-{rows}.parquet"
        write_features(data, rows)
        spec_path = tmp_path / f"spec-{rows}.yaml"
        spec_path.write_text(yaml.safe_dump({
            "model": {"factory": "tests.tiny_models:wide_mlp"},
            "dataset": {"source": str(data), "input_column": "x"},
            "layers": [{"name": "fc1"}, {"name": "relu"}],
            "attributions": [{"method": "saliency"}],
            "projection": {"sample_size": 5000},
            "execution": {"batch_size": 2048, "num_workers": 1, "ray_address": address,
                              "driver_sql_memory_mib": 64},
            "output": {"root": str(tmp_path / "runs"), "run_name": f"rows-{rows}"},
        }))
        peaks[rows], manifest = peak_driver_rss(spec_path)
        assert manifest.counts.instances == rows
        assert manifest.counts.bytes > rows * 1000  # the rows really were that heavy
        assert not (tmp_path / "runs" / f"rows-{rows}" / ".duckdb-spill").exists()  # spill removed
        data.unlink()
    growth = peaks[LARGE] - peaks[SMALL]
    print(f"driver peak RSS: {SMALL:,} rows {peaks[SMALL] / 2**20:.0f} MiB, {LARGE:,} rows "
          f"{peaks[LARGE] / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB")
    assert growth < ALLOWED_GROWTH
    assert peaks[LARGE] < 2 * 2**30
