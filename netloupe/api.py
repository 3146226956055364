"""The Python API, for notebooks and scripts: open a committed run and ask it questions, or
start a run. Everything is read through the run's catalog and storage, as the CLI and the
dashboard read it.

    import netloupe

    run = netloupe.open_run("runs/mnist-demo")     # or "s3://bucket/runs/name?endpoint_override=..."
    run.sql("SELECT label, avg(correct::INT) AS accuracy FROM instances GROUP BY 1")   # pyarrow.Table
    run.df("SELECT * FROM neuron_matrix('relu2', 'stroke = ''thin''')")               # pandas.DataFrame
    run.relation("SELECT * FROM instances").filter("NOT correct").limit(5)            # DuckDB relation
    run.layers, run.methods, run.operators
    one = run.instance(7)               # arrays: one.input, one.maps["saliency"], one.activations["relu2"]
    run.dashboard()                     # the dashboard, inline in Jupyter
    new = netloupe.explain("examples/mnist.yaml", force=True)   # a spec file or a dict; returns a Run
    both = netloupe.compare(v1="runs/a", v2="runs/b")             # runs of the same data, together
    both.df("SELECT * FROM disagreements('v1', 'v2')")
    both.instance(7)["v2"].maps["saliency"]                      # one instance in every run
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from netloupe.contract.errors import RunError, SpecError
from netloupe.contract.spec import load_spec, parse_spec
from netloupe.storage.catalog import OPERATORS_LIST_SQL, open_catalog, query_relation, run_query
from netloupe.storage.instance import InstanceRecord, read_instance
from netloupe.storage.location import local_run_dir
from netloupe.storage.reader import RunReader


class Run(RunReader):
    """A committed run: its manifest, SQL over its catalog, one instance as arrays, and (from
    :class:`RunReader`) whole tables as Arrow: ``instances()``, ``activations(layer)``,
    ``attributions(method)``, ``activation_matrix(layer)``, ``attribution_maps(method)``."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        """Where the run is: its directory, or its URI in an object store."""
        super().__init__(local_run_dir(self.location))
        self.directory: Path = self.layout.root
        """The run on this machine (for a store, the local copy SQL reads)."""
        self._connection: duckdb.DuckDBPyConnection | None = None

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The run's read-only, sandboxed DuckDB connection (opened on first use)."""
        if self._connection is None:
            self._connection = open_catalog(self.directory)
        return self._connection

    # -- SQL ---------------------------------------------------------------------------------

    def sql(self, query: str, parameters: list | dict | None = None) -> pa.Table:
        """The result of a read-only query (SELECT or EXPLAIN; ``?`` or ``$name`` parameters
        bound, never pasted), as an Arrow table."""
        return run_query(self.connection, query, parameters)

    def df(self, query: str, parameters: list | dict | None = None) -> pd.DataFrame:
        """:meth:`sql` as a pandas DataFrame."""
        return self.sql(query, parameters).to_pandas()

    def relation(self, query: str, parameters: list | dict | None = None) -> duckdb.DuckDBPyRelation:
        """One SELECT as a DuckDB relation, to refine lazily (``.filter``, ``.aggregate``...)."""
        return query_relation(self.connection, query, parameters)

    # -- what the run holds ------------------------------------------------------------------

    @property
    def operators(self) -> list[str]:
        """The explanation operators, SQL table macros (``SELECT * FROM neuron_matrix(...)``)."""
        return self.sql(OPERATORS_LIST_SQL)["operator"].to_pylist()

    def __len__(self) -> int:
        """Instances in the run."""
        return self.manifest.counts.instances

    def instance(self, instance_id) -> InstanceRecord:
        """One instance: its row (label, prediction, probabilities, metadata), its input, each
        method's map and each layer's activations, as arrays."""
        return read_instance(self.connection, self.manifest, instance_id)

    # -- showing it --------------------------------------------------------------------------

    def influence(self, instance_id) -> pd.DataFrame:
        """``instance_id``'s most influential training examples (TracIn): proponents then
        opponents, strongest first, each with its score, label and input as the training set
        holds it (docs/sql.md "Influence of training examples")."""
        from netloupe.storage.training_examples import influential_examples

        if self.manifest.influence is None:
            raise RunError(f"run {self.manifest.run_name!r} computed no influence: add an influence section to its "
                           "spec (netloupe spec-help influence) and run it again")
        return influential_examples(self.layout.influence_path, self.manifest.influence, instance_id).to_pandas()

    def dashboard(self):
        """The analyst dashboard as a Panel object: the last expression of a Jupyter cell
        shows it inline (needs the ``dashboard`` extra)."""
        from netloupe.dashboards.app import notebook_dashboard

        return notebook_dashboard(self.directory)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __repr__(self) -> str:
        return (f"Run({self.location!r}: {len(self):,} instances, layers {self.layers}, "
                f"methods {self.methods})")


def open_run(location: str | os.PathLike) -> Run:
    """The committed run at ``location``: a run directory, or a run URI in an object store
    (downloaded once into ``NETLOUPE_CACHE``, refreshed when the run changes)."""
    return Run(location)


class Comparison:
    """Several runs of the same instances in one read-only connection, each run's tables under
    its name (``v1.instances``), with the operators that compare runs (``disagreements``,
    ``agreement``, ``map_agreement``, ``subset_metrics_by_run``, ``representation_change``,
    ``neuron_matches``: docs/sql.md "Across runs")."""

    def __init__(self, runs: dict[str, str | os.PathLike]):
        from netloupe.storage.compare import open_runs

        self.runs = {name: local_run_dir(str(location)) for name, location in runs.items()}
        """Each run's directory by its name in SQL, in the order given."""
        self.connection: duckdb.DuckDBPyConnection = open_runs(self.runs)
        self._opened: dict[str, Run] = {}

    def sql(self, query: str, parameters: list | dict | None = None) -> pa.Table:
        """The result of a read-only query, as an Arrow table."""
        return run_query(self.connection, query, parameters)

    def run(self, name: str) -> Run:
        """One of the runs on its own (:class:`Run`: its operators, instances, dashboard)."""
        if name not in self.runs:
            raise RunError(f"no run named {name!r} here; the runs are {', '.join(self.runs)}")
        if name not in self._opened:
            self._opened[name] = Run(self.runs[name])
        return self._opened[name]

    def instance(self, instance_id) -> dict[str, InstanceRecord]:
        """One instance in every run, by run name in order: its prediction, maps and
        activations side by side (how each checkpoint saw it)."""
        return {name: self.run(name).instance(instance_id) for name in self.runs}

    def df(self, query: str, parameters: list | dict | None = None) -> pd.DataFrame:
        """:meth:`sql` as a pandas DataFrame."""
        return self.sql(query, parameters).to_pandas()

    def influence(self, instance_id) -> pd.DataFrame:
        """A run group's influence for ``instance_id``, summed over its checkpoints (as
        :meth:`Run.influence`)."""
        from netloupe.storage.run_group import group_of, influence_path
        from netloupe.storage.training_examples import influential_examples

        group = group_of(list(self.runs.values()))
        if group is None or group[1].influence is None:
            raise RunError("these runs are no run group that computed influence; a single run's is "
                           "Comparison.run(name).influence(id)")
        return influential_examples(influence_path(group[0]), group[1].influence, instance_id).to_pandas()

    def close(self) -> None:
        """Close the connection and the runs opened on their own."""
        self.connection.close()
        for run in self._opened.values():
            if run._connection is not None:
                run._connection.close()
        self._opened.clear()

    def __enter__(self) -> Comparison:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Comparison({', '.join(f'{n}={str(d)!r}' for n, d in self.runs.items())})"


def compare(*runs: str | os.PathLike, **named: str | os.PathLike) -> Comparison:
    """Several runs of the same data together: ``compare(v1="runs/a", v2="runs/b")``,
    ``compare("runs/a", "runs/b")`` (each named by its directory), or a run group's members
    (``compare("runs/mnist-epochs")``). Runs over different instances or inputs are refused."""
    from netloupe.storage.compare import runs_to_open

    given = runs_to_open([str(r) for r in runs]) if runs else {}
    clash = sorted(set(given) & set(named))
    if clash:
        raise RunError(f"two runs are named {clash[0]!r}: name each once")
    return Comparison({**given, **named})


def explain(spec: str | os.PathLike | dict[str, Any], force: bool = False,
            progress: bool = True) -> Run | Comparison:
    """Run a job spec (a YAML file, or the same as a dict) and return the committed run (for a
    spec with ``model.checkpoints``, the run group's runs together, as :func:`compare` opens
    them). ``force`` replaces a run of the same name; ``progress`` prints a line per stage."""
    from netloupe.pipeline.driver import run_job
    from netloupe.pipeline.progress import ProgressLines, RunProgress

    if isinstance(spec, dict):
        job = parse_spec(spec, origin="(given as a dict)")
    elif isinstance(spec, (str, os.PathLike)):
        job = load_spec(spec)
    else:
        raise SpecError(f"explain() takes a spec file's path or a dict, got {type(spec).__name__}")
    reporter = ProgressLines(lambda text: print(text, file=sys.stdout, flush=True)) if progress else RunProgress()
    if job.model.checkpoints is not None:
        from netloupe.pipeline.run_group import run_checkpoints

        return compare(run_checkpoints(job, force=force, progress=reporter).directory)
    return Run(run_job(job, force=force, progress=reporter).location)


def methods() -> pd.DataFrame:
    """The attribution methods: name, Captum class, capability flags."""
    from netloupe.workers.methods import METHODS, flags_of

    return pd.DataFrame([{"method": m.name, "captum": m.captum_class.__name__, **flags_of(m)}
                         for m in METHODS.values()])
