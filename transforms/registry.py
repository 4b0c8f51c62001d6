"""The stages a build spec can name, with their parameter models.

A *local* stage sees one shard at a time. An *ordered* stage sees the shards in order and
carries a state across them (exact dedup's ``seen`` keys); the flow runs it as one task,
after running its ``prepare`` step, if it has one, on every shard as shard-level tasks.
Bump a stage's ``version`` whenever its output for the same input changes: the version
is part of every cache key, so a rebuild then recomputes that stage and what follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from transforms.dedup import ExactDedupParams, exact_dedup
from transforms.filters import FilterParams, filter_rows
from transforms.normalize import NormalizeParams, normalize
from transforms.response.match import MatchParams, match_distribution
from transforms.response.near_dedup import NearDedupParams, near_dedup
from transforms.response.near_dedup import prepare as prepare_near_dedup
from transforms.response.refusal_mix import RefusalMixParams, refusal_mix
from transforms.response.rules import RuleFilterParams, rule_filter
from transforms.response.semantic_dedup import SemanticDedupParams, semantic_dedup


@dataclass(frozen=True)
class StageDef:
    """A stage: its parameter model, its function and how it is scheduled."""

    name: str
    params: type[BaseModel]
    run: Callable[..., Any]
    version: str = "1"
    new_state: Callable[[], Any] | None = None
    whole: bool = False
    """Sees the whole table at once (global quotas, model I/O); runs as
    ``run(table, params, context)`` with a :class:`StageContext`."""
    prepare: Callable[[Any, Any], dict[str, Any]] | None = None
    """An ordered stage's per-shard work that needs no state, as ``prepare(table, params)
    -> {name: numpy array}``: the flow runs it on every input shard as shard-level tasks,
    then the ordered pass runs as ``run(table, params, state, prepared)``."""

    @property
    def ordered(self) -> bool:
        return self.new_state is not None

    @property
    def starts_segment(self) -> bool:
        """Ordered and whole stages each start a new segment (task) of the flow."""
        return self.ordered or self.whole


@dataclass(frozen=True)
class StageContext:
    """What a whole-table stage may use besides its rows: a work folder for its artefacts
    (e.g. a rehearsed checkpoint) and the generation-cache folder."""

    work: Path
    cache_dir: Path


STAGES: dict[str, StageDef] = {
    stage.name: stage
    for stage in (
        StageDef("normalize", NormalizeParams, normalize),
        StageDef("exact_dedup", ExactDedupParams, exact_dedup, new_state=dict),
        StageDef("filter", FilterParams, filter_rows),
        StageDef("rule_filter", RuleFilterParams, rule_filter),
        StageDef(
            "near_dedup",
            NearDedupParams,
            near_dedup,
            version="2",
            new_state=dict,
            prepare=prepare_near_dedup,
        ),
        StageDef("semantic_dedup", SemanticDedupParams, semantic_dedup, whole=True),
        StageDef("match_distribution", MatchParams, match_distribution, whole=True),
        StageDef("refusal_mix", RefusalMixParams, refusal_mix, whole=True),
    )
}

DEFAULT_CHAIN: tuple[str, ...] = ("normalize", "exact_dedup", "filter")
