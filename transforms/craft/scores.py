"""CRaFT knowledge measures: correctness μ and certainty σ from model outputs.

Zhu et al., "Utilize the Flow before Stepping into the Same River Twice: Certainty
Represented Knowledge Flow for Refusal-Aware Instruction Tuning" (CRaFT), AAAI-25,
arXiv 2410.06913, §4.2, and its public code (github.com/opendatalab/CRaFT, with the
OpenCompass fork github.com/Zrc007/opencompass_CRaFT).

- Open QA: μ is the fraction of the N sampled answers that are correct. The paper says
  "exact match"; the code (``TriviaQAEvaluator``) counts an answer as correct when some
  gold alias, lower-cased, is a substring of the lower-cased, stripped answer, and an
  answer containing "I don't know" (``check_is_refuse``) is a refusal, never correct. The
  substring rule is our default; ``rule="exact"`` is the paper's wording.
- Multiple choice: from the full-vocabulary probabilities p(X) of the option tokens,
  μ = p(gold) / Σ_X p(X) and σ = −entropy of the renormalised p(X), so σ ∈ [−ln k, 0]
  (the paper's stated range [−log|O|, 0]). With ``raw_entropy`` (``fidelity: code``), σ is
  minus the entropy of the *raw* p(X), as the code computes it (its PPL inferencer's
  ``-sum(p * log(p))`` over the option tokens' probabilities; only μ is renormalised).

σ for open QA (mean pairwise embedding cosine) needs an embedding model and lives with
the engine-backed query code, not here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

REFUSAL_MARKER = "i don't know"
"""The refusal keyword of the CRaFT code (``REFUSE_KEYWORDS['en']``), lower-cased."""

LETTERS = ("A", "B", "C", "D")
"""MCQ option letters, in option order."""

MatchRule = Literal["substring", "exact"]


def normalize_answer(text: str) -> str:
    """Lower-cased and stripped: the CRaFT code's answer normalisation."""
    return text.lower().strip()


def is_refusal(answer: str) -> bool:
    """True when the answer contains "I don't know" (any case, straight or curly apostrophe)."""
    return REFUSAL_MARKER in answer.lower().replace("\u2019", "'")


def is_correct(answer: str, references: Sequence[str], rule: MatchRule = "substring") -> bool:
    """Whether one answer matches one of the gold aliases.

    ``substring`` (default, the CRaFT code's rule): some normalised alias is a substring of
    the normalised answer. ``exact``: some normalised alias equals the normalised answer.
    A refusal is never correct; empty aliases are ignored.
    """
    if rule not in ("substring", "exact"):
        raise ValueError(f"unknown match rule {rule!r}: expected 'substring' or 'exact'")
    if is_refusal(answer):
        return False
    pred = normalize_answer(answer)
    aliases = [a for a in (normalize_answer(r) for r in references) if a]
    if rule == "exact":
        return pred in aliases
    return any(alias in pred for alias in aliases)


def oeqa_correctness(
    samples: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    rule: MatchRule = "substring",
) -> np.ndarray:
    """μ per row: the fraction of that row's sampled answers that are correct.

    A row with no samples gets NaN (the selection stage rejects it as a missing score).

    Raises:
        ValueError: ``samples`` and ``references`` differ in length.
    """
    if len(samples) != len(references):
        raise ValueError(f"{len(samples)} sample lists but {len(references)} reference lists")
    out = np.full(len(samples), np.nan, dtype=np.float64)
    for i, (answers, refs) in enumerate(zip(samples, references, strict=True)):
        if len(answers):
            out[i] = sum(is_correct(a, refs, rule) for a in answers) / len(answers)
    return out


def most_frequent_correct(
    samples: Sequence[str], references: Sequence[str], rule: MatchRule = "substring"
) -> str | None:
    """The model's own most frequent correct answer (stripped), or None if none is correct.

    CRaFT's open-QA rehearsal target: rehearsal teaches the model what it already says, not
    the gold string. Answers are counted by their stripped text; ties go to the answer that
    occurs first.
    """
    correct = [a.strip() for a in samples if is_correct(a, references, rule)]
    if not correct:
        return None
    counts = Counter(correct)  # insertion-ordered: ties resolve to the first occurrence
    return max(counts, key=lambda answer: counts[answer])


@dataclass(frozen=True)
class McqKnowledge:
    """Per-row MCQ knowledge state (arrays of length n; ``renormalised`` is n×k)."""

    p_gold: np.ndarray
    """Raw full-vocabulary probability of the gold option token (rehearsal uses > 0.99)."""
    renormalised: np.ndarray
    """p(X) / Σ p over the k options; each row sums to 1 (uniform for an all-zero row)."""
    correctness: np.ndarray
    """μ = p(gold) / Σ p."""
    certainty: np.ndarray
    """σ = −entropy (natural log) of the renormalised probabilities, in [−ln k, 0]; or, with
    ``raw_entropy``, of the raw probabilities."""


def mcq_knowledge(
    option_probs: np.ndarray, gold: Sequence[int], *, raw_entropy: bool = False
) -> McqKnowledge:
    """μ and σ of each MCQ row from the option-token probabilities (CRaFT §4.2).

    Args:
        option_probs: n×k full-vocabulary softmax probabilities of the option tokens
            (k = 4 for A–D); they need not sum to 1. An all-zero row counts as uniform.
        gold: the gold option index of each row (0 = A).
        raw_entropy: σ from the raw probabilities (the code) instead of the renormalised
            ones (the paper).

    Raises:
        ValueError: wrong shape, negative or non-finite probabilities, or a gold index
            outside the options.
    """
    probs = np.asarray(option_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"option_probs must be n×k, got shape {probs.shape}")
    n, k = probs.shape
    gold_idx = np.asarray(gold, dtype=np.int64).reshape(-1)
    if gold_idx.shape[0] != n:
        raise ValueError(f"{n} rows of probabilities but {gold_idx.shape[0]} gold indices")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        row = int(np.argmax(~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1)))
        raise ValueError(f"row {row}: option probabilities must be finite and >= 0")
    if n and (gold_idx.min() < 0 or gold_idx.max() >= k):
        row = int(np.argmax((gold_idx < 0) | (gold_idx >= k)))
        raise ValueError(f"row {row}: gold index {gold_idx[row]} is not in 0..{k - 1}")
    totals = probs.sum(axis=1, keepdims=True)
    zero = totals[:, 0] <= 0
    safe = np.where(zero[:, None], 1.0, totals)
    renorm = np.where(zero[:, None], 1.0 / k, probs / safe)
    rows = np.arange(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(renorm > 0, renorm * np.log(renorm), 0.0)
        raw_plogp = np.where(probs > 0, probs * np.log(probs), 0.0)
    certainty = (
        raw_plogp.sum(axis=1)
        if raw_entropy
        else np.clip(plogp.sum(axis=1), -np.log(k), 0.0)  # float round-off only
    )
    return McqKnowledge(
        p_gold=probs[rows, gold_idx],
        renormalised=renorm,
        correctness=renorm[rows, gold_idx],
        certainty=certainty,
    )


def letter_index(letter: str) -> int:
    """0-based option index of an MCQ letter (``"A"`` → 0; case and spaces ignored)."""
    key = letter.strip().upper()
    if key not in LETTERS:
        raise ValueError(f"{letter!r} is not one of {', '.join(LETTERS)}")
    return LETTERS.index(key)
