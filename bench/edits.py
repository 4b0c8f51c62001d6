"""Edits that make near copies of a text for the dedup benchmarks (``bench/dedup.py``,
``bench/semantic_dedup.py``): typos, extra white space, two sentences swapped, the second
half cut. Each draws from the ``rng`` it is given, so a seeded corpus is reproducible."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

SENTENCE = re.compile(r"(?<=[.!?])\s+")


def typos(text: str, rng: random.Random, most: int = 4) -> str:
    """1 to ``most`` words of more than 3 letters with two neighbouring letters swapped."""
    words = text.split(" ")
    for _ in range(rng.randint(1, most)):
        i = rng.randrange(len(words))
        w = words[i]
        if len(w) > 3:
            j = rng.randrange(len(w) - 1)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def whitespace(text: str, rng: random.Random) -> str:
    return "  " + text.replace(" ", "  ", rng.randint(1, 20)) + "\n"


def swap(
    text: str,
    rng: random.Random,
    split: Callable[[str], list[str]] = SENTENCE.split,
    sep: str = " ",
    most_typos: int = 4,
) -> str:
    """Two neighbouring sentences (``split``, joined again by ``sep``) swapped; a text of
    fewer than three gets :func:`typos` instead."""
    parts = split(text)
    if len(parts) < 3:
        return typos(text, rng, most_typos)
    i = rng.randrange(len(parts) - 1)
    parts[i], parts[i + 1] = parts[i + 1], parts[i]
    return sep.join(parts)


def cut(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    return " ".join(words[: max(1, len(words) // 2)])
