"""Every stage a build spec can name: the pure stages of :mod:`transforms.registry` plus
the model-backed ones, which live in ``pipelines`` because they construct engines."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from engines.embeddings import Embedder
from pipelines.craft import CraftParams, run_craft
from pipelines.judge import JudgeParams, judge_stage
from pipelines.refine import RefineParams, refine_stage
from pipelines.self_guide import SelfGuideParams, self_guide_stage
from pipelines.self_instruct import SelfInstructParams, self_instruct_stage
from storage.gencache import GenerationCache
from transforms.registry import STAGES, StageContext, StageDef
from transforms.response.semantic_dedup import SemanticDedupParams, semantic_dedup
from transforms.stage import StageResult


def craft_stage(table: Any, params: CraftParams, context: StageContext) -> StageResult:
    """The ``craft`` stage: CRaFT over the whole table (see :mod:`pipelines.craft`)."""
    return run_craft(table, params, context.work, GenerationCache(context.cache_dir))


def semantic_dedup_stage(
    table: Any, params: SemanticDedupParams, context: StageContext | None = None
) -> StageResult:
    """The ``semantic_dedup`` stage with the MiniLM embedder its parameters name (the
    transform receives the engine, it never constructs one)."""
    embedder = Embedder(params.embedding_dir, batch_size=params.batch_size)
    return semantic_dedup(table, params, context, embedder=embedder)


ALL_STAGES: dict[str, StageDef] = {
    **STAGES,
    "semantic_dedup": replace(STAGES["semantic_dedup"], run=semantic_dedup_stage),
    "craft": StageDef("craft", CraftParams, craft_stage, whole=True),
    "refine": StageDef("refine", RefineParams, refine_stage, whole=True),
    "self_instruct": StageDef("self_instruct", SelfInstructParams, self_instruct_stage, whole=True),
    "self_guide": StageDef("self_guide", SelfGuideParams, self_guide_stage, whole=True),
    "judge": StageDef("judge", JudgeParams, judge_stage, whole=True),
}


def stage(name: str) -> StageDef:
    """Look up a stage by name; the error lists the known ones."""
    try:
        return ALL_STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(ALL_STAGES)}") from None
