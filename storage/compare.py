"""Several committed runs over the same instances in one read-only DuckDB connection: what
``netloupe sql RUN_A RUN_B ... "SQL"`` and ``netloupe.compare(...)`` open.

Each run's tables and Parquet views sit under the run's own name (``v1.instances``,
``v2.attributions_saliency``, ``v2.activation_vectors_fc1``); ``runs`` lists the runs in the
order given (a model's versions, a training run's checkpoints), ``instances_by_run`` holds
every run's instances with a ``run`` column; the operators of ``storage/sql/compare.sql``
compare them (i-Algebra's join and anti-join across models). Runs over different data are
refused: the same ids (counted and hashed here) and, where both manifests record it, the same
inputs (:attr:`netloupe.storage.manifest.DatasetInfo.input_digest`).

The per-instance map comparisons and the layer comparisons are Python functions registered
on the connection: a rank correlation with ties needs per-row ranks, and CKA needs the
layers' cross-covariance, which SQL would compute a neuron pair at a time.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from scipy.stats import rankdata

from netloupe.contract.errors import RunError
from netloupe.storage.activation_index import ActivationIndex
from netloupe.storage.catalog import (
    BUILDING_BLOCKS_SQL,
    SQL_DIR,
    _run_statements,
    activation_vectors_view,
    checked_layout,
)
from netloupe.storage.layout import RunLayout, part_name
from netloupe.storage.manifest import RunManifest
from netloupe.storage.part_statistics import WIDE_NEURON_LIMIT
from netloupe.storage.run_group import group_members, group_of, influence_path, read_group
from netloupe.storage.schema import ID_SQL_TYPES, id_digest_sql, quoted_identifier, vectors_to_numpy

COMPARE_SQL = SQL_DIR / "compare.sql"
RUN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
"""A run's name in SQL: an identifier (its schema), so ``v1.instances`` needs no quoting."""
RESERVED_NAMES = {"main", "memory", "system", "temp", "information_schema", "pg_catalog"}
GRAM_BATCH_ROWS = 65_536
"""Joined instances per step of a layer comparison: two 256-wide float32 blocks of 64 MB."""
COMPARE_OPERATORS_SQL = """
    SELECT function_name AS operator, comment FROM duckdb_functions()
    WHERE function_type = 'table_macro' AND database_name = 'memory' AND NOT starts_with(function_name, '_')
    ORDER BY function_name
"""


@dataclass(frozen=True)
class ComparedRun:
    """One run of a comparison: its name in SQL, where it is, and its Parquet views."""

    name: str
    directory: Path
    manifest: RunManifest
    parquet: dict[str, str]
    """Each Parquet view's parts, as an absolute path pattern."""
    index_parts: list[tuple[str, int]]
    """Its activation index's parts (key, first row) in row order (:mod:`netloupe.storage.activation_index`)."""


def named_runs(arguments: list[str]) -> dict[str, str]:
    """``NAME=LOCATION`` or a bare location (a run directory or URI, named by its last path
    segment) per run, in order; names must be SQL identifiers and distinct."""
    named: dict[str, str] = {}
    for argument in arguments:
        name, location = split_run_name(argument)
        problem = run_name_problem(name)
        if problem:
            raise RunError(f"run name {name!r} (of {argument!r}) {problem}: name it, e.g. v1={location}")
        if name in named:
            raise RunError(f"two runs are named {name!r}: name each, e.g. a={named[name]} b={location}")
        named[name] = location
    if not named:
        raise RunError("no runs given to compare")
    return named


def runs_to_open(arguments: list[str]) -> dict[str, str]:
    """:func:`named_runs`, except that one run group given alone opens as its members
    (:mod:`netloupe.storage.run_group`), each under its member name."""
    if len(arguments) == 1 and read_group(split_run_name(arguments[0])[1]) is not None:
        return {name: str(path) for name, path in group_members(split_run_name(arguments[0])[1]).items()}
    return named_runs(arguments)


def run_name_problem(name: str) -> str | None:
    """What keeps ``name`` from naming a run in SQL (its schema), or None."""
    if not RUN_NAME.match(name):
        return "must be a SQL identifier: a letter or _, then letters, digits or _, at most 63"
    if name.lower() in RESERVED_NAMES:
        return f"is a schema DuckDB keeps ({', '.join(sorted(RESERVED_NAMES))})"
    return None


def split_run_name(argument: str) -> tuple[str, str]:
    """``(name, location)`` of ``NAME=LOCATION``, or of a bare location (its last path segment,
    without a URI's query, as the name)."""
    name, equals, location = argument.partition("=")
    if equals and re.fullmatch(r"\w+", name):
        return name, location
    return argument.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1], argument


def open_runs(runs: dict[str, str | os.PathLike]) -> duckdb.DuckDBPyConnection:
    """A read-only, sandboxed DuckDB connection over ``runs`` (name → run directory), each
    under its name, with the comparison operators. Query it through
    :func:`netloupe.storage.catalog.run_query`."""
    named = named_runs([f"{name}={directory}" for name, directory in runs.items()])
    con = duckdb.connect(":memory:")
    try:
        compared = [_attach(con, position, name, checked_layout(directory))
                    for position, (name, directory) in enumerate(named.items())]
        _check_same_instances(con, compared)
        _create_run_list(con, compared)
        influence = _create_group_influence(con, compared)
        _run_statements(con, BUILDING_BLOCKS_SQL)
        _register_comparisons(con, compared)
        _run_statements(con, COMPARE_SQL)
    except BaseException:
        con.close()
        raise
    con.execute("SET temp_directory = ''").fetchall()
    allowed = [str(run.directory) + os.sep for run in compared] + ([str(influence.parent) + os.sep] if influence else [])
    con.execute("SET allowed_directories = ?", [allowed]).fetchall()
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions"):
        con.execute(f"SET {setting} = false").fetchall()  # constant names, no user input
    con.execute("SET lock_configuration = true").fetchall()
    return con


def _attach(con: duckdb.DuckDBPyConnection, position: int, name: str, layout: RunLayout) -> ComparedRun:
    """The run's catalog attached read-only; in the schema ``name``, a view of each of its
    tables and, by absolute path, of each of its Parquet views."""
    alias = f"_run{position}"
    con.execute(f"ATTACH ? AS {alias} (READ_ONLY)", [str(layout.catalog_path)]).fetchall()
    schema = quoted_identifier(name)  # quoted: a name may be a keyword of DuckDB's (end, all, default)
    con.execute(f"CREATE SCHEMA {schema}").fetchall()
    tables = con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = ? ORDER BY 1",
                         [alias]).fetchall()
    for (table,) in tables:
        quoted = quoted_identifier(table)
        con.execute(f"CREATE VIEW {schema}.{quoted} AS SELECT * FROM {alias}.main.{quoted}").fetchall()
    parquet = {view: str(layout.root / relative)
               for view, relative in con.execute(f"SELECT view, path FROM {alias}.main.parquet_views").fetchall()}
    con.execute(f"USE memory.{schema}").fetchall()
    for view, pattern in parquet.items():
        con.read_parquet(pattern).create_view(view)
    con.execute("USE memory.main").fetchall()
    index_parts = [(key, int(first)) for key, first in con.execute(
        f"SELECT part, first_row FROM {alias}.main.activation_index_parts ORDER BY first_row").fetchall()]
    return ComparedRun(name, layout.root, layout.read_manifest(), parquet, index_parts)


def _create_group_influence(con: duckdb.DuckDBPyConnection, compared: list[ComparedRun]) -> Path | None:
    """When the runs are the members of one run group that computed influence (TracIn summed
    over their checkpoints), its table as the view ``influence``; returns its path."""
    group = group_of([run.directory for run in compared])
    if group is None or group[1].influence is None:
        return None
    path = influence_path(group[0])
    con.read_parquet(str(path)).create_view("influence")
    con.execute("COMMENT ON VIEW influence IS 'The run group''s TracIn proponents and opponents per instance, "
                "summed over its checkpoints'").fetchall()
    return path


def _check_same_instances(con: duckdb.DuckDBPyConnection, compared: list[ComparedRun]) -> None:
    """Every run holds the same instance ids (count and digest), and where two manifests
    record their inputs' digest, the same inputs."""
    first = compared[0]
    facts = {}
    for run in compared:
        id_type = run.manifest.dataset.id_type
        if id_type != first.manifest.dataset.id_type:
            raise RunError(f"runs {first.name} and {run.name} are over different data: their instance ids are "
                           f"{first.manifest.dataset.id_type} and {id_type}; compare runs of one dataset")
        [(rows, digest)] = con.execute(
            f"SELECT count(*), {id_digest_sql('instance_id', id_type)} FROM {quoted_identifier(run.name)}.instances").fetchall()
        facts[run.name] = (rows, int(digest))
    for run in compared[1:]:
        (rows_a, ids_a), (rows_b, ids_b) = facts[first.name], facts[run.name]
        if (rows_a, ids_a) != (rows_b, ids_b):
            raise RunError(f"runs {first.name} and {run.name} are over different instances ({rows_a:,} and "
                           f"{rows_b:,}{', other ids' if rows_a == rows_b else ''}); compare runs of one "
                           "dataset (the same spec's dataset, limit and ids)")
        inputs_a, inputs_b = first.manifest.dataset.input_digest, run.manifest.dataset.input_digest
        same_hasher = inputs_a and inputs_b and inputs_a.split(":")[0] == inputs_b.split(":")[0]
        if same_hasher and inputs_a != inputs_b:
            raise RunError(f"runs {first.name} and {run.name} have the same instance ids but different inputs "
                           "(the dataset's files changed between them); compare runs of one dataset")


def _create_run_list(con: duckdb.DuckDBPyConnection, compared: list[ComparedRun]) -> None:
    rows = [{"position": i, "run": run.name, "directory": str(run.directory), "run_name": run.manifest.run_name,
             "model": _model_of(run.manifest),
             "instances": run.manifest.counts.instances} for i, run in enumerate(compared)]
    con.from_arrow(pa.Table.from_pylist(rows)).create_view("runs")
    con.execute("COMMENT ON VIEW runs IS 'The runs compared, in the order given'").fetchall()
    selects = []
    for run in compared:  # names match RUN_NAME: no quote inside
        own = con.execute("SELECT count(*) FROM duckdb_columns() WHERE schema_name = ? AND table_name = 'instances' "
                          "AND column_name = 'run'", [run.name]).fetchall()[0][0]
        # A metadata column called run keeps its values as instance_run (run names the run here).
        selects.append(f"SELECT '{run.name}' AS run, *{' RENAME (run AS instance_run)' if own else ''} "
                       f"FROM {quoted_identifier(run.name)}.instances")
    union = " UNION ALL BY NAME ".join(selects)
    con.execute(f"CREATE VIEW instances_by_run AS {union}").fetchall()
    con.execute("COMMENT ON VIEW instances_by_run IS 'Every run''s instances, with the run''s name'").fetchall()


def _model_of(manifest: RunManifest) -> str | None:
    """What the run explained: its weights file, checkpoint or factory (None for a run written
    without a spec)."""
    model = (manifest.spec or {}).get("model") or {}
    return model.get("weights") or model.get("huggingface") or model.get("torchscript") or model.get("factory")


def _register_comparisons(con: duckdb.DuckDBPyConnection, compared: list[ComparedRun]) -> None:
    runs = {run.name: run for run in compared}
    # (null_handling special: a constant map has no rank correlation, NULL)
    con.create_function("rank_correlation", _rank_correlation, [con.type("FLOAT[]"), con.type("FLOAT[]")],
                        con.type("DOUBLE"), type="arrow", side_effects=False, null_handling="special")
    con.create_function("top_k_overlap", _top_k_overlap, [con.type("FLOAT[]"), con.type("FLOAT[]"), con.type("INTEGER")],
                        con.type("DOUBLE"), type="arrow", side_effects=False, null_handling="special")
    con.create_function("_representation_change",
                        lambda a, b, layer, sample: layer_comparison(runs, a, b, layer, sample).summary(),
                        [con.type("VARCHAR")] * 3 + [con.type("BIGINT")],
                        con.type("STRUCT(instances BIGINT, neurons_a INTEGER, neurons_b INTEGER, linear_cka DOUBLE)"),
                        side_effects=False)
    con.create_function("_representation_change_by_run",
                        lambda layer, reference, sample: representation_changes(runs, layer, reference, sample),
                        [con.type("VARCHAR"), con.type("VARCHAR"), con.type("BIGINT")],
                        con.type("STRUCT(position INTEGER, run VARCHAR, compared_with VARCHAR, instances BIGINT, "
                                 "linear_cka DOUBLE)[]"),
                        side_effects=False, null_handling="special")
    con.create_function("_neuron_matches",
                        lambda a, b, layer, sample: layer_comparison(runs, a, b, layer, sample).matches(),
                        [con.type("VARCHAR")] * 3 + [con.type("BIGINT")],
                        con.type("STRUCT(neuron INTEGER, best_match INTEGER, correlation DOUBLE)[]"),
                        side_effects=False)


# -- per-instance map agreement -------------------------------------------------------------

def _rows_of(lists: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, width)`` float64 values of a list column (zero rows where a list is null), and
    the validity mask."""
    if isinstance(lists, pa.ChunkedArray):  # what DuckDB hands an Arrow function
        lists = lists.combine_chunks()
    valid = np.asarray(lists.is_valid())
    present = vectors_to_numpy(lists.filter(pa.array(valid)))
    rows = np.zeros((len(lists), present.shape[1]))
    rows[valid] = present
    return rows, valid


def rank_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, Spearman's rank correlation of ``a`` and ``b`` (``(n, width)``): Pearson's of
    their ranks, ties at their mean rank; NaN where either row is constant."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=1) / np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))


def top_k_overlaps(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row, the share of the ``k`` largest ``|values|`` of ``a`` that are among ``b``'s
    (ties at the k-th broken by position, the earlier first)."""
    k = max(1, min(int(k), a.shape[1]))
    chosen = []
    for values in (a, b):
        top = np.argsort(-np.abs(values), axis=1, kind="stable")[:, :k]
        mask = np.zeros(values.shape, bool)
        np.put_along_axis(mask, top, True, axis=1)
        chosen.append(mask)
    return (chosen[0] & chosen[1]).sum(axis=1) / k


def _same_width(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) and x.shape != y.shape:
        raise RunError(f"map_agreement compares maps of one size; the two runs stored {x.shape[1]} and "
                       f"{y.shape[1]} values per map (another model, or another storage mode)")


def _rank_correlation(a: pa.Array, b: pa.Array) -> pa.Array:
    (x, valid_a), (y, valid_b) = _rows_of(a), _rows_of(b)
    _same_width(x, y)
    values = rank_correlations(x, y)
    return pa.array(values, mask=~(valid_a & valid_b) | np.isnan(values))


def _top_k_overlap(a: pa.Array, b: pa.Array, k: pa.Array) -> pa.Array:
    (x, valid_a), (y, valid_b) = _rows_of(a), _rows_of(b)
    _same_width(x, y)
    ks = np.asarray(k.to_numpy())
    values = top_k_overlaps(x, y, int(ks[0])) if len(ks) else np.empty(0)
    return pa.array(values, mask=~(valid_a & valid_b))


# -- layer comparison -------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerComparison:
    """The centred second moments of one layer in two runs over their common instances."""

    instances: int
    cov_aa: np.ndarray
    cov_bb: np.ndarray
    cov_ab: np.ndarray

    @property
    def linear_cka(self) -> float | None:
        """Linear CKA: ||Cov(A, B)||² / (||Cov(A, A)|| ||Cov(B, B)||), Frobenius norms."""
        scale = np.linalg.norm(self.cov_aa) * np.linalg.norm(self.cov_bb)
        return float(np.sum(self.cov_ab ** 2) / scale) if scale > 0 else None

    def summary(self) -> dict:
        return {"instances": self.instances, "neurons_a": self.cov_aa.shape[0], "neurons_b": self.cov_bb.shape[0],
                "linear_cka": self.linear_cka}

    def matches(self) -> list[dict]:
        """Per neuron of run a, the neuron of run b correlating most with it (none for a
        neuron constant over the instances)."""
        # (a variance a rounding below zero is a constant neuron's)
        sd_a, sd_b = np.sqrt(np.clip(np.diag(self.cov_aa), 0, None)), np.sqrt(np.clip(np.diag(self.cov_bb), 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            correlation = self.cov_ab / np.outer(sd_a, sd_b)
        correlation[:, sd_b == 0] = -np.inf
        rows = []
        for neuron in range(correlation.shape[0]):
            best = int(np.argmax(correlation[neuron])) if sd_a[neuron] > 0 and (sd_b > 0).any() else None
            rows.append({"neuron": neuron, "best_match": best,
                         "correlation": None if best is None else float(correlation[neuron, best])})
        return rows


def layer_comparison(runs: dict[str, ComparedRun], a: str, b: str, layer: str, sample: int = 0) -> LayerComparison:
    """``layer``'s activation vectors in runs ``a`` and ``b`` paired by instance (about
    ``sample`` of them, or all when 0), reduced to their centred second moments: from the
    runs' activation indexes (:func:`_index_comparison`), else from their Parquet vectors
    (:func:`_paired_blocks`) a block of rows at a time (:class:`_GramSums`)."""
    parts = [_vector_parts(runs, name, layer) for name in (a, b)]
    total = runs[a].manifest.counts.instances
    fraction = sample / total if sample and sample < total else None
    indexes = _indexes(runs[a], runs[b], layer)
    if indexes is not None:
        comparison = _index_comparison(*indexes, layer, fraction)
    else:  # a layer too wide for the index
        moments = _GramSums(selves=True)
        for x, y in _paired_blocks(parts, ID_SQL_TYPES[runs[a].manifest.dataset.id_type], fraction):
            moments.add(x, y)
        comparison = moments.comparison() if moments.n else None
    if comparison is None:
        raise RunError(f"runs {a} and {b} have no instances in common for layer {layer!r}")
    return comparison


class _GramSums:
    """Running sums of two aligned blocks' rows and their products (the two self-products
    too when ``selves``). Every block is shifted by the first block's mean before its float32
    products (summed in float64 across blocks): second moments about a point near the mean do
    not cancel as raw ones would (a neuron of mean 10 and deviation 0.01 lost 30% of its
    variance unshifted)."""

    def __init__(self, selves: bool):
        self.selves = selves
        """Whether the self-products (and the sums) are added here; else the runs' Gram
        matrices give them (:meth:`comparison`)."""
        self.n, self.shift, self.sums, self.products = 0, None, None, None

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add aligned blocks (shifted in place when they are writable: fresh arrays)."""
        if self.shift is None:
            self.shift = [x.mean(axis=0, dtype=np.float64).astype(np.float32),
                          y.mean(axis=0, dtype=np.float64).astype(np.float32)]
            self.sums = [np.zeros(x.shape[1]), np.zeros(y.shape[1])]
            self.products = [np.zeros((x.shape[1],) * 2), np.zeros((y.shape[1],) * 2),
                             np.zeros((x.shape[1], y.shape[1]))]
        x, y = (np.subtract(v, s, out=v) if v.flags.writeable and v.dtype == np.float32 else v - s
                for v, s in zip((x, y), self.shift))
        self.n += len(x)
        if self.selves:
            self.sums[0] += x.sum(axis=0, dtype=np.float64)
            self.sums[1] += y.sum(axis=0, dtype=np.float64)
            self.products[0] += x.T @ x
            self.products[1] += y.T @ y
        self.products[2] += x.T @ y

    def comparison(self, grams: tuple[np.ndarray, np.ndarray] | None = None) -> LayerComparison:
        """The centred moments; the self-moments and the sums from ``grams`` (each run's raw
        Gram matrix over the same rows, :func:`netloupe.storage.part_statistics.layer_gram`)
        when given."""
        n = self.n
        if grams is None:
            mean_a, mean_b = (s / n for s in self.sums)
        else:  # the shifted rows' means, from the raw sums
            mean_a, mean_b = (gram[0, 1:] / n - shift for gram, shift in zip(grams, self.shift))
        cross = self.products[2] / n - np.outer(mean_a, mean_b)
        if grams is None:
            return LayerComparison(n, self.products[0] / n - np.outer(mean_a, mean_a),
                                   self.products[1] / n - np.outer(mean_b, mean_b), cross)
        return LayerComparison(n, *(_centred_gram(gram, n) for gram in grams), cross)


def _centred_gram(gram: np.ndarray, n: int) -> np.ndarray:
    if int(round(gram[0, 0])) != n:
        raise RunError(f"a run's Gram matrices count {gram[0, 0]:,.0f} rows where {n:,} were paired; "
                       "its index parts do not match its catalog")
    mean = gram[0, 1:] / n
    return gram[1:, 1:] / n - np.outer(mean, mean)


def _indexes(first: ComparedRun, second: ComparedRun, layer: str) -> tuple[ActivationIndex, ActivationIndex] | None:
    """The two runs' activation indexes of ``layer`` (the workers' row-major matrices), or
    None when a run has none of it or they hold other ids."""
    runs = (first, second)
    if any(not run.index_parts or not 0 < run.manifest.model.layer_neurons.get(layer, WIDE_NEURON_LIMIT + 1)
           <= WIDE_NEURON_LIMIT for run in runs):
        return None
    indexes = [ActivationIndex(run.directory, {layer: {}}, run.index_parts) for run in runs]
    return None if not np.array_equal(indexes[0].sorted_ids, indexes[1].sorted_ids) else tuple(indexes)


def _index_comparison(first: ActivationIndex, second: ActivationIndex, layer: str,
                      fraction: float | None) -> LayerComparison | None:
    """The moments from the activation indexes: read whole (about four times faster than the
    compressed vectors), each run's self-moments summed from the workers' per-part Gram
    matrices (no product at query time; computed here for a run made before they were kept),
    the cross-product over the pairs. When the two runs were batched alike (a run group),
    each instance is at the same row in both and a part pairs with its namesake; else the
    second run's rows are gathered in the first's order. A ``fraction``: whole parts of the
    first run, chosen by a hash of their names (:func:`_hash_fraction`, as the Parquet path)."""
    hashes = [_hash_fraction(part_name(key)) for key in first.part_keys]
    chosen = [p for p, value in enumerate(hashes) if fraction is None or value < fraction]
    if not chosen and hashes:  # a sample smaller than every part's share: the one part of least hash
        chosen = [int(np.argmin(hashes))]
    aligned = first.part_keys == second.part_keys and np.array_equal(first.rows_of_sorted, second.rows_of_sorted)
    grams = None
    if aligned or fraction is None:  # the second run's own parts cover exactly the rows paired
        grams = (first.gram(layer, chosen), second.gram(layer, chosen if aligned else range(len(second.part_keys))))
    moments = _GramSums(selves=grams is None or any(g is None for g in grams))
    row_in_second = None
    if not aligned:
        row_in_second = np.empty(first.rows, np.int64)
        row_in_second[first.rows_of_sorted] = second.rows_of_sorted

    def pair(part: int) -> tuple[np.ndarray, np.ndarray]:
        x = first.read_part(layer, part)
        if aligned:
            return x, second.read_part(layer, part)
        wanted = row_in_second[first.first_rows[part]:first.first_rows[part] + len(x)]
        order = np.argsort(wanted)
        y = np.empty((len(wanted), second.part_matrix(layer, 0).shape[1]), np.float32)
        y[order] = second.take(layer, wanted[order])
        return x, y

    # The next pair is read while this one is multiplied (reading and BLAS both release the GIL).
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(pair, chosen[0]) if chosen else None
        for position in range(len(chosen)):
            x, y = pending.result()
            if position + 1 < len(chosen):
                pending = reader.submit(pair, chosen[position + 1])
            moments.add(x, y)
    if not moments.n:
        return None
    return moments.comparison(None if moments.selves else grams)


def _paired_blocks(patterns: list[str], id_sql: str, fraction: float | None):
    """Blocks of rows of the two runs' vectors for the same instances, in the same order: one
    DuckDB join of the two, streamed (measured faster than reading part pairs with pyarrow and
    aligning them: DuckDB decodes the vectors faster). A ``fraction`` of the instances: when
    the two runs were batched alike (the same spec over other weights, a run group: a part is
    named by its ids' hash, so the names agree), whole parts chosen by a hash of their names,
    so that only those are read; else instances by a hash of their ids, after reading all."""
    sources: list[str | list[str]] = list(patterns)
    keep = ""
    if fraction is not None:
        names = [sorted(Path(f).name for f in glob.glob(pattern)) for pattern in patterns]
        chosen = [name for name in names[0] if _hash_fraction(name) < fraction]
        if names[0] == names[1] and chosen:
            sources = [[str(Path(pattern).parent / name) for name in chosen] for pattern in patterns]
        else:
            keep = f"WHERE hash(x.instance_id::VARCHAR || '/cka') % 1000000 < {int(1e6 * fraction)}"
    con = duckdb.connect(":memory:")
    try:
        reader = con.sql(
            f"SELECT x.activation AS a, y.activation AS b FROM read_parquet($a) x "
            f"JOIN read_parquet($b) y ON x.instance_id::{id_sql} = y.instance_id::{id_sql} {keep}",
            params={"a": sources[0], "b": sources[1]}).to_arrow_reader(GRAM_BATCH_ROWS)
        for batch in reader:
            yield vectors_to_numpy(batch.column(0)), vectors_to_numpy(batch.column(1))
    finally:
        con.close()


def _hash_fraction(name: str) -> float:
    """A part name's place in [0, 1), the same on every machine."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") / 2**64


def representation_changes(runs: dict[str, ComparedRun], layer: str, reference: str | None = None,
                           sample: int = 0) -> list[dict]:
    """Per run in order, ``layer``'s linear CKA against the next run (the last has none), or
    against ``reference`` when given: how a representation settles over checkpoints."""
    names = list(runs)
    if reference is not None and reference not in runs:
        raise RunError(f"no run named {reference!r} here; the runs are {', '.join(names)}")
    rows = []
    for position, name in enumerate(names):
        other = reference if reference is not None else (names[position + 1] if position + 1 < len(names) else None)
        change = layer_comparison(runs, name, other, layer, sample or 0) if other is not None else None
        rows.append({"position": position, "run": name, "compared_with": other,
                     "instances": None if change is None else change.instances,
                     "linear_cka": None if change is None else change.linear_cka})
    return rows


def _vector_parts(runs: dict[str, ComparedRun], name: str, layer: str) -> str:
    if name not in runs:
        raise RunError(f"no run named {name!r} here; the runs are {', '.join(runs)}")
    run = runs[name]
    if activation_vectors_view(layer) not in run.parquet:
        raise RunError(f"run {name} recorded no layer {layer!r}; it has {', '.join(run.manifest.layers) or 'none'}")
    return run.parquet[activation_vectors_view(layer)]
