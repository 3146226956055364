"""Scale benchmark (issue 4): throughput and peak memory at 10k, 100k and 1M instances.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10000,100000,1000000] [--workers 1,2]

Each run is ``netloupe run examples/mnist-scale.yaml`` (the trained MNIST CNN on generated
``mnist-variants``: activations of relu2 and relu3, saliency stored in full, PCA of both
layers) as a subprocess, while this script samples every 0.5 s the resident memory of the
driver (the ``netloupe`` process) and of every Ray worker process (``ray::*``). Datasets are
generated before the timed runs (and cached).

Reported per run: wall time, instances/s end to end and in the steady state (after the
first result), driver peak RSS, the largest worker's peak RSS and the peak of all Ray
workers together; then the ratios the issue sets targets for (throughput at the largest
size ÷ at the smallest, 2 workers ÷ 1). Not a test: prints the table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from netloupe.pipeline.ray_cluster import LOCAL_RAY_ENVIRONMENT
from netloupe.storage.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NETLOUPE = [sys.executable, "-m", "netloupe.pipeline.cli"]


class MemorySampler(threading.Thread):
    """Peak RSS of one process and of the Ray worker processes, sampled until stopped."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.driver = psutil.Process(pid)
        self.interval = interval
        self.stop_event = threading.Event()
        self.driver_peak = 0
        self.worker_peaks: dict[int, int] = {}
        self.workers_total_peak = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.driver_peak = max(self.driver_peak, self.driver.memory_info().rss)
            except psutil.Error:
                pass  # the driver exited between samples
            total = 0
            for process in psutil.process_iter(["pid", "cmdline"]):
                cmdline = process.info["cmdline"] or []
                if cmdline and cmdline[0].startswith("ray::"):
                    try:
                        rss = process.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    self.worker_peaks[process.pid] = max(self.worker_peaks.get(process.pid, 0), rss)
            self.workers_total_peak = max(self.workers_total_peak, total)
            self.stop_event.wait(self.interval)


def ensure_dataset(rows: int) -> None:
    from netloupe.pipeline.builtin_datasets import builtin

    started = time.perf_counter()
    path = builtin("mnist-variants").path(rows, 0)
    print(f"dataset {path} ready in {time.perf_counter() - started:.0f} s", flush=True)


def measured_run(command: list[str], name: str) -> tuple[float, MemorySampler]:
    """Run ``command`` (a ``netloupe run``) with its memory sampled: wall seconds and the sampler."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env={**LOCAL_RAY_ENVIRONMENT, **os.environ},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = MemorySampler(process.pid)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    sampler.stop_event.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"run {name} failed:\n{stderr.decode()[-3000:]}")
    return wall, sampler


def timed_queries(run_dir: Path, queries: dict[str, str], repeats: int = 3, connection=None) -> dict[str, float]:
    """Each query's warm median of ``repeats`` (seconds) through the run's catalog (what
    ``netloupe sql`` opens), or through ``connection`` when given (several runs together)."""
    import statistics

    from netloupe.storage.catalog import open_catalog, run_query

    catalog = connection if connection is not None else open_catalog(run_dir)
    timed = {}
    for name, sql in queries.items():
        run_query(catalog, sql)  # warm
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            run_query(catalog, sql)
            seconds.append(time.perf_counter() - started)
        timed[name] = statistics.median(seconds)
    return timed


def run_once(rows: int, workers: int, out_root: Path) -> dict:
    name = f"scale-{rows}-w{workers}"
    command = NETLOUPE + ["run", str(ROOT / "examples/mnist-scale.yaml"), "--force", "--no-progress",
                          "--set", f"dataset.rows={rows}", "--set", f"execution.num_workers={workers}",
                          "--set", f"output.root={out_root}", "--set", f"output.run_name={name}"]
    wall, sampler = measured_run(command, name)
    manifest = RunLayout(out_root / name).read_manifest()
    timings = manifest.timings
    result = {
        "rows": rows, "workers": workers, "wall_s": wall,
        "inst_per_s": rows / wall,
        "steady_inst_per_s": timings["steady_instances_per_second"],
        "explain_s": timings["explain_seconds"], "part_pass_s": timings["part_pass_seconds"],
        "catalog_s": timings["catalog"]["total"],
        "worker_compute_s": timings["compute_seconds_sum"], "worker_write_s": timings["write_seconds_sum"],
        "catalog_parts_s": {k: round(v, 1) for k, v in timings["catalog"].items() if k not in ("total", "bytes")},
        "driver_peak_gib": sampler.driver_peak / 2**30,
        "worker_peak_gib": max(sampler.worker_peaks.values(), default=0) / 2**30,
        "workers_total_peak_gib": sampler.workers_total_peak / 2**30,
    }
    subprocess.run(["rm", "-rf", str(out_root / name)], check=True)  # a 1M run is ~4 GB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    for rows in sizes:
        ensure_dataset(rows)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=ROOT / "runs" if (ROOT / "runs").exists() else None) as tmp:
        for rows in sizes:
            for w in workers:
                result = run_once(rows, w, Path(tmp))
                results.append(result)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
                      flush=True)
    print("\n| instances | workers | wall (s) | inst/s end to end | inst/s steady | explain (s) | part pass (s) "
          "| catalog (s) | driver peak RSS (GiB) | largest worker peak (GiB) | all workers peak (GiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['workers']} | {r['wall_s']:.0f} | {r['inst_per_s']:.0f} | "
              f"{r['steady_inst_per_s']:.0f} | {r['explain_s']:.0f} | {r['part_pass_s']:.1f} | {r['catalog_s']:.1f} | "
              f"{r['driver_peak_gib']:.2f} | {r['worker_peak_gib']:.2f} | {r['workers_total_peak_gib']:.2f} |")
    by = {(r["rows"], r["workers"]): r for r in results}
    small, large = min(sizes), max(sizes)
    for w in workers:
        if (small, w) in by and (large, w) in by and small != large:
            a, b = by[(small, w)], by[(large, w)]
            print(f"{w} worker(s): throughput at {large:,} ÷ at {small:,}: end to end "
                  f"{b['inst_per_s'] / a['inst_per_s']:.2f}x, steady {b['steady_inst_per_s'] / a['steady_inst_per_s']:.2f}x")
    if len(workers) > 1:
        for rows in sizes:
            one, two = by.get((rows, workers[0])), by.get((rows, workers[-1]))
            if one and two:
                print(f"{rows:,}: {workers[-1]} workers ÷ {workers[0]}: end to end {two['inst_per_s'] / one['inst_per_s']:.2f}x, "
                      f"steady {two['steady_inst_per_s'] / one['steady_inst_per_s']:.2f}x")


if __name__ == "__main__":
    main()
