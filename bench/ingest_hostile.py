"""Benchmark: peak memory of hostile JSON input (issue #15), which must stay under 500 MiB.

Cases (written to a temporary folder):

- ``deep_json_400kb``: a 400 KB JSON file, ``[`` × 200,000 then ``]`` × 200,000 (a build of
  it reached 22 GB resident before the bounds);
- ``deep_json_40kb``: ``[`` × 20,000 then ``]`` × 20,000 (ijson alone took about 1 GB);
- ``deep_jsonl``: 1,000 JSON lines, each an Alpaca record whose ``output`` nests 5,000 deep,
  then 1,000 good records.

Each case runs twice, each run in its own child process so that its peak RSS is its own:
``ingest`` reads the file with ``read_source`` to the end; ``build`` runs the real
``aligncurate build --json`` CLI on a one-source spec (an ephemeral Prefect server, its own
child process, is included in the peak when it is the larger).

Usage: ``python bench/ingest_hostile.py``. Prints a JSON report and markdown rows for
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python bench/ingest_hostile.py` puts bench/ first on sys.path, where bench/engines.py
# would shadow the `engines` package: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]

from bench import harness  # noqa: E402 (needs the path fixed above)

LIMIT_MIB = 500
GOOD = b'{"instruction": "What is 2 + 2?", "output": "4"}\n'


def deep_record(depth: int) -> bytes:
    return b'{"instruction": "x", "output": ' + b"[" * depth + b"]" * depth + b"}\n"


CASES = {
    "deep_json_400kb": ("deep.json", lambda: b"[" * 200_000 + b"]" * 200_000),
    "deep_json_40kb": ("deep40.json", lambda: b"[" * 20_000 + b"]" * 20_000),
    "deep_jsonl": ("deep.jsonl", lambda: deep_record(5_000) * 1_000 + GOOD * 1_000),
}


def child_ingest(path: Path) -> dict:
    from transforms.ingest import read_source

    t0 = time.perf_counter()
    results = list(read_source(path))
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "rows_read": sum(r.stats["rows_read"] for r in results),
        "reject_reasons": {
            reason: sum(r.stats["reject_reasons"].get(reason, 0) for r in results)
            for reason in {k for r in results for k in r.stats["reject_reasons"]}
        },
    }


def run_build(path: Path, work: Path) -> dict:
    """The real CLI in a child process: exit code, summary rows, wall time and peak RSS."""
    spec = work / f"{path.stem}.yaml"
    spec.write_text(json.dumps({"name": path.stem, "sources": [{"path": str(path)}]}))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "DO_NOT_TRACK": "1"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    exe = Path(sys.executable).with_name("aligncurate")
    t0 = time.perf_counter()
    command = [str(exe), "build", str(spec), "--store", str(work / "store"), "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    summary = json.loads(out) if status == 0 else {}
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "exit_status": os.waitstatus_to_exitcode(status),
        "rows": summary.get("rows"),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_ingest(Path(args.child[1]))))
        return
    report: dict = {"machine": machine(), "limit_mib": LIMIT_MIB, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        work = Path(tmp)
        for case, (name, make) in CASES.items():
            path = work / name
            path.write_bytes(make())
            report["cases"][case] = {
                "file_bytes": path.stat().st_size,
                "ingest": harness.run_child(__file__, "ingest", str(path)),
                "build": run_build(path, work),
            }
    print(json.dumps(report, indent=2))
    print("\n| case | file | ingest: peak RSS, s | build (CLI): exit, peak RSS, s | rejected |")
    print("|---|---:|---:|---:|---|")
    for case, r in report["cases"].items():
        ingest, build = r["ingest"], r["build"]
        print(
            f"| {case} | {r['file_bytes'] / 1000:,.0f} KB "
            f"| {ingest['peak_rss_mib']} MiB, {ingest['seconds']} s "
            f"| {build['exit_status']}, {build['peak_rss_mib']} MiB, {build['seconds']} s "
            f"| {ingest['reject_reasons']} |"
        )
    peaks = [r[k]["peak_rss_mib"] for r in report["cases"].values() for k in ("ingest", "build")]
    if max(peaks) >= LIMIT_MIB:
        sys.exit(f"peak RSS {max(peaks)} MiB is not under {LIMIT_MIB} MiB")


if __name__ == "__main__":
    main()
