"""Stage ``normalize``: Unicode NFC, control characters stripped, whitespace trimmed.

Applied to every prompt turn and to the response. Because ``id`` is a content hash, it is
recomputed from the normalised text. This stage rejects nothing.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from transforms.ids import row_ids
from transforms.stage import StageResult
from transforms.text import combined, map_contents

# C0 and C1 control characters except tab, line feed and carriage return.
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"


class NormalizeParams(BaseModel):
    """Each step can be switched off."""

    model_config = ConfigDict(extra="forbid")
    nfc: bool = True
    strip_control: bool = True
    trim: bool = True


def normalize_text(values: pa.Array, params: NormalizeParams) -> pa.Array:
    """Normalise one string array (nulls stay null)."""
    out = values
    if params.nfc:
        out = pc.utf8_normalize(out, form="NFC")
    if params.strip_control:
        out = pc.replace_substring_regex(out, pattern=CONTROL_CHARS, replacement="")
    if params.trim:
        out = pc.utf8_trim_whitespace(out)
    return out


def normalize(table: pa.Table, params: NormalizeParams) -> StageResult:
    """Normalise prompt turns and responses, then recompute the content-hash ids."""

    def op(values: pa.Array) -> pa.Array:
        return normalize_text(values, params)

    prompt = map_contents(table.column("prompt"), op)
    response = op(combined(table.column("response")))
    ids = row_ids(table.column("source"), prompt, response)
    out = table
    for name, column in (("prompt", prompt), ("response", response), ("id", ids)):
        out = out.set_column(out.schema.get_field_index(name), name, column)
    return StageResult(kept=out)
