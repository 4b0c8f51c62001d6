"""Measure what the fact-world model knows: greedy accuracy and sampled correctness (μ)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .facts import GROUPS
from .prompts import pick_shots, query_prompt


def _matches(answer: str, aliases: Sequence[str]) -> bool:
    """Correct when some gold alias is a substring of the lower-cased, stripped answer."""
    text = answer.strip().lower()
    return any(alias.lower() in text for alias in aliases)


def fact_messages(facts: Sequence[dict], fact: dict, n_shots: int) -> list[dict[str, str]]:
    """The chat messages asking ``fact`` after ``n_shots`` known facts (fixed per fact)."""
    shots = pick_shots(facts, n_shots, exclude=fact["id"], seed=fact["id"]) if n_shots else ()
    return query_prompt(fact["question"], shots)


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    *,
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[str]]:
    """``n`` replies to each conversation: greedy when ``temperature`` is 0, else sampled.

    Prompts are rendered with the tokenizer's chat template, batched by length with left
    padding; generation stops at ``</s>``.
    """
    prompts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in conversations
    ]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    replies: list[list[str]] = [[] for _ in ids]
    sample = temperature > 0
    torch.manual_seed(seed)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=1.0,
            top_k=0 if sample else None,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for row, i in enumerate(chunk):
            replies[i] = texts[row * n : (row + 1) * n]
    return replies


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[dict],
    *,
    shot_counts: Sequence[int] = (0, 3),
) -> dict[str, dict[str, float]]:
    """Greedy accuracy per group, for each shot count: ``{"0_shot": {"known": 1.0, ...}}``."""
    result: dict[str, dict[str, float]] = {}
    for k in shot_counts:
        replies = generate_answers(model, tokenizer, [fact_messages(facts, f, k) for f in facts])
        hits: dict[str, list[bool]] = defaultdict(list)
        for fact, (reply,) in zip(facts, replies, strict=True):
            hits[fact["group"]].append(_matches(reply, fact["answers"]))
        result[f"{k}_shot"] = {g: round(sum(hits[g]) / len(hits[g]), 4) for g in GROUPS if hits[g]}
    return result


def sampled_correctness(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[dict],
    *,
    n_shots: int = 3,
    n: int = 10,
    temperature: float = 1.0,
    max_new_tokens: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """μ per fact id: the share of ``n`` samples at ``temperature`` that are correct."""
    conversations = [fact_messages(facts, f, n_shots) for f in facts]
    replies = generate_answers(
        model,
        tokenizer,
        conversations,
        n=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=max(1, 256 // n),
        seed=seed,
    )
    return {
        fact["id"]: sum(_matches(r, fact["answers"]) for r in samples) / n
        for fact, samples in zip(facts, replies, strict=True)
    }
