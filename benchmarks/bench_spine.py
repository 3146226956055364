"""Spine benchmarks: ours vs. a baseline, measured side by side in one run, same threads.

    .venv/bin/python benchmarks/bench_spine.py [--only a,b,c,d] [--instances 200000]

(a) activations + saliency, whole pipeline (Ray + Parquet) vs. a bare single-process loop
    doing the same work (read Parquet, forward with hooks, saliency, write Parquet);
    steady-state throughput, with Ray start-up and actor start-up reported apart.
(b) attribution methods vs. the model's own bound (fwd+bwd throughput ÷ passes), and
    Integrated Gradients vs. a plain Captum loop with default settings.
(c) forward with hooks recording a 512-wide layer vs. a plain forward.
(d) the demo (`netloupe run examples/mnist.yaml`) wall time, cold cache (trains the CNN).

Not a test: prints ratios for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netloupe.pipeline.ray_cluster import local_ray_environment  # noqa: E402

local_ray_environment()  # before anything imports ray

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from netloupe.contract.spec import parse_spec  # noqa: E402
from netloupe.pipeline.builtin_datasets import builtin  # noqa: E402
from netloupe.pipeline.zoo import MnistCNN  # noqa: E402
from netloupe.storage.layout import part_key, write_part  # noqa: E402
from netloupe.workers.capture import LayerCapture  # noqa: E402
from netloupe.workers.explain import BatchExplainer, module_output_bytes  # noqa: E402
from netloupe.workers.methods import bind_method, tune_chunk_rows  # noqa: E402

THREADS = 2
BATCH = 1024


def line(label: str, ours: float, base: float, unit: str, better: str = "higher") -> None:
    ratio = ours / base if base else float("nan")
    print(f"  {label:58s} ours {ours:10.1f} {unit:6s} baseline {base:10.1f} {unit:6s} ratio {ratio:5.2f}x ({better} is better)")


def tiled_mnist(n: int, path: Path) -> Path:
    """``n`` instances made by repeating mnist-5k, with unique ids, in row groups of 16k."""
    base = pq.read_table(builtin("mnist-5k").path())
    reps = -(-n // base.num_rows)
    table = pa.concat_tables([base] * reps).slice(0, n)
    table = table.set_column(0, "instance_id", pa.array(np.arange(n, dtype=np.int64)))
    pq.write_table(table, path, row_group_size=16384)
    return path


def paired(ours, base, rounds: int = 7) -> tuple[float, float, float]:
    """Median times of ``ours`` and ``base`` run alternately, and the median of the per-round
    ratios (this machine's speed drifts by 20% over seconds; alternation cancels it)."""
    ours(), base()
    t_ours, t_base, ratios = [], [], []
    for _ in range(rounds):
        a = timeit(ours, 1)
        b = timeit(base, 1)
        t_ours.append(a)
        t_base.append(b)
        ratios.append(a / b)
    return statistics.median(t_ours), statistics.median(t_base), statistics.median(ratios)


def pline(label: str, ours: float, base: float, ratio: float, unit: str = "ms") -> None:
    print(f"  {label:58s} ours {ours * 1e3:10.1f} {unit:6s} baseline {base * 1e3:10.1f} {unit:6s} time ratio {ratio:5.2f}x")


def timeit(fn, repeat: int = 5) -> float:
    """Median seconds of ``repeat`` runs after a warm-up (``repeat=0``: one run, no warm-up)."""
    if repeat == 0:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- (a) ------------------------------------------------------------------------------------

def bench_pipeline(n: int, work: Path) -> None:
    print(f"(a) activations (conv1, conv2, fc1) + saliency, {n} MNIST-sized instances, batch {BATCH}, {THREADS} threads")
    data = tiled_mnist(n, work / "tiled.parquet")
    spec_data = {
        "model": {"factory": "netloupe.pipeline.zoo:MnistCNN"},
        "dataset": {"source": str(data), "input_column": "image", "metadata_columns": ["stroke"]},
        "preprocess": {"shape": [1, 28, 28], "scale": 1 / 255},
        "layers": [{"name": "conv1"}, {"name": "conv2"}, {"name": "fc1"}],
        "attributions": [{"method": "saliency"}],
        "execution": {"batch_size": BATCH, "num_workers": 1, "threads_per_worker": THREADS},
        "output": {"root": str(work / "runs"), "run_name": "bench"},
    }
    spec = parse_spec(spec_data)

    # Baseline: the same work in one process, no Ray.
    from netloupe.pipeline.datasets import resolve_dataset
    from netloupe.workers.model_loading import load_model

    torch.set_num_threads(THREADS)
    dataset = resolve_dataset(spec)
    model = load_model(spec.model)
    explainer = BatchExplainer(spec, dataset, model, torch.device("cpu"))
    out = work / "bare"
    started = time.perf_counter()
    rows = 0
    for batch in pq.ParquetFile(data).iter_batches(batch_size=BATCH, columns=dataset.columns):
        table = pa.Table.from_batches([batch])
        explained = explainer.explain(table)
        key = part_key(explained.instance_ids)
        for rel, part in explained.tables.items():
            write_part(out / rel, key, part)
        rows += table.num_rows
    bare = rows / (time.perf_counter() - started)
    shutil.rmtree(out)

    # Ours: the whole pipeline.
    import ray

    from netloupe.pipeline.driver import run_job
    from netloupe.pipeline.ray_cluster import ensure_ray

    ray_init = ensure_ray(None)
    result = run_job(spec, force=True)
    timings = result.manifest.timings
    steady = timings["steady_instances_per_second"]
    wall = n / timings["explain_seconds"]
    print(f"  ray.init {ray_init:.1f} s; actor start-up + first batch {timings['first_result_seconds']:.1f} s; "
          f"explain wall {timings['explain_seconds']:.1f} s; validate {timings['validate_seconds']:.1f} s")
    line("steady state (after the first batch), instances/s", steady, bare, "inst/s")
    line("whole explain stage incl. actor start-up, instances/s", wall, bare, "inst/s")
    ray.shutdown()


# -- (b) ------------------------------------------------------------------------------------

def bench_methods(work: Path) -> None:
    print(f"(b) attribution methods on a {BATCH}-instance MNIST batch, {THREADS} threads (time per batch)")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = MnistCNN().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(BATCH, 1, 28, 28)
    target = torch.randint(0, 10, (BATCH,))

    def fwd_bwd_at(size):
        xs, ts = x[:size], target[:size]

        def run():
            for start in range(0, BATCH, size):
                xr = xs.clone().requires_grad_(True)
                out = model(xr).gather(1, ts[:, None]).sum()
                torch.autograd.grad(out, xr)
        return run

    def fwd_at(size):
        def run():
            with torch.no_grad():
                for start in range(0, BATCH, size):
                    model(x[start:start + size])
        return run

    # The model's own bound: its best forward(+backward) time for 1024 instances over
    # batch sizes, each the median of 5.
    sizes = (128, 256, 512, 1024)
    fwd_times = {n: timeit(fwd_at(n)) for n in sizes}
    fb_times = {n: timeit(fwd_bwd_at(n)) for n in sizes}
    print("  model, ms per 1024 instances by batch size: forward "
          + ", ".join(f"{n}: {t * 1e3:.0f}" for n, t in fwd_times.items())
          + "; forward+backward " + ", ".join(f"{n}: {t * 1e3:.0f}" for n, t in fb_times.items()))
    per_instance = module_output_bytes(model, x)
    chunk_rows = tune_chunk_rows(model, x, per_instance)
    print(f"  chunk rows chosen by measurement: {chunk_rows}")
    base = {"method": "saliency", "params": {}}

    def bound(entry, layer=None):
        spec = parse_spec({"model": {"factory": "a.b:c"}, "dataset": {"source": "digits"},
                           "attributions": [entry], "output": {"run_name": "x"}}).attributions[0]
        method = bind_method(spec, model, (1, 28, 28), chunk_rows)
        return lambda: method(x, target)

    best_fb, best_fwd = min(fb_times, key=fb_times.get), min(fwd_times, key=fwd_times.get)
    n_steps = 32
    ig = bound({"method": "integrated_gradients", "params": {"n_steps": n_steps}})
    bound_fb = fwd_bwd_at(best_fb)
    t_ig, t_b, r = paired(ig, lambda: [bound_fb() for _ in range(n_steps)], rounds=3)
    pline(f"integrated_gradients n={n_steps} vs bound {n_steps}×fwd+bwd (target ≤ 1/0.85=1.18)", t_ig, t_b, r)

    plain_model = MnistCNN().eval()  # parameters still require grad, as in a plain script
    from captum.attr import IntegratedGradients

    def plain_captum():
        for start in range(0, BATCH, 64):
            IntegratedGradients(plain_model).attribute(x[start:start + 64], target=target[start:start + 64], n_steps=n_steps)

    t_ig, t_plain, r = paired(ig, plain_captum, rounds=3)
    pline("integrated_gradients vs plain Captum, batches of 64, defaults", t_ig, t_plain, r)

    def plain_captum_same_batch():
        IntegratedGradients(plain_model).attribute(x, target=target, n_steps=n_steps)

    t_ig, t_plain, r = paired(ig, plain_captum_same_batch, rounds=1)
    pline(f"integrated_gradients vs plain Captum, same {BATCH} batch, defaults", t_ig, t_plain, r)
    t_sal, t_b, r = paired(bound(base), bound_fb)
    pline("saliency vs fwd+bwd (target ≤ 1.3)", t_sal, t_b, r)
    grad_cam_vs_forward(bound({"method": "grad_cam", "layer": "conv2"}), fwd_at)
    window = {"sliding_window_shapes": [1, 7, 7], "strides": [1, 7, 7]}
    occ = bound({"method": "occlusion", "params": window})
    occ1 = bound({"method": "occlusion", "params": {**window, "perturbations_per_eval": 1}})
    t_occ, t_occ1, r = paired(occ, occ1, rounds=3)
    pline("occlusion, 16 windows: chosen perturbations_per_eval vs 1", t_occ, t_occ1, r)
    t_occ, t_b, r = paired(occ, lambda: [fwd_at(best_fwd)() for _ in range(16)], rounds=3)
    pline("occlusion, 16 windows vs bound 16×forward", t_occ, t_b, r)


def grad_cam_vs_forward(grad_cam, fwd_at, rounds: int = 15) -> None:
    """Grad-CAM against the model's forward at every batch size, all interleaved round by
    round (a forward baseline picked from separate timings drifted by up to 2x here)."""
    sizes = (128, 256, 512, 1024)
    grad_cam(), [fwd_at(n)() for n in sizes]
    t_cam, t_fwd = [], {n: [] for n in sizes}
    for _ in range(rounds):
        t_cam.append(timeit(grad_cam, 0))
        for n in sizes:
            t_fwd[n].append(timeit(fwd_at(n), 0))
    medians = {n: statistics.median(v) for n, v in t_fwd.items()}
    best = min(medians, key=medians.get)
    ratios = sorted(a / b for a, b in zip(t_cam, t_fwd[best]))
    pline(f"grad_cam vs forward at its best batch ({best}), {rounds} interleaved rounds (target ≤ 1.3)",
          statistics.median(t_cam), medians[best], statistics.median(t_cam) / medians[best])
    print(f"    per-round ratios from {ratios[0]:.2f} to {ratios[-1]:.2f}")


# -- (c) ------------------------------------------------------------------------------------

class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(4)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 7 * 7, 512)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        return self.fc2(self.relu1(self.fc1(self.flatten(self.pool(self.relu(self.conv(x)))))))


def bench_hooks() -> None:
    print(f"(c) forward with a hook recording a 512-wide layer vs plain forward, batch {BATCH}")
    torch.set_num_threads(THREADS)
    model = Wide().eval()
    x = torch.rand(BATCH, 1, 28, 28)
    capture = LayerCapture(model, [("fc1", "mean")])

    def plain():
        with torch.inference_mode():
            model(x)

    def hooked():
        with torch.inference_mode(), capture:
            model(x)
        capture.activations["fc1"].numpy()

    t_hooked, t_plain, r = paired(hooked, plain, rounds=15)
    pline("hooked forward vs plain forward (target ≤ 1.1)", t_hooked, t_plain, r)


# -- (d) ------------------------------------------------------------------------------------

def bench_demo(work: Path) -> None:
    print("(d) the demo, cold cache (downloads nothing; trains the CNN once), target < 180 s")
    env = dict(os.environ, NETLOUPE_CACHE=str(work / "cache"))
    started = time.perf_counter()
    subprocess.run([str(ROOT / ".venv" / "bin" / "netloupe"), "run", str(ROOT / "examples" / "mnist.yaml"),
                    "--force", "--no-progress", "--set", f"output.root={work / 'demo-runs'}"],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"  demo wall time {time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="a,b,c,d")
    parser.add_argument("--instances", type=int, default=200_000)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="netloupe-bench-"))
    os.environ.setdefault("NETLOUPE_CACHE", str(work / "cache"))
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {THREADS} threads on both sides")
    try:
        if "c" in parts:
            bench_hooks()
        if "b" in parts:
            bench_methods(work)
        if "a" in parts:
            bench_pipeline(args.instances, work)
        if "d" in parts:
            bench_demo(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
