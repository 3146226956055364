"""The ``netloupe`` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

from netloupe.contract.errors import NetloupeError, SpecError
from netloupe.pipeline.progress import PROGRESS_INTERVAL_S


def netloupe_command() -> str:
    """The command that runs netloupe, spelled as a user types it: ``netloupe`` when that is
    what the shell finds, else the script's path (``.venv/bin/netloupe`` after ``make demo``)."""
    on_path = shutil.which("netloupe")
    script = Path(sys.argv[0]) if Path(sys.argv[0]).name == "netloupe" else Path(sys.executable).parent / "netloupe"
    if on_path and (not script.exists() or Path(on_path).resolve() == script.resolve()):
        return "netloupe"
    if script.exists():
        try:
            return shlex.quote(str(script.resolve().relative_to(Path.cwd())))
        except ValueError:
            return shlex.quote(str(script.resolve()))
    return f"{shlex.quote(sys.executable)} -m netloupe.pipeline.cli"


def next_steps(result) -> list[str]:
    """Commands to try on a run just committed."""
    netloupe, run = netloupe_command(), shlex.quote(result.location)
    lines = [f"{netloupe} sql {run} \"SELECT label, avg(correct::INT) AS accuracy, count(*) AS n "
             "FROM instances GROUP BY 1 ORDER BY 1\""]
    layers = list(result.manifest.model.layer_neurons)
    if layers:
        lines.append(f"{netloupe} sql {run} \"SELECT * FROM neuron_matrix_by('{layers[-1]}', 'label') "
                     "WHERE neuron < 2\"")
    lines.append(f"{netloupe} sql {run} --list")
    lines.append(f"{netloupe} dashboard {run}     # then open http://127.0.0.1:5006/")
    return lines


def cmd_run(args) -> int:
    from netloupe.contract.spec import load_spec, parse_overrides, parse_spec
    from netloupe.pipeline.driver import run_job, run_summary
    from netloupe.pipeline.progress import RunProgress, progress_for

    if (args.spec is None) == (args.resume is None):
        raise SpecError("give a job spec to run, or --resume RUN to finish an interrupted run (not both)")
    resume = None
    if args.resume is not None:
        from netloupe.storage.layout import RunStaging

        if args.set:
            raise SpecError("--resume continues the interrupted run with its own spec; --set cannot change it")
        resume, spec_data = RunStaging.resume(args.resume, force=args.force)
        spec = parse_spec(spec_data, origin=f"(the interrupted run's spec, {resume.worker_root})")
        print(f"resuming {args.resume} from {resume.worker_root}", flush=True)
    else:
        spec = load_spec(args.spec, parse_overrides(args.set))
    progress = RunProgress() if args.no_progress else progress_for(sys.stdout)
    if spec.model.checkpoints is not None:
        if resume is not None:
            raise SpecError("--resume finishes one run; a run group's members are runs: resume the member that "
                            "was interrupted, then run the group's spec again with --force")
        return _run_group(spec, args.force, progress)
    result = run_job(spec, force=args.force, progress=progress, resume=resume)
    print(run_summary(result))
    print(f"  manifest: {shlex.quote(str(result.layout.manifest_path))}")
    print("next:")
    for line in next_steps(result):
        print(f"  {line}")
    return 0


def _run_group(spec, force: bool, progress) -> int:
    from netloupe.pipeline.driver import run_summary
    from netloupe.pipeline.run_group import run_checkpoints

    group = run_checkpoints(spec, force=force, progress=progress)
    for name, result in group.members.items():
        print(f"{name}: {run_summary(result)}")
    netloupe, where = netloupe_command(), shlex.quote(str(group.directory))
    first, last = list(group.members)[0], list(group.members)[-1]
    print(f"run group: {where} ({len(group.members)} runs, one per checkpoint)\nnext:")
    print(f"  {netloupe} sql {where} \"SELECT run, size, accuracy FROM subset_metrics_by_run('true')\"")
    print(f"  {netloupe} sql {where} \"SELECT * FROM agreement('{first}', '{last}')\"")
    layers = list(group.members[last].manifest.model.layer_neurons)
    if layers:
        print(f"  {netloupe} sql {where} \"SELECT * FROM representation_change_by_run('{layers[-1]}')\"")
    return 0


def cmd_validate(args) -> int:
    from netloupe.contract.spec import load_spec, parse_overrides
    from netloupe.pipeline.driver import validate

    checked = validate(load_spec(args.spec, parse_overrides(args.set)))
    print(json.dumps({"rows": checked.dataset.num_rows, "classes": checked.class_names,
                      "model": checked.facts.model_dump(mode="json"), "fingerprint": checked.fingerprint.digest,
                      "weights_unset": checked.weights_unset}, indent=2))
    return 0


def cmd_methods(_args) -> int:
    from netloupe.workers.methods import LRP_RULES, METHODS, baseline_default, flags_of, noise_tunnel_defaults
    from netloupe.workers.token_methods import TOKEN_METHODS

    for method in METHODS.values():
        flags = [name for name, on in flags_of(method).items() if on]
        home = method.captum_class.__module__
        home = "captum.attr" if home.startswith("captum.") else home  # Captum's public path, not its _core
        print(f"{method.name}  ({home}.{method.captum_class.__name__})" + (f"  [{', '.join(flags)}]" if flags else ""))
        if method.takes_baselines:
            print(f"    {'baseline':24s} {baseline_default()!r}, the method's own 'baseline' field (a constant input"
                  + (", or 'background' / 'mean' of the run's background rows)" if method.baselines_as_distribution
                     else ", or 'mean' of the run's background rows)"))
        if method.perturbs_features:
            print(f"    {'feature_mask':24s} a tabular run's features (dataset.feature_groups); an image's grid cells "
                  "or superpixels (the method's own 'feature_mask' field)")
        if method.checks_layers:
            print(f"    {'rules':24s} {{}}, the method's own 'rules' field: per module path or class, "
                  f"one of {sorted(LRP_RULES)} (else the module's own rule, else Captum's ε)")
        for parameter in method.parameter_defaults():
            print(f"    {parameter.name:24s} {parameter.netloupe}{_captum_note(parameter)}")
    print("any Captum method can be wrapped in a noise tunnel: 'noise_tunnel: {nt_type, nt_samples, stdevs}'")
    for parameter in noise_tunnel_defaults():
        print(f"    {parameter.name:24s} {parameter.netloupe}{_captum_note(parameter)}")
    print("on texts (dataset.text_column), one value per token (workers/token_methods.py):")
    for method in TOKEN_METHODS.values():
        print(f"    {method.name:24s} {method.description}"
              + "".join(f"; {name} {value!r}" for name, value in method.parameters.items()))
    return 0


def _captum_note(parameter) -> str:
    if not parameter.differs:
        return ""
    return "   <- Captum requires it" if parameter.captum == "(required)" else f"   <- Captum's default: {parameter.captum}"


def cmd_spec_help(args) -> int:
    from netloupe.contract.spec import spec_help

    print(spec_help(args.section))
    return 0


def cmd_layers(args) -> int:
    from netloupe.contract.spec import load_spec
    from netloupe.workers.model_loading import load_model

    model = load_model(load_spec(args.spec).model)
    for name, module in model.named_modules():
        if name:
            print(f"{name:30s} {type(module).__name__}")
    return 0


def _show(table, max_rows: int) -> None:
    """Print an Arrow table as DuckDB's boxed table (a private in-memory connection)."""
    import duckdb

    with duckdb.connect() as con:
        con.from_arrow(table).show(max_rows=max_rows, max_width=200)


def cmd_sql(args) -> int:
    from netloupe.storage.catalog import CATALOG_CONTENTS_SQL, OPERATORS_LIST_SQL, QueryError, open_catalog, run_query
    from netloupe.storage.compare import COMPARE_OPERATORS_SQL, open_runs, runs_to_open, split_run_name
    from netloupe.storage.location import local_run_dir
    from netloupe.storage.run_group import read_group

    # RUN [RUN ...] [QUERY]: the last is the query unless --file or --list stands for it.
    runs, query = (args.run, None) if args.file or args.list else (args.run[:-1], args.run[-1])
    if not runs:
        raise QueryError("give a run and a query: netloupe sql runs/NAME \"SELECT ...\" "
                         "(or several runs: netloupe sql v1=runs/a v2=runs/b \"SELECT * FROM agreement('v1', 'v2')\")")
    if len(runs) == 1 and split_run_name(runs[0])[1] == runs[0] and read_group(runs[0]) is None:  # one run
        con = open_catalog(local_run_dir(runs[0]))
        listing = (CATALOG_CONTENTS_SQL, "SELECT layer, view, neurons, output_shape FROM layers",
                   "SELECT * FROM methods", OPERATORS_LIST_SQL)
        example = "SELECT * FROM neuron_matrix('conv2', 'label = 3')"
    else:
        con = open_runs({name: local_run_dir(location) for name, location in runs_to_open(runs).items()})
        listing = ("SELECT * FROM runs", COMPARE_OPERATORS_SQL)
        example = "SELECT * FROM disagreements('v1', 'v2'); each run's tables as v1.instances, v2.attributions_<method>"
    if args.list:
        for listed in listing:
            _show(run_query(con, listed), 1000)
        print(f"operators are table macros: {example}; docs/sql.md has an example of each")
        return 0
    if (query is None) == (args.file is None):
        raise QueryError("give a query, or --file with a script of queries (not both)")
    sql = query if query is not None else Path(args.file).read_text()
    table = run_query(con, sql)
    if args.format == "table":
        _show(table, args.max_rows)
        return 0
    if args.format == "parquet":
        if args.output is None:
            raise QueryError("--format parquet writes a file: add --output FILE.parquet")
        import pyarrow.parquet as pq

        pq.write_table(table, args.output)
        return 0
    out = open(args.output, "wb") if args.output else sys.stdout.buffer
    try:
        if args.format == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(_csv_ready(table), out)
        else:
            for row in table.to_pylist():
                out.write((json.dumps(row, default=str) + "\n").encode())
    finally:
        if args.output:
            out.close()
        else:
            out.flush()
    return 0


def _csv_ready(table):
    """``table`` with each nested column (a list, a struct, a map: CSV has no cell for them)
    as its JSON text."""
    import pyarrow as pa

    for position, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            texts = [None if v is None else json.dumps(v, default=str) for v in table.column(position).to_pylist()]
            table = table.set_column(position, field.name, pa.array(texts, pa.string()))
    return table


def cmd_catalog(args) -> int:
    from netloupe.contract.spec import DRIVER_SQL_MEMORY_MIB, parse_spec
    from netloupe.storage.catalog import build_catalog
    from netloupe.storage.layout import RunLayout
    from netloupe.storage.location import is_uri

    if is_uri(args.run):
        raise SpecError(f"{args.run} is in an object store, where a run's catalog is built before the run is "
                        "published; to rebuild one, copy the run to a local directory and pass that directory")

    layout = RunLayout(Path(args.run).resolve())
    manifest = layout.read_manifest()
    memory_mib = (parse_spec(manifest.spec).execution.driver_sql_memory_mib if manifest.spec is not None
                  else DRIVER_SQL_MEMORY_MIB)
    timings = build_catalog(layout, manifest, memory_mib, native_activations=args.native_activations)
    print(f"built {layout.catalog_path} ({timings['bytes'] / 1e6:.1f} MB) in {timings['total']:.1f} s")
    return 0


def dashboard_runs(arguments: list[str], shown: str | None) -> tuple[Path, dict[str, Path] | None]:
    """What ``netloupe dashboard`` shows: the run of the single-run tabs, and the runs compared
    (None for one run). Runs are given as ``netloupe sql`` takes them: one run, a run group, or
    several ``NAME=RUN`` or bare directories; ``shown`` names the run the single-run tabs show
    (default: the last, a group's final checkpoint)."""
    from netloupe.contract.errors import RunError
    from netloupe.storage.compare import runs_to_open, split_run_name
    from netloupe.storage.location import local_run_dir
    from netloupe.storage.run_group import read_group

    if len(arguments) == 1 and split_run_name(arguments[0])[1] == arguments[0] and read_group(arguments[0]) is None:
        if shown is not None:
            raise RunError(f"--run picks one of several runs (a run group, or NAME=RUN ...); {arguments[0]} is one run")
        return local_run_dir(arguments[0]), None
    runs = {name: local_run_dir(location) for name, location in runs_to_open(arguments).items()}
    shown = list(runs)[-1] if shown is None else shown
    if shown not in runs:
        raise RunError(f"--run {shown}: no run of that name here; the runs are {', '.join(runs)}")
    return runs[shown], (runs if len(runs) > 1 else None)


def cmd_dashboard(args) -> int:
    import os

    from netloupe.dashboards.app import serve

    password = os.environ.get("NETLOUPE_DASHBOARD_PASSWORD")
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as error:
            raise SpecError(f"--password-file {args.password_file}: cannot read a password from it ({error}); "
                            "put the password on its first line") from None
    if password == "":
        raise SpecError("the dashboard password is empty: give a non-empty one (--password-file or "
                        "NETLOUPE_DASHBOARD_PASSWORD)")
    if args.host not in ("127.0.0.1", "localhost", "::1") and password is None:
        print(f"warning: {args.host} is reachable from other machines and no password is set "
              "(--password-file or NETLOUPE_DASHBOARD_PASSWORD)", file=sys.stderr, flush=True)
    users = None if password is None else {args.user: password}
    run_dir, compared = dashboard_runs(args.run, args.shown)
    what = (f"{run_dir}, across {len(compared)} runs ({', '.join(compared)})," if compared else " ".join(args.run))
    print(f"serving the dashboard of {what} at http://{args.host}:{args.port}/"
          + (f" (sign in as {args.user})" if users else "") + " (Ctrl-C stops it)", flush=True)
    serve(run_dir, host=args.host, port=args.port, show=False, users=users, compared=compared)
    return 0


def cmd_report(args) -> int:
    import time

    from netloupe.dashboards.report import write_report
    from netloupe.storage.location import local_run_dir

    started = time.perf_counter()
    written = write_report(local_run_dir(args.run), args.output, layer=args.layer, mistakes=args.mistakes)
    print(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB, one self-contained file) "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_submit(args) -> int:
    from netloupe.pipeline.submit import JobServer, prepare_job

    job = prepare_job(args.spec, args.set, args.id)
    server = JobServer(args.address, notify=lambda text: print(text, file=sys.stderr, flush=True))
    submission_id = server.submit(**job)
    print(f"submitted {submission_id}; follow it with: netloupe jobs logs {submission_id} --follow", flush=True)
    if not args.wait:
        return 0
    for text in server.follow(submission_id):
        print(text, end="", flush=True)
    return _report_end(server, submission_id)


def _report_end(server, submission_id: str) -> int:
    info = server.info(submission_id)
    status = str(info.status.value)
    print(f"\njob {submission_id}: {status}" + (f" ({info.message})" if info.message else ""), flush=True)
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from netloupe.pipeline.submit import JobServer, SubmitError

    server = JobServer(args.address)
    if args.action == "list":
        for row in server.jobs():
            print(f"{row['submission_id']}  {row['status']:<9}  {row['entrypoint']}")
        return 0
    if not args.id:
        raise SubmitError(f"`netloupe jobs {args.action}` needs a submission id (see `netloupe jobs list`)")
    if args.action == "status":
        info = server.info(args.id)
        print(f"{args.id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
        return 0
    if args.action == "logs":
        if not args.follow:
            print(server.logs(args.id), end="")
            return 0
        for text in server.follow(args.id):
            print(text, end="", flush=True)
        return _report_end(server, args.id)
    stopped = server.stop(args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'already ended'}")
    return 0


def cmd_generate(args) -> int:
    from netloupe.contract.errors import DatasetError
    from netloupe.pipeline.builtin_datasets import BUILTIN_DATASETS
    from netloupe.pipeline.mnist_variants import write_mnist_variants

    try:
        out = write_mnist_variants(args.out, args.rows, args.seed,
                                   progress=lambda done, total: print(f"{done:,} of {total:,} rows", flush=True))
    except (FileExistsError, ValueError) as error:
        raise DatasetError(f"{error}") from None
    roles = BUILTIN_DATASETS["mnist-variants"].defaults()
    print(f"wrote {args.rows:,} instances to {out}; use it as dataset.source with "
          f"input_column: {roles['input_column']}, metadata_columns: {roles['metadata_columns']}, "
          f"preprocess: {roles['preprocess']}")
    return 0


def cmd_zoo(args) -> int:
    from netloupe.contract.errors import RunError
    from netloupe.pipeline.zoo import write_checkpoint

    try:
        out = write_checkpoint(args.name, args.out)
    except (FileExistsError, KeyError) as error:
        raise RunError(error.args[0]) from None
    if out.is_dir() and not (out / "config.json").exists():  # a series of weights files
        print(f"wrote the {args.name} checkpoints to {out}; explain them with model.checkpoints: {out}/*.safetensors")
    else:
        print(f"wrote the {args.name} checkpoint to {out}; explain it with model.huggingface: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netloupe", description="Explain neural networks at scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="explain every instance of a dataset into a run directory")
    run.add_argument("spec", nargs="?", help="job spec YAML (see examples/mnist.yaml)")
    run.add_argument("--resume", metavar="RUN", help="finish the interrupted run that was to be RUN "
                     "(<output.root>/<run_name>), explaining only the instances it had not finished")
    run.add_argument("--force", action="store_true", help="replace an existing run of the same name")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec value, e.g. --set execution.num_workers=2")
    run.add_argument("--no-progress", action="store_true",
                     help="report no progress (default: Ray Data's bars in a terminal, a line every "
                          f"{PROGRESS_INTERVAL_S:g} s in a log)")
    run.set_defaults(func=cmd_run)
    val = sub.add_parser("validate", help="check a spec on a few rows without running it")
    val.add_argument("spec")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.set_defaults(func=cmd_validate)
    sub.add_parser("methods", help="list the attribution methods").set_defaults(func=cmd_methods)
    sql = sub.add_parser("sql", help="query a run, or several runs of the same data, with SQL (read-only DuckDB)")
    sql.add_argument("run", nargs="+", metavar="RUN [RUN ...] QUERY",
                     help="a run directory (runs/<name>) or URI (s3://bucket/runs/<name>), then the SQL over its views "
                          "and operators (--list shows them); several runs, each as NAME=DIR (or DIR, named by its "
                          "directory), are opened together: their tables as NAME.instances..., with the operators "
                          "comparing runs (docs/sql.md 'Across runs')")
    sql.add_argument("--file", help="run the statements of this .sql file; the last one's result is shown")
    sql.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    sql.add_argument("--output", help="write the result to this file (required for parquet)")
    sql.add_argument("--max-rows", type=int, default=40, help="rows shown in table format")
    sql.add_argument("--list", action="store_true",
                     help="list the run's views and tables, layers, methods, and the SQL operators")
    sql.set_defaults(func=cmd_sql)
    catalog = sub.add_parser("catalog", help="(re)build a run's catalog.duckdb")
    catalog.add_argument("run", help="a run directory (runs/<name>)")
    catalog.add_argument("--native-activations", action="store_true",
                         help="copy each layer's activations into the catalog as a native table: the stock duckdb "
                              "CLI's operators then scan them about twice as fast, for a bigger catalog.duckdb")
    catalog.set_defaults(func=cmd_catalog)
    dashboard = sub.add_parser("dashboard", help="serve the analyst dashboard of a run, or of several runs "
                                                 "of the same data compared (Panel)")
    dashboard.add_argument("run", nargs="+", metavar="RUN",
                           help="a run directory (runs/<name>) or a run URI (s3://bucket/runs/<name>); a run group "
                                "(runs/<group>) or several runs, each as NAME=RUN (or RUN, named by its directory) "
                                "add an 'Across runs' tab comparing them")
    dashboard.add_argument("--run", dest="shown", metavar="NAME",
                           help="with several runs: the one the single-run tabs show (default: the last)")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to bind (default 127.0.0.1: this machine only)")
    dashboard.add_argument("--port", type=int, default=5006)
    dashboard.add_argument("--password-file", help="require signing in with the password on this file's first "
                                                   "line (or set NETLOUPE_DASHBOARD_PASSWORD)")
    dashboard.add_argument("--user", default="analyst", help="the user name to sign in with (default analyst)")
    dashboard.set_defaults(func=cmd_dashboard)
    report = sub.add_parser("report", help="write a run's findings as one self-contained HTML file (opens offline, "
                                           "no server): summary, fidelity, subgroups, neuron matrix, scatter, "
                                           "the most confident mistakes with their maps")
    report.add_argument("run", help="a run directory (runs/<name>) or a run URI (s3://bucket/runs/<name>)")
    report.add_argument("--output", required=True, metavar="FILE.html", help="the file to write (replaced whole)")
    report.add_argument("--layer", help="the layer of the neuron matrix and the scatter (default: the last recorded)")
    report.add_argument("--mistakes", type=int, default=8, metavar="N",
                        help="how many of the most confident mistakes to show with their maps (default 8; 0: none)")
    report.set_defaults(func=cmd_report)
    generate = sub.add_parser("generate", help="write an mnist-variants dataset of N instances as Parquet")
    generate.add_argument("--rows", type=int, required=True, help="instances to generate")
    generate.add_argument("--out", required=True, help="directory to create (must not exist)")
    generate.add_argument("--seed", type=int, default=0, help="same seed and rows, same instances")
    generate.set_defaults(func=cmd_generate)
    zoo = sub.add_parser("zoo", help="write a demo model's Hugging Face checkpoint (trained once, then cached)")
    zoo.add_argument("name", help="which demo model: mnist-vit (a small vision transformer on mnist-5k)")
    zoo.add_argument("--out", required=True, help="directory to create (must not exist)")
    zoo.set_defaults(func=cmd_zoo)
    submit = sub.add_parser("submit", help="run a spec on a Ray cluster as a Ray job (Job Submission API)")
    submit.add_argument("spec", help="job spec YAML; its directory is uploaded as the job's working directory")
    submit.add_argument("--address", help="the job server, http://HOST:8265 (else RAY_API_SERVER_ADDRESS or "
                                          "RAY_ADDRESS, as for `ray job submit`)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value")
    submit.add_argument("--id", help="the submission id to use (default: one Ray makes up)")
    submit.add_argument("--wait", action="store_true", help="follow the job's logs; exit 1 unless it succeeds")
    submit.set_defaults(func=cmd_submit)
    jobs = sub.add_parser("jobs", help="follow Ray jobs: list, status ID, logs ID [--follow], stop ID")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("id", nargs="?", help="a submission id (from `netloupe submit` or `jobs list`)")
    jobs.add_argument("--address", help="the job server, http://HOST:8265 (else RAY_API_SERVER_ADDRESS or "
                                        "RAY_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="with logs: keep printing until the job ends")
    jobs.set_defaults(func=cmd_jobs)
    spec_help_parser = sub.add_parser("spec-help", help="every job spec key: type, default, documentation")
    spec_help_parser.add_argument("section", nargs="?", help="only this section (e.g. execution, fidelity)")
    spec_help_parser.set_defaults(func=cmd_spec_help)
    layers = sub.add_parser("layers", help="list the layer names of a spec's model")
    layers.add_argument("spec")
    layers.set_defaults(func=cmd_layers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from netloupe.pipeline.ray_cluster import local_ray_environment

    local_ray_environment()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NetloupeError as error:
        print(f"netloupe: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
