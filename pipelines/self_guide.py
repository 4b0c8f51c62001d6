"""The ``self_guide`` stage: task-specific inputs, then outputs, from the model itself.

SELF-GUIDE (Zhao et al., 2024, arXiv 2407.12874) through the engine layer and the generation
cache; prompts and quality filters in :mod:`transforms.synthesis.self_guide`. The task is
``instruction`` (a parameter) and its demonstrations are ``examples`` rows of the input table
(the first in id order, with a user turn and a response: input = the last user turn, output
= the response). The input rows pass through untouched.

Rounds: ``rounds`` × ``inputs_per_round`` input prompts, each showing the examples (shuffled)
and up to ``max_generated_in_prompt`` inputs kept so far (a random number of them, 1..10 in
the code), drawn with a generator seeded by (``seed``, round); every request has its own
seed. Kept inputs are then annotated (``output_samples`` samples each) and reduced by the
length, noise and self-consistency filters.

Lineage: ``lineage_parents`` are the ids of the example rows; ``lineage_round`` the round
that produced the input; ``lineage_seed`` the seed of the output request.
"""

from __future__ import annotations

import random

import pyarrow as pa
from pydantic import Field

from engines.base import Request, Sampling, row_seed
from engines.cached import CachedEngine
from pipelines.engine_settings import close_engine, open_engine
from pipelines.synthesis import (
    GeneratorSettings,
    as_prompt,
    with_generated,
)
from storage.gencache import GenerationCache
from transforms.registry import StageContext
from transforms.stage import StageResult
from transforms.synthesis import self_guide as sg
from transforms.synthesis.lineage import Generated, generated_tables, user_prompt

STAGE = "self_guide"


class SelfGuideParams(GeneratorSettings):
    """The task, and the published defaults (the code's) of SELF-GUIDE."""

    instruction: str = Field(min_length=1, description="the task instruction")
    examples: int = Field(default=3, ge=1, description="demonstration rows (the paper: ~3)")
    rounds: int = Field(default=10, ge=1)
    inputs_per_round: int = Field(default=10, ge=1)
    input_temperature: float = 1.0
    input_max_tokens: int = 500
    max_generated_in_prompt: int = Field(default=10, ge=0)
    min_input_chars: int = Field(default=120, ge=0)
    output_samples: int = Field(default=10, ge=1)
    output_temperature: float = 0.2
    output_max_tokens: int = 500
    min_frequency: float = 0.2
    seed: int = 0


class SelfGuideError(ValueError):
    """The input table has no usable demonstration rows."""


def task_examples(table: pa.Table, k: int) -> tuple[list[sg.Example], list[str]]:
    """The first ``k`` rows (id order) with a user turn and a response, as examples."""
    rows = sorted(table.select(["id", "prompt", "response"]).to_pylist(), key=lambda r: r["id"])
    examples, ids = [], []
    for row in rows:
        users = [m["content"] for m in row["prompt"] or [] if m["role"] == "user"]
        if users and users[-1].strip() and (row["response"] or "").strip():
            examples.append(sg.Example(users[-1].strip(), row["response"].strip()))
            ids.append(row["id"])
        if len(examples) == k:
            break
    if not examples:
        raise SelfGuideError("self_guide: no input row has a user turn and a response to use")
    return examples, ids


def run_self_guide(table: pa.Table, params: SelfGuideParams, engine: CachedEngine) -> StageResult:
    """SELF-GUIDE over ``engine``; ``table`` passes through, generated rows are added."""
    examples, parents = task_examples(table, params.examples)
    rows: list[Generated] = []
    accepted: list[tuple[str, int]] = []
    seen = {e.input for e in examples}
    input_sampling = Sampling(
        temperature=params.input_temperature, max_tokens=params.input_max_tokens
    )
    for rnd in range(params.rounds):
        rng = random.Random(f"{params.seed}:{STAGE}:round:{rnd}")
        requests = []
        for i in range(params.inputs_per_round):
            kept = [text for text, _ in accepted]
            shown = []
            if kept and params.max_generated_in_prompt:
                shown = rng.sample(
                    kept, rng.randint(1, min(len(kept), params.max_generated_in_prompt))
                )
            demos = rng.sample(examples, len(examples))
            text = sg.input_prompt(params.instruction, demos, shown)
            seed = row_seed(f"{params.seed}:{rnd}", f"{STAGE}:input", i)
            requests.append(Request(as_prompt(params, text), input_sampling, seed))
        for request, samples in zip(requests, engine.generate(requests), strict=True):
            candidate = sg.clean_generation(samples[0].text)
            reason = sg.input_reject_reason(candidate, params.min_input_chars, seen)
            if reason is not None:
                rows.append(
                    Generated(
                        user_prompt(params.instruction, candidate),
                        "",
                        parents,
                        rnd,
                        request.seed,
                        reason,
                    )
                )
                continue
            seen.add(candidate)
            accepted.append((candidate, rnd))
    _annotate(params, engine, examples, parents, accepted, rows)
    kept_rows, rejected = generated_tables(rows, STAGE, engine.fingerprint)
    stats = {
        "engine_self_guide": engine.stats.to_dict(),
        "inputs_kept": len(accepted),
        "generated_rows": len(rows),
    }
    return with_generated(table, kept_rows, rejected, stats)


def _annotate(
    params: SelfGuideParams,
    engine: CachedEngine,
    examples: list[sg.Example],
    parents: list[str],
    accepted: list[tuple[str, int]],
    rows: list[Generated],
) -> None:
    sampling = Sampling(
        n=params.output_samples,
        temperature=params.output_temperature,
        max_tokens=params.output_max_tokens,
    )
    requests = [
        Request(
            as_prompt(params, sg.output_prompt(params.instruction, examples, text)),
            sampling,
            row_seed(text, f"{STAGE}:output:{params.seed}"),
        )
        for text, _ in accepted
    ]
    bounds = sg.length_bounds([e.output for e in examples])
    outputs = engine.generate(requests) if requests else []
    for (text, rnd), request, samples in zip(accepted, requests, outputs, strict=True):
        answers = [sg.clean_generation(s.text) for s in samples]
        output = sg.consistent_output(answers, bounds, params.min_frequency)
        prompt = user_prompt(params.instruction, text)
        if output is None:
            shown = answers[0] if answers else ""
            rows.append(
                Generated(prompt, shown, parents, rnd, request.seed, sg.NO_CONSISTENT_OUTPUT)
            )
        else:
            rows.append(Generated(prompt, output, parents, rnd, request.seed))


def self_guide_stage(
    table: pa.Table, params: SelfGuideParams, context: StageContext
) -> StageResult:
    """The ``self_guide`` stage (whole table): opens the engine, runs, closes it."""
    task_examples(table, params.examples)  # no usable examples: fail before the model loads
    engine = open_engine(params, GenerationCache(context.cache_dir))
    try:
        return run_self_guide(table, params, engine)
    finally:
        close_engine(engine)
