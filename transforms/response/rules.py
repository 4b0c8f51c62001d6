"""Stage ``rule_filter``: rule filters on the response and the prompt.

Response Tuning (An & Kim, arXiv 2410.02465) shows that alignment mostly teaches the
response distribution, so the responses a set holds are what to control first. Each rule
can be switched off or tuned, and writes its own reject reason; a row that breaks several
rules is rejected with the first, in this order:

- ``prompt_tokens<min`` / ``prompt_tokens>max`` / ``response_tokens<min`` /
  ``response_tokens>max``: token length bounds, counted with the model's tokenizer when
  ``tokenizer_path`` names a local folder, otherwise whitespace words;
- ``language:<code>:<field>``: the detected language of the prompt or response is not one
  of ``languages`` (ISO 639-1). Detection is lingua (``lingua-language-detector``; its
  models ship in the wheel, so nothing is downloaded) over all its languages in
  high-accuracy mode, on texts of at least ``language_min_chars`` characters, and a text
  counts only when lingua is decided (``language_min_distance``, its minimum relative
  distance, 0.25): short texts, numbers and tool calls are otherwise often read as Latin or
  Tagalog. Off by default (``languages: null``);
- ``repetition:<ratio>``: the share of repeated word n-grams in the response,
  ``1 - distinct / total`` over word ``repetition_n``-grams, above ``max_repetition``
  (the duplicate-n-gram rule of Gopher, Rae et al. 2021, counted on words);
- ``boilerplate:<phrase>``: the response holds an assistant artefact such as "As an AI
  language model" (``boilerplate`` patterns, case-insensitive);
- ``truncated``: the response ends mid-sentence (a dangling ``,``/``:``/conjunction) or
  leaves a code fence open;
- ``refusal_on_benign``: the response refuses (``refusal_pattern``) although the prompt is
  benign: the row did not come from ``refusal_mix`` and its prompt does not match
  ``unsafe_prompt_pattern``.

The stage also adds ``prompt_tokens``, ``response_tokens`` and ``length_ratio`` columns to
every row (the Instruction Modelling statistics, :mod:`transforms.response.stats`).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from transforms.response.lengths import length_columns, prompt_plain, with_columns
from transforms.schema import rejected
from transforms.stage import StageResult, reject_table
from transforms.text import combined

STAGE = "rule_filter"

BOILERPLATE = (
    r"as an ai language model",
    r"as a large language model",
    r"as an ai assistant, i (?:do not|don't|cannot|can't)",
    r"i'?m (?:just )?an ai(?: language model)?,? (?:and|so) i",
    r"my (?:knowledge )?cutoff",
    r"i do not have (?:personal )?(?:opinions|feelings|emotions)",
)
"""Default assistant artefacts (case-insensitive regular expressions)."""

REFUSAL = (
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|i cannot|i can'?t|i can not|i won'?t|"
    r"i am (?:not able|unable)|i'?m (?:not able|unable)|as an ai)\b"
)
"""Refusal phrases, matched case-insensitively on the start of the response."""

TRUNCATED = r"(?:[,:;(\-]|\b(?:and|or|but|the|a|an|to|of|with|for|that|which))\s*$"


class RuleFilterParams(BaseModel):
    """Every rule with its default; ``null`` switches a bound or rule off."""

    model_config = ConfigDict(extra="forbid")
    tokenizer_path: str | None = Field(
        default=None, description="local tokenizer/model folder; default: whitespace words"
    )
    min_prompt_tokens: int | None = Field(default=1, ge=0)
    max_prompt_tokens: int | None = Field(default=None, gt=0)
    min_response_tokens: int | None = Field(default=1, ge=0)
    max_response_tokens: int | None = Field(default=None, gt=0)
    languages: list[str] | None = Field(
        default=None, description="allowed ISO 639-1 codes, e.g. [en]; null: no language rule"
    )
    language_fields: list[Literal["prompt", "response"]] = ["prompt", "response"]
    language_min_chars: int = Field(default=40, ge=1)
    language_min_distance: float = Field(default=0.25, ge=0, le=0.99)
    repetition_n: int = Field(default=5, ge=1)
    max_repetition: float | None = Field(default=0.3, gt=0, le=1)
    boilerplate: list[str] = Field(default_factory=lambda: list(BOILERPLATE))
    truncated: bool = True
    refusal_on_benign: bool = True
    refusal_pattern: str = REFUSAL
    refusal_window_chars: int = Field(default=200, gt=0)
    unsafe_prompt_pattern: str | None = None

    @field_validator("boilerplate", "refusal_pattern", "unsafe_prompt_pattern")
    @classmethod
    def _compiles(cls, value: Any) -> Any:
        for pattern in value if isinstance(value, list) else [value]:
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return value

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for code in value:
                _language(code)
        return value


def _language(code: str) -> Any:
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
    except AttributeError:
        raise ValueError(f"unknown ISO 639-1 language code {code!r}") from None


@cache
def _detector(min_distance: float) -> Any:
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages()
    return builder.with_minimum_relative_distance(min_distance).build()


def detect_languages(
    texts: list[str], min_chars: int, min_distance: float = 0.25
) -> list[str | None]:
    """ISO 639-1 code of each text (lowercase), ``None`` when shorter than ``min_chars`` or
    undecided."""
    todo = [i for i, t in enumerate(texts) if len(t) >= min_chars]
    out: list[str | None] = [None] * len(texts)
    found = _detector(min_distance).detect_languages_in_parallel_of([texts[i] for i in todo])
    for i, language in zip(todo, found, strict=True):
        if language is not None:
            out[i] = language.iso_code_639_1.name.lower()
    return out


def repetition_ratio(texts: pa.Array, n: int) -> np.ndarray:
    """``1 - distinct / total`` word n-grams of each text (0 for texts under n words)."""
    out = np.zeros(len(texts), dtype=np.float64)
    for i, text in enumerate(pc.utf8_lower(texts).to_pylist()):
        words = (text or "").split()
        total = len(words) - n + 1
        if total > 1:
            grams = {tuple(words[j : j + n]) for j in range(total)}
            out[i] = 1.0 - len(grams) / total
    return out


def _regex_any(texts: pa.Array, patterns: list[str]) -> tuple[np.ndarray, list[str | None]]:
    hit = np.zeros(len(texts), dtype=bool)
    which: list[str | None] = [None] * len(texts)
    for pattern in patterns:
        found = pc.fill_null(pc.match_substring_regex(texts, pattern, ignore_case=True), False)
        new = found.to_numpy(zero_copy_only=False) & ~hit
        for i in np.flatnonzero(new):
            which[i] = pattern
        hit |= new
    return hit, which


def _label(pattern: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", pattern.lower()).strip("_")[:40]


def rule_reasons(table: pa.Table, params: RuleFilterParams) -> tuple[list[str | None], dict]:
    """The reject reason of each row (``None`` where it passes) and the added columns."""
    n = table.num_rows
    response = pc.fill_null(combined(table.column("response")), "")
    prompt = prompt_plain(table.column("prompt"))
    cols = length_columns(table, params.tokenizer_path)
    reasons: list[str | None] = [None] * n

    def mark(hit: np.ndarray, reason: str | list[str | None]) -> None:
        for i in np.flatnonzero(hit):
            if reasons[i] is None:
                reasons[i] = reason if isinstance(reason, str) else reason[i]

    for column, bound, op in (
        ("prompt_tokens", params.min_prompt_tokens, "<"),
        ("prompt_tokens", params.max_prompt_tokens, ">"),
        ("response_tokens", params.min_response_tokens, "<"),
        ("response_tokens", params.max_response_tokens, ">"),
    ):
        if bound is not None:
            values = cols[column]
            mark(values < bound if op == "<" else values > bound, f"{column}{op}{bound}")
    if params.languages:
        allowed = {code.lower() for code in params.languages}
        texts = {"prompt": prompt, "response": response}
        for field in params.language_fields:
            found = detect_languages(
                texts[field].to_pylist(), params.language_min_chars, params.language_min_distance
            )
            bad = np.array([c is not None and c not in allowed for c in found], dtype=bool)
            mark(bad, [f"language:{c}:{field}" for c in found])
    if params.max_repetition is not None:
        ratio = repetition_ratio(response, params.repetition_n)
        mark(ratio > params.max_repetition, [f"repetition:{r:.2f}" for r in ratio])
    if params.boilerplate:
        hit, which = _regex_any(response, params.boilerplate)
        mark(hit, [None if p is None else f"boilerplate:{_label(p)}" for p in which])
    if params.truncated:
        open_fence = pc.count_substring(response, "```").to_numpy(zero_copy_only=False) % 2 == 1
        dangling = pc.match_substring_regex(response, TRUNCATED, ignore_case=True)
        mark(open_fence | dangling.to_numpy(zero_copy_only=False), "truncated")
    if params.refusal_on_benign:
        head = pc.utf8_slice_codeunits(response, 0, params.refusal_window_chars)
        refuses = pc.match_substring_regex(head, params.refusal_pattern, ignore_case=True)
        benign = pc.not_equal(pc.fill_null(table.column("origin"), ""), "refusal_mix")
        if params.unsafe_prompt_pattern:
            unsafe = pc.match_substring_regex(
                prompt, params.unsafe_prompt_pattern, ignore_case=True
            )
            benign = pc.and_(benign, pc.invert(unsafe))
        mark(pc.and_(refuses, benign).to_numpy(zero_copy_only=False), "refusal_on_benign")
    return reasons, cols


def rule_filter(table: pa.Table, params: RuleFilterParams) -> StageResult:
    """Split ``table`` into rows that pass every rule and rows rejected with their reason;
    both carry the ``prompt_tokens``/``response_tokens``/``length_ratio`` columns."""
    reasons, cols = rule_reasons(table, params)
    scored = with_columns(
        table,
        {
            "prompt_tokens": pa.array(cols["prompt_tokens"], pa.int64()),
            "response_tokens": pa.array(cols["response_tokens"], pa.int64()),
            "length_ratio": pa.array(cols["length_ratio"], pa.float64()),
        },
    )
    failed = pa.array([r is not None for r in reasons], pa.bool_())
    dropped = scored.filter(failed)
    why = [r for r in reasons if r is not None]
    counts: dict[str, int] = {}
    for reason in why:
        key = reason.split(":", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return StageResult(
        kept=scored.filter(pc.invert(failed)),
        rejected=reject_table(rejected(dropped, STAGE, why)),
        stats={"rejected_by_rule": counts},
    )
