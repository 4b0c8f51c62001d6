"""Benchmark: the wall time of a small ``aligncurate build`` against its work (#16 item 6).

For a small spec, rounds alternate between:

- ``temporary``: the build starts a Prefect server for itself and stops it at the end
  (``ALIGNCURATE_PREFECT_SERVER=temporary``; the default when no server runs);
- ``reused``: the build uses the persistent server of ``aligncurate server start``, started
  once before the rounds (its start-up is reported apart);
- ``warm``: the same, through the console script, which hands the command to the warm
  runner that ``server start`` started beside the server (:mod:`pipelines.warm`);
- ``baseline`` (with ``--baseline-tree DIR``): the same command run from another checkout,
  e.g. ``git archive`` of an older commit, for a before/after comparison.

*Work* is the flow run's own duration (its start to its end, as the Prefect server records
it); *wall* is the whole command, process start to exit. Every case runs as its own
``python -m pipelines.cli build`` process (``warm``: ``aligncurate build``) with the same
``PREFECT_HOME``, so all flow runs land in one database, read through the persistent server
at the end.

Usage: ``python bench/small_build.py [--spec examples/demo/spec.yaml | --one-row]
[--rounds 3] [--baseline-tree DIR] [--tree DIR] [--cases warm,reused]``. Prints a JSON
report and markdown rows for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


CONSOLE_SCRIPT = Path(sys.executable).with_name("aligncurate")


def _build(
    tree: Path, spec: Path, store: Path, env: dict[str, str], console: bool = False
) -> tuple[float, str]:
    """One build from ``tree`` (``console``: through the installed console script, which
    hands it to the warm runner); its wall seconds and build id."""
    if console:
        command, full = [str(CONSOLE_SCRIPT), "build", str(spec)], env
    else:
        command = [sys.executable, "-m", "pipelines.cli", "build", str(spec)]
        full = {**env, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    proc = subprocess.run(
        [*command, "--store", str(store), "--json"],
        env=full,
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"build from {tree} failed: {proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout)["build_id"]


def _server(args: list[str], env: dict[str, str], code: Path) -> dict:
    command = [sys.executable, "-m", "pipelines.cli", "server", *args, "--json"]
    proc = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True, check=False)
    return json.loads(proc.stdout)


def _work(url: str, build_id: str) -> float:
    """The flow run's duration, from its recorded start and end."""
    with urllib.request.urlopen(f"{url}/flow_runs/{build_id}", timeout=10) as response:
        run = json.loads(response.read())
    start, end = (datetime.fromisoformat(run[k]) for k in ("start_time", "end_time"))
    return (end - start).total_seconds()


def _one_row_spec(root: Path) -> Path:
    rows = REPO / "examples" / "demo" / "data" / "gsm8k_sample.jsonl"
    with rows.open() as source:
        (root / "one.jsonl").write_text(source.readline())
    spec = root / "one-row.yaml"
    spec.write_text(
        "name: one-row\nsources:\n  - path: one.jsonl\n"
        "stages:\n  - normalize: {}\n  - exact_dedup: {}\n  - filter: {}\n"
    )
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "demo" / "spec.yaml")
    parser.add_argument(
        "--one-row",
        action="store_true",
        help="instead of --spec: the first row of the demo's gsm8k_sample.jsonl through "
        "normalize, exact_dedup and filter",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path, help="a checkout to time as 'baseline'")
    parser.add_argument(
        "--tree",
        type=Path,
        default=REPO,
        help="the checkout whose code the temporary, reused and warm cases run (its server, "
        "warm runner and console-script imports: PYTHONPATH); default: this one",
    )
    parser.add_argument(
        "--cases",
        default="baseline,temporary,reused,warm",
        help="which cases to time, comma-separated (baseline needs --baseline-tree)",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aligncurate-bench-small-"))
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "ALIGNCURATE_STATE": str(root / "state"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    for name in ("PREFECT_API_URL", "ALIGNCURATE_PREFECT_SERVER", "ALIGNCURATE_WARM", "PYTHONPATH"):
        env.pop(name, None)
    code = args.tree.resolve()
    if code != REPO:
        env["PYTHONPATH"] = str(code)
    spec = _one_row_spec(root) if args.one_row else args.spec.resolve()
    cases: dict[str, tuple[Path, dict[str, str], bool]] = {}
    if args.baseline_tree:
        cases["baseline"] = (args.baseline_tree.resolve(), env, False)
    cases["temporary"] = (code, {**env, "ALIGNCURATE_PREFECT_SERVER": "temporary"}, False)
    cases["reused"] = (code, env, False)
    cases["warm"] = (code, env, True)
    unknown = set(args.cases.split(",")) - set(cases)
    if unknown:
        parser.error(f"unknown cases (or baseline without --baseline-tree): {sorted(unknown)}")
    # a first build creates the Prefect database: not a round
    _build(code, spec, root / "warm-up", cases["temporary"][1])
    cases = {name: case for name, case in cases.items() if name in args.cases.split(",")}
    started = time.perf_counter()
    server = _server(["start"], env, code)
    server_start = time.perf_counter() - started
    runs: dict[str, list[tuple[float, str]]] = {name: [] for name in cases}
    try:
        if "warm" in cases and not (served := _server(["status"], env, code)["warm"])["serves"]:
            raise RuntimeError(f"the warm runner would not serve these builds: {served}")
        for i in range(args.rounds):
            for name, (tree, case_env, console) in cases.items():
                runs[name].append(_build(tree, spec, root / f"{name}-{i}", case_env, console))
        report = {}
        for name, found in runs.items():
            walls = [wall for wall, _ in found]
            works = [_work(server["url"], build_id) for _, build_id in found]
            report[name] = {
                "wall_s": [round(w, 2) for w in walls],
                "work_s": [round(w, 2) for w in works],
                "wall_over_work": round(statistics.median(walls) / statistics.median(works), 2),
            }
    finally:
        _server(["stop"], env, code)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }
    result = {
        "spec": str(spec),
        "tree": str(code),
        "server_start_s": round(server_start, 2),
        "machine": machine,
    }
    print(json.dumps({**result, "cases": report}, indent=2))
    for name, row in report.items():
        print(
            f"| {name} | {statistics.median(row['wall_s']):.2f} | "
            f"{statistics.median(row['work_s']):.2f} | {row['wall_over_work']:.2f} |"
        )


if __name__ == "__main__":
    main()
