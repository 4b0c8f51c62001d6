"""Stage ``exact_dedup``: exact duplicates on the normalised (prompt, response).

The first occurrence (in source order, then row order) is kept; later ones go to
``rejected`` with reason ``duplicate_of:<kept id>``. The key ignores ``source``, so the
same pair in two corpora is a duplicate too. The stage is *ordered*: shards are fed in
order with one ``seen`` map (key → kept id) carried across them. That map costs about
200 bytes per distinct row as Python strings: memory grows with the number of distinct
rows (about 200 MB per million), not with their size.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from transforms.ids import content_key
from transforms.schema import rejected
from transforms.stage import StageResult, reject_table

STAGE = "exact_dedup"


class ExactDedupParams(BaseModel):
    """No knobs yet: the key is fixed to the normalised (prompt, response)."""

    model_config = ConfigDict(extra="forbid")


def exact_dedup(table: pa.Table, params: ExactDedupParams, seen: dict[str, str]) -> StageResult:
    """Drop rows whose (prompt, response) key is in ``seen``; add the new keys to ``seen``.

    ``seen`` maps dedup key → id of the kept row; it is the state carried across shards.
    """
    keys = content_key(table.column("prompt"), table.column("response")).to_pylist()
    ids = table.column("id").to_pylist()
    keep: list[bool] = []
    reasons: list[str] = []
    for key, row_id in zip(keys, ids, strict=True):
        first = seen.get(key)
        if first is None:
            seen[key] = row_id
            keep.append(True)
        else:
            keep.append(False)
            reasons.append(f"duplicate_of:{first}")
    mask = pa.array(keep, pa.bool_())
    dropped = table.filter(pc.invert(mask))
    return StageResult(
        kept=table.filter(mask),
        rejected=reject_table(rejected(dropped, STAGE, reasons)),
        stats={"distinct_keys": len(seen)},
    )
