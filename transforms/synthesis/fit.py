"""Fit a few-shot prompt into a model's context by dropping its last items (no model I/O).

A prompt that lists items — Self-Instruct's pool instructions, its classification and
instance demonstrations — *fits* a context of ``context`` tokens when its own tokens leave
at least ``min_new_tokens`` to generate (never more than the request's ``max_tokens``).
:func:`fit_prompt` renders the prompt with all items, then with one fewer from the end, and
so on, and takes the first that fits; the generation budget becomes what the context has
left, at most ``max_tokens`` (vLLM stops there anyway; an OpenAI-compatible server refuses a
request that asks for more). When not even ``min_items`` items fit, the request cannot be
sent: the result says so (``fits`` False) with the token count of that smallest prompt.

The engines count tokens of the text they are sent, so ``count_tokens`` must see the prompt
as the engine will (after the chat template, when one is used).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class FittedPrompt:
    """The prompt text with the first ``shown`` items, and what fitting it cost."""

    text: str
    shown: int
    dropped: int
    tokens: int | None
    """the prompt's tokens (None when there is no context to fit)"""
    max_tokens: int
    """the generation budget: ``max_tokens``, or less where the context ends first"""
    fits: bool


def fit_prompt(
    items: Sequence[T],
    render: Callable[[Sequence[T]], str],
    count_tokens: Callable[[str], int],
    *,
    context: int | None,
    max_tokens: int,
    min_new_tokens: int,
    min_items: int = 0,
) -> FittedPrompt:
    """The prompt ``render(items[:k])`` for the largest ``k >= min_items`` that fits.

    ``context`` None means no limit: every item is shown and nothing is counted. A request
    needs ``min(min_new_tokens, max_tokens)`` tokens of room to generate. When even
    ``min_items`` items do not fit, the result is that smallest prompt with ``fits`` False.
    """
    if context is None:
        return FittedPrompt(render(items), len(items), 0, None, max_tokens, fits=True)
    need = min(min_new_tokens, max_tokens)
    smallest = min(min_items, len(items))
    for shown in range(len(items), smallest - 1, -1):
        text = render(items[:shown])
        tokens = count_tokens(text)
        room = context - tokens
        if room >= need:
            budget = min(max_tokens, room)
            return FittedPrompt(text, shown, len(items) - shown, tokens, budget, fits=True)
    return FittedPrompt(text, smallest, len(items) - smallest, tokens, 0, fits=False)
