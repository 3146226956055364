"""Driver tail: the wall seconds from the end of the explain pass to the committed run, before and after.

    .venv/bin/python benchmarks/bench_driver.py [--sizes 100000,1000000] [--repeats 2] [--before a220364] [--after COMMIT]
    .venv/bin/python benchmarks/bench_driver.py --simulated-cluster [--sim-rows 200000] [--sim-workers 8]

The driver tail of a run is what the driver does alone after the last explain batch:
settling the parts, the projection pass, the SQL catalog, the commit, and its own exit
(Ray's shutdown included). It is measured as (the process's exit) - (the arrival of the
stage line ``explained N instances in ...`` on its stdout), each line timestamped as it
arrives; the manifest's timings (projection, catalog, ...) and the gaps between the stage
lines after that one say where the tail goes.

Two versions run side by side, interleaved (before, after, before, after, ...: this VM's
speed drifts 2x within minutes): "before" is the commit ``--before`` (default a220364),
checked out in a temporary git worktree; "after" is this working tree as it is now
(uncommitted changes included), or with ``--after`` another commit from a worktree of its own
(so the working tree can change while this runs). Both run ``python -m netloupe.pipeline.cli run`` with this
venv's python on this repository's ``examples/mnist-scale.yaml`` (``--simulated-cluster``:
a small MLP on a generated 30-feature Parquet file, ``--sim-workers`` workers sharing the
cores with fractional ``execution.cpus_per_worker``; reports the driver's share of the
wall, tail / (explain pass + tail)).

netloupe is installed in editable mode: ``import netloupe`` finds ``<cwd>/netloupe`` (the
``-m`` path entry) and its layers (``netloupe.storage`` = ``storage/``, ...) through the
editable finder, which always points at this working tree. The "before" run therefore gets
a directory of symlinks laid out as the installed package (``netloupe/`` = the worktree's
``netloupe/`` files, ``netloupe/storage`` -> the worktree's ``storage/``, ... as its
pyproject maps them), first on PYTHONPATH and as its working directory; the local Ray that
the driver starts hands both to its workers. Before timing, each version is checked: a
child process prints where every layer imports from, and one untimed warm-up run on
``--probe-rows`` rows records (an audit hook in a ``sitecustomize`` on PYTHONPATH) every
file of either checkout that the driver and each Ray worker process opened. The timed runs
carry no probe.

This VM is shared: each run also reports the share of the CPUs that processes other than
its own (its driver's session, and this script) used meanwhile, and warns above 10%.

Everything (worktree, symlinks, runs, Ray's session files: RAY_TMPDIR) lives in one
temporary directory, removed at the end with the worktree (``git worktree remove``).
Not a test: prints markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SCALE_SPEC = ROOT / "examples/mnist-scale.yaml"
_RAY_DIRS = count()
"""Short names for the runs' Ray directories: Ray's socket paths below them must fit 107 bytes."""

LOCAL_RAY_ENVIRONMENT = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""A literal copy of netloupe.pipeline.ray_cluster.LOCAL_RAY_ENVIRONMENT: importing it would
bind this script to one of the two versions."""

EXPLAINED = re.compile(r"\bexplained [\d,]+ instances? in ")
"""The stage line that ends the explain pass (pipeline/driver.py: ``explained 5,000 instances in 14 s``);
not the progress lines (``explained 12,288 of 50,000 instances (25%)...``) nor the summary."""
EXPLAINING = re.compile(r"\bexplaining [\d,]+ instances? with ")
"""The stage line that starts it."""
STAGE = re.compile(r"^\[\s*[^\]]*\]\s+(.*)$")
"""A stage line: ``[      21 s] projecting 2 tables to 2-D`` (pipeline/progress.py)."""
COMMITTED = re.compile(r"^run '.*' committed: ")

PROBE_SITECUSTOMIZE = r'''
"""bench_driver's probe: record every file of the watched checkouts this process opens."""
import os
import sys

_out = os.environ.get("BENCH_DRIVER_PROBE_DIR")
if _out:
    _roots = tuple(r.rstrip(os.sep) + os.sep for r in os.environ["BENCH_DRIVER_PROBE_ROOTS"].split(os.pathsep))
    _seen = set()
    _busy = []

    def _bench_driver_probe(event, args):
        if event != "open" or _busy or not args or not isinstance(args[0], str):
            return
        if not args[0].endswith((".py", ".pyc", ".sql")):
            return
        real = os.path.realpath(args[0])
        if real in _seen or not real.startswith(_roots) or (os.sep + ".venv" + os.sep) in real:
            return
        _seen.add(real)
        _busy.append(1)
        try:
            with open(os.path.join(_out, f"{os.getpid()}.txt"), "a") as f:
                if len(_seen) == 1:
                    f.write("#argv " + " ".join(sys.argv[:1]) + "\n")
                f.write(real + "\n")
        finally:
            _busy.pop()

    sys.addaudithook(_bench_driver_probe)

# Then the sitecustomize this one shadows (Debian's), if any.
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _next = os.path.join(os.path.abspath(_entry or "."), "sitecustomize.py")
    if os.path.dirname(_next) != _here and os.path.isfile(_next):
        with open(_next) as _f:
            exec(compile(_f.read(), _next, "exec"), {"__name__": "sitecustomize", "__file__": _next})
        break
'''

IMPORT_CHECK = r'''
import importlib, json, os, sys
names = json.loads(sys.argv[1])
print(json.dumps({n: os.path.realpath(importlib.import_module(n).__file__) for n in names}))
'''


@dataclass
class Version:
    """One side of the comparison: the checkout whose code runs, and how a child process gets it."""

    name: str
    root: Path
    """The checkout (the worktree, or this repository)."""
    cwd: Path
    """The child's working directory: ``python -m`` puts it first on sys.path, and Ray adds
    the driver's working directory to its workers' sys.path."""
    pythonpath: list[str] = field(default_factory=list)

    def packages(self) -> list[str]:
        """The installed package's names, from this checkout's pyproject."""
        with open(self.root / "pyproject.toml", "rb") as f:
            return list(tomllib.load(f)["tool"]["setuptools"]["package-dir"])

    def env(self, ray_dir: Path | None = None, probe: tuple[Path, Path, list[Path]] | None = None) -> dict:
        env = {**LOCAL_RAY_ENVIRONMENT, **os.environ, "PYTHONUNBUFFERED": "1"}
        path = list(self.pythonpath)
        if probe is not None:
            site_dir, out_dir, roots = probe
            path.insert(0, str(site_dir))
            env["BENCH_DRIVER_PROBE_DIR"] = str(out_dir)
            env["BENCH_DRIVER_PROBE_ROOTS"] = os.pathsep.join(str(r) for r in roots)
        if os.environ.get("PYTHONPATH"):
            path.append(os.environ["PYTHONPATH"])
        if path:
            env["PYTHONPATH"] = os.pathsep.join(path)
        if ray_dir is not None:
            env["RAY_TMPDIR"] = str(ray_dir)
        return env


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def package_tree(worktree: Path, dest: Path) -> Path:
    """A directory holding ``netloupe/`` laid out as installed, made of symlinks into
    ``worktree`` by its pyproject's package-dir mapping; returns the directory."""
    with open(worktree / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    package = dest / "netloupe"
    package.mkdir(parents=True)
    for entry in (worktree / mapping["netloupe"]).iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name == "netloupe":
            continue
        top, _, sub = name.partition(".")
        if top != "netloupe" or "." in sub:
            raise SystemExit(f"{worktree}/pyproject.toml maps {name!r}; this script lays out only netloupe.<layer>")
        link = package / sub
        if link.exists() or link.is_symlink():
            raise SystemExit(f"{worktree}/{mapping['netloupe']} already has {sub!r}, which pyproject maps to {folder}/")
        link.symlink_to(worktree / folder, target_is_directory=True)
    return dest


def inside(path: str, root: Path) -> bool:
    return path.startswith(str(root).rstrip(os.sep) + os.sep)


def check_imports(version: Version, other: Version) -> None:
    """A child process as the runs get it: every layer must import from ``version.root``."""
    names = version.packages()
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK, json.dumps(names)], cwd=version.cwd,
                          env=version.env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{version.name}: importing netloupe failed:\n{done.stderr[-3000:]}")
    files = json.loads(done.stdout.strip().splitlines()[-1])
    wrong = {n: f for n, f in files.items() if not inside(f, version.root) or inside(f, other.root)}
    if wrong:
        raise SystemExit(f"{version.name}: these import from outside {version.root}: {wrong}")
    print(f"check {version.name}: all {len(files)} packages import from {version.root} "
          f"(netloupe.storage.__file__ -> {files.get('netloupe.storage')})", flush=True)


def ray_processes(ray_dir: Path) -> list[psutil.Process]:
    """The processes of the local Ray a run started (their command lines name its RAY_TMPDIR)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(ray_dir) in cmdline:
            found.append(process)
    return found


class OtherLoad(threading.Thread):
    """CPU seconds used by processes other than the run's (and this script) while it runs:
    this VM is shared, and another job's tests make a run look slow. The run's own processes
    are those of its driver's session (Ray starts its processes in it) or naming its Ray
    directory. Sampled every ``interval`` s; a process that ends loses its last interval."""

    def __init__(self, ray_dir: Path, interval: float = 1.0):
        super().__init__(daemon=True)
        self.ray_dir, self.interval = str(ray_dir), interval
        self.session: int | None = None
        self.since = time.time()
        self.stop_event = threading.Event()
        self.ours: set[int] = {os.getpid()}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}

    def is_ours(self, process: psutil.Process) -> bool:
        try:
            if self.session is not None and os.getsid(process.pid) == self.session:
                return True
            return self.ray_dir in " ".join(process.cmdline())
        except (OSError, psutil.Error):
            return False

    def sample(self) -> None:
        for process in psutil.process_iter():
            pid = process.pid
            if pid in self.ours:
                continue
            try:
                if pid not in self.first:
                    if self.is_ours(process):
                        self.ours.add(pid)
                        continue
                    times = process.cpu_times()
                    self.first[pid] = 0.0 if process.create_time() >= self.since else times.user + times.system
                else:
                    times = process.cpu_times()
                self.last[pid] = times.user + times.system
            except psutil.Error:
                continue

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> float:
        """Stop sampling; the other processes' CPU seconds since the start."""
        self.stop_event.set()
        self.join()
        return sum(max(0.0, self.last[pid] - self.first[pid]) for pid in self.last)


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for_ray_exit(ray_dir: Path, timeout: float = 60.0) -> int:
    """Wait until the run's own Ray processes are gone (so that the next run does not share
    the cores with them); stop those still there after ``timeout``. Returns how many lingered."""
    deadline = time.monotonic() + timeout
    lingering = ray_processes(ray_dir)
    while lingering and time.monotonic() < deadline:
        time.sleep(0.5)
        lingering = [p for p in lingering if alive(p)]
    for process in lingering:
        try:
            process.terminate()
        except psutil.Error:
            pass
    if lingering:
        print(f"  {len(lingering)} Ray processes of {ray_dir} were still running {timeout:.0f} s after the driver "
              f"exited; stopped them (pids {[p.pid for p in lingering]})", flush=True)
    return len(lingering)


def flatten(timings: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in timings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("bytes"):
            flat[prefix + key] = float(value)
    return flat


def normalised(text: str) -> str:
    """A stage line's text with its numbers out, so that runs of other sizes share the key."""
    text = re.sub(r"'[^']*'", "'…'", text)
    return re.sub(r"\d[\d,.]*( (min|h|s)\b)?", "N", text)


def run_once(version: Version, spec: Path, sets: list[str], work: Path, tag: str,
             probe: tuple[Path, Path, list[Path]] | None = None) -> dict:
    """One ``netloupe run``; returns its times (perf_counter seconds) and manifest timings."""
    out_root, ray_dir = work / f"{tag}-out", work / f"r{next(_RAY_DIRS)}"
    ray_dir.mkdir()
    command = [sys.executable, "-m", "netloupe.pipeline.cli", "run", str(spec), "--force"]
    for item in [*sets, f"output.root={out_root}", "output.run_name=bench"]:
        command += ["--set", item]
    lines: list[tuple[float, str, str]] = []
    lock = threading.Lock()

    def read(stream, name: str) -> None:
        for raw in iter(stream.readline, b""):
            arrived = time.perf_counter()
            with lock:
                lines.append((arrived, name, raw.decode(errors="replace").rstrip("\n")))

    others = OtherLoad(ray_dir)
    others.sample()  # the baseline, before the run's processes exist
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=version.cwd, env=version.env(ray_dir, probe), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    others.session = process.pid
    others.start()
    readers = [threading.Thread(target=read, args=(process.stdout, "stdout"), daemon=True),
               threading.Thread(target=read, args=(process.stderr, "stderr"), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        returncode = process.wait()
        exited = time.perf_counter()
    except BaseException:
        others.stop()
        # Interrupted: stop the run we started as a Ctrl-C would (it cleans its staging), then its group.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        raise
    others_cpu = others.stop()
    for reader in readers:
        reader.join(timeout=60)
    lingered = wait_for_ray_exit(ray_dir)
    with lock:
        lines.sort()
        text = [(t, s, line) for t, s, line in lines]
    if returncode != 0:
        stderr = "\n".join(line for _, s, line in text if s == "stderr")[-3000:]
        raise SystemExit(f"{version.name} run {tag} failed ({returncode}):\n{stderr}")
    explained = next((t for t, _, line in text if EXPLAINED.search(line)), None)
    explaining = next((t for t, _, line in text if EXPLAINING.search(line)), None)
    if explained is None:
        raise SystemExit(f"{version.name} run {tag}: no 'explained N instances in ...' line in its output:\n"
                         + "\n".join(line for _, _, line in text[-40:]))
    # The gaps between the stage lines after the explain pass, each named by the line that ends it.
    segments, last = {}, explained
    for t, _, line in text:
        if t <= explained:
            continue
        stage = STAGE.match(line)
        if stage or COMMITTED.match(line):
            label = normalised(stage.group(1) if stage else line.split(":")[0])
            segments[f"until '{label}'"] = segments.get(f"until '{label}'", 0.0) + t - last
            last = t
    segments["until exit"] = exited - last
    manifest = json.loads((out_root / "bench" / "manifest.json").read_text())
    result = {
        "version": version.name, "tag": tag, "wall_s": exited - started, "tail_s": exited - explained,
        "explain_pass_s": explained - explaining if explaining is not None else None,
        "segments": segments, "timings": flatten(manifest.get("timings", {})),
        "timing_keys": sorted(manifest.get("timings", {})), "argv0": (manifest.get("argv") or [""])[0],
        "lingering_ray_processes": lingered, "pid": process.pid,
        "others_cpu_share": others_cpu / ((exited - started) * (os.cpu_count() or 1)),
    }
    shutil.rmtree(out_root, ignore_errors=True)  # a 1M run is ~4 GB
    shutil.rmtree(ray_dir, ignore_errors=True)
    return result


def probe_run(version: Version, other: Version, spec: Path, sets: list[str], rows: int, work: Path,
              site_dir: Path) -> dict:
    """An untimed warm-up run on ``rows`` rows with the probe on: which checkout's files did the
    driver and each Ray worker process open? Fails unless every one is ``version``'s."""
    out_dir = work / f"probe-{version.name}"
    out_dir.mkdir()
    result = run_once(version, spec, [*sets, f"dataset.limit={rows}"], work, f"probe-{version.name}",
                      probe=(site_dir, out_dir, [version.root, other.root]))
    processes = []
    for record in sorted(out_dir.glob("*.txt")):
        content = record.read_text().splitlines()
        argv0 = content[0].removeprefix("#argv ") if content and content[0].startswith("#argv ") else "?"
        processes.append({"pid": int(record.stem), "argv0": argv0, "files": content[1:]})
    workers = [p for p in processes if p["argv0"].endswith("default_worker.py")]
    drivers = [p for p in processes if p["pid"] == result["pid"]]
    foreign = [(p["pid"], f) for p in processes for f in p["files"] if not inside(f, version.root)]
    explain_workers = [p for p in workers if any(inside(f, version.root) and "/workers/" in f[len(str(version.root)):]
                                                 for f in p["files"])]
    if foreign:
        raise SystemExit(f"{version.name}: processes of its run opened files of another checkout: {foreign[:5]}")
    if not drivers or not explain_workers:
        raise SystemExit(f"{version.name}: the probe saw {len(drivers)} driver and {len(explain_workers)} Ray worker "
                         f"processes loading netloupe.workers; cannot tell which code the workers ran "
                         f"({[(p['pid'], p['argv0'], len(p['files'])) for p in processes]})")

    def relative(files: list[str]) -> set[str]:
        return {f[len(str(version.root)) + 1:] for f in files if f.endswith((".py", ".sql"))}

    def first_worker_module(files: list[str]) -> str:
        """The first module of netloupe.workers a process read (in order): what it was started for."""
        return next((f[len(str(version.root)) + 1:] for f in files if f.endswith(".py")
                     and f[len(str(version.root)) + 1:].startswith("workers/") and not f.endswith("__init__.py")), "?")

    entry = sorted({first_worker_module(p["files"]) for p in explain_workers})
    print(f"check {version.name}: in a {rows:,}-row warm-up run the driver (pid {result['pid']}, "
          f"{len(relative(drivers[0]['files']))} source files) and {len(workers)} Ray worker processes (which loaded "
          f"{', '.join(entry)}) read netloupe's code only from {version.root}, "
          f"none from {other.root}", flush=True)
    result["probe_driver_files"] = relative(drivers[0]["files"])
    result["probe_worker_files"] = set().union(*(relative(p["files"]) for p in workers))
    return result


def probe_differences(before: dict, after: dict) -> str:
    """The source files one version's run read and the other's did not (driver; Ray workers)."""
    parts = []
    for where in ("driver", "worker"):
        b, a = before[f"probe_{where}_files"], after[f"probe_{where}_files"]
        parts.append(f"{where}s: only before read {sorted(b - a) or 'nothing else'}, "
                     f"only after read {sorted(a - b) or 'nothing else'}")
    return "; ".join(parts)


def prepare_mnist_variants(versions: list[Version], sizes: list[int]) -> None:
    """Generate the datasets (by the "after" code) before anything is timed; check each
    version finds the same cached files."""
    snippet = ("import sys; from netloupe.pipeline.builtin_datasets import builtin; "
               "print(builtin('mnist-variants').path(int(sys.argv[1]), 0))")
    for rows in sizes:
        paths = {}
        for version in sorted(versions, key=lambda v: v.name != "after"):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", snippet, str(rows)], cwd=version.cwd, env=version.env(),
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{version.name}: preparing mnist-variants {rows}:\n{done.stderr[-3000:]}")
            paths[version.name] = done.stdout.strip().splitlines()[-1]
            print(f"dataset for {version.name}: {paths[version.name]} ready in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        if len(set(paths.values())) != 1:
            print(f"  note: the versions read different files for {rows:,} rows: {paths}", flush=True)


def write_simulated_inputs(work: Path, rows: int, workers: int, batch_size: int, cpus_per_worker: float) -> Path:
    """A 30-feature Parquet file (standard-normal features, which the breast-cancer MLP of the
    zoo takes standardised) and a spec explaining it with ``workers`` workers; returns the spec."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    rng = np.random.default_rng(0)
    features = [f"f{i:02d}" for i in range(30)]
    x = rng.normal(size=(rows, len(features))).astype(np.float32)
    columns = {"instance_id": pa.array(np.arange(rows, dtype=np.int64))}
    columns.update({name: x[:, i] for i, name in enumerate(features)})
    columns["label"] = pa.array(rng.integers(0, 2, rows).astype(np.int64))
    columns["group"] = pa.array(np.where(np.arange(rows) % 3 == 0, "a", "b").astype(object))
    data = work / "tabular.parquet"
    pq.write_table(pa.table(columns), data, row_group_size=max(batch_size, 16384))
    spec = {
        "model": {"factory": "netloupe.pipeline.zoo:trained_breast_cancer_mlp", "class_names": ["malignant", "benign"]},
        "dataset": {"source": str(data), "feature_columns": features, "id_column": "instance_id",
                    "label_column": "label", "metadata_columns": ["group"]},
        "layers": [{"name": "relu1"}, {"name": "relu2"}],
        "attributions": [{"method": "saliency"}],
        "target": {"kind": "predicted"},
        "storage": {"attributions": "full"},
        "projection": {"sample_size": min(20000, rows), "seed": 0},
        "execution": {"batch_size": batch_size, "num_workers": workers, "cpus_per_worker": cpus_per_worker},
        "output": {"root": str(work / "unused"), "run_name": "bench"},
    }
    path = work / "simulated-cluster.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def ratio(after: float | None, before: float | None) -> str:
    return "—" if not after or not before else f"{after / before:.2f}x"


def busiest(results: dict[str, list[dict]]) -> str:
    """The largest share of the machine's CPUs that other processes took during one of these runs."""
    return f"{max(r['others_cpu_share'] for rs in results.values() for r in rs):.0%}"


def breakdown(results: list[dict]) -> str:
    """Medians of the tail's gaps between stage lines and of the manifest's timings."""
    segments = {}
    for r in results:
        for key, value in r["segments"].items():
            segments.setdefault(key, []).append(value)
    timings = {}
    for r in results:
        for key, value in r["timings"].items():
            timings.setdefault(key, []).append(value)
    gaps = " + ".join(f"{key} {median(v):.1f}" for key, v in segments.items())
    stated = ", ".join(f"{key} {median(v):.2f}" for key, v in timings.items())
    return f"tail = {gaps} s; manifest timings (s): {stated}"


def interleaved(versions: list[Version], repeats: int, run) -> dict[str, list[dict]]:
    """``run(version, i)`` for before, after, before, after, ...; the results by version."""
    results: dict[str, list[dict]] = {v.name: [] for v in versions}
    for i in range(repeats):
        for version in versions:
            result = run(version, i)
            results[version.name].append(result)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()
                              if k in ("version", "tag", "wall_s", "tail_s", "explain_pass_s", "others_cpu_share")}),
                  flush=True)
            if result["others_cpu_share"] > 0.1:
                print(f"  warning: other processes on this machine used {result['others_cpu_share']:.0%} of its CPUs "
                      "during this run; its times are not comparable", flush=True)
    return results


def key_differences(before: dict, after: dict) -> str:
    only_before = sorted(set(before["timing_keys"]) - set(after["timing_keys"]))
    only_after = sorted(set(after["timing_keys"]) - set(before["timing_keys"]))
    if not only_before and not only_after:
        return "the two versions' manifests have the same timing keys"
    return f"manifest timing keys only before: {only_before or 'none'}; only after: {only_after or 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="instances per run (mnist-scale)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each version per size")
    parser.add_argument("--before", default="a220364", help="the commit to compare the working tree with")
    parser.add_argument("--after", default=None,
                        help="a commit to run as 'after' from a worktree of its own (default: the working tree, "
                             "which must then stay untouched while this runs)")
    parser.add_argument("--probe-rows", type=int, default=2048,
                        help="rows of the untimed warm-up run that checks which code each version ran")
    parser.add_argument("--simulated-cluster", action="store_true",
                        help="instead: a small MLP over --sim-workers workers on a generated tabular file")
    parser.add_argument("--sim-rows", type=int, default=200000)
    parser.add_argument("--sim-workers", type=int, default=8)
    parser.add_argument("--sim-batch-size", type=int, default=1024)
    parser.add_argument("--sim-cpus-per-worker", type=float, default=None,
                        help="default: the cores shared by the workers (a local Ray has cores + 1 CPUs, one "
                             "kept for reading)")
    parser.add_argument("--tmp-dir", default=None, help="where the temporary directory goes (default: the system's)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    commit = git("rev-parse", "--short", args.before)
    head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    after_commit = git("rev-parse", "--short", args.after) if args.after else None
    print(f"before: {args.before} ({commit}); after: "
          + (f"{args.after} ({after_commit})" if after_commit else
             f"the working tree at {ROOT} (HEAD {head}"
             + (f" + uncommitted changes in {len(dirty.splitlines())} files)" if dirty else ", no uncommitted changes)")),
          flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-driver-", dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        worktrees = []

        def checkout(name: str, at: str) -> Version:
            worktree = work / f"{name}-checkout"
            git("worktree", "add", "--detach", str(worktree), at)
            worktrees.append(worktree)
            tree = package_tree(worktree, work / f"{name}-package")
            return Version(name, worktree, cwd=tree, pythonpath=[str(tree)])

        try:
            before = checkout("before", commit)
            after = checkout("after", after_commit) if after_commit else Version("after", ROOT, cwd=ROOT)
            versions = [before, after]
            check_imports(before, after)
            check_imports(after, before)
            site_dir = work / "probe-site"
            site_dir.mkdir()
            (site_dir / "sitecustomize.py").write_text(PROBE_SITECUSTOMIZE)
            if args.simulated_cluster:
                simulated(args, versions, work, site_dir)
            else:
                scale(args, sizes, versions, work, site_dir)
        finally:
            for worktree in worktrees:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)


def scale(args, sizes: list[int], versions: list[Version], work: Path, site_dir: Path) -> None:
    before, after = versions
    prepare_mnist_variants(versions, sizes)
    base = [f"dataset.rows={min(sizes)}"]
    probe_rows = min(args.probe_rows, min(sizes))
    probes = {v.name: probe_run(v, after if v is before else before, SCALE_SPEC, base, probe_rows, work, site_dir)
              for v in versions}
    print(f"check: {key_differences(probes['before'], probes['after'])}; manifest argv[0]: before "
          f"{probes['before']['argv0']}, after {probes['after']['argv0']}", flush=True)
    print(f"check: {probe_differences(probes['before'], probes['after'])}", flush=True)
    by_size = {}
    for rows in sizes:
        by_size[rows] = interleaved(
            versions, args.repeats,
            lambda v, i, rows=rows: run_once(v, SCALE_SPEC, [f"dataset.rows={rows}"], work, f"{v.name}-{rows}-{i}"))
    print(f"\nDriver tail (the explain pass's last line to the process's exit), `examples/mnist-scale.yaml`, "
          f"median of {args.repeats} interleaved runs each; before = {args.before}, after = {args.after or 'the working tree'}\n")
    print("| instances | tail before (s) | tail after (s) | after/before | tail per 1M before (s) "
          "| tail per 1M after (s) | wall before (s) | wall after (s) | wall after/before | others' CPU share, max |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows, results in by_size.items():
        tb, ta = (median(r["tail_s"] for r in results[v]) for v in ("before", "after"))
        wb, wa = (median(r["wall_s"] for r in results[v]) for v in ("before", "after"))
        print(f"| {rows:,} | {fmt(tb)} | {fmt(ta)} | {ratio(ta, tb)} | {fmt(tb * 1e6 / rows)} | {fmt(ta * 1e6 / rows)} "
              f"| {fmt(wb, 0)} | {fmt(wa, 0)} | {ratio(wa, wb)} | {busiest(results)} |")
    print()
    for rows, results in by_size.items():
        for name in ("before", "after"):
            print(f"- {rows:,} {name}: {breakdown(results[name])}")


def simulated(args, versions: list[Version], work: Path, site_dir: Path) -> None:
    before, after = versions
    workers = args.sim_workers
    cpus = args.sim_cpus_per_worker or min(1.0, (os.cpu_count() or 1) / workers)
    spec = write_simulated_inputs(work, args.sim_rows, workers, args.sim_batch_size, cpus)
    print(f"simulated cluster: {args.sim_rows:,} rows of 30 features, a 30-64-32-2 MLP "
          f"(netloupe.pipeline.zoo:trained_breast_cancer_mlp), {workers} workers x {cpus:g} CPUs, "
          f"batches of {args.sim_batch_size}; spec {spec.name}", flush=True)
    probes = {v.name: probe_run(v, after if v is before else before, spec, [], min(args.probe_rows, args.sim_rows),
                                work, site_dir) for v in versions}
    print(f"check: {key_differences(probes['before'], probes['after'])}", flush=True)
    print(f"check: {probe_differences(probes['before'], probes['after'])}", flush=True)
    results = interleaved(versions, args.repeats, lambda v, i: run_once(v, spec, [], work, f"{v.name}-sim-{i}"))
    print(f"\nDriver share of the wall, {workers} workers x {cpus:g} CPUs on a local Ray, {args.sim_rows:,} instances "
          f"of a small MLP, median of {args.repeats} interleaved runs each; before = {args.before}, "
          f"after = {args.after or 'the working tree'}\n")
    print("| version | explain pass (s) | driver tail (s) | tail / (explain pass + tail) | wall (s) "
          "| others' CPU share, max |")
    print("|---|---:|---:|---:|---:|---:|")
    shares = {}
    for name in ("before", "after"):
        rs = results[name]
        share = median(r["tail_s"] / (r["explain_pass_s"] + r["tail_s"]) for r in rs if r["explain_pass_s"])
        shares[name] = share
        print(f"| {name} | {fmt(median(r['explain_pass_s'] for r in rs))} | {fmt(median(r['tail_s'] for r in rs))} "
              f"| {fmt(share * 100 if share is not None else None, 0)}% | {fmt(median(r['wall_s'] for r in rs), 0)} "
              f"| {busiest({name: rs})} |")
    tb, ta = (median(r["tail_s"] for r in results[v]) for v in ("before", "after"))
    print(f"\ntail after/before: {ratio(ta, tb)}; driver share after/before: {ratio(shares['after'], shares['before'])}")
    print()
    for name in ("before", "after"):
        print(f"- {name}: {breakdown(results[name])}")


if __name__ == "__main__":
    main()
