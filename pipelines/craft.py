"""The ``craft`` stage: query M0, rehearse, query M̃, select by knowledge flow, relabel.

CRaFT (Zhu et al., AAAI-25, arXiv 2410.06913) as one stage over the whole table (its
selection fills global quotas). The pure parts live in :mod:`transforms.craft`; this module
owns the model I/O: it builds the engines (through the generation cache, so a rerun makes
no model calls), fine-tunes M̃ in the Prefect task ``rehearsal`` (cached on the base model,
the training data and the hyper-parameters; its result is the merged checkpoint under the
work folder, so a rerun reuses it), adds every per-row score as a column, and writes the
diagnostics (:mod:`transforms.craft.diagnostics`): the knowledge-state scatter as a PNG and
the CRSS static-conflict rate. ``stats["seconds"]`` times each phase.

Rehearsal data follows the code's selection: open-QA rows with μ ≥ 0.995 and σ ≥ 0.995, at
most 1,000 (seeded), each trained on the model's own most frequent correct answer (the code
means to, but its ``replace_ans`` always falls back to the gold answer: a bug we do not
reproduce); MCQ rows with p(gold) > 0.99, trained on the letter. Under ``fidelity: paper``
(the default) both use the query's prompt, and MCQ rows are not capped. ``fidelity: code``
rehearses as the released code does: open QA on the bare question in the chat template,
as a full fine-tune at 2e-6, batch 16 (the code packs to 2,048 tokens at 1 × 16
accumulation: packing is not reproduced); MCQ capped at 1,000 rows by ``random.sample``
(seed 42), in the chat template with the BASIC instruction, target ``"A\n"``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from prefect import task
from pydantic import Field

from engines.embeddings import Embedder
from engines.hf import TransformersEngine
from engines.models import fingerprint
from engines.prompts import render
from engines.rehearsal import RehearsalParams, rehearse
from pipelines.engine_settings import EngineSettings, close_engine, open_engine
from pipelines.fingerprint import fresh, key_of
from storage.atomic import atomic_path
from storage.gencache import GenerationCache
from transforms.craft.diagnostics import (
    CRSS_THRESHOLD,
    knowledge_state_png,
    state_labels,
    static_conflict_rate,
)
from transforms.craft.evaluation import basic_prompt_text
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
from transforms.craft.select import (
    CERTAINTY,
    CORRECTNESS,
    FLOW,
    IDK,
    LABEL_COLUMN,
    SelectionParams,
    select,
)
from transforms.stage import StageResult

log = logging.getLogger("aligncurate.craft")
FLOW_METHODS = {"craft", "craft_wo_cer"}


class CraftParams(EngineSettings):
    """Every published default of CRaFT, as parameters."""

    model: str = Field(description="the model to be tuned (M0): a local HF folder")
    method: Literal["craft", "cor_rait", "craft_wo_flow", "craft_wo_cer", "vanilla"] = "craft"
    query: QueryParams = Field(default_factory=QueryParams)
    rehearsal: RehearsalParams = Field(default_factory=RehearsalParams)
    rehearsal_max_rows: int = 1000
    rehearsal_min_correctness: float = 0.995
    rehearsal_min_certainty: float = 0.995
    rehearsal_min_p_gold: float = 0.99
    selection: SelectionParams = Field(default_factory=SelectionParams)
    relabel: RelabelParams = Field(default_factory=RelabelParams)
    static_conflict: bool = Field(
        default=True, description="measure CRSS (needs a transformers pass over kept rows)"
    )
    crss_threshold: float = CRSS_THRESHOLD
    seed: int = 0
    fidelity: Literal["paper", "code"] = Field(
        default="paper",
        description="code: the released code's MCQ certainty (raw entropy) and MCQ selection "
        "(ties kept, refills and baseline fills with replacement); see docs/craft.md",
    )


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
    code = params.fidelity == "code"
    pairs = []
    for i in qa:
        target = most_frequent_correct(
            k0.samples[i] or [], rows[i]["references"], rule=params.query.match
        )
        question = question_of(rows[i])
        messages = [{"role": "user", "content": question}] if code else oeqa_messages(question, [])
        if target:
            pairs.append((render_messages(messages), target))
    mcq = [
        i
        for i, r in enumerate(rows)
        if r["task"] == "mcq" and k0.p_gold[i] > params.rehearsal_min_p_gold
    ]
    if code and len(mcq) > params.rehearsal_max_rows:
        mcq = sorted(random.Random(42).sample(mcq, params.rehearsal_max_rows))
    for i in mcq:
        r = rows[i]
        subject = subject_of(r["source"])
        if code:
            text = basic_prompt_text("mcq", question_of(r), r["choices"], subject)
            pair = (render_messages([{"role": "user", "content": text}]), r["references"][0] + "\n")
        else:
            pair = (mcq_prompt(subject, question_of(r), r["choices"], []), " " + r["references"][0])
        pairs.append(pair)
    return pairs


CODE_OEQA_REHEARSAL = {"method": "full", "learning_rate": 2e-6, "batch_size": 16}
"""The code's open-QA rehearsal (``fidelity: code``): full fine-tune at 2e-6, 16 rows a step."""


REHEARSAL_CODE_VERSION = 2
"""Part of the rehearsed checkpoint's key: bump it when :mod:`engines.rehearsal` changes what
it trains (the checkpoint is shared store-wide and reused whenever it exists)."""


def rehearsal_params(params: CraftParams, table: pa.Table) -> RehearsalParams:
    """The rehearsal settings: as given, or under ``fidelity: code`` for an open-QA table the
    code's full fine-tune (:data:`CODE_OEQA_REHEARSAL`)."""
    qa_tasks = set(table.column("task").to_pylist()) & {"open_qa", "mcq"}
    if params.fidelity == "code" and qa_tasks == {"open_qa"}:
        return params.rehearsal.model_copy(update=CODE_OEQA_REHEARSAL)
    return params.rehearsal


@task(
    name="rehearsal",
    cache_key_fn=lambda _context, parameters: parameters["key"],
    persist_result=True,
)
def rehearsal_task(
    key: str, model: str, pairs: list[tuple[str, str]], params: RehearsalParams, folder: str
) -> str:
    """Rehearse M0 into M̃: one Prefect task, cached on (base model, training pairs,
    hyper-parameters), whose result is the merged checkpoint folder."""
    if not (Path(folder) / "config.json").is_file():
        log.info("rehearsal: fine-tuning on %d rows", len(pairs))
        rehearse(model, pairs, Path(folder), params)
    return folder


def rehearsed_model(
    params: CraftParams, pairs: list[tuple[str, str]], root: Path, settings: RehearsalParams
) -> str:
    """The merged checkpoint of M̃, trained now or reused from an earlier run.

    It lives under ``root`` (the store's cache folder), keyed by the base model, the pairs
    and the hyper-parameters only, so every dataset built from the same M0 and the same
    rows (e.g. the method variants of one corpus) shares one rehearsal."""
    key = key_of(
        "rehearsal",
        REHEARSAL_CODE_VERSION,
        fingerprint("model", params.model),
        pairs,
        settings.model_dump(mode="json"),
    )
    folder = root / "rehearsed" / key
    # The task's key names the folder too: a cached result is a path, valid only there.
    return fresh(rehearsal_task, folder)(
        key_of(key, str(folder)), params.model, pairs, settings, str(folder)
    )


class _Clock:
    """Wall-clock seconds per named phase (the benchmark's per-stage breakdown), and the
    part of them spent in models: engine start-up and calls, embeddings, training and
    hidden states."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.model_seconds = 0.0

    @contextmanager
    def __call__(self, phase: str, model: bool = False) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + elapsed, 3)
            if model:
                self.model_seconds += elapsed


def question_vectors(model: str, questions: list[str], work: Path) -> tuple[np.ndarray, int]:
    """Last-layer hidden states of the questions' final tokens on ``model`` (CRSS's
    representation), kept under the work folder so a rerun computes none; returns the
    vectors and how many were computed now."""
    key = key_of("hidden", fingerprint("transformers", model), questions)
    path = work / "hidden" / f"{key}.npy"
    if path.is_file():
        return np.load(path), 0
    vectors = TransformersEngine(model).hidden_states(questions)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:  # two builds at once: own file
        np.save(handle, vectors)
    return vectors, len(questions)


def diagnose(
    selected: StageResult, params: CraftParams, work: Path, clock: _Clock
) -> dict[str, Any]:
    """The knowledge-state scatter (a PNG under the work folder) and the CRSS rate."""
    kept, dropped = selected.kept, selected.rejected
    labels = state_labels(kept, dropped, LABEL_COLUMN)
    both = pa.concat_tables(
        [kept.select([CORRECTNESS, CERTAINTY]), dropped.select([CORRECTNESS, CERTAINTY])]
    )
    png = knowledge_state_png(
        both.column(CORRECTNESS).to_numpy(zero_copy_only=False),
        both.column(CERTAINTY).to_numpy(zero_copy_only=False),
        labels,
        f"CRaFT knowledge state ({params.method})",
    )
    figure = work / "figures" / f"{key_of(png.hex())}.png"
    with atomic_path(figure) as tmp:
        tmp.write_bytes(png)
    out: dict[str, Any] = {"figures": {"knowledge_state": str(figure)}}
    if params.static_conflict:
        rows = kept.select(["task", "prompt", LABEL_COLUMN]).to_pylist()
        with clock("hidden_states", model=True):
            vectors, computed = question_vectors(params.model, [question_of(r) for r in rows], work)
        is_idk = np.array([r[LABEL_COLUMN] == IDK for r in rows], dtype=bool)
        out["static_conflict"] = {
            **static_conflict_rate(vectors[is_idk], vectors[~is_idk], params.crss_threshold),
            "hidden_states_computed": computed,
        }
    return out


def run_craft(
    table: pa.Table, params: CraftParams, work: Path, cache: GenerationCache
) -> StageResult:
    """The whole CRaFT stage over ``table``; adds the score columns, then selects."""
    embedder = Embedder()
    clock = _Clock()
    query_params = params.query
    if params.fidelity == "code":
        query_params = query_params.model_copy(update={"mcq_raw_entropy": True})

    def render_messages(messages: list[dict[str, str]]) -> str:
        return render(params.model, messages)

    def query(model: str, label: str) -> tuple[Knowledge, dict[str, int]]:
        engine = open_engine(params, cache, model)  # the model loads on its first call
        try:
            return query_knowledge(
                table, engine, render_messages, embedder, query_params, label
            ), engine.stats.to_dict()
        finally:
            close_engine(engine)
            clock.model_seconds += engine.stats.engine_seconds

    with clock("query_init"):
        k0, stats_init = query(params.model, "craft_init")
    stats: dict[str, Any] = {"engine_init": stats_init}
    flow = certainty_flow = correctness_m1 = certainty_m1 = np.full(table.num_rows, np.nan)
    if params.method in FLOW_METHODS:
        pairs = rehearsal_pairs(table, k0, params, render_messages)
        stats["rehearsal_rows"] = len(pairs)
        with clock("rehearsal", model=True):
            settings = rehearsal_params(params, table)
            rehearsed = rehearsed_model(params, pairs, cache.path.parent, settings)
        with clock("query_rehearsal"):
            # The same per-row seeds as M0's query (common random numbers): where M̃ did not
            # change, its samples are M0's, so Δμ measures the model, not sampling noise.
            k1, stats["engine_rehearsal"] = query(rehearsed, "craft_init")
        correctness_m1, certainty_m1 = k1.correctness, k1.certainty
        flow = k1.correctness - k0.correctness
        certainty_flow = k1.certainty - k0.certainty
    with clock("selection"):
        scored = table
        for name, values in (
            (CORRECTNESS, k0.correctness),
            (CERTAINTY, k0.certainty),
            ("correctness_rehearsal", correctness_m1),
            ("certainty_rehearsal", certainty_m1),
            (FLOW, flow),
            ("certainty_flow", certainty_flow),
        ):
            scored = scored.append_column(name, pa.array(values, pa.float64(), from_pandas=True))
        selection = {"method": params.method, "fidelity": params.fidelity}
        selected = select(scored, params.selection.model_copy(update=selection))
        relabelled = relabel(selected.kept, params.relabel)
    with clock("diagnostics"):
        stats.update(diagnose(selected, params, work, clock))
    clock.model_seconds += embedder.seconds
    return StageResult(
        kept=relabelled.kept,
        rejected=selected.rejected,
        stats={
            **stats,
            **selected.stats,
            **relabelled.stats,
            "seconds": clock.seconds,
            "model_seconds": round(clock.model_seconds, 3),
        },
    )
