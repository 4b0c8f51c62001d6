"""The ``craft`` stage: query M0, rehearse, query M̃, select by knowledge flow, relabel.

CRaFT (Zhu et al., AAAI-25, arXiv 2410.06913) as one stage over the whole table (its
selection fills global quotas). The pure parts live in :mod:`transforms.craft`; this module
owns the model I/O: it builds the engines (through the generation cache, so a rerun makes
no model calls), fine-tunes M̃ (the merged checkpoint is kept under the work folder, keyed
by the base model and the training data, so a rerun reuses it) and adds every per-row
score as a column.

Rehearsal data follows the code: open-QA rows with μ ≥ 0.995 and σ ≥ 0.995, at most 1,000
(seeded), each trained on the model's own most frequent correct answer; MCQ rows with
p(gold) > 0.99, trained on the letter. Both use the same prompt as the query.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from engines import make_engine
from engines.cached import CachedEngine
from engines.embeddings import Embedder
from engines.models import fingerprint
from engines.prompts import render
from engines.rehearsal import RehearsalParams, rehearse
from pipelines.fingerprint import key_of
from storage.gencache import GenerationCache
from transforms.craft.query import (
    Knowledge,
    QueryParams,
    mcq_prompt,
    oeqa_messages,
    query_knowledge,
    question_of,
    subject_of,
)
from transforms.craft.relabel import RelabelParams, relabel
from transforms.craft.scores import most_frequent_correct
from transforms.craft.select import SelectionParams, select
from transforms.stage import StageResult

log = logging.getLogger("aligncurate.craft")
FLOW_METHODS = {"craft", "craft_wo_cer"}


class CraftParams(BaseModel):
    """Every published default of CRaFT, as parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="the model to be tuned (M0): a local HF folder")
    engine: Literal["vllm", "openai", "transformers"] = "vllm"
    url: str | None = None
    max_model_len: int | None = 512
    method: Literal["craft", "cor_rait", "craft_wo_flow", "craft_wo_cer", "vanilla"] = "craft"
    query: QueryParams = Field(default_factory=QueryParams)
    rehearsal: RehearsalParams = Field(default_factory=RehearsalParams)
    rehearsal_max_rows: int = 1000
    rehearsal_min_correctness: float = 0.995
    rehearsal_min_certainty: float = 0.995
    rehearsal_min_p_gold: float = 0.99
    selection: SelectionParams = Field(default_factory=SelectionParams)
    relabel: RelabelParams = Field(default_factory=RelabelParams)
    seed: int = 0


def _engine(params: CraftParams, model: str, cache: GenerationCache) -> CachedEngine:
    options: dict[str, Any] = {}
    if params.engine == "vllm" and params.max_model_len:
        options["max_model_len"] = params.max_model_len
    if params.engine == "openai":
        options["url"] = params.url
    return CachedEngine(make_engine(params.engine, model, **options), cache)


def _close(engine: CachedEngine) -> None:
    close = getattr(engine.engine, "close", None)
    if close is not None:
        close()


def rehearsal_pairs(
    table: pa.Table,
    k0: Knowledge,
    params: CraftParams,
    render_messages: Callable[[list[dict[str, str]]], str],
) -> list[tuple[str, str]]:
    """The (prompt, completion) pairs M0 is rehearsed on (see the module docstring)."""
    rows = table.select(["id", "source", "task", "prompt", "references", "choices"]).to_pylist()
    qa = [
        i
        for i, r in enumerate(rows)
        if r["task"] == "open_qa"
        and k0.correctness[i] >= params.rehearsal_min_correctness
        and k0.certainty[i] >= params.rehearsal_min_certainty
    ]
    rng = random.Random(params.seed)
    if len(qa) > params.rehearsal_max_rows:
        qa = sorted(rng.sample(qa, params.rehearsal_max_rows))
    pairs = []
    for i in qa:
        target = most_frequent_correct(
            k0.samples[i] or [], rows[i]["references"], rule=params.query.match
        )
        if target:
            pairs.append((render_messages(oeqa_messages(question_of(rows[i]), [])), target))
    for i, r in enumerate(rows):
        if r["task"] == "mcq" and k0.p_gold[i] > params.rehearsal_min_p_gold:
            prompt = mcq_prompt(subject_of(r["source"]), question_of(r), r["choices"], [])
            pairs.append((prompt, " " + r["references"][0]))
    return pairs


def run_craft(
    table: pa.Table, params: CraftParams, work: Path, cache: GenerationCache
) -> StageResult:
    """The whole CRaFT stage over ``table``; adds the score columns, then selects."""
    embedder = Embedder()

    def render_messages(messages: list[dict[str, str]]) -> str:
        return render(params.model, messages)

    engine0 = _engine(params, params.model, cache)
    try:
        k0 = query_knowledge(table, engine0, render_messages, embedder, params.query, "craft_init")
    finally:
        _close(engine0)
    stats: dict[str, Any] = {"engine_init": engine0.stats.to_dict()}
    flow = certainty_flow = correctness_m1 = certainty_m1 = np.full(table.num_rows, np.nan)
    if params.method in FLOW_METHODS:
        pairs = rehearsal_pairs(table, k0, params, render_messages)
        stats["rehearsal_rows"] = len(pairs)
        key = key_of(
            "rehearsal",
            fingerprint("model", params.model),
            pairs,
            params.rehearsal.model_dump(mode="json"),
        )
        rehearsed = work / "rehearsed" / key
        if not (rehearsed / "config.json").is_file():
            log.info("rehearsal: fine-tuning on %d rows", len(pairs))
            rehearse(params.model, pairs, rehearsed, params.rehearsal)
        engine1 = _engine(params, str(rehearsed), cache)
        try:
            k1 = query_knowledge(
                table, engine1, render_messages, embedder, params.query, "craft_rehearsal"
            )
        finally:
            _close(engine1)
        stats["engine_rehearsal"] = engine1.stats.to_dict()
        correctness_m1, certainty_m1 = k1.correctness, k1.certainty
        flow = k1.correctness - k0.correctness
        certainty_flow = k1.certainty - k0.certainty
    scored = table
    for name, values in (
        ("correctness_init", k0.correctness),
        ("certainty_init", k0.certainty),
        ("correctness_rehearsal", correctness_m1),
        ("certainty_rehearsal", certainty_m1),
        ("knowledge_flow", flow),
        ("certainty_flow", certainty_flow),
    ):
        scored = scored.append_column(name, pa.array(values, pa.float64(), from_pandas=True))
    selected = select(scored, params.selection.model_copy(update={"method": params.method}))
    relabelled = relabel(selected.kept, params.relabel)
    return StageResult(
        kept=relabelled.kept,
        rejected=selected.rejected,
        stats={**stats, **selected.stats, **relabelled.stats},
    )
