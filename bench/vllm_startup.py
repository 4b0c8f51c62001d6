"""Benchmark: vLLM on CPU with its engine core in a process of its own (vLLM's default) or in
the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, what ``engines.vllm_engine``
sets on CPU unless the variable is already set).

Each case is a fresh child process that starts ``VLLMEngine`` on the fact-world model
(max_model_len 512), generates 10 samples of up to 50 tokens for each of 300 fact-world
questions, and closes the engine. It reports the start-up, generation and close wall times,
the CPU seconds of the child and its processes (``wait4``), the largest peak RSS of any one of
them, and a SHA-256 of every sample text (the two modes must agree). Three rounds alternate
the order of the two cases; before each case the 1-minute load must be below 1.0 (the script
waits up to 3 minutes for it and records what it saw). Medians are printed for
docs/performance.md.

Usage: ``python bench/vllm_startup.py [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python bench/vllm_startup.py` puts bench/ first on sys.path, where bench/engines.py would
# shadow the `engines` package: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]

from bench import harness  # noqa: E402 (needs the path fixed above)

MODES = {"multiprocess": "1", "in_process": "0"}
PROMPTS = 300
FIELDS = ("start_s", "generate_s", "close_s", "cpu_s", "peak_rss_mib")


def child(mode: str) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = MODES[mode]
    from engines import Request, Sampling
    from engines.vllm_engine import VLLMEngine
    from examples.fact_world import session_fact_world

    world = session_fact_world()
    sampling = Sampling(n=10, temperature=1.0, max_tokens=50)
    requests = [
        Request(f"Question: {f['question']}\nAnswer:", sampling, i)
        for i, f in enumerate(world.facts()[:PROMPTS])
    ]
    t0 = time.perf_counter()
    engine = VLLMEngine(world.model_dir, max_model_len=512)
    engine.llm  # noqa: B018 - loading is what is timed
    t1 = time.perf_counter()
    outputs = engine.generate(requests)
    t2 = time.perf_counter()
    engine.close()
    t3 = time.perf_counter()
    digest = hashlib.sha256(json.dumps([[s.text for s in o] for o in outputs]).encode())
    return {
        "start_s": round(t1 - t0, 2),
        "generate_s": round(t2 - t1, 2),
        "close_s": round(t3 - t2, 2),
        "samples_sha256": digest.hexdigest(),
    }


def run_case(mode: str) -> dict:
    return harness.run_child(__file__, mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for i in range(args.rounds):
        order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
        for mode in order:
            runs[mode].append(run_case(mode))
    digests = {r["samples_sha256"] for rs in runs.values() for r in rs}
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "identical_samples": len(digests) == 1,
        "runs": runs,
        "median": {
            m: {f: statistics.median(r[f] for r in rs) for f in FIELDS} for m, rs in runs.items()
        },
    }
    print(json.dumps(report, indent=2))
    print("\n| engine core | start (s) | 300 × 10 samples (s) | close (s) | CPU (s) | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, med in report["median"].items():
        print(
            f"| {mode} | {med['start_s']} | {med['generate_s']} | {med['close_s']} "
            f"| {med['cpu_s']} | {med['peak_rss_mib']} MiB |"
        )
    if not report["identical_samples"]:
        sys.exit("the two modes gave different samples")


if __name__ == "__main__":
    main()
