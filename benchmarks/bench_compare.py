"""Operators across runs at a million instances (issue 18): two runs of the same instances,
each with a 256-unit layer, queried together through ``netloupe.storage.compare.open_runs``.

    .venv/bin/python benchmarks/bench_compare.py [--size 1000000] [--neurons 256] [--repeats 3] [--keep DIR]

The runs are written by ``storage.handmade.write_handmade_run`` (as bench_sql.py's): run b's
activations are run a's mixed with fresh noise, so CKA is neither 0 nor 1, and 10% of its
predictions differ; both store a 64-value map per instance (b's: a's plus noise). Each
operator is timed warm, median of ``--repeats``; the opening of the two runs is timed too. CKA is checked against numpy on the same matrices.

Not a test: prints a table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_scale import timed_queries  # noqa: E402
from bench_sql import CLASSES, LAYER, make_data  # noqa: E402

from netloupe.storage import schema as S  # noqa: E402
from netloupe.storage.catalog import run_query  # noqa: E402
from netloupe.storage.compare import open_runs  # noqa: E402
from netloupe.storage.handmade import write_handmade_run  # noqa: E402
from netloupe.storage.layout import RunLayout  # noqa: E402

QUERIES = {
    "disagreements (count)": "SELECT count(*) FROM disagreements('a', 'b')",
    "disagreements (top 100 by confidence)": "SELECT * FROM disagreements('a', 'b') ORDER BY confidence_a DESC LIMIT 100",
    "agreement": "SELECT * FROM agreement('a', 'b')",
    "subset_metrics_by_run": "SELECT * FROM subset_metrics_by_run('stroke = ''thin''')",
    "representation_change (all)": f"SELECT * FROM representation_change('a', 'b', '{LAYER}')",
    "representation_change (100k sample)": f"SELECT * FROM representation_change('a', 'b', '{LAYER}', sample := 100000)",
    "neuron_matches (all)": f"SELECT * FROM neuron_matches('a', 'b', '{LAYER}')",
    "map_agreement (mean over all, 64-value maps)":
        "SELECT avg(rank_correlation), avg(top_k_overlap) FROM map_agreement('a', 'b', 'saliency')",
}
MAP_VALUES = 64
"""Values per stored map (an 8x8 heatmap): a million of them per run is 256 MB."""


def second_run(instances: pa.Table, activations: np.ndarray, seed: int = 1) -> tuple[pa.Table, np.ndarray]:
    """Run b: activations mixed with noise, 10% of predictions moved to another class."""
    rng = np.random.default_rng(seed)
    n = instances.num_rows
    mixed = np.empty_like(activations)
    for start in range(0, n, 100_000):
        block = activations[start:start + 100_000]
        mixed[start:start + len(block)] = np.maximum(0.7 * block + 0.7 * rng.normal(size=block.shape), 0)
    prediction = instances["prediction"].to_numpy().copy()
    moved = rng.random(n) < 0.1
    prediction[moved] = (prediction[moved] + 1) % CLASSES
    probabilities = np.full((n, CLASSES), 0.05 / (CLASSES - 1), np.float32)
    probabilities[np.arange(n), prediction] = 0.95
    table = instances.set_column(instances.schema.get_field_index("prediction"), "prediction", pa.array(prediction))
    table = table.set_column(table.schema.get_field_index("probabilities"), "probabilities",
                             S.fixed_vectors(probabilities, CLASSES))
    return table, mixed


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    y = y.astype(np.float64) - y.mean(axis=0, dtype=np.float64)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--neurons", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the two runs here and keep them; when they are there "
                                                  "already, time the queries on them (the written runs take minutes)")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench-compare-", dir=ROOT / "runs"))
    try:
        started = time.perf_counter()
        instances, activations = make_data(args.size, args.neurons)
        table_b, activations_b = second_run(instances, activations)
        a, b = RunLayout(workdir / "a"), RunLayout(workdir / "b")
        if not (b.manifest_path.exists() and a.manifest_path.exists()):
            maps = np.random.default_rng(2).normal(size=(args.size, MAP_VALUES)).astype(np.float32)
            maps_b = maps + np.random.default_rng(3).normal(size=maps.shape).astype(np.float32)
            a = write_handmade_run(workdir, "a", instances, {LAYER: activations}, {"saliency": maps})
            b = write_handmade_run(workdir, "b", table_b, {LAYER: activations_b}, {"saliency": maps_b})
            del maps, maps_b
            print(f"{args.size:,} instances x {args.neurons} neurons, two runs written in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        expected = numpy_cka(activations, activations_b)
        del activations, activations_b
        opened = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            con = open_runs({"a": a.root, "b": b.root})
            opened.append(time.perf_counter() - started)
        cka = run_query(con, QUERIES["representation_change (all)"])["linear_cka"][0].as_py()
        sampled = run_query(con, QUERIES["representation_change (100k sample)"]).to_pylist()[0]
        print(f"linear CKA {cka:.6f}, numpy {expected:.6f}; on the 100k sample {sampled['linear_cka']:.6f} "
              f"({sampled['instances']:,} instances)", flush=True)
        assert abs(cka - expected) < 1e-4 * max(1.0, expected), (cka, expected)
        print(f"\n| operator ({args.size:,} instances, {args.neurons} units) | seconds (warm median of {args.repeats}) |")
        print("|---|---:|")
        print(f"| open the two runs | {statistics.median(opened):.3f} |")
        for name, seconds in timed_queries(None, QUERIES, args.repeats, connection=con).items():
            print(f"| {name} | {seconds:.3f} |", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
