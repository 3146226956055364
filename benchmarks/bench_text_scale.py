"""Text runs at scale (issue 16): tokens/s from 10k to 1M texts, and the token operators on the
largest run.

    .venv/bin/python benchmarks/bench_text_scale.py --sizes 10000,100000 --methods integrated_gradients,input_x_gradient
    .venv/bin/python benchmarks/bench_text_scale.py --sizes 1000000 --methods input_x_gradient

There is no million-text corpus here, so the texts are the rotten-tomatoes snippets drawn with
replacement (seeded; each keeps its label, movie and split). Each size is one
``netloupe run`` of the zoo's rt-bert (max_length 64, 2 workers) as a subprocess, its memory
sampled as in ``bench_scale.py``. After each run the token operators are timed through the
run's catalog (what ``netloupe sql`` opens), warm, median of 3:

* ``top_tokens_by(m, 'prediction')``: the top tokens per predicted class, from the per-token
  sums the run precomputes (``token_cells``);
* ``top_tokens(m, 'prediction = 1')``: the same for any predicate, by a scan of the long view;
* ``token_difference(m, 'NOT correct', 'correct')``: the mistakes against the rest (two scans);
* ``instances_with_token('tedious')``: every text containing a word.

Not a test: prints a table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_scale import NETLOUPE, measured_run, timed_queries  # noqa: E402

from netloupe.storage.layout import RunLayout  # noqa: E402

OPERATORS = {
    "top_tokens_by (per class, precomputed)": "SELECT * FROM top_tokens_by('{m}', 'prediction', min_count := 20)",
    "top_tokens (predicate, scan)": "SELECT * FROM top_tokens('{m}', 'prediction = 1', min_count := 20)",
    "token_difference (two scans)": "SELECT * FROM token_difference('{m}', 'NOT correct', 'correct', min_count := 20)",
    "instances_with_token": "SELECT count(*) FROM instances_with_token('tedious')",
}


def texts(rows: int, directory: Path) -> Path:
    """``rows`` rotten-tomatoes snippets drawn with replacement (seed 0), ids 0..rows-1."""
    from netloupe.pipeline.builtin_datasets import builtin

    path = directory / f"texts-{rows}.parquet"
    if not path.exists():
        corpus = pq.read_table(builtin("rotten-tomatoes").path())
        drawn = np.random.default_rng(0).integers(0, corpus.num_rows, rows)
        table = corpus.take(pa.array(drawn)).drop_columns(["instance_id"])
        pq.write_table(table.append_column("instance_id", pa.array(np.arange(rows, dtype=np.int64))), path)
    return path


def run_once(rows: int, methods: list[str], checkpoint: Path, directory: Path) -> tuple[dict, Path]:
    name = f"text-scale-{rows}"
    spec = {
        "model": {"huggingface": str(checkpoint), "class_names": ["rotten", "fresh"]},
        "dataset": {"source": str(texts(rows, directory)), "text_column": "text",
                    "metadata_columns": ["movie", "split"]},
        "text": {"max_length": 64},
        "layers": [{"name": "bert.pooler"}],
        "attributions": [{"method": m} for m in methods],
        "execution": {"batch_size": 1024, "num_workers": 2},
        "output": {"root": str(directory / "runs"), "run_name": name},
    }
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    command = NETLOUPE + ["run", str(directory / f"{name}.yaml"), "--force", "--no-progress"]
    wall, sampler = measured_run(command, name)
    run_dir = directory / "runs" / name
    timings = RunLayout(run_dir).read_manifest().timings
    return {"texts": rows, "methods": ",".join(methods), "wall_s": wall, "explain_s": timings["explain_seconds"],
            "steady_texts_per_s": timings["steady_instances_per_second"], "catalog_s": timings["catalog"]["total"],
            "driver_peak_gib": sampler.driver_peak / 2**30,
            "workers_total_peak_gib": sampler.workers_total_peak / 2**30}, run_dir


def operators(run_dir: Path, method: str) -> dict:
    """Each operator's warm median of 3 (seconds) through the run's catalog, and the token rows."""
    from netloupe.storage.catalog import open_catalog, run_query

    tokens = run_query(open_catalog(run_dir), "SELECT sum(length)::BIGINT AS n FROM tokens")["n"][0].as_py()
    return {"tokens": tokens, **timed_queries(run_dir, {name: sql.format(m=method) for name, sql in OPERATORS.items()})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--methods", default="integrated_gradients,input_x_gradient")
    parser.add_argument("--keep", action="store_true", help="keep the runs (a 1M run is several GB)")
    args = parser.parse_args()
    from netloupe.pipeline.zoo import rt_bert_checkpoint

    checkpoint = rt_bert_checkpoint()
    directory = ROOT / "runs" / "bench-text-scale"
    directory.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    results = []
    for rows in [int(s) for s in args.sizes.split(",")]:
        result, run_dir = run_once(rows, methods, checkpoint, directory)
        result.update(operators(run_dir, methods[-1]))
        result["tokens_per_s"] = result["tokens"] / result["explain_s"]
        results.append(result)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
        if not args.keep:
            shutil.rmtree(run_dir)
    print("\n| texts | methods | tokens | wall (s) | explain (s) | tokens/s (explain) | texts/s steady | catalog (s) "
          "| driver peak (GiB) | workers peak (GiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['texts']:,} | {r['methods']} | {r['tokens']:,} | {r['wall_s']:.0f} | {r['explain_s']:.0f} | "
              f"{r['tokens_per_s']:,.0f} | {r['steady_texts_per_s']:.0f} | {r['catalog_s']:.1f} | "
              f"{r['driver_peak_gib']:.2f} | {r['workers_total_peak_gib']:.2f} |")
    print(f"\nOperators ({methods[-1]}), warm median of 3, seconds:")
    print("| texts | " + " | ".join(OPERATORS) + " |")
    print("|---:|" + "---:|" * len(OPERATORS))
    for r in results:
        print(f"| {r['texts']:,} | " + " | ".join(f"{r[name]:.3f}" for name in OPERATORS) + " |")


if __name__ == "__main__":
    main()
