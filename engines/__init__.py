"""Model I/O behind one protocol (:mod:`engines.base`): vLLM in-process, an
OpenAI-compatible server, transformers, and sentence embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.base import Engine, EngineError, Request, Sample, Sampling, row_seed

ENGINE_KINDS = ("vllm", "openai", "transformers")

__all__ = [
    "ENGINE_KINDS",
    "Engine",
    "EngineError",
    "Request",
    "Sample",
    "Sampling",
    "make_engine",
    "row_seed",
]


def make_engine(kind: str, model_path: str | Path, **options: Any) -> Engine:
    """An engine of ``kind`` for the model at ``model_path`` (nothing loads yet).

    ``openai`` needs ``url=`` (a running server); see :class:`engines.server.VLLMServer`
    to start one.
    """
    if kind == "vllm":
        from engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **options)
    if kind == "openai":
        from engines.openai import OpenAIEngine

        return OpenAIEngine(options.pop("url"), model_path, **options)
    if kind == "transformers":
        from engines.hf import TransformersEngine

        return TransformersEngine(model_path, **options)
    raise EngineError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
