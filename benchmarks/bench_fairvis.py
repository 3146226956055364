"""FairVis operators at 1M instances: the subgroup formulas written once (issue 15) against the
operators as they were before (commit 49a025f), interleaved, same answers checked.

    .venv/bin/python benchmarks/bench_fairvis.py [--rows 1000000] [--repeats 7]

A handmade run (no model) of ``--rows`` instances with three metadata columns; the old macros
are loaded from git under an ``old_`` prefix into the same sandboxed connection. Not a test:
prints the table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from netloupe.storage import schema as S
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.handmade import write_handmade_run

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "49a025f"
CLASSES = 10


def make_run(rows: int, directory: Path) -> Path:
    rng = np.random.default_rng(0)
    label = rng.integers(0, CLASSES, rows)
    prediction = np.where(rng.random(rows) < 0.9, label, rng.integers(0, CLASSES, rows))
    probabilities = np.full((rows, CLASSES), 0.05 / (CLASSES - 1), np.float32)
    probabilities[np.arange(rows), prediction] = 0.95
    pick = lambda values: np.array(values)[rng.integers(0, len(values), rows)]  # noqa: E731
    instances = pa.table({
        "instance_id": np.arange(rows, dtype=np.int64), "label": label, "prediction": prediction,
        "probabilities": S.fixed_vectors(probabilities, CLASSES), "stroke": pick(["thin", "medium", "heavy"]),
        "jitter": pick(["none", "low", "high"]), "noise": pick(["clean", "noisy"]),
    })
    activations = {"fc": rng.random((rows, 4), dtype=np.float32)}
    return write_handmade_run(directory, "fairvis", instances, activations, {}, rows_per_part=100_000).root


def old_macros() -> str:
    """The subgroup macros as they were, renamed so they live beside today's."""
    text = subprocess.run(["git", "show", f"{BEFORE}:storage/sql/operators.sql"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    start = text.index("-- Subgroups (FairVis)")
    end = text.index("-- Mean attribution maps per class subset")
    block = text[start:end]
    block = re.sub(r"^(COMMENT ON .*|--.*)$", "", block, flags=re.M)
    for name in ("_subgroups", "subgroup_metrics", "suggested_subgroups"):
        block = re.sub(rf"\b{name}\(", f"old_{name}(", block)
    return block.replace("CREATE MACRO", "CREATE TEMP MACRO")


OLD_SUBSET = """
SELECT count(*) AS size, avg(correct::INT) AS accuracy,
       count(*) FILTER (WHERE label = $p AND prediction = $p) AS tp,
       count(*) FILTER (WHERE label <> $p AND prediction = $p) AS fp,
       count(*) FILTER (WHERE label = $p AND prediction <> $p) AS fn,
       count(*) FILTER (WHERE label <> $p AND prediction <> $p) AS tn,
       fp / nullif(fp + tn, 0) AS fpr, fn / nullif(fn + tp, 0) AS fnr,
       tp / nullif(tp + fp, 0) AS precision, tp / nullif(tp + fn, 0) AS recall,
       avg(confidence) AS mean_confidence
FROM instances WHERE label IS NOT NULL AND (stroke = 'thin' AND noise = 'noisy')"""

CASES = {
    "subgroup_metrics, 3 columns": (
        "SELECT * FROM subgroup_metrics(['stroke', 'jitter', 'noise'], 3) ORDER BY subgroup",
        "SELECT * FROM old_subgroup_metrics(['stroke', 'jitter', 'noise'], 3) ORDER BY subgroup", None),
    "suggested_subgroups, fnr": (
        "SELECT * FROM suggested_subgroups(['stroke', 'jitter', 'noise'], 'fnr', positive := 3, min_size := 100)",
        "SELECT * FROM old_suggested_subgroups(['stroke', 'jitter', 'noise'], 'fnr', positive := 3, min_size := 100)",
        None),
    "one subset (side by side view)": (
        "SELECT * EXCLUDE (mean_confidence) FROM subset_metrics('stroke = ''thin'' AND noise = ''noisy''', 3)",
        f"SELECT * EXCLUDE (mean_confidence) FROM ({OLD_SUBSET})", {"p": 3}),
}


def timed(con, sql, parameters) -> tuple[float, pa.Table]:
    started = time.perf_counter()
    result = run_query(con, sql, parameters)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="netloupe-bench-fairvis-") as tmp:
        run = make_run(args.rows, Path(tmp))
        con = open_catalog(run)
        for statement in old_macros().split(";"):
            if statement.strip():
                con.execute(statement)
        print(f"| {args.rows:,} instances | now, median s | before, median s | now / before | same answer |")
        print("|---|---|---|---|---|")
        for name, (now_sql, old_sql, old_parameters) in CASES.items():
            now, before = [], []
            for _ in range(args.repeats):  # interleaved: the machine's drift hits both alike
                seconds, now_result = timed(con, now_sql, None)
                now.append(seconds)
                seconds, old_result = timed(con, old_sql, old_parameters)
                before.append(seconds)
            names = [c for c in old_result.column_names if c in now_result.column_names]
            same = now_result.select(names).to_pandas().round(12).equals(old_result.select(names).to_pandas().round(12))
            ratio = statistics.median(now) / statistics.median(before)
            print(f"| {name} | {statistics.median(now):.3f} | {statistics.median(before):.3f} | {ratio:.2f} | {same} |")


if __name__ == "__main__":
    main()
