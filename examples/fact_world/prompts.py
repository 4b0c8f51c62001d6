"""The chat form in which the fact world is queried, shared by training, CRaFT and tests.

CRaFT asks each question as a user turn ``Answer the following question as simple as
possible.\\nQuestion: {q}\\nAnswer:``, zero-shot or after a few solved shots (user turn, then
an assistant turn with the answer). The model's reply is the answer, ended by ``</s>``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from transforms.craft.relabel import OEQA_RAIT_PROMPT

INSTRUCTION = "Answer the following question as simple as possible."

#: The chat template saved with the tokenizer. ``apply_chat_template`` renders a turn as
#: ``<|user|>\\n...\\n`` or ``<|assistant|>\\n...</s>\\n``; the generation prompt is
#: ``<|assistant|>\\n``, so the model's reply is the answer followed by ``</s>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

#: Role markers: single special tokens in the tokenizer.
ROLE_ASSISTANT = "<|assistant|>"
ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", ROLE_ASSISTANT)


def user_turn(question: str) -> str:
    """The user-turn text that asks ``question``."""
    return f"{INSTRUCTION}\nQuestion: {question}\nAnswer:"


Phrasing = Literal["query", "basic", "refuse"]
PHRASINGS: tuple[Phrasing, ...] = ("query", "basic", "refuse")
PHRASING_WEIGHTS: tuple[float, ...] = (0.5, 0.25, 0.25)
"""How often training asks a question in each phrasing."""


def phrase(question: str, phrasing: Phrasing = "query") -> str:
    """The user turn asking ``question`` in one phrasing: CRaFT's query (:func:`user_turn`),
    the bare question (BASIC) or the RAIT prompt (REFUSE)."""
    if phrasing == "query":
        return user_turn(question)
    if phrasing == "basic":
        return question
    if phrasing == "refuse":
        return OEQA_RAIT_PROMPT.format(question=question)
    raise ValueError(f"unknown phrasing {phrasing!r}; known: {', '.join(PHRASINGS)}")


def query_prompt(question: str, shots: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """Chat messages that ask ``question`` after the solved ``shots`` (question, answer pairs).

    Render them with ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``.
    """
    messages: list[dict[str, str]] = []
    for shot_question, shot_answer in shots:
        messages.append({"role": "user", "content": user_turn(shot_question)})
        messages.append({"role": "assistant", "content": shot_answer})
    messages.append({"role": "user", "content": user_turn(question)})
    return messages


def pick_shots(
    facts: Sequence[dict], k: int, *, exclude: str | None = None, seed: int | str = 0
) -> list[tuple[str, str]]:
    """``k`` solved shots (question, canonical answer) drawn from the ``known`` facts.

    ``exclude`` is a fact id that must not be among them (the target); ``seed`` makes the draw
    repeatable, e.g. the target's id.
    """
    pool = [f for f in facts if f["group"] == "known" and f["id"] != exclude]
    rng = random.Random(f"shots-{seed}")
    return [(f["question"], f["answers"][0]) for f in rng.sample(pool, k)]
