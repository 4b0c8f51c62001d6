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
        out = pc.utf8_trim_whitespace(out)
    return out


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
    """``values`` with ``op`` applied to the strings where ``rows`` is true."""
    if not pc.any(rows).as_py():
        return values
    changed = op(values.filter(rows))
    return pc.replace_with_mask(values, rows, changed)


def normalize(table: pa.Table, params: NormalizeParams) -> StageResult:
    """Normalise prompt turns and responses; recompute the ids of the rows that changed."""

    def op(values: pa.Array) -> pa.Array:
        return normalize_text(values, params)

    old_prompt = combined(table.column("prompt"))
    old_response = combined(table.column("response"))
    prompt = map_contents(old_prompt, op)
    response = op(old_response)
    changed = pc.or_(
        pc.fill_null(pc.not_equal(response, old_response), False),
        _turns_changed(old_prompt, prompt),
    )
    ids = combined(table.column("id"))
    if pc.any(changed).as_py():
        rows = pc.indices_nonzero(changed)
        fresh = row_ids(
            combined(table.column("source")).take(rows), prompt.take(rows), response.take(rows)
        )
        positions = np.full(len(ids), -1, dtype=np.int64)
        positions[rows.to_numpy()] = np.arange(len(rows))
        ids = pc.if_else(changed, pc.take(fresh, pa.array(np.maximum(positions, 0))), ids)
    out = table
    for name, column in (("prompt", prompt), ("response", response), ("id", ids)):
        out = out.set_column(out.schema.get_field_index(name), name, column)
    return StageResult(kept=out)


def _turns_changed(old: pa.ListArray, new: pa.ListArray) -> pa.Array:
    """Per row: did any turn's content change?"""
    old_text = pc.list_flatten(old).field("content")
    new_text = pc.list_flatten(new).field("content")
    turn_changed = pc.fill_null(pc.not_equal(old_text, new_text), False)
    if not pc.any(turn_changed).as_py():
        return pa.array(np.zeros(len(old), dtype=bool))
    parents = pc.list_parent_indices(old).to_numpy()
    out = np.zeros(len(old), dtype=bool)
    out[parents[turn_changed.to_numpy(zero_copy_only=False)]] = True
    return pa.array(out)
