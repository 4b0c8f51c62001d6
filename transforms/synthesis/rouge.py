"""The ROUGE-L novelty filter of Self-Instruct, fast on large pools.

Self-Instruct (Wang et al., ACL 2023, arXiv 2212.10560, §2.3) adds a generated instruction
to the task pool only when its ROUGE-L similarity with every instruction already there is
below 0.7. The authors' code scores each candidate against the whole pool with
``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``: quadratic Python,
seconds per candidate on a pool of 20,000.

This module gives the same decisions, bit for bit, much faster:

- tokens come from rouge-score's own ``DefaultTokenizer`` (lower-case, ``[a-z0-9]+`` runs,
  no stemming), so the inputs are the library's;
- an inverted index over the pool gives, for every pool entry at once (numpy), the size of
  the multiset intersection with the candidate. The LCS is never longer than that overlap,
  so ``2·overlap / (m + n)`` bounds the F-measure from above and prunes every entry that
  cannot reach the threshold;
- the few survivors get their exact LCS length from a bit-parallel LCS (Hyyrö's
  formulation, Python integers as bit vectors), and the F-measure is computed with the
  library's own ``scoring.fmeasure(precision, recall)`` from the same integers, so even the
  float rounding at the threshold matches.

``bench/synthesis.py`` checks the decisions against a plain loop over ``RougeScorer.score``
and reports the speedup (docs/performance.md).

Threshold: the paper keeps an instruction when ROUGE-L is *less than* 0.7, i.e. rejects at
≥ 0.7; the code rejects at ``> 0.7``. They differ only at exactly 0.7; we follow the paper
(and the issue), ``score >= threshold`` rejects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.7
_SLACK = 1e-9  # the bound is exact arithmetic; the library's float may differ by an ulp


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokens of ``text`` (the ``rougeL`` scorer's, without stemming)."""
    return _tokenizer().tokenize(text)


@cache
def _tokenizer() -> Any:
    """rouge-score's tokenizer, imported on first use: rouge-score imports nltk and scipy
    (about 1.7 s), which every ``aligncurate`` command would otherwise pay at start-up."""
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=False)


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token-id sequences.

    Bit-parallel: one bit per position of ``a``, one big-integer update per token of ``b``
    (Hyyrö, "Bit-parallel LCS-length computation revisited", 2004).
    """
    if not a or not b:
        return 0
    masks: dict[int, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        match = masks.get(token)
        if match is not None:
            u = v & match
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def f_measure(lcs: int, target_len: int, prediction_len: int) -> float:
    """ROUGE-L F-measure from an LCS length, with rouge-score's own arithmetic."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    from rouge_score import scoring

    return float(scoring.fmeasure(precision, recall))


@dataclass(frozen=True)
class Match:
    """The most similar pool entry among those that could reach the threshold."""

    index: int
    score: float


class NoveltyIndex:
    """A growing pool of instructions that answers "is this one novel?" quickly.

    ``check(text)`` returns the best :class:`Match` with ROUGE-L ≥ ``threshold`` (None when
    the text is novel); ``add(text)`` puts a text into the pool.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self.texts: list[str] = []
        self._vocab: dict[str, int] = {}
        self._seqs: list[list[int]] = []
        self._lengths = np.zeros(64, dtype=np.int64)
        self._rows: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._sizes: list[int] = []

    def __len__(self) -> int:
        return len(self.texts)

    def _ids(self, tokens: Iterable[str], grow: bool) -> list[int]:
        ids = []
        for token in tokens:
            index = self._vocab.get(token)
            if index is None:
                if not grow:
                    ids.append(-1)  # unseen: matches nothing in the pool
                    continue
                index = self._vocab[token] = len(self._vocab)
                self._rows.append(np.zeros(4, dtype=np.int64))
                self._counts.append(np.zeros(4, dtype=np.int32))
                self._sizes.append(0)
            ids.append(index)
        return ids

    def add(self, text: str) -> int:
        """Add ``text`` to the pool; returns its index."""
        row = len(self.texts)
        seq = self._ids(rouge_tokens(text), grow=True)
        self.texts.append(text)
        self._seqs.append(seq)
        if row >= len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
        self._lengths[row] = len(seq)
        for token, count in Counter(seq).items():
            size = self._sizes[token]
            if size == len(self._rows[token]):
                self._rows[token] = np.concatenate([self._rows[token], self._rows[token]])
                self._counts[token] = np.concatenate([self._counts[token], self._counts[token]])
            self._rows[token][size] = row
            self._counts[token][size] = count
            self._sizes[token] = size + 1
        return row

    def extend(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.add(text)

    def candidates(self, seq: Sequence[int]) -> np.ndarray:
        """Pool rows whose overlap bound reaches the threshold (a superset of the matches)."""
        n = len(self.texts)
        if not seq or n == 0:
            return np.zeros(0, dtype=np.int64)
        overlap = np.zeros(n, dtype=np.int64)
        for token, count in Counter(seq).items():
            if token < 0:
                continue
            size = self._sizes[token]
            rows = self._rows[token][:size]
            overlap[rows] += np.minimum(self._counts[token][:size], count)
        lengths = self._lengths[:n]
        bound = 2.0 * overlap / np.maximum(lengths + len(seq), 1)
        return np.flatnonzero((bound >= self.threshold - _SLACK) & (lengths > 0))

    def check(self, text: str) -> Match | None:
        """The most similar pool entry with ROUGE-L ≥ threshold, or None if ``text`` is novel."""
        seq = self._ids(rouge_tokens(text), grow=False)
        best: Match | None = None
        for row in self.candidates(seq):
            other = self._seqs[row]
            score = f_measure(lcs_length(seq, other), len(seq), len(other))
            if score >= self.threshold and (best is None or score > best.score):
                best = Match(int(row), score)
        return best


def novel_mask(
    texts: Sequence[str], pool: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD
) -> list[bool]:
    """Self-Instruct's sequential filter: each text is kept when it is novel against
    ``pool`` and the texts kept before it (a kept text joins the pool)."""
    index = NoveltyIndex(threshold)
    index.extend(pool)
    keep = []
    for text in texts:
        novel = index.check(text) is None
        if novel:
            index.add(text)
        keep.append(novel)
    return keep
