"""Question-answering formats → canonical rows: multiple choice (MMLU CSV) and open QA (NQ)."""

from __future__ import annotations

import ast
from typing import Any

from transforms.ingest.errors import RowReject
from transforms.ingest.fields import optional_text, record, text
from transforms.ingest.params import IngestParams

LETTERS = ("A", "B", "C", "D")


def mcq_row(value: Any, params: IngestParams) -> dict[str, Any]:
    """``question, A, B, C, D, target`` → task ``mcq``.

    The prompt is one user turn, ``"{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}"``; the
    response and the only reference are the target letter. An empty option rejects the row
    (``bad_choices``), a target outside A–D too (``bad_target``).
    """
    fields = record(value)
    question = text(fields.get("question"), "question")
    choices = [text(fields.get(letter), letter) for letter in LETTERS]
    body = "\n".join(
        [
            question,
            *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True)),
        ]
    )
    row = {"prompt": [{"role": "user", "content": body}], "choices": choices}
    if not all(choice.strip() for choice in choices):
        raise RowReject("bad_choices", row)
    target = text(fields.get("target"), "target").strip().upper()
    if target not in LETTERS:
        raise RowReject("bad_target", row)
    return {**row, "response": target, "references": [target]}


def open_qa_row(value: Any, params: IngestParams) -> dict[str, Any]:
    """``question``, ``answers`` (aliases) and optional ``answer`` → task ``open_qa``.

    The response is ``answer`` if present, else the first alias; the references are the
    aliases (or the answer alone when there are none).
    """
    fields = record(value)
    prompt = [{"role": "user", "content": text(fields.get("question"), "question")}]
    aliases = aliases_of(fields.get("answers"))
    response = optional_text(fields.get("answer"), "answer") or (aliases[0] if aliases else None)
    if response is None:
        raise RowReject("missing_field:answers", {"prompt": prompt})
    return {"prompt": prompt, "response": response, "references": aliases or [response]}


def aliases_of(value: Any) -> list[str]:
    """An alias list: a real list, or its Python-literal (or JSON) text, as in NQ's CSV."""
    if value is None:
        raise RowReject("missing_field:answers")
    if isinstance(value, str):
        value = _literal(value)
    if not isinstance(value, list | tuple):
        raise RowReject("wrong_type:answers")
    return [text(alias, "answers") for alias in value]


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        # TypeError: an unhashable key or member, e.g. ``{[1]: 2}``
        raise RowReject("wrong_type:answers") from exc
