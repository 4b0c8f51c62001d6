"""Stage ``exact_dedup``: exact duplicates on the normalised (prompt, response).

The first occurrence (in source order, then row order) is kept; later ones go to
``rejected`` with reason ``duplicate_of:<kept id>``. The key ignores ``source``, so the
same pair in two corpora is a duplicate too. The stage is *ordered*: shards are fed in
order with one state carried across them, the keys seen so far with the id of the row
kept for each. That state is a :class:`transforms.keyset.KeySet`: the key's XXH3-128
digest and the kept row's id (an XXH3-128 hex digest too) as 16 raw bytes each, in
sorted numpy runs. Runs of a million keys or more keep only the key's first 8 bytes in
memory and the other 24 bytes in an anonymous temporary file, read with one ``pread`` per
key found there (see that module), so the state's memory grows by about 8 bytes per
distinct row (32 below a million; the dict of hex strings it replaced took about 200),
and its temporary files by 24. Measured by ``bench/dedup_state.py`` (random keys in
64k-row shards, each case in its own process, medians of 3 rounds alternating with the
unspilled KeySet; 2-core Xeon, load 0.3-2.4): the peak RSS grows by 9.6 bytes per key
from 1M to 4M keys, against 78 unspilled and 222 for the dict; the stage takes 1.64 s
per million rows over 1M rows and 1.86 over 4M, against 1.63 and 1.87 unspilled, mostly
``content_key``'s hashing and the table filters.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from transforms.ids import content_key_words, contiguous
from transforms.keyset import KeySet, group_keys, hex_words, words_hex
from transforms.schema import rejected
from transforms.stage import StageResult, reject_table

STAGE = "exact_dedup"
KEY_ROWS = 8192
"""Rows whose keys are hashed at a time (see :func:`content_words`)."""
ID_KEYS = "ids_are_keys"
"""Set true in the carried state (before the first shard) by a flow whose rows' ids hash
their content under one source: one source, and no stage before this one but ingest,
normalize and filter, which leave each row's id the hash of its (source, prompt, response)
(:func:`pipelines.segments.content_ids`). Two such ids are equal exactly when the rows'
(prompt, response) keys are, so the ids' 16 bytes serve as the keys, and the content is not
hashed a second time. The decisions and reasons are the same."""
NO_ID = "<no id>"
"""Named in the reason of a duplicate whose kept row has no id (a build always sets ids;
a caller of the function may not)."""


class ExactDedupParams(BaseModel):
    """No knobs yet: the key is fixed to the normalised (prompt, response)."""

    model_config = ConfigDict(extra="forbid")


def exact_dedup(table: pa.Table, params: ExactDedupParams, state: dict) -> StageResult:
    """Drop rows whose (prompt, response) key was seen before, in an earlier shard or
    earlier in this one; remember the new keys with the id of the row kept for each.

    ``state`` is the carried dict: the :class:`KeySet` under ``"keys"``, and under
    ``"other_ids"`` the kept ids that are not 32-character hex digests (none in a build:
    every row id is one), by key; :data:`ID_KEYS`, when the flow set it, makes the ids the
    keys.
    """
    seen: KeySet = state.setdefault("keys", KeySet())
    other_ids: dict[tuple[int, int], str] = state.setdefault("other_ids", {})
    ids = contiguous(table.column("id"))
    words, plain = hex_words(ids)  # every row's, then the kept ones' (no copy of their ids)
    if state.get(ID_KEYS) and not plain.all():
        row = int(np.flatnonzero(~plain)[0])
        raise ValueError(f"exact_dedup: {ID_KEYS} is set, but row {row} has no XXH3-128 id")
    keys = words if state.get(ID_KEYS) else content_words(table)
    distinct, first, group = group_keys(keys)
    found, earlier = seen.find(distinct)
    new_keys, new_rows = distinct[~found], first[~found]
    keep = np.zeros(table.num_rows, dtype=bool)
    keep[new_rows] = True
    duplicates = np.flatnonzero(~keep)
    reasons = pc.binary_join_element_wise(
        "duplicate_of",
        _owners(ids, group[duplicates], first, found, earlier, distinct, other_ids),
        ":",
    )
    kept_ids, plain = words[new_rows], plain[new_rows]
    for k in np.flatnonzero(~plain):
        other_ids[(int(new_keys[k, 0]), int(new_keys[k, 1]))] = ids[int(new_rows[k])].as_py()
    seen.add(new_keys, kept_ids)
    mask = pa.array(keep)
    return StageResult(
        kept=table if not len(duplicates) else table.filter(mask),  # a filter copies all
        rejected=reject_table(rejected(table.filter(pc.invert(mask)), STAGE, reasons)),
        stats={"distinct_keys": len(seen)},
    )


def content_words(table: pa.Table) -> np.ndarray:
    """Each row's key as 128-bit words, hashed :data:`KEY_ROWS` rows at a time (the
    hashed text is joined into one buffer and copied once more: for a whole shard, two
    transient copies of all its text)."""
    parts = [
        content_key_words(part.column("prompt"), part.column("response"))
        for part in (table.slice(start, KEY_ROWS) for start in range(0, table.num_rows, KEY_ROWS))
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)


def _owners(
    ids: pa.Array,
    groups: np.ndarray,
    first: np.ndarray,
    found: np.ndarray,
    earlier: np.ndarray,
    keys: np.ndarray,
    other_ids: dict[tuple[int, int], str],
) -> pa.Array:
    """The id each duplicate row (given by its key's number in ``keys``) is a duplicate of:
    the kept row's of an earlier shard (``found``), else this shard's first row with the
    key; :data:`NO_ID` for a row without id. Only the duplicates' owners are looked up."""
    owners = pc.take(ids, pa.array(first[groups]))
    from_earlier = found[groups]
    if from_earlier.any():
        known = groups[from_earlier]
        owners = pc.replace_with_mask(
            owners,
            pa.array(from_earlier),
            _ids_of(earlier[known], keys[known], other_ids).cast(owners.type),
        )
    return pc.fill_null(owners, NO_ID)


def _ids_of(
    earlier: np.ndarray, keys: np.ndarray, other_ids: dict[tuple[int, int], str]
) -> pa.Array:
    """The kept ids of ``keys``, from their 16 bytes (``earlier``) or ``other_ids``."""
    hexes = words_hex(earlier)
    if not other_ids:
        return hexes
    names = hexes.to_pylist()
    for i, key in enumerate(keys.tolist()):
        names[i] = other_ids.get((key[0], key[1]), names[i])
    return pa.array(names, pa.string())
