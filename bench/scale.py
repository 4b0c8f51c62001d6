"""Scale-out and object-storage costs of a build, each against its baseline in the same run.

1. Ingest → normalize → near dedup of ``--rows`` GSM8K rows (the real corpus, repeated;
   split over ``--sources`` files, since shard-level work is parallel per source) with
   ``--runner dask`` on a 2-worker LocalCluster against the default runner (threads, one
   per core) and against one thread (every task after the other).
   The ingest → normalize part alone is measured too. Near dedup's per-shard work
   (signatures, band keys) runs as shard-level ``prepare`` tasks on either runner; its
   look-ups and verification are an ordered pass in the flow's process. Each build's
   phases (ingest, prepare, ordered segment, commit, after the commit) come from Prefect's
   task runs.
2. The same build into an ``s3://`` store on loopback (moto_server) against a local store.
3. ``--serial-share``: the serial share of the near-dedup build under ``--runner dask``
   (2-worker LocalCluster), partitioned dedup (``partitions``: 2 per worker, the
   default) against its anchor, the ordered pass (``partitions: 0``), each build in its
   own child process (``bench.harness.run_child``), ``--rounds`` rounds in alternating
   order, medians reported. From Prefect's task runs: ``flow_tasks_s``, the time of the
   tasks that run in the flow's process (the ordered segment, the commit);
   ``uncovered_s``, the wall time during which no worker task runs (flow tasks, Dask
   start-up, orchestration gaps, the report after the commit); ``serial_share``:
   ``flow_tasks_s`` ÷ wall, and ``serial_share_uncovered``: ``uncovered_s`` ÷ wall. Also
   the bytes the partition tasks read (``shuffle_bytes``: band keys and row numbers;
   ``signature_bytes``: the signatures of rows in buckets of two or more), the rounds, and
   the per-task overhead of Prefect on Dask (``--overhead-tasks`` empty tasks).

Every build starts from an empty store and work folder (no task is reused). Usage::

    .venv/bin/python bench/scale.py [--rows 1000000] [--sources 4] [--s3-rows N]
    .venv/bin/python bench/scale.py --serial-share [--rows 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# `python bench/X.py` puts bench/ first on sys.path: put the repository there instead.
sys.path[:] = [str(REPO), str(REPO / "tests")] + [
    p for p in sys.path if Path(p).resolve() != Path(__file__).parent
]
SHARED = REPO.parent / "shared" / "data"

from bench import harness  # noqa: E402 (needs the path fixed above)


def _spec(folder: Path, files: list[Path], stages: list[dict], name: str) -> Path:
    import yaml

    spec = folder / f"{name}.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"name": name, "sources": [{"path": str(f)} for f in files], "stages": stages}
        )
    )
    return spec


def _build(spec: Path, store: str, runner: str, env: dict[str, str] | None = None) -> dict:
    """One build; ``runner`` is ``threads`` (the default), ``dask``, or ``serial`` (one
    thread: every task after the other, the single-core reference)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from pipelines.build import build_dataset
    from pipelines.runners import RunnerOptions, build_flow

    if runner == "serial":
        flow = build_dataset.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    else:
        flow = build_flow(RunnerOptions(runner=runner))
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        start = time.perf_counter()
        summary = flow(str(spec), store=store)
        summary["seconds"] = time.perf_counter() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return summary


def _same(a: str, b: str, name: str, options: dict[str, str] | None = None) -> bool:
    from storage.dataset import DatasetStore

    left = DatasetStore(a).read(name)
    right = DatasetStore(b, storage_options=options).read(name)
    return left.equals(right)


def _dask_startup() -> float:
    """Seconds to start the 2-worker LocalCluster ``--runner dask`` uses and import the
    pipeline on its workers: a fixed cost of every Dask build."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: __import__("pipelines.build"))
        return time.perf_counter() - start


FLOW_TASKS = ("ordered-segment", "commit")
"""Task runs that run in the flow's process (called, not submitted)."""


def serial_phases(flow_run_id: str) -> dict[str, float]:
    """Wall seconds of the build, of its flow-process tasks, and of the time no worker
    task ran (the union of the worker tasks' spans subtracted from the wall)."""
    runs, flow = harness.task_runs(flow_run_id)
    spans = [
        (r.name.rsplit("-", 1)[0], r.start_time.timestamp(), r.end_time.timestamp())
        for r in runs
        if r.start_time and r.end_time
    ]
    start, end = flow.start_time.timestamp(), flow.end_time.timestamp()
    covered, reach = 0.0, start
    for _, lo, hi in sorted((s for s in spans if s[0] not in FLOW_TASKS), key=lambda s: s[1]):
        lo = max(lo, reach)
        if hi > lo:
            covered, reach = covered + hi - lo, hi
    flow_tasks = sum(hi - lo for name, lo, hi in spans if name in FLOW_TASKS)
    wall = end - start
    return {
        "wall_s": round(wall, 2),
        "flow_tasks_s": round(flow_tasks, 2),
        "uncovered_s": round(wall - covered, 2),
        "serial_share": round(flow_tasks / wall, 3),
        "serial_share_uncovered": round((wall - covered) / wall, 3),
        "tasks": len(spans),
    }


def _serial_child(spec: str, store: str, partitions: int) -> dict:
    """One near-dedup build on a 2-worker LocalCluster (in a child process)."""
    from pipelines.runners import RunnerOptions, build_flow

    options = RunnerOptions(runner="dask", dask_workers=2, partitions=partitions)
    start = time.perf_counter()
    summary = build_flow(options)(spec, store)
    out = {"seconds": round(time.perf_counter() - start, 2), "train": summary["rows"]["train"]}
    out["digest"] = _digest(store, summary["name"])
    out.update(serial_phases(summary["build_id"]))
    out.update(harness.flow_phases(summary["build_id"]))
    scratch = list(Path(store).rglob("partitioned/*/p*"))
    if scratch:
        files = list(scratch[0].glob("scatter/*"))
        out["shuffle_bytes"] = sum(
            f.stat().st_size for f in files if f.suffixes[0] in (".keys", ".rows")
        )
        buckets = list(scratch[0].glob("buckets/p*/sigs.npy"))
        out["signature_bytes"] = sum(int(np.load(b, mmap_mode="r").nbytes) for b in buckets)
        out["rounds"] = len(list(scratch[0].glob("round-*/dropped.npy")))
    return out


def _digest(store: str, name: str) -> str:
    """SHA-256 of the version's train and rejected splits (Arrow IPC), to compare builds."""
    import hashlib

    import pyarrow as pa

    from storage.dataset import DatasetStore

    digest = hashlib.sha256()
    for split in ("train", "rejected"):
        table = DatasetStore(store).read(name, split)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()


def _overhead_child(tasks: int) -> dict:
    """Seconds per empty Prefect task on a 2-worker LocalCluster: ``tasks`` submitted at
    once, timed from the first submit to the last result (cluster start-up excluded)."""
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    @task
    def empty(i: int) -> int:
        return i

    @flow(
        task_runner=DaskTaskRunner(
            cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None}
        )
    )
    def many(n: int) -> float:
        empty.submit(-1).result()  # the workers are up
        start = time.perf_counter()
        futures = [empty.submit(i) for i in range(n)]
        assert [f.result() for f in futures] == list(range(n))
        return time.perf_counter() - start

    seconds = many(tasks)
    return {
        "tasks": tasks,
        "seconds": round(seconds, 2),
        "per_task_ms": round(1e3 * seconds / tasks, 1),
    }


def _serial_share(args: argparse.Namespace, tmp: Path) -> None:
    """Partitioned dedup against the ordered pass on the Dask runner, alternating."""
    from corpora import enlarged_gsm8k
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    per = args.rows // args.sources
    files = [
        enlarged_gsm8k(SHARED, tmp / f"gsm8k-{i}.jsonl", per, start=i * per)
        for i in range(args.sources)
    ]
    spec = _spec(tmp, files, [{"normalize": {}}, {"near_dedup": {}}], "serial-share")
    cases = {"ordered": 0, "partitioned": 4}
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    results: dict[str, object] = {
        "rows": per * args.sources,
        "sources": args.sources,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_before": os.getloadavg(),
    }
    script = str(Path(__file__).resolve())
    with prefect_test_harness(server_startup_timeout=180):
        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())  # for the children
        results["overhead"] = harness.run_child(script, "overhead", str(args.overhead_tasks))
        print("overhead", json.dumps(results["overhead"]), flush=True)
        for r in range(args.rounds):
            for name in list(cases)[:: 1 if r % 2 == 0 else -1]:
                store = tmp / f"{name}-{r}"
                run = harness.run_child(script, "serial", str(spec), str(store), str(cases[name]))
                shutil.rmtree(store, ignore_errors=True)
                runs[name].append(run)
                print(name, r, json.dumps(run), flush=True)
    for name, got in runs.items():
        results[name] = {
            key: statistics.median(run[key] for run in got)
            for key in got[0]
            if isinstance(got[0][key], int | float)
        }
    results["identical"] = len({run["digest"] for g in runs.values() for run in g}) == 1
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        kind, *rest = sys.argv[2:]
        if kind == "serial":
            out = _serial_child(rest[0], rest[1], int(rest[2]))
        else:
            out = _overhead_child(int(rest[0]))
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--s3-rows", type=int, default=None, help="default: --rows")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--skip-dedup", action="store_true", help="only ingest → normalize")
    parser.add_argument(
        "--serial-share", action="store_true", help="only the partitioned-dedup case (3.)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overhead-tasks", type=int, default=200)
    args = parser.parse_args()

    own_home = "PREFECT_HOME" not in os.environ
    if own_home:
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="bench-scale-prefect-")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        (_serial_share if args.serial_share else _measure)(args, tmp)
    finally:  # the corpora and stores of a 1M-row run take several GB
        shutil.rmtree(tmp, ignore_errors=True)
        if own_home:
            shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)


def _measure(args: argparse.Namespace, tmp: Path) -> None:
    """Build every case under ``tmp`` and print the results."""
    from corpora import enlarged_gsm8k
    from prefect.testing.utilities import prefect_test_harness
    from s3server import moto_s3

    per = args.rows // args.sources
    files = [
        enlarged_gsm8k(SHARED, tmp / f"gsm8k-{i}.jsonl", per, start=i * per)
        for i in range(args.sources)
    ]
    shard_level = [{"normalize": {}}]
    full = [{"normalize": {}}, {"near_dedup": {}}]
    results: dict[str, object] = {
        "rows": per * args.sources,
        "sources": args.sources,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_before": os.getloadavg(),
    }
    results["dask_startup_s"] = round(_dask_startup(), 1)
    plan = [("ingest_normalize", shard_level), ("with_near_dedup", full)]
    with prefect_test_harness(server_startup_timeout=180):
        for label, stages in plan[:1] if args.skip_dedup else plan:
            spec = _spec(tmp, files, stages, label.replace("_", "-"))
            threads = _build(spec, str(tmp / f"{label}-threads"), "threads")
            dask = _build(spec, str(tmp / f"{label}-dask"), "dask")
            serial = _build(spec, str(tmp / f"{label}-serial"), "serial")
            identical = _same(str(tmp / f"{label}-threads"), str(tmp / f"{label}-dask"), spec.stem)
            results[label] = {
                "threads_s": round(threads["seconds"], 1),
                "dask_s": round(dask["seconds"], 1),
                "serial_s": round(serial["seconds"], 1),
                "threads_phases_s": harness.flow_phases(threads["build_id"]),
                "dask_phases_s": harness.flow_phases(dask["build_id"]),
                "serial_phases_s": harness.flow_phases(serial["build_id"]),
                "speedup": round(threads["seconds"] / dask["seconds"], 2),
                "speedup_vs_serial": round(serial["seconds"] / dask["seconds"], 2),
                "train_rows": threads["rows"]["train"],
                "identical": identical,
            }
            print(label, json.dumps(results[label]), flush=True)
        if not args.skip_s3:
            rows = args.s3_rows or args.rows
            s3_files = (
                files
                if rows == args.rows
                else [enlarged_gsm8k(SHARED, tmp / "gsm8k-s3.jsonl", rows)]
            )
            spec = _spec(tmp, s3_files, full, "s3-cost")
            local = _build(spec, str(tmp / "s3-local"), "threads")
            with moto_s3(tmp / "moto.log", bucket="bench") as server:
                env = {**server.env(), "ALIGNCURATE_WORK": str(tmp / "s3-work")}
                remote = _build(spec, "s3://bench/store", "threads", env)
                identical = _same(
                    str(tmp / "s3-local"), "s3://bench/store", "s3-cost", server.env()
                )
            results["s3"] = {
                "rows": rows,
                "local_s": round(local["seconds"], 1),
                "s3_s": round(remote["seconds"], 1),
                "ratio": round(remote["seconds"] / local["seconds"], 2),
                "identical": identical,
            }
            print("s3", json.dumps(results["s3"]), flush=True)
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
