"""Render conversations with the model's own chat template, once, on our side.

Every engine receives the same rendered text, so in-process vLLM, a remote ``vllm serve``
and transformers see byte-identical prompts (and the cache key is the same for all).
The rendered text already holds the template's special tokens, so engines must not add
a BOS token again when they tokenise it (:func:`encode`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from engines.base import EngineError
from engines.models import model_dir

Message = Mapping[str, str]


@cache
def tokenizer(path: str) -> Any:
    """The model's tokenizer (transformers ``AutoTokenizer``), loaded once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir(path)))


def render(path: str | Path, messages: Sequence[Message], generation_prompt: bool = True) -> str:
    """The conversation as the model's chat template renders it, ready for the reply."""
    tok = tokenizer(str(path))
    if not getattr(tok, "chat_template", None):
        raise EngineError(f"model {str(path)!r} has no chat template; pass raw prompts instead")
    return tok.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
    )


def encode(path: str | Path, text: str) -> list[int]:
    """Token ids of rendered text, without adding special tokens a second time."""
    return list(tokenizer(str(path))(text, add_special_tokens=False)["input_ids"])


def option_token_id(model_path: str, option: str) -> int:
    """The single token an option letter is written as after ``Answer:`` (`` A`` if that is
    one token, else ``A``)."""
    tok = tokenizer(model_path)
    for text in (f" {option}", option):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
    raise EngineError(f"option {option!r} is not a single token for {model_path!r}")
