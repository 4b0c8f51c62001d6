"""``aligncurate server start|stop|status``: the persistent local Prefect server that later
commands reuse (:mod:`pipelines.prefect_server`)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

server_app = typer.Typer(
    name="server",
    help="A local Prefect server that builds reuse instead of starting one each time.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object, for scripts.")]


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


@server_app.command()
def start(as_json: JsonOpt = False) -> None:
    """Start the local Prefect server (or report the one running); builds then use it."""
    from pipelines.prefect_server import ServerError, configured_url
    from pipelines.prefect_server import start as start_server

    if url := configured_url():
        raise _fail(
            f"PREFECT_API_URL is set ({url}): commands use that server, so no local one is "
            "started; unset it to run one"
        )
    try:
        info, started = start_server()
    except ServerError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        _emit({"state": "running", "started": started, **info.to_dict()})
        return
    verb = "started" if started else "already running:"
    out.print(
        f"Prefect server {verb} {info.url} (pid {info.pid}, log {info.log}). Builds use it; "
        f"`aligncurate server stop` stops it. For the prefect CLI or a worker: "
        f"export PREFECT_API_URL={info.url}",
        highlight=False,
        soft_wrap=True,
    )


@server_app.command()
def stop(as_json: JsonOpt = False) -> None:
    """Stop the local Prefect server."""
    from pipelines.prefect_server import stop as stop_server

    info = stop_server()
    if as_json:
        _emit({"stopped": info is not None, **(info.to_dict() if info else {})})
        return
    if info is None:
        out.print("no local Prefect server was running", highlight=False)
    else:
        out.print(f"stopped the Prefect server {info.url} (pid {info.pid})", highlight=False)


@server_app.command()
def status(as_json: JsonOpt = False) -> None:
    """Whether the local Prefect server runs (exit 0) or not (exit 1), and where."""
    from pipelines.prefect_server import configured_url
    from pipelines.prefect_server import status as server_status

    found = server_status()
    configured = configured_url()
    if as_json:
        _emit({**found, "prefect_api_url": configured})
    elif found["state"] == "stopped":
        out.print(f"no local Prefect server (state in {found['state_dir']})", highlight=False)
    else:
        use = "builds use it" if found["reusable"] else "builds here do not use it"
        out.print(
            f"{found['state']}: {found['url']} (pid {found['pid']}, PREFECT_HOME "
            f"{found['prefect_home']}, log {found['log']}); {use}",
            highlight=False,
            soft_wrap=True,
        )
    if configured and not as_json:
        out.print(f"PREFECT_API_URL is set: commands use {configured}", highlight=False)
    if found["state"] != "running":
        raise typer.Exit(1)
