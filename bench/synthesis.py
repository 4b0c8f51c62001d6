"""Benchmark: the Self-Instruct ROUGE-L novelty filter, and one Self-Instruct round on vLLM.

1. **Novelty filter** (:mod:`transforms.synthesis.rouge`). A pool of ``--pool`` (20,000)
   instructions from the shared corpora (GSM8K, GPTeacher roleplay and toolformer, the
   safety set, the 175 seeds; exact duplicates removed, shuffled with a fixed seed), then
   ``--candidates`` new instructions checked one after the other as a Self-Instruct round
   does (a kept candidate joins the pool): half held-out corpus instructions, half near
   copies of pool instructions (one word dropped), so both decisions occur.
   - ``plain``: the authors' loop, ``RougeScorer(["rougeL"]).score(candidate, other)`` for
     every pool entry, the maximum decides (``>= 0.7`` rejects);
   - ``index``: :class:`NoveltyIndex` (built once over the pool, timed separately), then
     ``check`` + ``add``.
   The decisions and the maximum scores of rejected candidates must agree exactly. Also
   timed: the index filtering the whole pool against itself (20,000 sequential checks),
   with the plain loop's time for that estimated from its measured cost per pair.
2. **Generation** (``--skip-generation`` to leave out): one Self-Instruct round of
   ``--requests`` prompts from the demo seed file on the fact-world model (the stage's own
   request builder, sampling 0.7 / 0.5, per-request seeds), through our layer
   (``pipelines.self_instruct.bootstrap``: ``CachedEngine`` on a fresh cache, parsing and
   filters included) against one bare ``vllm.LLM.generate`` call with the same token ids
   and ``SamplingParams`` on the same ``LLM`` instance, alternating order ``--repeats``
   times; then the round again on the filled cache (no engine call).

Usage: ``python bench/synthesis.py [--pool 20000] [--candidates 16] [--requests 256]
[--out report.json]``. Prints a JSON report (after vLLM's own log lines).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# `python bench/X.py` puts bench/ first on sys.path: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]

SHARED = REPO.parent / "shared" / "data"
CORPORA = (
    "instructions/gsm8k_train_alpaca.json",
    "instructions/gpteacher_roleplay.json",
    "instructions/gpteacher_toolformer.json",
    "safety/safety_only_data_Instructions.json",
)
THRESHOLD = 0.7


def machine() -> dict[str, Any]:
    import psutil

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def instructions() -> list[str]:
    """Every instruction of the shared corpora and seeds, cleaned as Self-Instruct lists
    them, exact duplicates removed, in a fixed shuffled order."""
    from transforms.synthesis.self_instruct import clean_instruction, load_seed_tasks

    texts = [
        t.instruction for t in load_seed_tasks(SHARED / "seeds/self_instruct_seed_tasks.jsonl")
    ]
    for name in CORPORA:
        texts += [r["instruction"] for r in json.loads((SHARED / name).read_text())]
    unique = list(dict.fromkeys(clean_instruction(t) for t in texts if t.strip()))
    random.Random(0).shuffle(unique)
    return unique


def novelty(pool_size: int, n_candidates: int) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    from transforms.synthesis.rouge import NoveltyIndex

    texts = instructions()
    if len(texts) < pool_size + n_candidates:
        raise SystemExit(f"only {len(texts)} distinct instructions for the pool and candidates")
    pool, held_out = texts[:pool_size], texts[pool_size:]
    rng = random.Random(1)
    candidates = []
    for i in range(n_candidates):
        if i % 2:
            words = rng.choice(pool).split()
            if len(words) > 4:
                del words[rng.randrange(len(words))]
            candidates.append(" ".join(words))
        else:
            candidates.append(held_out[i])

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    start = time.perf_counter()
    plain_pool, plain = list(pool), []
    pairs = 0
    for text in candidates:
        best = max(scorer.score(text, other)["rougeL"].fmeasure for other in plain_pool)
        pairs += len(plain_pool)
        plain.append(best)
        if best < THRESHOLD:
            plain_pool.append(text)
    plain_s = time.perf_counter() - start

    start = time.perf_counter()
    index = NoveltyIndex(THRESHOLD)
    index.extend(pool)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    fast = []
    for text in candidates:
        match = index.check(text)
        fast.append(match.score if match else None)
        if match is None:
            index.add(text)
    check_s = time.perf_counter() - start

    decisions_agree = all(
        (p >= THRESHOLD) == (f is not None) for p, f in zip(plain, fast, strict=True)
    )
    scores_agree = all(f is None or f == p for p, f in zip(plain, fast, strict=True))

    start = time.perf_counter()
    self_index = NoveltyIndex(THRESHOLD)
    kept = 0
    for text in pool:
        if self_index.check(text) is None:
            self_index.add(text)
            kept += 1
    self_s = time.perf_counter() - start
    per_pair = plain_s / pairs
    return {
        "pool": pool_size,
        "candidates": n_candidates,
        "rejected": sum(p >= THRESHOLD for p in plain),
        "decisions_agree": decisions_agree,
        "max_scores_of_rejected_agree": scores_agree,
        "plain_s": round(plain_s, 2),
        "plain_us_per_pair": round(per_pair * 1e6, 1),
        "index_build_s": round(build_s, 3),
        "index_check_s": round(check_s, 4),
        "index_ms_per_candidate": round(check_s / n_candidates * 1e3, 3),
        "speedup_check": round(plain_s / check_s, 1),
        "speedup_incl_build": round(plain_s / (check_s + build_s), 1),
        "pool_self_filter": {
            "instructions": pool_size,
            "kept": kept,
            "index_s": round(self_s, 2),
            "plain_estimate_s": round(per_pair * pool_size * (pool_size - 1) / 2, 0),
        },
    }


def generation(n_requests: int, repeats: int) -> dict[str, Any]:
    from engines.cached import CachedEngine
    from engines.vllm_engine import VLLMEngine, sampling_params
    from examples.fact_world import session_fact_world
    from pipelines.self_instruct import SelfInstructParams, bootstrap, round_requests
    from storage.gencache import GenerationCache
    from transforms.synthesis.self_instruct import load_seed_tasks

    world = session_fact_world()
    params = SelfInstructParams(
        model=str(world.model_dir),
        seeds_path=str(REPO / "examples" / "synthesis" / "seeds.jsonl"),
        chat_template=False,
        requests_per_round=n_requests,
        max_rounds=1,
        max_tokens=128,
    )
    seeds = load_seed_tasks(params.seeds_path)
    requests = [r for r, _, _ in round_requests(params, seeds, [], 0)]
    engine = VLLMEngine(world.model_dir, max_model_len=512)
    start = time.perf_counter()
    llm = engine.llm
    startup_s = time.perf_counter() - start
    try:
        prompts = [engine._prompt(r.prompt) for r in requests]
        sampling = [sampling_params(r) for r in requests]
        llm.generate(prompts[:8], sampling[:8], use_tqdm=False)  # warm-up

        def bare() -> float:
            start = time.perf_counter()
            llm.generate(prompts, sampling, use_tqdm=False)
            return time.perf_counter() - start

        def ours() -> float:
            folder = Path(tempfile.mkdtemp(prefix="bench-synthesis-"))
            cached = CachedEngine(engine, GenerationCache(folder))
            start = time.perf_counter()
            bootstrap(params, cached, seeds, [])
            elapsed = time.perf_counter() - start
            assert cached.stats.engine_calls == 1
            ours.cache = folder  # type: ignore[attr-defined]
            return elapsed

        times: dict[str, list[float]] = {"bare": [], "ours": []}
        for i in range(repeats):
            for name, fn in (
                (("bare", bare), ("ours", ours)) if i % 2 == 0 else (("ours", ours), ("bare", bare))
            ):
                times[name].append(fn())
        warm = CachedEngine(engine, GenerationCache(ours.cache))  # type: ignore[attr-defined]
        start = time.perf_counter()
        bootstrap(params, warm, seeds, [])
        warm_s = time.perf_counter() - start
        assert warm.stats.engine_calls == 0
    finally:
        engine.close()
    bare_s, ours_s = statistics.median(times["bare"]), statistics.median(times["ours"])
    return {
        "requests": n_requests,
        "max_tokens": params.max_tokens,
        "startup_s": round(startup_s, 1),
        "bare_s": [round(t, 3) for t in times["bare"]],
        "ours_cold_s": [round(t, 3) for t in times["ours"]],
        "ours_warm_s": round(warm_s, 4),
        "bare_requests_per_s": round(n_requests / bare_s, 1),
        "ours_requests_per_s": round(n_requests / ours_s, 1),
        "cold_over_bare": round(ours_s / bare_s, 3),
        "warm_speedup_over_bare": round(bare_s / warm_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20_000)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": machine()}
    report["novelty"] = novelty(args.pool, args.candidates)
    if not args.skip_generation:
        report["generation"] = generation(args.requests, args.repeats)
    report["load_avg_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)  # vLLM logs to stdout too: --out keeps a clean copy
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    if not report["novelty"]["decisions_agree"]:
        raise SystemExit("the index and the plain loop disagree")


if __name__ == "__main__":
    main()
