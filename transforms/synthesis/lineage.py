"""Generated rows in the canonical schema, each with its lineage.

Every row a synthesis stage writes — kept or rejected — has ``origin = "synthetic"`` and
these stage columns:

| column | type | meaning |
|---|---|---|
| ``lineage_method`` | string | ``self_instruct``, ``self_guide`` or ``judge`` |
| ``lineage_round`` | int64 | the generation round (0 for one-shot stages) |
| ``lineage_parents`` | list<string> | ids of what the row was generated from (see each stage) |
| ``lineage_generator`` | string | the generating engine's fingerprint (model hash included) |
| ``lineage_seed`` | int64 | the seed of the request that produced it |

The row id is the usual content hash of (source, prompt, response) with the method as
source, so the same generation gets the same id in every build.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from transforms.ids import row_ids
from transforms.schema import MESSAGE, SCHEMA, conform, rejected
from transforms.stage import reject_table

LINEAGE_FIELDS = (
    pa.field("lineage_method", pa.string()),
    pa.field("lineage_round", pa.int64()),
    pa.field("lineage_parents", pa.list_(pa.string())),
    pa.field("lineage_generator", pa.string()),
    pa.field("lineage_seed", pa.int64()),
)


def user_turn(instruction: str, input_text: str = "") -> str:
    """The user turn of an (instruction, input) task: the alpaca reader's convention."""
    instruction = instruction.strip()
    return f"{instruction}\n\n{input_text.strip()}" if input_text.strip() else instruction


def user_prompt(instruction: str, input_text: str = "") -> list[dict[str, str]]:
    return [{"role": "user", "content": user_turn(instruction, input_text)}]


@dataclass
class Generated:
    """One generated row before it becomes Arrow: ``reason`` None means kept."""

    prompt: list[dict[str, str]]
    response: str
    parents: Sequence[str]
    round: int = 0
    seed: int | None = None
    reason: str | None = None
    task: str = "instruction"
    references: list[str] | None = None
    choices: list[str] | None = None
    generator: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def generated_tables(
    rows: Sequence[Generated],
    method: str,
    generator: str,
    extra: Sequence[pa.Field] = (),
) -> tuple[pa.Table, pa.Table]:
    """(kept, rejected) tables of generated rows, canonical columns first, then the lineage
    columns, then the stage's ``extra`` columns (each row's ``extra`` dict, null if absent).
    Rejected rows carry ``reject_stage = method`` and their reason."""
    prompts = pa.array([r.prompt for r in rows], pa.list_(MESSAGE))
    responses = pa.array([r.response for r in rows], pa.string())
    sources = pa.array([method] * len(rows), pa.string())
    columns: dict[str, pa.Array] = {
        "id": row_ids(sources, prompts, responses),
        "source": sources,
        "source_index": pa.array(range(len(rows)), pa.int64()),
        "task": pa.array([r.task for r in rows], pa.string()),
        "prompt": prompts,
        "response": responses,
        "references": pa.array([r.references for r in rows], pa.list_(pa.string())),
        "choices": pa.array([r.choices for r in rows], pa.list_(pa.string())),
        "origin": pa.array(["synthetic"] * len(rows), pa.string()),
        "lineage_method": sources,
        "lineage_round": pa.array([r.round for r in rows], pa.int64()),
        "lineage_parents": pa.array([list(r.parents) for r in rows], pa.list_(pa.string())),
        "lineage_generator": pa.array([r.generator or generator for r in rows], pa.string()),
        "lineage_seed": pa.array([r.seed for r in rows], pa.int64()),
    }
    for f in extra:
        columns[f.name] = pa.array([r.extra.get(f.name) for r in rows], f.type)
    table = conform(pa.table(columns), SCHEMA)
    keep = pa.array([r.reason is None for r in rows], pa.bool_())
    kept = table.filter(keep)
    bad = table.filter(pa.array([r.reason is not None for r in rows], pa.bool_()))
    reasons = [r.reason for r in rows if r.reason is not None]
    return kept, reject_table(rejected(bad, method, reasons))
