"""Plain texts of conversations and their token lengths.

Lengths are counted with the model's tokenizer when one is configured (a local folder,
loaded with transformers ``AutoTokenizer``), otherwise as whitespace-separated words.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.text import byte_chunks, combined, rows_with

Column = pa.Array | pa.ChunkedArray


def prompt_plain(prompt: Column, sep: str = "\n") -> pa.Array:
    """The contents of every turn of each conversation joined by ``sep`` (no roles)."""
    prompt = combined(prompt)
    contents = pc.fill_null(pc.list_flatten(prompt).field("content"), "")
    offsets = prompt.offsets
    if len(offsets) and offsets[0].as_py() != 0:
        offsets = pc.subtract(offsets, offsets[0])
    return pc.fill_null(pc.binary_join(pa.ListArray.from_arrays(offsets, contents), sep), "")


def word_counts(texts: Column) -> np.ndarray:
    """Whitespace-separated words of each string (null counts as 0), as int64: the words
    Arrow's ``utf8_split_whitespace`` makes, counted with numpy on the UTF-8 bytes (a word
    starts at a non-space byte after a space or at the string's start) without splitting.
    Strings that may hold non-ASCII white space (a byte C2, E1, E2 or E3: the lead bytes of
    U+0085, U+00A0, U+1680, U+180E, U+2000-U+205F and U+3000) are split by Arrow."""
    text = pc.fill_null(combined(texts), "")
    counts = np.zeros(len(text), dtype=np.int64)
    unsure: list[np.ndarray] = []
    for first_row, data, bounds in byte_chunks(text):
        space = (data == 32) | ((data >= 9) & (data <= 13))
        starts = ~space
        starts[1:] &= space[:-1]
        first = bounds[:-1][bounds[:-1] < bounds[1:]]  # each non-empty string's first byte
        starts[first] = ~space[first]
        rows = slice(first_row, first_row + len(bounds) - 1)
        counts[rows] = np.diff(np.searchsorted(np.flatnonzero(starts), bounds))
        maybe = np.flatnonzero((data == 0xC2) | ((data >= 0xE1) & (data <= 0xE3)))
        unsure.append(first_row + rows_with(maybe, bounds))
    rows = np.concatenate(unsure) if unsure else np.zeros(0, dtype=np.int64)
    if len(rows):
        counts[rows] = _split_counts(text.take(pa.array(rows)))
    return counts


def _split_counts(text: pa.Array) -> np.ndarray:
    """Words of each (non-null) string, split by Arrow at any Unicode white space."""
    text = pc.utf8_trim_whitespace(text)
    counts = pc.list_value_length(pc.utf8_split_whitespace(text))
    counts = pc.if_else(pc.equal(text, ""), 0, counts)  # Arrow splits "" into [""]
    return counts.to_numpy(zero_copy_only=False).astype(np.int64)


_per_thread = threading.local()


def _tokenizer(path: str) -> Any:
    """The tokenizer at ``path``, one per thread: a fast tokenizer's Rust object may not be
    used by two threads at once (it can answer "Already borrowed")."""
    loaded: dict[str, Any] = _per_thread.__dict__.setdefault("tokenizers", {})
    if path not in loaded:
        from transformers import AutoTokenizer

        loaded[path] = AutoTokenizer.from_pretrained(path)
    return loaded[path]


def token_counts(texts: Column, tokenizer: str | None = None) -> np.ndarray:
    """Tokens of each string: the tokenizer at ``tokenizer`` (a local folder; no special
    tokens added), else whitespace words."""
    if tokenizer is None:
        return word_counts(texts)
    values = pc.fill_null(combined(texts), "").to_pylist()
    if not values:
        return np.zeros(0, dtype=np.int64)
    ids = _tokenizer(tokenizer)(values, add_special_tokens=False)["input_ids"]
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(values))


def length_columns(table: pa.Table, tokenizer: str | None = None) -> dict[str, np.ndarray]:
    """``prompt_tokens``, ``response_tokens`` and ``length_ratio`` (prompt / response
    tokens; a zero-token response counts as one token) of each row."""
    prompt = token_counts(prompt_plain(table.column("prompt")), tokenizer)
    response = token_counts(table.column("response"), tokenizer)
    ratio = prompt / np.maximum(response, 1)
    return {"prompt_tokens": prompt, "response_tokens": response, "length_ratio": ratio}


def with_columns(table: pa.Table, columns: dict[str, Any]) -> pa.Table:
    """``table`` with ``columns`` set (replaced when present, appended otherwise)."""
    for name, values in columns.items():
        array = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table
