"""Task runner selection for ``build_dataset``: threads (the default: one per core, at least
2) or a Dask cluster.

``--runner dask`` hands the shard-level tasks (one ingest task per source, running the
local stages that follow it: normalize, filters, ...; one ``prepare`` task per shard for
an ordered stage that has one: near dedup's signatures) to a Dask cluster through
``prefect-dask``'s ``DaskTaskRunner``: an existing scheduler (``--dask-address
tcp://host:8786``) or, without an address, a ``LocalCluster`` of ``--dask-workers``
single-threaded worker processes on this machine. Ordered passes and whole-table stages
(exact dedup, near dedup's look-ups, CRaFT, synthesis) see every shard and run in the
flow's process.

Task arguments are shard paths and parameters, never rows, so tasks travel cheaply; the
workers must see the same files (one machine, or a shared filesystem / the same mount for
the store's ``_work`` folder) and reach the same Prefect API.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RunnerName = Literal["threads", "dask"]


class RunnerError(ValueError):
    """A runner that cannot be built from the options given."""


class RunnerOptions(BaseModel):
    """Where the shard-level tasks run."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    runner: RunnerName = "threads"
    dask_address: str | None = Field(
        default=None, description="scheduler of an existing Dask cluster, tcp://host:8786"
    )
    dask_workers: int = Field(
        default=2, ge=1, description="LocalCluster workers when no address is given"
    )


def task_runner(options: RunnerOptions) -> Any | None:
    """The Prefect task runner for ``options``; ``None`` keeps the flow's default."""
    if options.runner == "threads":
        if options.dask_address:
            raise RunnerError("--dask-address needs --runner dask")
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - pinned in pyproject
        raise RunnerError("--runner dask needs prefect-dask (pip install prefect-dask)") from exc
    if options.dask_address:
        if not options.dask_address.startswith(
            ("tcp://", "tls://", "ws://", "wss://", "inproc://")
        ):
            raise RunnerError(
                f"--dask-address {options.dask_address!r}: expected a scheduler URL such as "
                "tcp://host:8786"
            )
        return DaskTaskRunner(address=options.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": options.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        },
    )


def build_flow(options: RunnerOptions) -> Any:
    """``build_dataset`` with the task runner ``options`` ask for. A Dask worker that dies
    while it runs a task fails the task (after Dask's own retries on other workers), the
    flow fails before its commit, and :class:`RunnerError` says which task was lost."""
    from pipelines.build import build_dataset

    runner = task_runner(options)
    if runner is None:
        return build_dataset
    flow = build_dataset.with_options(task_runner=runner)

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return flow(*args, **kwargs)
        except Exception as exc:
            if type(exc).__name__ != "KilledWorker":
                raise
            raise RunnerError(f"a Dask worker died while running a build task: {exc}") from exc

    return run
