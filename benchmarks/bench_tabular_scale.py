"""Kernel SHAP at scale on tabular data (issue 17): how stable the values are per sample budget,
then instances/s from 10k to 1M people, end to end, and the feature operators on the largest run.

    .venv/bin/python benchmarks/bench_tabular_scale.py --stability        # choose n_samples
    .venv/bin/python benchmarks/bench_tabular_scale.py --sizes 10000,100000,1000000 --samples 512 --background 10
    .venv/bin/python benchmarks/bench_tabular_scale.py --workers 1x2,2x1 --sizes 50000 --samples 512 --background 10

Stability: the same 500 people explained twice with different seeds (different coalitions),
per sample budget; the median over people of |a - b| / |a| (L2 over the twelve features). Two
estimates each within x of the truth differ by about x·√2.

Scale: there is no million-person census here, so the people are UCI Adult's 48,842 drawn with
replacement (seeded; each keeps its values, label and split). Each size is one ``netloupe run``
of examples/adult.yaml with Kernel SHAP only (1 worker of 2 threads: the whole machine), as a subprocess, its memory sampled as in ``bench_scale.py``. After each run the
feature operators are timed through the run's catalog, warm, median of 3.

Workers: the same run in each configuration ``workers x threads per worker``, interleaved,
``--repeats`` times (this VM drifts): how the explain stage scales with workers on the two
cores here, and what a run's fixed costs (start, catalog) are, for the cluster arithmetic.

Not a test: prints tables for RESULTS.md.
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
    "feature_importance_by (per class)": "SELECT * FROM feature_importance_by('kernel_shap', 'prediction')",
    "feature_importance (predicate)": "SELECT * FROM feature_importance('kernel_shap', 'sex = ''Female''')",
    "feature_importance_difference": ("SELECT * FROM feature_importance_difference('kernel_shap', "
                                      "'sex = ''Female''', 'sex = ''Male''')"),
    "feature_dependence (100k sample)": "SELECT * FROM feature_dependence('kernel_shap', 'age')",
}


def stability(samples: list[int], background_rows: int = 20, people: int = 500) -> list[dict]:
    import torch
    from bench_model_agnostic import adult_inputs

    from netloupe.contract.spec import MethodSpec
    from netloupe.pipeline.zoo import trained_adult_mlp
    from netloupe.storage.features import feature_index, features_of
    from netloupe.workers.methods import bind_method

    x, columns, groups = adult_inputs()
    features = features_of(columns, groups)
    rng = np.random.default_rng(0)
    background = torch.from_numpy(x[rng.choice(len(x), background_rows, replace=False)])
    chosen = torch.from_numpy(x[rng.choice(len(x), people, replace=False)])
    model = trained_adult_mlp().eval()
    target = model(chosen).argmax(dim=1)
    first = [f.positions[0] for f in features]
    rows = []
    for n in samples:
        bound = bind_method(MethodSpec(method="kernel_shap", baseline="background", params={"n_samples": n}),
                            model, (len(columns),), 65536, torch.from_numpy(feature_index(features, len(columns))),
                            background)
        estimates = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            estimates.append(bound(chosen, target)[0][:, first].numpy())
        a, b = estimates
        relative = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-9)
        rows.append({"n_samples": n, "median_relative_difference": float(np.median(relative)),
                     "p90_relative_difference": float(np.quantile(relative, 0.9))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def people(rows: int, directory: Path) -> Path:
    """``rows`` Adult people drawn with replacement (seed 0), ids 0..rows-1."""
    from netloupe.pipeline.builtin_datasets import builtin

    path = directory / f"adult-{rows}.parquet"
    if not path.exists():
        census = pq.read_table(builtin("adult").path())
        drawn = np.random.default_rng(0).integers(0, census.num_rows, rows)
        table = census.take(pa.array(drawn)).drop_columns(["instance_id"])
        pq.write_table(table.append_column("instance_id", pa.array(np.arange(rows, dtype=np.int64))), path,
                       row_group_size=65536)
    return path


def run_once(rows: int, samples: int, background: int, directory: Path, workers: int = 1,
             threads: int = 2) -> tuple[dict, Path]:
    from netloupe.pipeline.builtin_datasets import builtin

    name = f"tabular-scale-{rows}-{workers}x{threads}"
    defaults = builtin("adult").defaults()
    spec = yaml.safe_load((ROOT / "examples/adult.yaml").read_text())
    spec["dataset"] = {"source": str(people(rows, directory)), **{k: defaults[k] for k in
                       ("feature_columns", "feature_groups", "metadata_columns")}}
    spec["preprocess"] = defaults["preprocess"]
    spec["attributions"] = [{"method": "kernel_shap", "baseline": "background", "params": {"n_samples": samples}}]
    spec["background"] = {"size": background}
    spec["execution"] = {"batch_size": 8192, "num_workers": workers, "threads_per_worker": threads}
    spec["output"] = {"root": str(directory / "runs"), "run_name": name}
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    command = NETLOUPE + ["run", str(directory / f"{name}.yaml"), "--force", "--no-progress"]
    wall, sampler = measured_run(command, name)
    run_dir = directory / "runs" / name
    timings = RunLayout(run_dir).read_manifest().timings
    return {"people": rows, "workers": f"{workers}x{threads}", "n_samples": samples, "background": background, "wall_s": wall, "explain_s": timings["explain_seconds"],
            "people_per_s": rows / wall, "steady_people_per_s": timings["steady_instances_per_second"],
            "catalog_s": timings["catalog"]["total"], "driver_peak_gib": sampler.driver_peak / 2**30,
            "workers_total_peak_gib": sampler.workers_total_peak / 2**30}, run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stability", action="store_true")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--background", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the runs")
    parser.add_argument("--workers", help="configurations to compare, workers x threads: 1x2,2x1")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.workers:
        worker_scaling(int(args.sizes.split(",")[0]), args.samples, args.background,
                       [tuple(int(n) for n in c.split("x")) for c in args.workers.split(",")], args.repeats)
        return
    if args.stability:
        rows = stability([64, 128, 256, 512, 1024], args.background)
        print("\n| n_samples | median relative difference of two seeds | 90th percentile |")
        print("|---:|---:|---:|")
        for r in rows:
            print(f"| {r['n_samples']} | {r['median_relative_difference']:.3f} | {r['p90_relative_difference']:.3f} |")
        return
    directory = ROOT / "runs" / "bench-tabular-scale"
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in [int(s) for s in args.sizes.split(",")]:
        result, run_dir = run_once(rows, args.samples, args.background, directory)
        result.update(timed_queries(run_dir, OPERATORS))
        results.append(result)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
        if not args.keep:
            shutil.rmtree(run_dir)
    print("\n| people | n_samples | background | wall (s) | explain (s) | people/s (wall) | people/s steady | catalog (s) "
          "| driver peak (GiB) | workers peak (GiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['people']:,} | {r['n_samples']} | {r['background']} | {r['wall_s']:.0f} | {r['explain_s']:.0f} | "
              f"{r['people_per_s']:,.0f} | {r['steady_people_per_s']:,.0f} | {r['catalog_s']:.1f} | "
              f"{r['driver_peak_gib']:.2f} | {r['workers_total_peak_gib']:.2f} |")
    print("\nFeature operators (kernel_shap), warm median of 3, seconds:")
    print("| people | " + " | ".join(OPERATORS) + " |")
    print("|---:|" + "---:|" * len(OPERATORS))
    for r in results:
        print(f"| {r['people']:,} | " + " | ".join(f"{r[name]:.3f}" for name in OPERATORS) + " |")


def worker_scaling(rows: int, samples: int, background: int, configurations: list[tuple[int, int]],
                   repeats: int) -> None:
    directory = ROOT / "runs" / "bench-tabular-scale"
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    for repeat in range(repeats):
        for workers, threads in configurations:  # interleaved: each repeat runs every configuration
            result, run_dir = run_once(rows, samples, background, directory, workers, threads)
            result["repeat"] = repeat
            results.append(result)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
            shutil.rmtree(run_dir)
    print(f"\n{rows:,} people, {samples} samples, {background} background rows; per repeat:")
    print("| repeat | workers x threads | wall (s) | explain (s) | fixed = wall - explain (s) | people/s steady "
          "| explain vs first configuration |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for repeat in range(repeats):
        rows_of = [r for r in results if r["repeat"] == repeat]
        for r in rows_of:
            print(f"| {repeat} | {r['workers']} | {r['wall_s']:.0f} | {r['explain_s']:.0f} | "
                  f"{r['wall_s'] - r['explain_s']:.0f} | {r['steady_people_per_s']:,.0f} | "
                  f"{rows_of[0]['explain_s'] / r['explain_s']:.2f}x |")


if __name__ == "__main__":
    main()
