"""``aligncurate generate``: sample completions for a JSONL file of prompts.

Each input line is ``{"messages": [...]}`` (rendered with the model's chat template) or
``{"prompt": "..."}`` (used as raw text). Each output line is the input plus
``samples: [{text, cumulative_logprob, finish_reason}]``. Every generation goes through
the generation cache, and every line gets its own seed (derived from its content and the
base seed), so a rerun is free and reproducible.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines import EngineError, Request, Sampling, make_engine, row_seed
from engines.cached import CachedEngine, Progress
from engines.prompts import render
from storage.gencache import GenerationCache


@dataclass(frozen=True)
class GenerateOptions:
    """What ``aligncurate generate`` was asked for."""

    engine: str
    model: str
    sampling: Sampling
    seed: int = 0
    url: str | None = None
    max_model_len: int | None = None


def read_prompts(path: Path, model: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The input records and their rendered prompts; errors name the line and field."""
    records, prompts = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EngineError(f"{path}: line {number}: invalid JSON: {exc.msg}") from None
            if isinstance(record, dict) and isinstance(record.get("messages"), list):
                prompts.append(render(model, record["messages"]))
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"])
            else:
                raise EngineError(
                    f"{path}: line {number}: field 'messages' (a list) or 'prompt' (a string) "
                    "is required"
                )
            records.append(record)
    return records, prompts


@contextmanager
def open_engine(options: GenerateOptions) -> Iterator[Any]:
    """The engine asked for; for ``openai`` without a URL, a ``vllm serve`` we start."""
    if options.engine == "openai" and options.url is None:
        from engines.server import VLLMServer

        with VLLMServer(options.model, max_model_len=options.max_model_len) as server:
            yield make_engine("openai", options.model, url=server.url)
        return
    extra: dict[str, Any] = {}
    if options.engine == "openai":
        extra["url"] = options.url
    elif options.engine == "vllm" and options.max_model_len:
        extra["max_model_len"] = options.max_model_len
    engine = make_engine(options.engine, options.model, **extra)
    try:
        yield engine
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()


def generate_file(
    source: Path,
    target: Path,
    options: GenerateOptions,
    cache: GenerationCache,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Generate for every line of ``source`` into ``target``; returns the statistics.
    ``progress(done, total)`` is called as batches of requests complete."""
    records, prompts = read_prompts(source, options.model)
    requests = [
        Request(p, options.sampling, row_seed(f"{options.seed}\x1f{p}", "generate"))
        for p in prompts
    ]
    start = time.perf_counter()
    with open_engine(options) as engine:
        cached = CachedEngine(engine, cache)
        outputs = cached.generate(requests, progress=progress)
    seconds = time.perf_counter() - start
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for record, samples in zip(records, outputs, strict=True):
            record = {
                **record,
                "samples": [
                    {
                        "text": s.text,
                        "cumulative_logprob": s.cumulative_logprob,
                        "finish_reason": s.finish_reason,
                    }
                    for s in samples
                ],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(target)
    completions = sum(len(s) for s in outputs)
    return {
        **cached.stats.to_dict(),
        "seconds": round(seconds, 3),
        "prompts": len(requests),
        "completions": completions,
        "completions_per_s": round(completions / seconds, 1) if seconds else None,
        "engine": engine.fingerprint,
    }
