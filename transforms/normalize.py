"""Stage ``normalize``: Unicode NFC, control characters stripped, whitespace trimmed.

Applied to every prompt turn and to the response. Because ``id`` is a content hash, it is
recomputed for the rows whose text changed. This stage rejects nothing.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from transforms.ids import contiguous, row_ids
from transforms.stage import StageResult
from transforms.text import StringOp, byte_chunks, map_contents, rows_with

# C0 and C1 control characters except tab, line feed and carriage return.
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"


class NormalizeParams(BaseModel):
    """Each step can be switched off."""

    model_config = ConfigDict(extra="forbid")
    nfc: bool = True
    strip_control: bool = True
    trim: bool = True


def normalize_text(values: pa.Array, params: NormalizeParams) -> pa.Array:
    """Normalise one string array (nulls stay null).

    NFC and the control-character pattern run only on the strings that can need them:
    ASCII text is already in NFC, and holds a control character only as a byte below 0x20
    (other than tab, line feed and carriage return) or 0x7F, which a byte scan finds. On the
    instruction corpora that is about 4% of the strings, and the whole step is 3x faster.
    Of those, NFC runs only on the ones Python's quick check cannot clear
    (:func:`maybe_not_nfc`): Arrow's NFC took 10.7 ms for a 64k-row batch's 2,231 non-ASCII
    responses, the check 2 ms.
    """
    out = values
    if not (params.nfc or params.strip_control):
        return pc.utf8_trim_whitespace(out) if params.trim else out
    unicode = pc.invert(pc.fill_null(pc.string_is_ascii(values), True))
    if params.nfc:
        out = _on_rows(
            out, maybe_not_nfc(values, unicode), lambda v: pc.utf8_normalize(v, form="NFC")
        )
    if params.strip_control:
        # NFC changed non-ASCII rows only, which are in `rows` anyway: the ASCII rows'
        # bytes are the same in `values` and `out`
        rows = pc.or_(unicode, _mask(len(out), control_rows(values)))
        out = _on_rows(
            out, rows, lambda v: pc.replace_substring_regex(v, CONTROL_CHARS, replacement="")
        )
    if params.trim:
        out = _on_rows(out, pa.array(edge_bytes(out)), pc.utf8_trim_whitespace)
    return out


def edge_bytes(values: pa.Array) -> np.ndarray:
    """Per string: can trimming whitespace change it? True where its first or last byte is
    ASCII 0x00-0x20, 0x7F or any byte of a multi-byte character: every Unicode whitespace
    character is one of those, so the other strings (most, on the instruction corpora) begin
    and end with a printable ASCII character and trim to themselves. Nulls and empty strings
    give False. Only the offsets and two bytes per string are read."""
    n = len(values)
    flagged = np.zeros(n, dtype=bool)
    _, offsets_buffer, data = values.buffers()[:3]
    if not n or data is None:
        return flagged
    width = np.int64 if pa.types.is_large_string(values.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=width)[values.offset : values.offset + n + 1]
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
    data_bytes = np.frombuffer(data, dtype=np.uint8)
    first = data_bytes[offsets[nonempty]]
    last = data_bytes[offsets[nonempty + 1] - 1]
    flagged[nonempty] = (first <= 0x20) | (first >= 0x7F) | (last <= 0x20) | (last >= 0x7F)
    return flagged


def maybe_not_nfc(values: pa.Array, rows: pa.Array) -> pa.Array:
    """Of the strings where ``rows`` is true, those NFC may change: all but the ones that
    ``unicodedata.is_normalized`` finds in NFC and whose characters Python's Unicode
    database knows (each line, without its line break, is printable).

    Python's database (Unicode 14.0 in 3.11) is older than Arrow's (utf8proc), which
    composes some characters Python has unassigned; an unassigned character is never
    printable, so such strings stay candidates. For assigned characters Unicode's
    normalization stability policy makes a string in NFC under one version stay so under
    every later one: a cleared string is one Arrow's NFC leaves as it is.
    """
    candidates = np.flatnonzero(rows.to_numpy(zero_copy_only=False))
    if not len(candidates):
        return rows
    try:
        texts = values.take(pa.array(candidates)).to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):  # invalid UTF-8: leave it to Arrow
        return rows
    normalized = unicodedata.is_normalized
    cleared = np.fromiter(
        (normalized("NFC", s) and all(map(str.isprintable, s.splitlines())) for s in texts),
        bool,
        len(texts),
    )
    mask = np.zeros(len(values), dtype=bool)
    mask[candidates[~cleared]] = True
    return pa.array(mask)


def control_rows(values: pa.Array) -> np.ndarray:
    """Indices of the strings holding an ASCII control character matched by
    :data:`CONTROL_CHARS` (a byte below 0x20 other than tab, line feed and carriage
    return, or 0x7F); nulls hold none. The bytes below 0x20 are counted first, and listed
    only when tab, line feed and carriage return are not all of them: listing them (line
    feeds are most) took twice as long. One byte mask is alive at a time (two at once cost
    8 MiB at the build's peak)."""
    parts = []
    for first, data, bounds in byte_chunks(values):
        flagged = np.zeros(0, dtype=np.int64)
        if np.count_nonzero(data < 0x20) > sum(
            np.count_nonzero(data == byte) for byte in (0x09, 0x0A, 0x0D)
        ):
            low = np.flatnonzero(data < 0x20)
            kind = data[low]
            flagged = low[(kind != 0x09) & (kind != 0x0A) & (kind != 0x0D)]
        if (data == 0x7F).any():
            flagged = np.union1d(flagged, np.flatnonzero(data == 0x7F))
        if len(flagged):
            parts.append(first + rows_with(flagged, bounds))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _mask(n: int, rows: np.ndarray) -> pa.Array:
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return pa.array(mask)


def _on_rows(values: pa.Array, rows: pa.Array, op: StringOp) -> pa.Array:
    """``values`` with ``op`` applied to the strings where ``rows`` is true: ``values``
    itself (no copy) when ``op`` changes none of them."""
    if not pc.any(rows).as_py():
        return values
    subset = values.filter(rows)
    changed = op(subset)
    if not pc.any(pc.fill_null(pc.not_equal(changed, subset), False)).as_py():
        return values
    return pc.replace_with_mask(values, rows, changed)


def normalize(table: pa.Table, params: NormalizeParams) -> StageResult:
    """Normalise prompt turns and responses; recompute the ids of the rows that changed.

    A column that no string of changes is not rebuilt, and a batch that nothing changes in
    is returned as it came.
    """
    old_prompt = contiguous(table.column("prompt"))
    old_contents = pc.list_flatten(old_prompt).field("content")
    contents = normalize_text(old_contents, params)
    old_response = contiguous(table.column("response"))
    response = normalize_text(old_response, params)
    if contents is old_contents and response is old_response:
        return StageResult(kept=table)
    out = table
    changed = np.zeros(len(table), dtype=bool)
    if contents is not old_contents:
        prompt = map_contents(old_prompt, lambda _: contents)
        out = out.set_column(out.schema.get_field_index("prompt"), "prompt", prompt)
        changed |= _turns_changed(old_prompt, old_contents, contents)
    if response is not old_response:
        out = out.set_column(out.schema.get_field_index("response"), "response", response)
        changed |= pc.fill_null(pc.not_equal(response, old_response), False).to_numpy(
            zero_copy_only=False
        )
    if changed.any():
        out = out.set_column(out.schema.get_field_index("id"), "id", _fresh_ids(out, changed))
    return StageResult(kept=out)


def _fresh_ids(table: pa.Table, changed: np.ndarray) -> pa.Array:
    """The ``id`` column with the rows where ``changed`` is true hashed again."""
    ids = contiguous(table.column("id"))
    rows = np.flatnonzero(changed)
    take = pa.array(rows)
    fresh = row_ids(
        contiguous(table.column("source")).take(take),
        contiguous(table.column("prompt")).take(take),
        contiguous(table.column("response")).take(take),
    )
    positions = np.zeros(len(ids), dtype=np.int64)
    positions[rows] = np.arange(len(rows))
    return pc.if_else(pa.array(changed), pc.take(fresh, pa.array(positions)), ids)


def _turns_changed(prompt: pa.ListArray, old_text: pa.Array, new_text: pa.Array) -> np.ndarray:
    """Per row of ``prompt``: did any turn's content change (``old_text`` to ``new_text``,
    its flattened turns' contents)?"""
    turn_changed = pc.fill_null(pc.not_equal(old_text, new_text), False)
    out = np.zeros(len(prompt), dtype=bool)
    if not pc.any(turn_changed).as_py():
        return out
    parents = pc.list_parent_indices(prompt).to_numpy()
    out[parents[turn_changed.to_numpy(zero_copy_only=False)]] = True
    return out
