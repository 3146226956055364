"""SQL benchmark: the neuron activation matrix, ours vs. the naive layout, side by side.

    .venv/bin/python benchmarks/bench_sql.py [--sizes 100000,1000000] [--neurons 256] [--repeats 7]

Both sides answer the same questions with DuckDB over the same activations (ReLU'd
Gaussians, 10 classes, 90% accuracy, a 3-valued metadata column):

* ours: a run written by ``storage.handmade.write_handmade_run`` and queried through its
  catalog with the operators (``neuron_matrix_by``, ``neuron_matrix``, ``neuron_matrix_ids``);
* naive: one Parquet file with one zstd FLOAT column per neuron beside the instance
  columns, the same aggregates written directly in SQL.

Questions: (1) the matrix for the 10 label classes, (2) the subset where a predicate holds
(about a third of the instances), (3) an explicit list of 100,000 random ids. Each is run
``--repeats`` times, alternating ours and naive, and the medians are printed with the
bytes of neuron values each side reads. The results are checked equal before timing.
A fourth line times the pure-SQL path of ours (what the stock duckdb CLI runs: the
catalog's native wide table, no activation index) on the predicate.

Not a test: prints figures for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from netloupe.storage import schema as S  # noqa: E402
from netloupe.storage.catalog import open_catalog, run_query  # noqa: E402
from netloupe.storage.handmade import write_handmade_run  # noqa: E402

CLASSES = 10
LAYER = "fc1"
PREDICATE = "stroke = 'thin'"
ID_LIST = 100_000

NAIVE_BY_CLASS = """
SELECT label, count(*) AS size, avg(COLUMNS('^n\\d+$')), avg((COLUMNS('^n\\d+$') > 0)::INT)
FROM read_parquet(?) GROUP BY label ORDER BY label"""
NAIVE_PREDICATE = """
SELECT count(*) AS size, avg(COLUMNS('^n\\d+$')), avg((COLUMNS('^n\\d+$') > 0)::INT)
FROM read_parquet(?) WHERE stroke = 'thin'"""
NAIVE_IDS = """
SELECT count(*) AS size, avg(COLUMNS('^n\\d+$')), avg((COLUMNS('^n\\d+$') > 0)::INT)
FROM read_parquet(?) WHERE instance_id IN (SELECT unnest(?::BIGINT[]))"""


def make_data(n: int, neurons: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, CLASSES, n)
    prediction = np.where(rng.random(n) < 0.9, label, rng.integers(0, CLASSES, n))
    probabilities = np.full((n, CLASSES), 0.05 / (CLASSES - 1), np.float32)
    probabilities[np.arange(n), prediction] = 0.95
    stroke = np.array(["thin", "medium", "heavy"])[rng.integers(0, 3, n)]
    activations = np.empty((n, neurons), np.float32)
    for start in range(0, n, 100_000):  # bounded temporaries
        block = rng.normal(size=(min(n, start + 100_000) - start, neurons)).astype(np.float32)
        block += 0.2 * label[start:start + len(block), None] / CLASSES
        activations[start:start + len(block)] = np.maximum(block, 0)
    instances = pa.table({
        "instance_id": np.arange(n, dtype=np.int64), "label": label, "prediction": prediction,
        "probabilities": S.fixed_vectors(probabilities, CLASSES), "stroke": stroke,
    })
    return instances, activations


def write_naive(path: Path, instances: pa.Table, activations: np.ndarray) -> None:
    """One zstd Parquet file, one FLOAT column per neuron (the layout the issue names naive)."""
    columns = {"instance_id": instances["instance_id"], "label": instances["label"], "stroke": instances["stroke"],
               "prediction": instances["prediction"]}
    columns.update({f"n{j}": activations[:, j] for j in range(activations.shape[1])})
    pq.write_table(pa.table(columns), path, compression="zstd", row_group_size=122_880)


def parquet_bytes(path: Path, columns: set[str]) -> int:
    """Compressed bytes of the given columns over all row groups of a Parquet file."""
    meta = pq.ParquetFile(path).metadata
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema in columns:
                total += chunk.total_compressed_size
    return total


def median_seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def bench(n: int, neurons: int, repeats: int, workdir: Path, rows_per_part: int) -> dict:
    print(f"\n== {n:,} instances × {neurons} neurons ==")
    started = time.perf_counter()
    instances, activations = make_data(n, neurons)
    naive_path = workdir / f"naive-{n}.parquet"
    write_naive(naive_path, instances, activations)
    naive_write = time.perf_counter() - started
    started = time.perf_counter()
    # Parts of a pipeline run's size (the scale demo's batch): the index gathers across them.
    layout = write_handmade_run(workdir / "runs", f"bench-{n}", instances, {LAYER: activations},
                                rows_per_part=rows_per_part)
    ours_write = time.perf_counter() - started
    print(f"  data + naive Parquet {naive_write:.1f} s; our run (Parquet parts + catalog) {ours_write:.1f} s, "
          f"catalog {layout.catalog_path.stat().st_size / 1e9:.2f} GB, naive file {naive_path.stat().st_size / 1e9:.2f} GB")
    ids = np.random.default_rng(1).choice(n, min(ID_LIST, n), replace=False).astype(np.int64).tolist()

    ours = open_catalog(layout.root)
    stock = duckdb.connect(str(layout.catalog_path), read_only=True)
    stock.execute("SET file_search_path = ?", [str(layout.root)])  # its Parquet views are relative to the run
    naive = duckdb.connect()
    questions = {
        "10 class subsets": (
            lambda: run_query(ours, "SELECT * FROM neuron_matrix_by(?, 'label')", [LAYER]),
            lambda: naive.execute(NAIVE_BY_CLASS, [str(naive_path)]).fetchall(),
        ),
        f"predicate {PREDICATE}": (
            lambda: run_query(ours, "SELECT * FROM neuron_matrix(?, ?)", [LAYER, PREDICATE]),
            lambda: naive.execute(NAIVE_PREDICATE, [str(naive_path)]).fetchall(),
        ),
        f"list of {len(ids):,} ids": (
            lambda: run_query(ours, "SELECT * FROM neuron_matrix_ids(?, ?::BIGINT[])", [LAYER, ids]),
            lambda: naive.execute(NAIVE_IDS, [str(naive_path), ids]).fetchall(),
        ),
        "predicate, pure SQL (stock CLI)": (
            lambda: stock.execute("SELECT * FROM neuron_matrix(?, ?)", [LAYER, PREDICATE]).fetchall(),
            lambda: naive.execute(NAIVE_PREDICATE, [str(naive_path)]).fetchall(),
        ),
    }
    # Same answers before timing: the predicate subset's means, ours vs. naive vs. numpy.
    mask = np.asarray(instances["stroke"].to_pylist()) == "thin"
    expected = activations[mask].mean(axis=0)
    got = np.array(run_query(ours, "SELECT mean FROM neuron_matrix(?, ?)", [LAYER, PREDICATE])["mean"])
    naive_row = naive.execute(NAIVE_PREDICATE, [str(naive_path)]).fetchall()[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(naive_row[1:1 + neurons]), expected, rtol=1e-4, atol=1e-5)

    # Bytes each side reads for the neuron values: the naive layout decompresses every
    # neuron column; ours gathers the subset's rows (or its complement's, whichever is
    # fewer) from the activation index, and nothing at all for class subsets.
    neuron_columns = {f"n{j}" for j in range(neurons)}
    row_bytes = neurons * 4

    def ours_bytes(k: int) -> int:
        return min(k, n - k) * row_bytes

    scanned = {
        "10 class subsets": (0, parquet_bytes(naive_path, neuron_columns | {"label"})),
        f"predicate {PREDICATE}": (ours_bytes(int(mask.sum())), parquet_bytes(naive_path, neuron_columns | {"stroke"})),
        f"list of {len(ids):,} ids": (ours_bytes(len(ids)), parquet_bytes(naive_path, neuron_columns | {"instance_id"})),
        "predicate, pure SQL (stock CLI)": (n * row_bytes, parquet_bytes(naive_path, neuron_columns | {"stroke"})),
    }
    results = {}
    for name, (ours_fn, naive_fn) in questions.items():
        ours_fn(), naive_fn()  # warm: file cache, catalog
        ours_times, naive_times = [], []
        for _ in range(repeats):
            ours_times += median_seconds(ours_fn, 1)
            naive_times += median_seconds(naive_fn, 1)
        o, b = statistics.median(ours_times), statistics.median(naive_times)
        results[name] = (o, b)
        print(f"  {name:32s} ours {o * 1000:8.1f} ms  naive {b * 1000:8.1f} ms  speed-up {b / o:6.1f}x   "
              f"bytes read: ours {scanned[name][0] / 1e6:8.1f} MB  naive {scanned[name][1] / 1e6:8.1f} MB")
    ours.close()
    stock.close()
    naive.close()
    shutil.rmtree(layout.root)
    naive_path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--neurons", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows-per-part", type=int, default=1024, help="rows per part, as a run's batch_size")
    parser.add_argument("--workdir", default=None, help="where the runs are written (default: a temp dir)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="netloupe-bench-sql-"))
    workdir.mkdir(parents=True, exist_ok=True)
    threads = duckdb.connect().execute("SELECT current_setting('threads')").fetchall()[0][0]
    print(f"duckdb {duckdb.__version__}, {threads} threads on both sides")
    sizes = [int(s) for s in args.sizes.split(",")]
    all_results = {n: bench(n, args.neurons, args.repeats, workdir, args.rows_per_part) for n in sizes}
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print(f"\ncost growth {small:,} → {large:,} instances ({large / small:.0f}x the rows):")
        for name in all_results[small]:
            o_small, b_small = all_results[small][name]
            o_large, b_large = all_results[large][name]
            print(f"  {name:32s} ours {o_large / o_small:6.1f}x   naive {b_large / b_small:6.1f}x")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
