"""What the synthesis stages share: the generator settings, opening an engine behind the
generation cache, and rendering a prompt for it.

The stages themselves live in :mod:`pipelines.self_instruct`, :mod:`pipelines.self_guide`
and :mod:`pipelines.judge`; their pure parts in :mod:`transforms.synthesis`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from engines import EngineError, make_engine
from engines.cached import CachedEngine
from engines.models import model_dir
from engines.prompts import render, tokenizer
from storage.gencache import GenerationCache
from transforms.stage import StageResult


class GeneratorSettings(BaseModel):
    """Which model generates, through which engine."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a local HF model folder (the tokenizer, for every engine)")
    engine: Literal["vllm", "openai", "transformers"] = "vllm"
    url: str | None = Field(default=None, description="the server, for engine: openai")
    max_model_len: int | None = 512
    chat_template: bool | None = Field(
        default=None,
        description="wrap prompts in the model's chat template; None: when it has one",
    )


def open_engine(settings: GeneratorSettings, cache: GenerationCache) -> CachedEngine:
    """The engine of ``settings`` behind the generation cache (nothing loads yet).

    Raises:
        EngineError: the model folder is missing, or ``openai`` has no ``url``.
    """
    model_dir(settings.model)  # a clear error before any generation
    options: dict[str, Any] = {}
    if settings.engine == "vllm" and settings.max_model_len:
        options["max_model_len"] = settings.max_model_len
    if settings.engine == "openai":
        if not settings.url:
            raise EngineError("engine 'openai' needs a url (a running vllm serve)")
        options["url"] = settings.url
    return CachedEngine(make_engine(settings.engine, settings.model, **options), cache)


def close_engine(engine: CachedEngine) -> None:
    close = getattr(engine.engine, "close", None)
    if close is not None:
        close()


def uses_chat(settings: GeneratorSettings) -> bool:
    if settings.chat_template is not None:
        return settings.chat_template
    return bool(getattr(tokenizer(str(model_dir(settings.model))), "chat_template", None))


def as_prompt(settings: GeneratorSettings, text: str) -> str:
    """``text`` as one user turn in the model's chat template, or raw (completion style)."""
    return as_chat_prompt(settings, [{"role": "user", "content": text}])


def as_chat_prompt(settings: GeneratorSettings, messages: Sequence[dict[str, str]]) -> str:
    """A conversation rendered for the model; raw mode sends the last user turn's text."""
    if uses_chat(settings):
        return render(settings.model, messages)
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def with_generated(
    table: pa.Table, kept: pa.Table, rejected: pa.Table, stats: dict[str, Any]
) -> StageResult:
    """The stage result of a synthesis stage: the input rows untouched, the generated rows
    appended (kept) or rejected, all generated rows counted as ``added``."""
    out = pa.concat_tables([table, kept], promote_options="permissive") if kept.num_rows else table
    return StageResult(
        kept=out, rejected=rejected, added=kept.num_rows + rejected.num_rows, stats=stats
    )
