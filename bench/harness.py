"""What the benchmark scripts share: running one measurement in a fresh child process.

A script re-runs itself as ``python SCRIPT --child ARGS...``; the child prints its result as
a JSON object on its last stdout line. Imported as ``bench.harness`` (the scripts put the
repository first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


QUIET_LOAD = float(os.environ.get("BENCH_QUIET_LOAD", "inf"))
"""``make bench`` sets 1.0; unset, cases start at once (a quick look while developing)."""
PATIENCE_S = float(os.environ.get("BENCH_PATIENCE_S", "120"))


def wait_for_quiet(limit: float = QUIET_LOAD, patience: float = PATIENCE_S) -> float:
    """The 1-minute load average once it is below ``limit``, or after ``patience`` seconds
    (``BENCH_QUIET_LOAD``, ``BENCH_PATIENCE_S``): under ``make bench`` every case starts on
    a quiet machine, not in the wake of the case before it."""
    deadline = time.monotonic() + patience
    while (load := os.getloadavg()[0]) >= limit and time.monotonic() < deadline:
        time.sleep(5)
    return round(load, 2)


def run_child(script: str, *args: str) -> dict:
    """Once the machine is quiet (:func:`wait_for_quiet`), run ``script --child *args`` and
    return its JSON result plus the load before it, its peak RSS and the CPU seconds of it
    and its waited-for processes (wait4)."""
    load = wait_for_quiet()
    proc = subprocess.Popen(
        [sys.executable, script, "--child", *args], stdout=subprocess.PIPE, cwd=REPO
    )
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{args[0]} child failed with status {status}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    result.setdefault("load_before", load)
    return result


def task_runs(flow_run_id: str) -> tuple[list, Any]:
    """Every task run of one flow run (paged), and the flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: list = []
    with get_client(sync_client=True) as client:
        only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        while page := client.read_task_runs(flow_run_filter=only, limit=200, offset=len(runs)):
            runs.extend(page)
        return runs, client.read_flow_run(flow_run_id)


def flow_phases(flow_run_id: str) -> dict[str, float]:
    """Wall seconds of each kind of task in one build (first start to last end), from
    Prefect's task runs: where the time goes, and which part a runner can spread."""
    runs, flow = task_runs(flow_run_id)
    spans: dict[str, list] = {}
    for run in runs:
        if run.start_time and run.end_time:
            name = run.name.rsplit("-", 1)[0]
            spans.setdefault(name, []).append((run.start_time, run.end_time))
    out = {
        name: round((max(e for _, e in v) - min(b for b, _ in v)).total_seconds(), 1)
        for name, v in spans.items()
    }
    commit_end = max(e for _, e in spans.get("commit", [(None, flow.end_time)]))
    out["after_commit"] = round((flow.end_time - commit_end).total_seconds(), 1)
    return out
