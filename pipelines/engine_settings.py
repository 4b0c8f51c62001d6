"""Which model a model-backed stage uses, and opening it behind the generation cache.

Every model-backed stage (``craft``, ``refine``, ``self_instruct``, ``self_guide``,
``judge``) takes these settings among its parameters and opens its engines here, so they
all resolve models, servers and context lengths the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engines import EngineError, make_engine
from engines.cached import CachedEngine
from engines.models import model_dir
from storage.gencache import GenerationCache


class EngineSettings(BaseModel):
    """The model, the engine that runs it, the server (``openai``), the context length and
    the generation cache's batch size."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a local HF model folder (the tokenizer, for every engine)")
    engine: Literal["vllm", "openai", "transformers"] = "vllm"
    url: str | None = Field(
        default=None, description="the server(s), for engine: openai (comma-separated)"
    )
    max_model_len: int | None = 512
    cache_batch: int = Field(
        default=256,
        ge=1,
        description="requests per generation-cache batch: each completed batch is stored "
        "before the next is sent, so a killed build loses at most one (smaller: finer resume; "
        "larger: bigger engine calls)",
    )


def open_engine(
    settings: EngineSettings, cache: GenerationCache, model: str | None = None
) -> CachedEngine:
    """The engine of ``settings`` (on ``model`` instead of ``settings.model`` when given, e.g.
    a rehearsed checkpoint) behind the generation cache; nothing loads until its first call.

    Raises:
        EngineError: the model folder is missing, or ``openai`` has no ``url``.
    """
    path = model or settings.model
    model_dir(path)  # a clear error before any generation
    options: dict[str, Any] = {}
    if settings.engine == "vllm" and settings.max_model_len:
        options["max_model_len"] = settings.max_model_len
    if settings.engine == "openai":
        if not settings.url:
            raise EngineError("engine 'openai' needs a url (a running vllm serve)")
        options["url"] = settings.url
    engine = make_engine(settings.engine, path, **options)
    return CachedEngine(engine, cache, batch_size=settings.cache_batch)


def close_engine(engine: CachedEngine) -> None:
    """Stop the engine's processes, if it has any (vLLM does)."""
    close = getattr(engine.engine, "close", None)
    if close is not None:
        close()
