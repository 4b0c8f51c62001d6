"""Scheduled builds: deployments of the ``build_dataset`` flow on a Prefect server.

``schedule_spec`` creates or updates one deployment per spec (named after the dataset), with
a cron schedule, in a *process* work pool that a ``prefect worker start --pool NAME`` runs.
The deployment's source is this repository's folder, so the worker runs the flow from the
same checkout (or the same image, in docker-compose). ``list_schedules`` shows the
deployments of ``build_dataset`` with their next runs. Both need a real server
(``PREFECT_API_URL``): an ephemeral one would forget the deployment when the command ends.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines.spec import load_spec
from storage.uris import normalize_root

FLOW_NAME = "build_dataset"
ENTRYPOINT = "pipelines/build.py:build_dataset"
DEFAULT_POOL = "aligncurate"
REPO = Path(__file__).resolve().parents[1]


class ScheduleError(RuntimeError):
    """No Prefect server to talk to, or it refused the deployment."""


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ScheduleError(
            "scheduled builds need a Prefect server: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api after `prefect server start`)"
        )
    return url


@contextmanager
def _connected() -> Iterator[Any]:
    """A sync client to a server that answers its health check."""
    from prefect.client.orchestration import get_client

    url = _api_url()
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
        if failure is not None:
            raise ScheduleError(f"Prefect server at {url} is unreachable: {failure}")
        yield client


def check_server() -> None:
    """When ``PREFECT_API_URL`` names a server, fail with one clear error unless it answers
    (without a URL, Prefect runs ephemerally and there is nothing to check)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        with _connected():
            pass


def ensure_pool(client: Any, pool: str) -> str:
    """The work pool's type; a ``process`` pool is created when it does not exist."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_work_pool(pool).type
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        return "process"


def _store_param(store: str | None) -> str | None:
    """A local store made absolute (the worker runs elsewhere); URIs as given."""
    return None if store is None else normalize_root(store)


def schedule_spec(
    spec_path: Path,
    cron: str,
    pool: str = DEFAULT_POOL,
    store: str | None = None,
    timezone: str = "UTC",
) -> dict[str, Any]:
    """Create or update the deployment ``build_dataset/<dataset name>`` for ``spec_path``
    with a cron schedule; returns what ``list_schedules`` shows for it."""
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    spec = load_spec(spec_path)  # fails on a bad spec before anything reaches the server
    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ScheduleError(f"--cron {cron!r} --timezone {timezone!r}: {reason}") from None
    with _connected() as client:
        kind = ensure_pool(client, pool)
        if kind != "process":
            raise ScheduleError(f"work pool {pool!r} is a {kind!r} pool; use a process pool")
        flow = Flow.from_source(source=str(REPO), entrypoint=ENTRYPOINT)
        deployment = flow.to_deployment(
            name=spec.name,
            work_pool_name=pool,
            schedule=schedule,
            parameters={
                "spec_path": str(Path(spec_path).resolve()),
                "store": _store_param(store),
            },
            description=f"Scheduled build of {spec.name} from {spec_path}",
            tags=["aligncurate"],
        )
        deployment.apply(work_pool_name=pool)
        return _describe(client, client.read_deployment_by_name(f"{FLOW_NAME}/{spec.name}"))


def list_schedules(runs: int = 3) -> list[dict[str, Any]]:
    """Every deployment of ``build_dataset`` with its schedules and next ``runs`` runs."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with _connected() as client:
        deployments = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))
        )
        return [_describe(client, d, runs) for d in sorted(deployments, key=lambda d: d.name)]


def _describe(client: Any, deployment: Any, runs: int = 3) -> dict[str, Any]:
    """A deployment as plain data: the runs the server has scheduled, else the schedule's
    next dates (the server's scheduler adds runs on its own loop)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    scheduled = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=runs,
    )
    crons = [s.schedule for s in deployment.schedules if s.active and hasattr(s.schedule, "cron")]
    next_runs = [r.expected_start_time for r in scheduled if r.expected_start_time]
    if not next_runs and crons and not deployment.paused:
        next_runs = _next_dates(crons, runs)
    return {
        "name": f"{FLOW_NAME}/{deployment.name}",
        "id": str(deployment.id),
        "work_pool": deployment.work_pool_name,
        "cron": [s.cron for s in crons],
        "timezone": [s.timezone for s in crons],
        "paused": bool(deployment.paused),
        "parameters": deployment.parameters,
        "next_runs": [t.isoformat() for t in next_runs[:runs]],
    }


def _next_dates(crons: list[Any], n: int) -> list[dt.datetime]:
    """The next ``n`` dates of the cron schedules, as Prefect's scheduler computes them."""
    import asyncio

    from prefect.server.schemas.schedules import CronSchedule as ServerCron

    async def dates() -> list[dt.datetime]:
        found: list[dt.datetime] = []
        for s in crons:
            found += await ServerCron(cron=s.cron, timezone=s.timezone).get_dates(n=n)
        return sorted(found)[:n]

    return asyncio.run(dates())
