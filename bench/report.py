"""Benchmark: the HTML report and ``inspect`` of a large version against reading it whole.

Builds a version (1M rows by default) from the shared Alpaca corpora with
``bench/ingest.py``'s corpus and pipeline (ingest, exact dedup, one Delta commit), then
times, each in its own child process (so peak RSS is its own):

- ``baseline``: ``DatasetStore.read`` of both splits into one Arrow table, then
  ``transforms.profile.profile`` over it (what ``aligncurate inspect`` did before it
  streamed);
- ``report``: ``write_report`` (one streamed pass per split; no diff, as for a first
  version), which also draws the plots and writes the page;
- ``inspect``: ``aligncurate inspect NAME --json`` in-process (the same profile, streamed
  over ``DatasetStore.batches``).

Usage: ``python bench/report.py [--rows 1000000]``. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python bench/report.py` puts bench/ first on sys.path, where bench/engines.py would shadow
# the `engines` package: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]

from bench import harness  # noqa: E402 (needs the path fixed above)


def child_build(work: Path, rows: str) -> dict:
    from bench.ingest import child_pipeline, make_corpus

    corpus = work / "corpus.jsonl"
    make_corpus(corpus, int(rows))
    result = child_pipeline(corpus, work)
    corpus.unlink()
    return result


def child_baseline(work: Path, _: str) -> dict:
    from storage.dataset import DatasetStore
    from transforms.profile import profile

    t0 = time.perf_counter()
    table = DatasetStore(str(work / "store")).read("bench", split=None)
    summary = profile(table)
    return {"seconds": time.perf_counter() - t0, "rows": summary["rows"]}


def child_report(work: Path, _: str) -> dict:
    from pipelines.report import write_report
    from storage.dataset import DatasetStore

    t0 = time.perf_counter()
    result = write_report(DatasetStore(str(work / "store")), "bench", work / "report", diff=False)
    return {
        "seconds": time.perf_counter() - t0,
        "rows": sum(result.rows.values()),
        "page_kib": round(result.bytes / 1024, 1),
    }


def child_inspect(work: Path, _: str) -> dict:
    from typer.testing import CliRunner

    from pipelines.cli import app

    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["inspect", "bench", "--store", str(work / "store"), "--json"])
    assert result.exit_code == 0, result.output
    return {"seconds": time.perf_counter() - t0, "rows": json.loads(result.stdout)["rows"]}


CHILDREN = {
    "build": child_build,
    "baseline": child_baseline,
    "report": child_report,
    "inspect": child_inspect,
}


def run_child(kind: str, work: Path, rows: int) -> dict:
    """Run one measurement in a fresh process; add its peak RSS from wait4."""
    return harness.run_child(__file__, kind, str(work), str(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "WORK", "ROWS"))
    args = parser.parse_args()
    if args.child:
        kind, work, rows = args.child
        print(json.dumps(CHILDREN[kind](Path(work), rows)))
        return
    with tempfile.TemporaryDirectory(prefix="aligncurate-bench-report-") as tmp:
        work = Path(tmp)
        build = run_child("build", work, args.rows)
        results = {k: run_child(k, work, args.rows) for k in ("baseline", "report", "inspect")}
    base, report, inspect = results["baseline"], results["report"], results["inspect"]
    print(
        json.dumps(
            {
                "rows": args.rows,
                "version_rows": report["rows"],
                "build_seconds": round(build["seconds"], 1),
                "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, Python {platform.python_version()}",
                "results": results,
                "time_ratio_report_vs_baseline": round(report["seconds"] / base["seconds"], 3),
                "rss_ratio_report_vs_baseline": round(
                    report["peak_rss_mib"] / base["peak_rss_mib"], 3
                ),
                "time_ratio_inspect_vs_baseline": round(inspect["seconds"] / base["seconds"], 3),
                "rss_ratio_inspect_vs_baseline": round(
                    inspect["peak_rss_mib"] / base["peak_rss_mib"], 3
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
