"""Fidelity benchmark (issue 7): what the fidelity checks cost the demo, side by side.

    .venv/bin/python benchmarks/bench_fidelity.py [--rows 5000] [--repeats 1]

Runs ``netloupe run examples/mnist.yaml`` (eight attribution methods over the MNIST digits,
as shipped: fidelity on, deletion/insertion curves of 4 steps for every instance and
method, infidelity, sensitivity-max and model randomization on a ~32-instance sample) and
the same spec with fidelity off (``curve_steps=0, sample_size=0``), alternating, each as a
subprocess on its own local Ray. Prints wall time, the explain pass, the catalog build and
the driver's statistics merge (``fidelity_summary`` is added up from the workers' per-part
method summaries as they arrive, with the other statistics) for each, and the ratio on / off.

Not a test: prints figures for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netloupe.storage.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
NETLOUPE = [sys.executable, "-m", "netloupe.pipeline.cli"]
VARIANTS = {"fidelity on (as shipped)": [], "fidelity off": ["--set", "fidelity.curve_steps=0",
                                                            "--set", "fidelity.sample_size=0"]}


def run_demo(root: Path, name: str, rows: int, extra: list[str]) -> dict:
    command = NETLOUPE + ["run", str(ROOT / "examples" / "mnist.yaml"), "--no-progress",
                          "--set", f"output.root={root}", "--set", f"output.run_name={name}",
                          "--set", f"dataset.limit={rows}", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    manifest = RunLayout(root / name).read_manifest()
    timings = manifest.timings
    return {"wall": wall, "explain": timings["explain_seconds"], "catalog": timings["catalog"]["total"],
            "merge": timings.get("statistics_merge_seconds", 0.0),
            "sampled": sum(manifest.fidelity.sampled_rows.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    results = {label: [] for label in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="netloupe-bench-fidelity-") as tmp:
        for repeat in range(args.repeats):
            for i, (label, extra) in enumerate(VARIANTS.items()):
                results[label].append(run_demo(Path(tmp), f"r{repeat}v{i}", args.rows, extra))
                print(f"{label:>26}: {results[label][-1]}", flush=True)
    print(f"\n{args.rows} rows, median of {args.repeats}")
    print(f"{'':>26} {'wall s':>8} {'explain s':>10} {'catalog s':>10} {'merge s':>10} {'sampled':>8}")
    medians = {}
    for label, runs in results.items():
        medians[label] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        m = medians[label]
        print(f"{label:>26} {m['wall']:8.1f} {m['explain']:10.1f} {m['catalog']:10.2f} {m['merge']:10.3f} "
              f"{m['sampled']:8.0f}")
    on, off = medians.values()
    print(f"{'ratio on / off':>26} {on['wall'] / off['wall']:8.2f} {on['explain'] / off['explain']:10.2f} "
          f"{on['catalog'] / off['catalog']:10.2f}")


if __name__ == "__main__":
    main()
