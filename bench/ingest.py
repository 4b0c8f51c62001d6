"""Benchmark: ingest → normalise → exact dedup → filter → Delta commit, against streaming pyarrow.

Builds a JSONL corpus (1M rows by default) from the shared Alpaca corpora with about 10%
exact duplicates, then times, each case in its own child process (``bench.harness``: peak
RSS and CPU seconds are its own), ``--rounds`` rounds (3) in alternating order, medians:

- ``streaming`` (**the anchor**): ``pyarrow.json.open_json`` (16 MiB blocks) streamed into
  ``pyarrow.parquet.ParquetWriter`` (zstd) on the same file;
- ``read_json``: ``pyarrow.json.read_json`` + ``pyarrow.parquet.write_table`` (the whole
  file in memory; the baseline before issue #17);
- ``streaming_1mib``: the anchor with 1 MiB blocks (slower, in far less memory);
- ``pipeline``: the build's tasks run directly (no Prefect): ingest with the default
  chain, dedup + filter, one Delta commit;
- ``flow``: the same through the Prefect flow ``build_dataset`` against a running Prefect
  server (started first, its start-up reported apart), which adds task orchestration,
  the build summary's statistics, the Prefect artifacts and the HTML report of the version.

Usage: ``python bench/ingest.py [--rows 1000000] [--rounds 3] [--skip-flow] [--json]
[--cases streaming,pipeline]``
prints a JSON report (``pipeline_vs_streaming``: the anchor's median seconds over the
pipeline's; ``peak_rss_mib``: the pipeline's median peak) and markdown rows; with
``--json`` only one JSON object on stdout (progress goes to stderr). ``--phases`` instead
runs the pipeline once on one shard thread and prints its CPU seconds, wall seconds and
peak RSS per phase (parse, assemble, ids, normalize, exact dedup, filter, shard writes and
reads, commit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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


def child_streaming(corpus: Path, work: Path, block_bytes: int = 16 << 20) -> dict:
    """The anchor: ``pyarrow.json.open_json`` (streaming, ``block_bytes`` blocks) into
    ``pyarrow.parquet.ParquetWriter`` (zstd), batch by batch."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    reader = pj.open_json(corpus, read_options=pj.ReadOptions(block_size=block_bytes))
    rows = 0
    with pq.ParquetWriter(work / "streaming.parquet", reader.schema, compression="zstd") as out:
        for batch in reader:
            out.write_batch(batch)
            rows += batch.num_rows
    return {"seconds": time.perf_counter() - t0, "rows": rows}


def child_streaming_1mib(corpus: Path, work: Path) -> dict:
    """The anchor with 1 MiB blocks: slower, in far less memory."""
    return child_streaming(corpus, work, 1 << 20)


def child_read_json(corpus: Path, work: Path) -> dict:
    """The whole file at once: ``pyarrow.json.read_json`` + ``pyarrow.parquet.write_table``."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    table = pj.read_json(corpus)
    pq.write_table(table, work / "read_json.parquet")
    return {"seconds": time.perf_counter() - t0, "rows": table.num_rows}


def _spec(corpus: Path, work: Path) -> Path:
    spec = work / "spec.yaml"
    spec.write_text(f"name: bench\nsources:\n  - path: {corpus}\n")
    return spec


def child_pipeline(corpus: Path, work: Path) -> dict:
    """The build's own task functions, no Prefect: the source's fingerprint, ingest (with
    normalize; it checks the bytes it reads against the fingerprint), the ordered segment
    (exact dedup + filter), one Delta commit: the work of a build."""
    from pipelines.build import ingest_source, run_segment
    from pipelines.fingerprint import file_fingerprint
    from pipelines.parallel import shard_threads
    from pipelines.segments import ChainStep, content_ids, split_segments
    from pipelines.spec import load_spec
    from storage.dataset import DatasetStore
    from transforms.registry import StageContext

    spec = load_spec(_spec(corpus, work))
    segments = split_segments([ChainStep.of(s.name, s.params) for s in spec.stages])
    t0 = time.perf_counter()
    source = spec.sources[0]
    fingerprint = file_fingerprint(source.path)  # as the flow does: hashed, then checked
    last = len(segments) == 1
    first = ingest_source.fn(
        "k0", source, spec.ingest, segments[0], str(work / "s0"), fingerprint, last
    )
    outputs = [first]
    train = first.train
    for i, chain in enumerate(segments[1:], 1):
        context = StageContext(work=work / "stages", cache_dir=work / "cache")
        last = i == len(segments) - 1
        ids = content_ids(len(spec.sources), segments, i)  # as the flow decides it
        out = run_segment.fn(f"k{i}", train, chain, str(work / f"s{i}"), context, None, last, ids)
        outputs.append(out)
        train = out.train
    rejected = [p for o in outputs for p in o.rejected]
    store = DatasetStore(str(work / "store"))
    # the flow's commit task writes with the shard threads (pipelines.build.commit_version)
    store.commit("bench", train, rejected, {"bench": True}, threads=shard_threads())
    seconds = time.perf_counter() - t0
    rows = store.versions("bench")[-1]
    return {
        "seconds": seconds,
        "rows": first.counts["ingest"]["in"],
        "version": rows.version,
        "counts": {k: v for o in outputs for k, v in o.counts.items()},
    }


class PhaseClock:
    """Exclusive CPU and wall seconds per phase: each wrapped call (or ``next`` of a wrapped
    generator) is charged to its phase, less the wrapped calls nested in it; the rest goes
    to ``other``. Process CPU (``time.process_time``, Arrow's threads included) is only
    attributable when one thread does the work: the phases child runs the shard work on
    one thread (``ALIGNCURATE_SHARD_THREADS=1``)."""

    def __init__(self) -> None:
        self.stack = ["other"]
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.last = (time.process_time(), time.perf_counter())
        self.rss: dict[str, float] = {}
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self) -> None:
        """The resident set size every 5 ms, its peak charged to the running phase."""
        page = os.sysconf("SC_PAGE_SIZE") / 2**20
        with open("/proc/self/statm") as statm:
            while True:
                statm.seek(0)
                rss = int(statm.read().split()[1]) * page
                top = self.stack[-1]
                self.rss[top] = max(self.rss.get(top, 0.0), rss)
                time.sleep(0.005)

    def _switch(self, push: str | None) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        top = self.stack[-1]
        self.cpu[top] = self.cpu.get(top, 0.0) + cpu - self.last[0]
        self.wall[top] = self.wall.get(top, 0.0) + wall - self.last[1]
        self.last = (cpu, wall)
        if push is None:
            self.stack.pop()
        else:
            self.stack.append(push)

    def call(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._switch(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._switch(None)

        return timed

    def generator(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            items = self.call(name, fn)(*args, **kwargs)
            step = self.call(name, next)
            while True:
                try:
                    yield step(items)
                except StopIteration:
                    return

        return timed

    def patch(self, owner: Any, attribute: str, name: str, *, generator: bool = False) -> None:
        wrap = self.generator if generator else self.call
        setattr(owner, attribute, wrap(name, getattr(owner, attribute)))


def child_phases(corpus: Path, work: Path) -> dict:
    """The pipeline on one shard thread, its CPU and wall seconds split by phase."""
    os.environ["ALIGNCURATE_SHARD_THREADS"] = "1"
    import pipelines.fingerprint as fingerprint
    import pipelines.segments as segments
    import storage.dataset as dataset
    import transforms.dedup as dedup
    import transforms.ingest.alpaca as alpaca
    import transforms.ingest.results as results
    import transforms.ingest.source as source
    import transforms.normalize as normalize
    from pipelines.stages import stage

    clock = PhaseClock()
    clock.patch(fingerprint, "file_fingerprint", "fingerprint (hash the source)")
    clock.patch(source, "iter_pieces", "parse (read, chunk, Arrow JSON)", generator=True)
    for name in ("from_columns", "build"):
        clock.patch(alpaca, name, "assemble (field checks, prompts)")
    for owner, name in ((results, "row_ids"), (results, "position_ids"), (normalize, "row_ids")):
        clock.patch(owner, name, "ids (XXH3-128 of source, prompt, response)")
    clock.patch(dedup, "content_key_words", "exact dedup: key hashing")
    for name, phase in (
        ("normalize", "normalize"),
        ("exact_dedup", "exact dedup: key set, splits"),
        ("filter", "filter (rule splits)"),
    ):
        definition = stage(name)
        object.__setattr__(definition, "run", clock.call(phase, definition.run))
    clock.patch(segments.ShardWriter, "_write", "shard writes")
    clock.patch(segments, "read_shards", "shard reads", generator=True)
    clock.patch(dataset.DatasetStore, "commit", "commit (Delta data files + log)")
    result = child_pipeline(corpus, work)
    clock._switch("other")
    order = sorted(clock.cpu, key=lambda k: -clock.cpu[k])
    result["phases"] = {
        k: {
            "cpu_s": round(clock.cpu[k], 2),
            "wall_s": round(clock.wall[k], 2),
            "peak_rss_mib": round(clock.rss.get(k, 0.0)),
        }
        for k in order
    }
    return result


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


CHILDREN = {
    "streaming": child_streaming,
    "read_json": child_read_json,
    "streaming_1mib": child_streaming_1mib,
    "pipeline": child_pipeline,
    "flow": child_flow,
    "phases": child_phases,
}
ANCHOR = "streaming"


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the report)."""
    print(message, file=sys.stderr, flush=True)


def run_child(kind: str, corpus: Path, work: Path, round_: int) -> dict:
    """Run one measurement in a fresh process; add its peak RSS, CPU and throughput."""
    folder = work / f"{kind}-{round_}"
    folder.mkdir()
    result = harness.run_child(__file__, kind, str(corpus), str(folder))
    result["rows_per_s"] = round(result["rows"] / result["seconds"])
    shutil.rmtree(folder, ignore_errors=True)  # the next case's disk and page cache
    log(
        f"round {round_ + 1} {kind}: {result['seconds']:.2f} s, "
        f"{result['peak_rss_mib']:.0f} MiB, {result['cpu_s']} CPU-s"
    )
    return result


def summarise(runs: list[dict]) -> dict:
    """Medians (and ranges) of one case's rounds."""
    keys = ("seconds", "peak_rss_mib", "cpu_s")
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    out["seconds_range"] = [
        round(min(r["seconds"] for r in runs), 3),
        round(max(r["seconds"] for r in runs), 3),
    ]
    out["peak_rss_mib_range"] = [
        min(r["peak_rss_mib"] for r in runs),
        max(r["peak_rss_mib"] for r in runs),
    ]
    out["rows_per_s"] = round(runs[0]["rows"] / out["seconds"])
    return out


def phase_table(phases: dict[str, dict[str, float]]) -> str:
    """The phases as a markdown table."""
    total = sum(p["cpu_s"] for p in phases.values())
    lines = ["| phase | CPU s | share | wall s | peak RSS in it |", "|---|---:|---:|---:|---:|"]
    for name, p in phases.items():
        lines.append(
            f"| {name} | {p['cpu_s']:.2f} | {p['cpu_s'] / total:.0%} | {p['wall_s']:.2f} "
            f"| {p['peak_rss_mib']:,} MiB |"
        )
    lines.append(f"| total | {total:.2f} | | {sum(p['wall_s'] for p in phases.values()):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "CORPUS", "WORK"))
    parser.add_argument("--skip-flow", action="store_true", help="leave out the Prefect flow")
    parser.add_argument(
        "--cases",
        default="streaming,read_json,streaming_1mib,pipeline,flow",
        help="comma-separated cases to run (the ratio needs streaming and pipeline)",
    )
    parser.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    parser.add_argument(
        "--phases", action="store_true", help="only the pipeline's CPU seconds per phase"
    )
    args = parser.parse_args()
    if args.child:
        kind, corpus, work = args.child
        print(json.dumps(CHILDREN[kind](Path(corpus), Path(work))))
        return
    wanted = args.cases.split(",")
    cases = (
        ["phases"]
        if args.phases
        else [k for k in wanted if k in CHILDREN and not (k == "flow" and args.skip_flow)]
    )
    rounds = 1 if args.phases else args.rounds
    with tempfile.TemporaryDirectory(prefix="aligncurate-bench-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        make_corpus(corpus, args.rows)
        size_mib = corpus.stat().st_size / 2**20
        log(f"corpus: {args.rows} rows, {size_mib:.1f} MiB")
        runs: dict[str, list[dict]] = {k: [] for k in cases}
        for r in range(rounds):  # alternate the order: no case always runs first
            for kind in cases if r % 2 == 0 else reversed(cases):
                runs[kind].append(run_child(kind, corpus, work, r))
    report: dict[str, Any] = {
        "rows": args.rows,
        "corpus_mib": round(size_mib, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "rounds": rounds,
    }
    if args.phases:
        report["phases"] = runs["phases"][0]["phases"]
        report["phases_markdown"] = phase_table(report["phases"])
        report["counts"] = runs["phases"][0]["counts"]
    else:
        medians = {k: summarise(v) for k, v in runs.items()}
        report["cases"] = medians
        anchor = medians[ANCHOR]["seconds"] if ANCHOR in medians else None
        if "pipeline" in medians:
            pipeline = medians["pipeline"]["seconds"]
            report["peak_rss_mib"] = medians["pipeline"]["peak_rss_mib"]
            report["peak_rss_mib_max"] = medians["pipeline"]["peak_rss_mib_range"][1]
            report["counts"] = runs["pipeline"][0]["counts"]
            if anchor:
                report["pipeline_vs_streaming"] = round(anchor / pipeline, 3)
            if "read_json" in medians:
                report["pipeline_vs_read_json"] = round(
                    medians["read_json"]["seconds"] / pipeline, 3
                )
        if "flow" in medians and anchor:
            report["flow_vs_streaming"] = round(anchor / medians["flow"]["seconds"], 3)
            report["flow_phases_s"] = runs["flow"][-1]["phases_s"]
    print(json.dumps(report, indent=None if args.json else 2))
    if not args.json:
        print(phase_table(report["phases"]) if args.phases else markdown(report))


def markdown(report: dict) -> str:
    """The medians as rows for docs/performance.md."""
    lines = [
        f"| {report['rows']:,} rows ({report['corpus_mib']} MiB), median of {report['rounds']} "
        "| seconds | rows/s | vs streaming | peak RSS | CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    anchor = report["cases"].get(ANCHOR, {}).get("seconds")
    for name, case in report["cases"].items():
        ratio = f"{anchor / case['seconds']:.2f}" if anchor else "-"
        lines.append(
            f"| {name} | {case['seconds']:.2f} | {case['rows_per_s']:,} | {ratio} "
            f"| {case['peak_rss_mib']:,.0f} MiB | {case['cpu_s']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
