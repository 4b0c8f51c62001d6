"""``aligncurate server start|stop|status``: the persistent local Prefect server that later
commands reuse (:mod:`pipelines.prefect_server`)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from pipelines.warm_client import WARM_ENV

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


WarmOpt = Annotated[
    bool,
    typer.Option(
        "--warm/--no-warm",
        help="Also start the warm runner: commands then run in a process that has Prefect, "
        "pyarrow and deltalake imported already (about 1.5 s less per command).",
    ),
]


@server_app.command()
def start(as_json: JsonOpt = False, warm: WarmOpt = True) -> None:
    """Start the local Prefect server and the warm runner (or report the ones running);
    commands then use them."""
    from pipelines import warm as runner
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
    problem = None
    if warm:
        try:
            runner.start()
        except runner.RunnerError as exc:  # the server runs: commands still use it
            problem = str(exc)
    warm_state = runner.status()
    if as_json:
        extra = {"warm_error": problem} if problem else {}
        _emit(
            {"state": "running", "started": started, **info.to_dict(), "warm": warm_state, **extra}
        )
        return
    verb = "started" if started else "already running:"
    out.print(
        f"Prefect server {verb} {info.url} (pid {info.pid}, log {info.log}). Builds use it; "
        f"`aligncurate server stop` stops it. For the prefect CLI or a worker: "
        f"export PREFECT_API_URL={info.url}",
        highlight=False,
        soft_wrap=True,
    )
    if problem:
        err.print(f"[yellow]warning:[/yellow] {escape(problem)}", highlight=False, soft_wrap=True)
    elif warm_state["state"] == "running":
        out.print(
            f"Warm runner: pid {warm_state['pid']}; commands run in it "
            f"({WARM_ENV}=0 turns it off for one)",
            highlight=False,
            soft_wrap=True,
        )


@server_app.command()
def stop(as_json: JsonOpt = False) -> None:
    """Stop the warm runner and the local Prefect server."""
    from pipelines import warm as runner
    from pipelines.prefect_server import stop as stop_server

    warm_info, warm_stopped = runner.stop()
    info = stop_server()
    if as_json:
        _emit(
            {
                "stopped": info is not None,
                **(info.to_dict() if info else {}),
                "warm_stopped": warm_info is not None and warm_stopped,
            }
        )
        if not warm_stopped:
            raise typer.Exit(1)
        return
    if warm_info is not None and warm_stopped:
        out.print(f"stopped the warm runner (pid {warm_info.pid})", highlight=False)
    elif warm_info is not None:
        err.print(
            f"the warm runner (pid {warm_info.pid}) still runs commands; it takes no new "
            "ones and stops when they end",
            highlight=False,
            soft_wrap=True,
        )
    if info is None:
        out.print("no local Prefect server was running", highlight=False)
    else:
        out.print(f"stopped the Prefect server {info.url} (pid {info.pid})", highlight=False)


@server_app.command()
def status(as_json: JsonOpt = False) -> None:
    """Whether the local Prefect server runs (exit 0) or not (exit 1), and where."""
    from pipelines import warm as runner
    from pipelines.prefect_server import configured_url
    from pipelines.prefect_server import status as server_status

    found = server_status()
    configured = configured_url()
    warm = runner.status()
    if as_json:
        _emit({**found, "prefect_api_url": configured, "warm": warm})
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
    if warm["state"] == "running" and not as_json:
        use = (
            "commands here run in it" if warm["serves"] else f"not for commands here: {warm['why']}"
        )
        out.print(f"warm runner: pid {warm['pid']}; {use}", highlight=False, soft_wrap=True)
    if configured and not as_json:
        out.print(f"PREFECT_API_URL is set: commands use {configured}", highlight=False)
    if found["state"] != "running":
        raise typer.Exit(1)
