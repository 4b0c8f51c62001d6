"""What every stage returns, and the per-stage accounting.

A stage is a pure function ``(table, params[, engine]) -> StageResult``. The invariant the
flow checks for every stage and shard: ``rows in = kept + rejected`` (+ ``added`` for
stages that synthesise rows, counted separately).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from transforms.schema import REJECTED_SCHEMA, conform


@dataclass(frozen=True)
class StageResult:
    """The rows a stage kept, the rows it rejected (with reasons), and its statistics."""

    kept: pa.Table
    rejected: pa.Table = field(default_factory=REJECTED_SCHEMA.empty_table)
    added: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def counts(self, rows_in: int) -> dict[str, int]:
        """The accounting line of this result; raises if rows were lost or invented."""
        kept, rejected = self.kept.num_rows, self.rejected.num_rows
        if rows_in + self.added != kept + rejected:
            raise AssertionError(
                f"stage lost rows: {rows_in} in + {self.added} added "
                f"!= {kept} kept + {rejected} rejected"
            )
        return {"in": rows_in, "kept": kept, "rejected": rejected, "added": self.added}


def reject_table(table: pa.Table) -> pa.Table:
    """Conform a table of rejected rows to the rejected-split schema."""
    return conform(table, REJECTED_SCHEMA)
