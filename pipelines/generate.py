"""``aligncurate generate``: sample completions for a JSONL file of prompts.

Each input line is ``{"messages": [...]}`` (rendered with the model's chat template) or
``{"prompt": "..."}`` (used as raw text). Each output line is the input plus
``samples: [{text, cumulative_logprob, finish_reason}]`` (plus ``token_logprobs`` and
``top_logprobs`` with ``--logprobs K``, K > 0). Every generation goes through
the generation cache, and every line gets its own seed (derived from its content and the
base seed), so a rerun is free and reproducible.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from engines import EngineError, Request, Sample, Sampling, make_engine, row_seed
from engines.cached import CachedEngine, Progress
from engines.prompts import render
from storage.atomic import atomic_path
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
                prompts.append(_render(model, record["messages"], f"{path}: line {number}"))
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"])
            else:
                raise EngineError(
                    f"{path}: line {number}: field 'messages' (a list) or 'prompt' (a string) "
                    "is required"
                )
            records.append(record)
    return records, prompts


def _sample_line(sample: Sample, sampling: Sampling) -> dict[str, Any]:
    """One sample as written out; per-token logprobs only when top-k alternatives were
    asked for (``--logprobs K`` with K > 0)."""
    line = {
        "text": sample.text,
        "cumulative_logprob": sample.cumulative_logprob,
        "finish_reason": sample.finish_reason,
    }
    if sampling.logprobs:
        line["token_logprobs"] = sample.token_logprobs
        line["top_logprobs"] = sample.top_logprobs
    return line


def _render(model: str, messages: list[Any], where: str) -> str:
    """The chat template's rendering of ``messages``; a malformed message names its index."""
    for index, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and "content" in message
            and isinstance(message["content"], str | list | None)
        ):
            raise EngineError(
                f"{where}: field 'messages[{index}]': expected an object with a string 'role' "
                "and a 'content' (text, a list of parts, or null beside tool calls), got "
                f"{json.dumps(message, ensure_ascii=False)[:120]}"
            )
    try:
        return render(model, messages)
    except (TypeError, ValueError, TemplateError) as exc:
        raise EngineError(f"{where}: field 'messages': the chat template failed: {exc}") from None


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


def _check_target(target: Path) -> None:
    """Fail before the engine starts when ``--out`` cannot be written: a folder, or a path
    under a file. (A read-only folder is found when the file is created.)"""
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; --out must name a file", str(target))
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(target))


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
    _check_target(target)
    requests = [
        Request(p, options.sampling, row_seed(f"{options.seed}\x1f{p}", "generate"))
        for p in prompts
    ]
    start = time.perf_counter()
    with open_engine(options) as engine:
        ready = time.perf_counter()
        cached = CachedEngine(engine, cache)
        outputs = cached.generate(requests, progress=progress)
        generated = time.perf_counter()
    seconds = time.perf_counter() - start
    generation = generated - ready
    # A unique temporary file beside the target, renamed onto it when whole, and removed
    # on any failure (a full disk, Ctrl-C, SIGTERM): never a half-written file left behind.
    with atomic_path(target) as tmp, tmp.open("w", encoding="utf-8") as out:
        for record, samples in zip(records, outputs, strict=True):
            samples = [_sample_line(s, options.sampling) for s in samples]
            out.write(json.dumps({**record, "samples": samples}, ensure_ascii=False) + "\n")
    completions = sum(len(s) for s in outputs)
    return {
        **cached.stats.to_dict(),
        "seconds": round(seconds, 3),
        "prompts": len(requests),
        "completions": completions,
        "startup_seconds": round(ready - start, 3),
        "generation_seconds": round(generation, 3),
        "completions_per_s": round(completions / generation, 1) if generation else None,
        "engine": engine.fingerprint,
    }
