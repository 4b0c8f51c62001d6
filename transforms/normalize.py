"""Stage ``normalize``: Unicode NFC, control characters stripped, whitespace trimmed.

Applied to every prompt turn and to the response. Because ``id`` is a content hash, it is
recomputed for the rows whose text changed. This stage rejects nothing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from transforms.ids import row_ids
from transforms.stage import StageResult
from transforms.text import StringOp, combined, map_contents, rows_with_bytes

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
    """
    out = values
    if not (params.nfc or params.strip_control):
        return pc.utf8_trim_whitespace(out) if params.trim else out
    unicode = pc.invert(pc.fill_null(pc.string_is_ascii(values), True))
    if params.nfc:
        out = _on_rows(out, unicode, lambda v: pc.utf8_normalize(v, form="NFC"))
    if params.strip_control:
        rows = pc.or_(unicode, _mask(len(out), rows_with_bytes(out, _ascii_control)))
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


def _ascii_control(data: np.ndarray) -> np.ndarray:
    """The bytes that are ASCII control characters matched by :data:`CONTROL_CHARS`."""
    flagged = data < 0x20
    flagged &= data != 0x09
    flagged &= data != 0x0A
    flagged &= data != 0x0D
    flagged |= data == 0x7F
    return flagged


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
    old_prompt = combined(table.column("prompt"))
    old_contents = pc.list_flatten(old_prompt).field("content")
    contents = normalize_text(old_contents, params)
    old_response = combined(table.column("response"))
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
    ids = combined(table.column("id"))
    rows = np.flatnonzero(changed)
    take = pa.array(rows)
    fresh = row_ids(
        combined(table.column("source")).take(take),
        combined(table.column("prompt")).take(take),
        combined(table.column("response")).take(take),
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
