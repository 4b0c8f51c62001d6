"""The ``aligncurate`` command line: build, versions, inspect, diff, tag, files, export,
schedule.

Every read command takes ``--json`` and then prints one JSON object on stdout.
``--store`` (or ``ALIGNCURATE_STORE``) chooses the store; the default is ``./datasets``.

A user error is one ``error:`` line on stderr and exit code 2 (with ``--json``, also
``{"ok": false, "error", "stage", "file", "line"}`` on stdout); ``--verbose`` adds the
traceback. Credentials in messages are redacted (:func:`storage.uris.redact`).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import wraps
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer._click.exceptions import UsageError
from typer.core import TyperCommand, TyperGroup

from pipelines.server_cli import server_app


class _Commands(TyperGroup):
    """The command group: an error in a command's arguments (a missing option, a value out
    of range, an unknown option) is one ``error:`` line and exit code 2 as well, naming the
    command's ``--help`` (and the ``--json`` failure object when ``--json`` was given)."""

    def invoke(self, ctx: typer.Context) -> Any:
        given = [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            _fail(exc, as_json="--json" in given, verbose=False)


app = typer.Typer(
    cls=_Commands,
    name="aligncurate",
    help="Curate alignment fine-tuning datasets into versioned Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
app.add_typer(server_app, name="server")

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="ALIGNCURATE_STORE", help="Store root (default ./datasets)."),
]
BuildStoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Store root; default: the spec's store, else $ALIGNCURATE_STORE, else ./datasets.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object, for scripts.")]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", help="On an error, print the full traceback too.")
]

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors() -> tuple[type[Exception], ...]:
    from engines.base import EngineError
    from pipelines.build import AccountingError
    from pipelines.prefect_server import ServerError
    from pipelines.runners import RunnerError
    from pipelines.schedule import ScheduleError
    from pipelines.self_guide import SelfGuideError
    from pipelines.spec import SpecError
    from storage.dataset import StoreError
    from transforms.ingest import IngestError
    from transforms.schema import SchemaError
    from transforms.synthesis.self_instruct import SeedError

    return (
        SpecError,
        StoreError,
        IngestError,
        SchemaError,
        AccountingError,
        EngineError,
        RunnerError,
        ScheduleError,
        SeedError,
        SelfGuideError,
        UsageError,  # typer.BadParameter, raised by a command's own checks
        OSError,  # e.g. --out naming a file, a folder that cannot be written
        MemoryError,
        RecursionError,
        ServerError,
    )


def _friendly(fn: F) -> F:
    """Turn known user errors into one red ``error:`` line on stderr and exit code 2, with
    ``{"ok": false, ...}`` on stdout under ``--json`` (see :func:`_fail`).

    It gives every command a ``--verbose`` option, which prints the traceback too; a
    command that declares a ``verbose`` parameter itself receives its value."""
    own = "verbose" in signature(fn).parameters

    @wraps(fn)
    def wrapper(*args: Any, verbose: bool = False, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs, **({"verbose": verbose} if own else {}))
        except _user_errors() as exc:
            _fail(exc, as_json=bool(kwargs.get("as_json")), verbose=verbose)

    if not own:
        params = signature(fn, eval_str=True)
        option = Parameter("verbose", Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOpt)
        wrapper.__signature__ = params.replace(  # type: ignore[attr-defined]
            parameters=[*params.parameters.values(), option]
        )
        wrapper.__annotations__ = {**fn.__annotations__, "verbose": VerboseOpt}
    return wrapper  # type: ignore[return-value]


def _fail(exc: BaseException, *, as_json: bool, verbose: bool) -> NoReturn:
    """Report a user error and exit with code 2: the traceback first under ``verbose``,
    then ``{"ok": false, "error", "stage", "file", "line"}`` on stdout under ``as_json``
    (fields null when unknown), then one ``error:`` line on stderr; credentials redacted."""
    from storage.uris import redact

    where = _where(exc)
    message = redact(_message(exc, where["stage"]))
    if verbose:
        sys.stderr.write(redact("".join(traceback.format_exception(exc))))
    if as_json:
        _emit_json({"ok": False, "error": message, **where})
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


def _message(exc: BaseException, stage: str | None) -> str:
    """One line for ``exc``: its message, or what an error without one means."""
    during = f" during {stage}" if stage else ""
    if isinstance(exc, MemoryError):
        return f"out of memory{during}: an input row or value is too large? (--verbose: where)"
    if isinstance(exc, RecursionError):
        return f"input nested too deeply{during} (Python's recursion limit; --verbose: where)"
    if isinstance(exc, UsageError):
        command = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
        return exc.format_message().rstrip(".") + command
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{target}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _where(exc: BaseException) -> dict[str, Any]:
    """The failure's ``stage``, ``file`` and ``line``, each None when unknown: the error's
    own attributes (:class:`~pipelines.spec.SpecError`: ``file``, ``line``;
    :class:`~transforms.ingest.IngestError`: ``path`` and a ``line N`` location; an
    ``OSError``'s ``filename``) and the stage that :func:`_run_console` noted."""
    from transforms.ingest import IngestError

    stage = getattr(exc, "stage", None) or ("ingest" if isinstance(exc, IngestError) else None)
    file = getattr(exc, "file", None) or getattr(exc, "path", None)
    if file is None and isinstance(exc, OSError):
        file = exc.filename
    line = getattr(exc, "line", None)
    location = re.match(r"line (\d+)", str(getattr(exc, "location", None) or ""))
    if line is None and location:
        line = int(location[1])
    return {"stage": stage, "file": None if file is None else str(file), "line": line}


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
"""Prefect's run loggers: their records go to the run log (the API) and to the console."""
_FAILED_STATE = re.compile(r"Finished in state (Failed|Crashed)")


class _Redact(logging.Filter):
    """Hides credentials (:func:`storage.uris.redact`) in every record it sees, its
    traceback included; a record with nothing to hide passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        from storage.uris import redact

        with suppress(Exception):  # a filter must never break logging
            text = record.getMessage()
            if (clean := redact(text)) != text:
                record.msg, record.args = clean, None
            if record.exc_info and not record.exc_text:
                trace = logging.Formatter().formatException(record.exc_info)
                if (clean := redact(trace)) != trace:
                    record.exc_text = clean
            elif record.exc_text:
                record.exc_text = redact(record.exc_text)
        return True


class _RunConsole(_Redact):
    """On Prefect's console handlers while ``build`` runs its flow: redacts, and keeps a
    failed run's records (each traceback, ``Finished in state Failed``) off the console
    unless ``quiet`` is off, as the CLI reports the failure in one line (the run log keeps
    them); it notes the stage (task name) of the first task run that failed."""

    def __init__(self, quiet: bool) -> None:
        super().__init__()
        self.quiet = quiet
        self.stage: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        if not record.name.startswith(RUN_LOGGERS):
            return True
        failed = (
            record.levelno >= logging.ERROR
            or record.exc_info is not None
            or _FAILED_STATE.match(str(record.msg)) is not None
        )
        run = getattr(record, "task_run_name", None)
        if failed and run and self.stage is None:
            self.stage = re.sub(r"-[0-9a-f]+$", "", str(run))  # Prefect's name-<hex> suffix
        return not (failed and self.quiet)


@contextmanager
def _run_console(verbose: bool) -> Iterator[None]:
    """While a flow runs: :class:`_RunConsole` on Prefect's console handlers, credentials
    redacted in the run log, and an error raised without a ``stage`` given the stage of
    the task run that failed."""
    from prefect.logging.handlers import PrefectConsoleHandler

    console, run_log = _RunConsole(quiet=not verbose), _Redact()
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for handler in handlers:
        handler.addFilter(console)
    for logger in loggers:
        logger.addFilter(run_log)
    try:
        yield
    except Exception as exc:
        if console.stage and getattr(exc, "stage", None) is None:
            with suppress(AttributeError):
                exc.stage = console.stage  # type: ignore[attr-defined]
        raise
    finally:
        for handler in handlers:
            handler.removeFilter(console)
        for logger in loggers:
            logger.removeFilter(run_log)


@contextmanager
def _signals_exit() -> Iterator[None]:
    """For a command that writes files without a flow (export, report, generate): SIGTERM
    and SIGHUP unwind like Ctrl-C (their atomic writes remove what they started, an engine
    stops its server), then exit 128 + signal; Ctrl-C exits 130."""
    from pipelines.prefect_server import signals_as_exit

    try:
        with signals_as_exit():
            yield
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None


def _out_folder(path: Path) -> Path:
    """An ``--out`` folder: it may not exist yet, but must not be a file."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"--out {path} is a file; it must be a folder")
    return path


def _store(store: str | None) -> Any:
    from storage.dataset import DatasetStore

    return DatasetStore(store)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _counts_table(counts: dict[str, dict[str, int]]) -> Table:
    table = Table("stage", "in", "kept", "rejected", "added", title="per-stage counts")
    for stage, line in counts.items():
        table.add_row(stage, *(str(line.get(k, 0)) for k in ("in", "kept", "rejected", "added")))
    return table


@app.command()
@_friendly
def build(
    spec: Annotated[Path, typer.Argument(help="Build spec (YAML).")],
    store: BuildStoreOpt = None,
    runner: Annotated[
        str, typer.Option(help="threads (default) or dask: where shard-level stages run.")
    ] = "threads",
    dask_address: Annotated[
        str | None,
        typer.Option(help="dask: scheduler of an existing cluster; default: a LocalCluster."),
    ] = None,
    dask_workers: Annotated[int, typer.Option(help="dask: LocalCluster worker processes.")] = 2,
    partitions: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Key partitions of exact and near dedup (0: the ordered pass in the flow's "
            "process). Default: $ALIGNCURATE_DEDUP_PARTITIONS, else 0 on threads and 2 per "
            "worker on dask (32 with --dask-address).",
        ),
    ] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Build a new version of the dataset a spec describes."""
    from pipelines.prefect_server import prefect_api
    from pipelines.progress import build_bars, wanted
    from pipelines.runners import RunnerOptions, build_flow
    from pipelines.schedule import check_server
    from pipelines.spec import check_sources, load_spec, spec_warnings

    loaded = load_spec(spec)  # fail fast on a bad spec or a missing file, before Prefect starts
    check_sources(loaded, spec)
    for warning in spec_warnings(loaded):
        err.print(
            f"[yellow]warning:[/yellow] {spec}: {escape(warning)}", highlight=False, soft_wrap=True
        )
    if runner not in ("threads", "dask"):
        raise typer.BadParameter("--runner must be threads or dask")
    flow = build_flow(
        RunnerOptions(
            runner=runner,
            dask_address=dask_address,
            dask_workers=dask_workers,
            partitions=partitions,
        )
    )
    check_server()  # an unreachable PREFECT_API_URL: one line and exit 2, before any work
    with prefect_api(), build_bars(wanted(as_json), out), _run_console(verbose):
        summary = flow(str(spec), store=store)
    if as_json:
        cache = summary.get("cache", {})
        _emit_json(
            {
                "name": summary["name"],
                "version": summary["version"],
                "counts": summary["counts"],
                "rows": summary["rows"],
                "build_id": summary["build_id"],
                "hits": cache.get("hits", 0),
                "misses": cache.get("misses", 0),
                "engine_calls": cache.get("engine_calls", 0),
                "dataset_stats": summary.get("dataset_stats"),
            }
        )
        return
    rows = summary["rows"]
    out.print(
        f"[bold green]{summary['name']}@{summary['version']}[/] committed to {summary['store']}: "
        f"{rows['train']} train, {rows['rejected']} rejected of {rows['in']} rows in"
        + (f" + {rows['generated']} generated" if rows.get("generated") else "")
    )
    out.print(_counts_table(summary["counts"]))
    _print_instruction_response(summary.get("dataset_stats"))


@app.command()
@_friendly
def versions(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the versions of a dataset, oldest first."""
    infos = _store(store).versions(name)
    if as_json:
        _emit_json(
            [
                {
                    "version": v.version,
                    "timestamp": v.timestamp.isoformat(),
                    "tags": v.tags,
                    "metadata": v.metadata,
                }
                for v in infos
            ]
        )
        return
    table = Table("version", "committed", "tags", "train", "rejected", "build id", title=name)
    for v in infos:
        rows = v.rows
        table.add_row(
            str(v.version),
            v.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
            ", ".join(v.tags),
            str(rows.get("train", "")),
            str(rows.get("rejected", "")),
            str(v.metadata.get("build_id", "")),
        )
    out.print(table)


@app.command()
@_friendly
def inspect(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@TAG.")],
    split: Annotated[str, typer.Option(help="train, rejected or all.")] = "all",
    sample: Annotated[int, typer.Option(help="Sample rows to show.")] = 3,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Schema, counts by split/source/task/reject reason, lengths and sample rows."""
    import pyarrow as pa

    from transforms.profile import profile_tables

    datasets = _store(store)
    name, version = datasets.resolve(ref)
    if split not in ("train", "rejected", "all"):
        raise typer.BadParameter("--split must be train, rejected or all")
    exact = f"{name}@{version}"
    schema_ = datasets.schema(exact)  # with the split column
    rows: list[dict[str, Any]] = []

    def tables() -> Iterator[pa.Table]:  # streamed: memory does not grow with the version
        for batch in datasets.batches(exact, split=None if split == "all" else split):
            table = pa.Table.from_batches([batch])
            if split != "all":
                table = table.append_column("split", pa.array([split] * table.num_rows))
            if len(rows) < sample:
                rows.extend(table.slice(0, sample - len(rows)).to_pylist())
            yield table

    report = profile_tables(tables(), schema_.names)
    schema = {f.name: str(f.type) for f in schema_}
    if as_json:
        _emit_json(
            {
                "name": name,
                "version": version,
                "split": split,
                "schema": schema,
                **report,
                "sample": rows,
            }
        )
        return
    out.print(f"[bold]{name}@{version}[/] ({split}): {report['rows']} rows")
    schema_table = Table("column", "type", title="schema")
    for column, kind in schema.items():
        schema_table.add_row(column, kind)
    out.print(schema_table)
    for column, counts in report["counts"].items():
        t = Table(column, "rows", title=f"by {column}")
        for value, n in counts.items():
            t.add_row(value, str(n))
        out.print(t)
    lengths = Table("field", "min", "mean", "p50", "p90", "max", title="lengths (chars)")
    for field, stats in report["lengths"].items():
        lengths.add_row(
            field, *(str(stats.get(k, "")) for k in ("min", "mean", "p50", "p90", "max"))
        )
    out.print(lengths)
    _print_instruction_response(report.get("instruction_response"))
    for row in rows:
        out.print_json(json.dumps(row, default=str))


def _print_instruction_response(stats: dict[str, Any] | None) -> None:
    """The instruction/response statistics and the loss-over-prompt recommendation."""
    if not stats or not stats["rows"]:
        return
    t = Table("field", "mean", "p50", "p90", "max", title=f"train tokens ({stats['unit']})")
    for field in ("prompt_tokens", "response_tokens", "row_ratio"):
        t.add_row(field, *(str(stats[field].get(k, "")) for k in ("mean", "p50", "p90", "max")))
    out.print(t)
    advice = stats["recommendation"]
    verdict = "loss over the prompt" if advice["loss_over_prompt"] else "loss on responses only"
    out.print(
        f"prompt/response length ratio {stats['length_ratio']}: recommend {verdict} "
        f"({'; '.join(advice['reasons'])}) [{advice['source']}]"
    )


@app.command()
@_friendly
def diff(
    a: Annotated[str, typer.Argument(help="NAME@A")],
    b: Annotated[str, typer.Argument(help="NAME@B")],
    examples: Annotated[int, typer.Option(help="Example ids per kind of change.")] = 5,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rows added, removed and changed between two versions."""
    result = _store(store).diff(a, b, examples=examples)
    if as_json:
        _emit_json(result.to_dict())
        return
    rows = Table("split", result.a, result.b, title="rows by split")
    for split in sorted({*result.rows_a, *result.rows_b}):
        rows.add_row(split, str(result.rows_a.get(split, 0)), str(result.rows_b.get(split, 0)))
    out.print(rows)
    changes = Table("change", "rows", "example ids", title=f"{result.a} → {result.b}")
    for kind in ("added", "removed", "changed", "moved"):
        shown = getattr(result, f"{kind}_examples")
        changes.add_row(kind, str(getattr(result, kind)), "\n".join(shown) or "-")
    changes.add_row("unchanged", str(result.unchanged), "-")
    out.print(changes)
    for kind in ("added", "removed"):
        if columns := getattr(result, f"columns_{kind}"):
            out.print(f"columns {kind}: {', '.join(columns)}")


@app.command()
@_friendly
def report(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@TAG.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for index.html.")],
    sample: Annotated[int, typer.Option(help="Sample rows per split.")] = 5,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a self-contained HTML report of a version to DIR/index.html."""
    with _signals_exit():
        from pipelines.report import write_report

        result = write_report(_store(store), ref, _out_folder(out_dir), sample=sample)
    if as_json:
        _emit_json(result.to_dict())
        return
    out.print(
        f"report of {result.name}@{result.version} ({', '.join(result.sections)}) → {result.path}"
    )


@app.command()
@_friendly
def tag(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    name: Annotated[str, typer.Argument(help="Tag to set (moves it if it exists).")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name a version; an existing tag moves, and the command says from where."""
    datasets = _store(store)
    dataset, _ = datasets.resolve(ref)
    previous, version = datasets.set_tag(ref, name)
    if as_json:
        _emit_json({"name": dataset, "version": version, "tag": name, "previous": previous})
        return
    if previous is None:
        out.print(f"tagged {dataset}@{version} as {name!r}", highlight=False)
    elif previous == version:
        out.print(f"{name!r} already tags {dataset}@{version}", highlight=False)
    else:
        out.print(f"{dataset}: moved {name!r} from v{previous} to v{version}", highlight=False)


@app.command()
@_friendly
def files(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@TAG.")],
    split: Annotated[str, typer.Option(help="train or rejected.")] = "train",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the Parquet files of exactly one version's split, one per line.

    A glob over the table folder would mix every version; read these instead, e.g.
    load_dataset("parquet", data_files=[...]) or DuckDB's read_parquet([...])."""
    datasets = _store(store)
    name, version = datasets.resolve(ref)
    found = datasets.files(f"{name}@{version}", split=split)
    if as_json:
        _emit_json({"name": name, "version": version, "split": split, "files": found})
        return
    sys.stdout.write("".join(f"{path}\n" for path in found))  # no wrapping: paths for scripts
    if not found:
        err.print(f"{name}@{version} has no {split} rows, so no files", highlight=False)


@app.command()
@_friendly
def doctor(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every log entry and every data file of a dataset; say which versions can be
    read and how to recover the others. Exit code 1 when something is damaged."""
    from storage.doctor import diagnose

    report = diagnose(_store(store), name)
    _print_result(report.to_dict(), report.lines(), as_json)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@_friendly
def gc(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    grace: Annotated[
        str, typer.Option(help="Keep unreferenced files younger than this: 30m, 1h, 2d.")
    ] = "1h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, delete nothing.")] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete data files that no version references (left by interrupted commits) once
    they are older than --grace; safe while builds run."""
    from storage.gc import collect_garbage, parse_grace

    result = collect_garbage(_store(store), name, parse_grace(grace), dry_run)
    _print_result(result.to_dict(), result.lines(), as_json)


def _print_result(data: dict[str, Any], lines: list[str], as_json: bool) -> None:
    if as_json:
        _emit_json(data)
    else:
        out.print(escape("\n".join(lines)), highlight=False, soft_wrap=True)


def _loss_over_prompt(value: str | None) -> bool | str | None:
    choices = {"true": True, "false": False, "auto": "auto"}
    if value is not None and value.lower() not in choices:
        raise typer.BadParameter("--loss-over-prompt must be true, false or auto")
    return None if value is None else choices[value.lower()]


class _ExportCommand(TyperCommand):
    """The ``export`` command, whose help ends with the formats of the registry
    (:data:`storage.export.FORMATS`), imported only when the help is shown: importing it
    for every command would slow each one down."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from storage.export import FORMATS

        lines = [f"* {name}: {escape(about)}" for name, about in FORMATS.items()]
        self.epilog = "Formats (docs/exports.md):\n\n" + "\n".join(lines)
        super().format_help(ctx, formatter)


@app.command(cls=_ExportCommand)
@_friendly
def export(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@TAG.")],
    fmt: Annotated[
        str, typer.Option("--format", help="Export format (listed below), e.g. trl_messages.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    loss_over_prompt: Annotated[
        str | None,
        typer.Option(
            "--loss-over-prompt",
            help="true, false or auto (from the instruction/response statistics): write the "
            "TRL / LLaMA-Factory setting into README.md and the manifest.",
        ),
    ] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a version's train split in a trainer's format."""
    from storage.export import export as run_export

    switch = _loss_over_prompt(loss_over_prompt)
    with _signals_exit():
        result = run_export(_store(store), ref, fmt, _out_folder(out_dir), loss_over_prompt=switch)
    data = result.to_dict() if hasattr(result, "to_dict") else vars(result)
    if as_json:
        _emit_json(data)
        return
    table = Table("field", "value", title=f"exported {ref} as {fmt} → {out_dir}")
    for key, value in data.items():
        shown = value if isinstance(value, str | int | float) else json.dumps(value, default=str)
        table.add_row(key, str(shown))
    out.print(table)


@app.command()
@_friendly
def generate(
    model: Annotated[Path, typer.Option("--model", help="Local HF model folder.")],
    source: Annotated[Path, typer.Option("--in", help="JSONL of {messages} or {prompt}.")],
    target: Annotated[Path, typer.Option("--out", help="JSONL to write.")],
    engine: Annotated[str, typer.Option(help="vllm, openai or transformers.")] = "vllm",
    url: Annotated[
        str | None, typer.Option(help="openai: a running server; default: start one.")
    ] = None,
    n: Annotated[int, typer.Option(min=1, help="Samples per prompt.")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    top_p: Annotated[float, typer.Option(max=1.0, help="In (0, 1].")] = 1.0,
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    logprobs: Annotated[
        int,
        typer.Option(
            min=0,
            help="Top-k alternatives per token, used for the samples' cumulative_logprob "
            "(0: only the sampled tokens).",
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Base seed; each line gets its own.")] = 0,
    max_model_len: Annotated[int | None, typer.Option(help="Context length for vLLM.")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sample completions for a JSONL file of prompts, through the generation cache."""
    from pipelines.generate import GenerateOptions, generate_file
    from pipelines.progress import bars, wanted
    from storage.dataset import default_store
    from storage.gencache import GenerationCache, cache_dir

    options = GenerateOptions(
        engine=engine,
        model=str(model),
        url=url,
        seed=seed,
        max_model_len=max_model_len,
        sampling=_sampling(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=logprobs
        ),
    )
    cache = GenerationCache(cache_dir(store or default_store()))
    with _signals_exit(), bars(wanted(as_json), out) as shown:
        progress = shown.requests("generate") if shown else None
        stats = generate_file(source, target, options, cache, progress=progress)
    if as_json:
        _emit_json(stats)
        return
    out.print(
        f"{stats['prompts']} prompts, {stats['completions']} completions in "
        f"{stats['seconds']} s ({stats['startup_seconds']} s start-up, "
        f"{stats['completions_per_s']}/s after it); cache: {stats['hits']} hits, "
        f"{stats['misses']} misses, {stats['engine_calls']} engine calls → {target}"
    )


def _sampling(**values: Any) -> Any:
    """The sampling parameters, a bad value reported as a usage error."""
    from engines import Sampling

    try:
        return Sampling(**values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
@_friendly
def schedule(
    spec: Annotated[Path | None, typer.Argument(help="Build spec (YAML) to schedule.")] = None,
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 3 * * *".')] = None,
    pool: Annotated[str, typer.Option(help="Process work pool (created if missing).")] = (
        "aligncurate"
    ),
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    show: Annotated[
        bool, typer.Option("--list", help="Show the deployments and their next runs.")
    ] = False,
    store: BuildStoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create or update a scheduled build of SPEC on the Prefect server ($PREFECT_API_URL),
    or --list the scheduled builds."""
    from pipelines.schedule import list_schedules, schedule_spec

    if show == (spec is not None):
        raise typer.BadParameter("give a SPEC with --cron, or --list")
    if spec is not None and not cron:
        raise typer.BadParameter('--cron is required, e.g. --cron "0 3 * * *"')
    if show:
        found = list_schedules()
        if as_json:
            _emit_json(found)
            return
        table = Table("deployment", "cron", "pool", "paused", "next runs", title="scheduled builds")
        for d in found:
            crons = ", ".join(f"{c} ({tz})" for c, tz in zip(d["cron"], d["timezone"], strict=True))
            table.add_row(
                d["name"], crons, d["work_pool"], str(d["paused"]), "\n".join(d["next_runs"])
            )
        out.print(table)
        return
    assert spec is not None and cron is not None
    result = schedule_spec(spec, cron, pool=pool, store=store, timezone=timezone)
    if as_json:
        _emit_json(result)
        return
    out.print(
        f"[bold green]{result['name']}[/] scheduled ({cron}, {timezone}) in pool {pool!r}; "
        f"next run {result['next_runs'][0] if result['next_runs'] else 'none'}. "
        f"Start a worker: prefect worker start --pool {pool}"
    )


@app.command()
@_friendly
def train(
    ref: Annotated[str, typer.Argument(help="Dataset version to train on, NAME[@VERSION|@TAG].")],
    model: Annotated[Path, typer.Option("--model", help="Base model (M0): a local HF folder.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the trained model.")],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a training parameter, e.g. --set learning_rate=1e-4 "
            "(method, learning_rate, epochs, batch_size, gradient_accumulation, lr_scheduler, "
            "warmup_ratio, weight_decay, max_length, lora_r, lora_alpha, lora_dropout, seed, "
            "threads).",
        ),
    ] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """RAIT training (CRaFT stage 2): fine-tune --model on REF's train split with TRL.

    Presets follow the CRaFT code: open QA a full fine-tune at 8e-6 for 3 epochs, MCQ LoRA
    at 2e-4. A rerun with the same version, model and parameters trains nothing."""
    from pipelines.train import train_version

    overrides = _overrides(param or [])
    record = train_version(
        _store(store), ref, model, out_dir, overrides, progress=wanted_progress(as_json)
    )
    if as_json:
        _emit_json({**record, "out": str(out_dir)})
        return
    losses = [p["loss"] for p in record["loss"]]
    how = "cached: nothing trained" if record["cached"] else f"trained in {record['seconds']} s"
    out.print(
        f"[bold green]{record['dataset']['ref']}[/] → {out_dir} ({how}); {record['task']} preset, "
        f"{record['params']['method']} at lr {record['params']['learning_rate']:g}, "
        f"{record['examples']} examples, {record['steps']} steps"
        + (f", loss {losses[0]:.4f} → {losses[-1]:.4f}" if losses else "")
    )


def wanted_progress(as_json: bool) -> bool:
    """Progress bars on a terminal, never with --json."""
    from pipelines.progress import wanted

    return wanted(as_json)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, each value read as YAML (numbers, booleans, strings)."""
    import yaml

    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        try:
            result[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise typer.BadParameter(f"{pair!r}: the value is not valid YAML") from None
    return result


@app.command()
@_friendly
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="The model to judge: a local HF folder.")],
    baseline: Annotated[
        Path, typer.Option("--baseline", help="Its initial model M0, for THS: a local HF folder.")
    ],
    questions: Annotated[
        list[str],
        typer.Option(
            "--questions",
            help="A question set: a QA file (open-QA JSONL {question, answers}, NQ CSV, MMLU "
            "CSV, ...) named after its stem, or a version NAME@VERSION. Repeatable.",
        ),
    ],
    engine: Annotated[str, typer.Option(help="vllm, openai or transformers.")] = "vllm",
    url: Annotated[str | None, typer.Option(help="openai: a running server.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length for vLLM.")] = None,
    rows_out: Annotated[
        Path | None, typer.Option("--rows-out", help="Write <set>.jsonl: question, answer, label.")
    ] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask every question with the RAIT prompt (greedy, cached) and report Pc, Pw, the
    refusal rate and THS against --baseline, per question set."""
    from pipelines.evaluate import evaluate as run_evaluation
    from pipelines.progress import bars
    from storage.dataset import default_store
    from storage.gencache import GenerationCache, cache_dir

    cache = GenerationCache(cache_dir(store or default_store()))
    with bars(wanted_progress(as_json), out) as shown:
        result = run_evaluation(
            str(model),
            str(baseline),
            questions,
            _store(store),
            cache,
            engine=engine,
            url=url,
            max_model_len=max_model_len,
            rows_out=rows_out,
            progress=shown.requests if shown else None,
        )
    if as_json:
        _emit_json(result)
        return
    out.print(evaluation_table(result))
    if result.get("stored"):
        out.print(f"stored next to its dataset version: {result['stored']}")


def evaluation_table(result: dict[str, Any]) -> Table:
    """Pc / Pw / refusal of the model and of M0, and THS, one row per question set."""
    table = Table(
        "set", "model", "n", "Pc %", "Pw %", "refusal %", "THS",
        title=f"{Path(result['model']).name} against M0 {Path(result['baseline']).name}",
    )  # fmt: skip
    for name, row in result["sets"].items():
        shown = (
            ("M0 Init-Basic", row["init_basic"], row["init_basic"]["ths"]),
            ("M0 Init-Refuse", row["init_refuse"], row["init_refuse"]["ths"]),
            (Path(result["model"]).name, row, row["ths"]),
        )
        for label, rates, ths in shown:
            table.add_row(
                name,
                label,
                str(rates["n"]),
                *(f"{100 * rates[k]:.1f}" for k in ("pc", "pw", "refusal")),
                "undefined" if ths is None else f"{ths:.1f}",
            )
    return table


@app.command("fact-world")
@_friendly
def fact_world(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for facts.jsonl and model/.")],
    seed: Annotated[int, typer.Option()] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Generate the fictional fact world and train its tiny model (cached), into --out."""
    from examples.fact_world import build_fact_world
    from examples.fact_world.world import copy_world

    folder = _out_folder(out_dir)  # before the world is built
    world = copy_world(build_fact_world(seed=seed), folder)
    if as_json:
        _emit_json(world.manifest)
        return
    out.print(f"fact world in {world.root}: facts {world.facts_path}, model {world.model_dir}")
    accuracy = world.manifest.get("accuracy", {}).get("greedy")
    if accuracy:
        out.print_json(json.dumps(accuracy, default=str))


def _exit_on_signal(signum: int, frame: object) -> NoReturn:
    signal.signal(signum, signal.SIG_IGN)  # once: a second one must not cut the exit short
    raise SystemExit(128 + signum)


def main() -> None:
    """The console script. Until a command installs its own unwinding (``_signals_exit``, a
    build's server handling), SIGTERM and SIGHUP end it quietly with 128 + signal, as they do
    later: nothing has been written yet (tests/test_command_signals.py)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # under nohup SIGHUP stays ignored
            signal.signal(sig, _exit_on_signal)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
