"""Stage ``refusal_mix``: add refusals of unsafe prompts (Response Tuning).

Response Tuning (An & Kim, arXiv 2410.02465) mixes refusals into the training set so that
a model trained on responses learns to refuse unsafe requests. Its refusal source is the
safety-tuned-llamas set (Bianchi et al. 2023, ``safety_only_data_Instructions.json``), of
which it keeps only the outputs matching ``\\b(ai|sorry)\\b`` case-insensitively: 1,829 of
the 2,483 rows. The pattern is this stage's default; the file is not bundled (it is
CC BY-NC 4.0, for research use), so ``source_path`` is required: download it from
:data:`SOURCE_URL` (or name any file ingest reads).

``n`` is absolute (an integer ≥ 1) or a share of the *final* set (a float < 1): with
``share`` s and ``m`` rows coming in, ``round(s·m / (1 − s))`` refusals are added, so they
are ``s`` of the rows that leave the stage. The rows are drawn without replacement with a
seeded generator, skip rows whose id is already in the table, and get
``origin=refusal_mix``. The stage rejects nothing: rows in + added = kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from transforms.schema import conform
from transforms.stage import StageResult

STAGE = "refusal_mix"
SOURCE_URL = (
    "https://github.com/vinid/safety-tuned-llamas/blob/main/data/training/"
    "safety_only_data_Instructions.json"
)
"""Response Tuning's refusal source: safety-tuned-llamas (Bianchi et al. 2023), CC BY-NC 4.0."""
MISSING_SOURCE = (
    "source_path is required: the file of refusals to mix in. Response Tuning uses "
    "safety_only_data_Instructions.json from safety-tuned-llamas (Bianchi et al. 2023, "
    "CC BY-NC 4.0, research use; not bundled with aligncurate): download it from "
    f"{SOURCE_URL} and set source_path to the downloaded file (relative to the spec)"
)
PATTERN = r"\b(ai|sorry)\b"


class RefusalMixParams(BaseModel):
    """How many refusals, from where, matching what (Response Tuning's defaults)."""

    model_config = ConfigDict(extra="forbid")
    n: float = Field(
        gt=0, description="rows to add: a count (>= 1) or a share of the final set (< 1)"
    )
    source_path: str = Field(description="the refusal source: any file ingest reads")
    source_format: str | None = None
    pattern: str = PATTERN
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _source_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("source_path") is None:
            raise PydanticCustomError("missing_source", MISSING_SOURCE)
        return data


def refusal_pool(params: RefusalMixParams) -> pa.Table:
    """The safety source's rows whose response matches ``pattern`` (case-insensitive)."""
    from transforms.ingest import read_source

    tables = [r.kept for r in read_source(params.source_path, format=params.source_format)]
    pool = pa.concat_tables(tables, promote_options="permissive")
    hit = pc.fill_null(
        pc.match_substring_regex(pool.column("response"), params.pattern, ignore_case=True), False
    )
    return pool.filter(hit)


def count_to_add(rows_in: int, n: float) -> int:
    """``n`` if absolute, else the count that makes the added rows a share ``n`` of the
    final set."""
    return int(n) if n >= 1 else round(n * rows_in / (1 - n))


def refusal_mix(table: pa.Table, params: RefusalMixParams, context: Any = None) -> StageResult:
    """``table`` plus the drawn refusals (as the last rows)."""
    pool = refusal_pool(params)
    fresh = pc.invert(
        pc.is_in(pool.column("id"), value_set=pa.array(table.column("id").to_pylist(), pa.string()))
    )
    pool = pool.filter(fresh)
    want = count_to_add(table.num_rows, params.n)
    if want > pool.num_rows:
        raise ValueError(
            f"refusal_mix: {want} refusals asked but {params.source_path} has only "
            f"{pool.num_rows} rows matching {params.pattern!r} (not already in the table)"
        )
    rng = np.random.default_rng(params.seed)
    chosen = np.sort(rng.choice(pool.num_rows, size=want, replace=False))
    added = pool.take(pa.array(chosen, pa.int64()))
    added = added.set_column(
        added.column_names.index("origin"), "origin", pa.array(["refusal_mix"] * want, pa.string())
    )
    out = pa.concat_tables([table, conform(added, table.schema)], promote_options="permissive")
    return StageResult(
        kept=out,
        added=want,
        stats={"pool": pool.num_rows, "added": want, "share": want / max(out.num_rows, 1)},
    )
