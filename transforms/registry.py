"""The stages a build spec can name, with their parameter models.

A *local* stage sees one shard at a time. An *ordered* stage sees the shards in order and
carries a state across them (exact dedup's ``seen`` keys); the flow runs it as one task.
Bump a stage's ``version`` whenever its output for the same input changes: the version
is part of every cache key, so a rebuild then recomputes that stage and what follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from transforms.dedup import ExactDedupParams, exact_dedup
from transforms.filters import FilterParams, filter_rows
from transforms.normalize import NormalizeParams, normalize


@dataclass(frozen=True)
class StageDef:
    """A stage: its parameter model, its function and how it is scheduled."""

    name: str
    params: type[BaseModel]
    run: Callable[..., Any]
    version: str = "1"
    new_state: Callable[[], Any] | None = None

    @property
    def ordered(self) -> bool:
        return self.new_state is not None


STAGES: dict[str, StageDef] = {
    stage.name: stage
    for stage in (
        StageDef("normalize", NormalizeParams, normalize),
        StageDef("exact_dedup", ExactDedupParams, exact_dedup, new_state=dict),
        StageDef("filter", FilterParams, filter_rows),
    )
}

DEFAULT_CHAIN: tuple[str, ...] = ("normalize", "exact_dedup", "filter")


def stage(name: str) -> StageDef:
    """Look up a stage by name; the error lists the known ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}") from None
