"""`netloupe report` at scale (issue 19): the time and peak memory of a run's HTML report.

    .venv/bin/python benchmarks/bench_report.py [--rows 1000000] [--side 28] [--run DIR] [--keep]

Writes a handmade run of ``--rows`` instances (``tests/report_run.py``: 3 classes, two metadata
columns, a 6-neuron layer with its projection, a ``side`` x ``side`` saliency map per instance
and a Parquet dataset of ``side`` x ``side`` input images the run points at), unless ``--run``
names a committed run, then times ``netloupe report RUN --output FILE.html`` as a subprocess
(a fresh process: imports and numba compilation included), reading its peak RSS from the
kernel's high-water mark (``VmHWM``) as it runs. Not a test: prints a line for RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.report_run import make_report_run


def high_water_kib(pid: int) -> int:
    """The process's peak resident memory so far (KiB; 0 once it has gone). The kernel keeps
    the mark, so a sample every 50 ms misses at most the last 50 ms; ``getrusage`` of a child
    would not do: its mark includes this process's pages at the fork, the run written above."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--side", type=int, default=28, help="pixels per side of each input and map")
    parser.add_argument("--run", type=Path, help="report this committed run instead of writing one")
    parser.add_argument("--mistakes", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the written run and report")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-report-", dir=ROOT / "runs"))
    try:
        run = args.run
        if run is None:
            started = time.perf_counter()
            run = make_report_run(workdir, rows=args.rows, side=args.side, name=f"report-{args.rows}")
            print(f"wrote {run} ({args.rows:,} instances, {args.side}x{args.side} inputs and maps) in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        output = workdir / "report.html"
        command = [sys.executable, "-m", "netloupe.pipeline.cli", "report", str(run), "--output", str(output),
                   "--mistakes", str(args.mistakes)]
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT)
        peak_kib = 0
        while process.poll() is None:
            peak_kib = max(peak_kib, high_water_kib(process.pid))
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        if process.returncode:
            raise SystemExit(f"netloupe report exited with {process.returncode}")
        peak_gib = peak_kib / 2**20
        print(f"netloupe report: {seconds:.1f} s wall, peak RSS {peak_gib:.2f} GiB, "
              f"{output.stat().st_size / 1e6:.2f} MB file", flush=True)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
