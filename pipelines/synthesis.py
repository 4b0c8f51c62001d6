"""What the synthesis stages share: the generator settings and rendering a prompt for them
(engines open through :mod:`pipelines.engine_settings`).

The stages themselves live in :mod:`pipelines.self_instruct`, :mod:`pipelines.self_guide`
and :mod:`pipelines.judge`; their pure parts in :mod:`transforms.synthesis`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from pydantic import Field

from engines.models import model_dir
from engines.prompts import render, tokenizer
from pipelines.engine_settings import EngineSettings
from transforms.stage import StageResult


class GeneratorSettings(EngineSettings):
    """Which model generates, through which engine, and how prompts are laid out."""

    chat_template: bool | None = Field(
        default=None,
        description="wrap prompts in the model's chat template; None: when it has one",
    )


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
