"""Benchmark: ingest → normalise → exact dedup → filter → Delta commit, against raw pyarrow.

Builds a JSONL corpus (1M rows by default) from the shared Alpaca corpora with about 10%
exact duplicates, then times, each in its own child process (so peak RSS is its own):

- ``baseline``: ``pyarrow.json.read_json`` + ``pyarrow.parquet.write_table`` of the file;
- ``pipeline``: the build's tasks run directly (no Prefect): ingest with the default
  chain, dedup + filter, one Delta commit;
- ``flow``: the same through the Prefect flow ``build_dataset`` against a running Prefect
  server (started first, its start-up reported apart), which adds task orchestration,
  the build summary's statistics, the Prefect artifacts and the HTML report of the version.

Usage: ``python bench/ingest.py [--rows 1000000] [--keep DIR]``. Prints a JSON report and
a markdown row for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python bench/ingest.py` puts bench/ first on sys.path, where bench/engines.py would shadow
# the `engines` package: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]

from bench import harness  # noqa: E402 (needs the path fixed above)

SHARED = REPO.parent / "shared" / "data"
CORPORA = [
    "instructions/gsm8k_train_alpaca.json",
    "instructions/gpteacher_roleplay.json",
    "instructions/gpteacher_toolformer.json",
    "safety/safety_only_data_Instructions.json",
]


def make_corpus(path: Path, rows: int, dup_fraction: float = 0.1, seed: int = 0) -> int:
    """Write ``rows`` Alpaca JSONL rows: distinct variants of the shared rows, plus duplicates."""
    base = [r for name in CORPORA for r in json.loads((SHARED / name).read_text())]
    rng = random.Random(seed)
    distinct = int(rows * (1 - dup_fraction))
    written: list[str] = []
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            if i < distinct or not written:
                r = base[i % len(base)]
                variant = i // len(base)
                rec = {
                    "instruction": r["instruction"]
                    if variant == 0
                    else f"{r['instruction']} (variant {variant})",
                    "input": r.get("input", ""),
                    "output": r["output"],
                }
                line = json.dumps(rec, ensure_ascii=False)
                if len(written) < 200_000:
                    written.append(line)
            else:
                line = rng.choice(written)
            out.write(line + "\n")
    return rows


def child_baseline(corpus: Path, work: Path) -> dict:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    table = pj.read_json(corpus)
    pq.write_table(table, work / "baseline.parquet")
    return {"seconds": time.perf_counter() - t0, "rows": table.num_rows}


def _spec(corpus: Path, work: Path) -> Path:
    spec = work / "spec.yaml"
    spec.write_text(f"name: bench\nsources:\n  - path: {corpus}\n")
    return spec


def child_pipeline(corpus: Path, work: Path) -> dict:
    from pipelines.build import ingest_source, run_segment
    from pipelines.segments import ChainStep, split_segments
    from pipelines.spec import load_spec
    from storage.dataset import DatasetStore
    from transforms.registry import StageContext

    spec = load_spec(_spec(corpus, work))
    segments = split_segments([ChainStep.of(s.name, s.params) for s in spec.stages])
    t0 = time.perf_counter()
    first = ingest_source.fn("k0", spec.sources[0], spec.ingest, segments[0], str(work / "s0"))
    outputs = [first]
    train = first.train
    for i, chain in enumerate(segments[1:], 1):
        context = StageContext(work=work / "stages", cache_dir=work / "cache")
        out = run_segment.fn(f"k{i}", train, chain, str(work / f"s{i}"), context)
        outputs.append(out)
        train = out.train
    rejected = [p for o in outputs for p in o.rejected]
    store = DatasetStore(str(work / "store"))
    store.commit("bench", train, rejected, {"bench": True})
    seconds = time.perf_counter() - t0
    rows = store.versions("bench")[-1]
    return {
        "seconds": seconds,
        "rows": first.counts["ingest"]["in"],
        "version": rows.version,
        "counts": {k: v for o in outputs for k, v in o.counts.items()},
    }


def child_flow(corpus: Path, work: Path) -> dict:
    """The build through Prefect, against a running server (as with ``PREFECT_API_URL``
    or docker-compose): the server's start-up is timed apart, not in ``seconds``."""
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.build import build_dataset

    spec = _spec(corpus, work)
    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180):
        server = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = build_dataset(str(spec), store=str(work / "flowstore"))
        seconds = time.perf_counter() - t0
        phases = harness.flow_phases(summary["build_id"])
    return {
        "seconds": seconds,
        "server_startup_s": round(server, 1),
        "rows": summary["rows"]["in"],
        "train": summary["rows"]["train"],
        "rejected": summary["rows"]["rejected"],
        "phases_s": phases,
        "outside_tasks_s": round(seconds - sum(phases.values()), 1),
    }


CHILDREN = {"baseline": child_baseline, "pipeline": child_pipeline, "flow": child_flow}


def run_child(kind: str, corpus: Path, work: Path) -> dict:
    """Run one measurement in a fresh process; add its peak RSS and throughput."""
    folder = work / kind
    folder.mkdir()
    result = harness.run_child(__file__, kind, str(corpus), str(folder))
    result["rows_per_s"] = round(result["rows"] / result["seconds"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "CORPUS", "WORK"))
    parser.add_argument("--skip-flow", action="store_true")
    args = parser.parse_args()
    if args.child:
        kind, corpus, work = args.child
        print(json.dumps(CHILDREN[kind](Path(corpus), Path(work))))
        return
    with tempfile.TemporaryDirectory(prefix="aligncurate-bench-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        make_corpus(corpus, args.rows)
        size_mib = corpus.stat().st_size / 2**20
        results = {
            k: run_child(k, corpus, work) for k in CHILDREN if not (k == "flow" and args.skip_flow)
        }
    base = results["baseline"]["seconds"]
    report = {
        "rows": args.rows,
        "corpus_mib": round(size_mib, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "results": results,
        "ratio_pipeline_vs_baseline": round(base / results["pipeline"]["seconds"], 3),
    }
    if "flow" in results:
        report["ratio_flow_vs_baseline"] = round(base / results["flow"]["seconds"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
