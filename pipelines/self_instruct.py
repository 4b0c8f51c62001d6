"""The ``self_instruct`` stage: bootstrap instructions from seed tasks, then instances.

Self-Instruct (Wang et al., ACL 2023, arXiv 2212.10560) through the engine layer and the
generation cache; the pure parts (prompts, parsers, filters, the ROUGE-L novelty index) are
in :mod:`transforms.synthesis`. The input rows pass through untouched; every generated row
is added, kept or rejected with its reason (``self_instruct:*``).

Rounds: each round sends ``requests_per_round`` prompts (the code's ``request_batch_size``,
5), each listing ``prompt_instructions`` (8) pool instructions, ``machine_in_prompt`` (2)
of them machine-generated once there are any, drawn with a random generator seeded by
(``seed``, round). Every request has its own seed (:func:`engines.base.row_seed`). Generation
stops once ``target_instructions`` are in the pool, or after ``max_rounds``. Then every new
instruction gets the classification check and its instances.

Lineage: ``lineage_parents`` holds the pool ids of the instructions shown in the prompt that
produced the row's instruction (seed ids as written in the seed file; ``si-<hash>`` for
machine-made ones); ``self_instruct_task`` is the row's own task id, ``lineage_round`` the
round, ``lineage_seed`` the seed of the request that generated the row's text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import xxhash
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
from transforms.synthesis import self_instruct as si
from transforms.synthesis.lineage import Generated, generated_tables, user_prompt
from transforms.synthesis.rouge import DEFAULT_THRESHOLD, NoveltyIndex

STAGE = "self_instruct"
EXTRA = (
    pa.field("self_instruct_task", pa.string()),
    pa.field("self_instruct_classification", pa.bool_()),
    pa.field("rouge_l_max", pa.float64()),
    pa.field("rouge_l_nearest", pa.string()),
)


class SelfInstructParams(GeneratorSettings):
    """Every published default of Self-Instruct (the code's), as parameters."""

    seeds_path: str | None = Field(
        default=None,
        description="seed tasks (JSON lines); None: the paper's 175 seed tasks, shipped with "
        "aligncurate (transforms/synthesis/data, Apache-2.0)",
    )
    classification_only: bool = Field(
        default=False,
        description="prompt with the classification seeds only, under the classification "
        "header (the code's --use_clf_seed_tasks_only)",
    )
    target_instructions: int = Field(default=100, ge=1)
    max_rounds: int = Field(default=100, ge=1)
    requests_per_round: int = Field(default=5, ge=1)
    prompt_instructions: int = Field(default=8, ge=1)
    machine_in_prompt: int = Field(default=2, ge=0)
    temperature: float = 0.7
    top_p: float = 0.5
    max_tokens: int = 1024
    stop: tuple[str, ...] = si.INSTRUCTION_STOP
    rouge_threshold: float = DEFAULT_THRESHOLD
    clf_demos_yes: int = Field(default=12, ge=0)
    clf_demos_no: int = Field(default=19, ge=0)
    instance_demos: int = Field(default=8, ge=0)
    max_instances: int = Field(default=5, ge=1)
    clf_max_tokens: int = 3
    instance_max_tokens_clf: int = 300
    instance_max_tokens_gen: int = 350
    seed: int = 0


@dataclass
class _Task:
    id: str
    instruction: str
    round: int
    parents: list[str]
    seed: int


def task_id(instruction: str) -> str:
    """The pool id of a machine-generated instruction."""
    return "si-" + xxhash.xxh3_64_hexdigest(instruction.encode())


def instruction_sampling(params: SelfInstructParams) -> Sampling:
    """The sampling of instruction generation (the code's: 0.7, 0.5, 1024, its stops)."""
    return Sampling(
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        stop=tuple(params.stop),
    )


def round_requests(
    params: SelfInstructParams, seeds: list[si.SeedTask], machine: list[_Task], rnd: int
) -> list[tuple[Request, str, list[str]]]:
    """One round's requests, each with its prompt text and the pool ids it shows."""
    rng = random.Random(f"{params.seed}:{STAGE}:round:{rnd}")
    sampling = instruction_sampling(params)
    out = []
    for i in range(params.requests_per_round):
        picked = rng.sample(machine, min(params.machine_in_prompt, len(machine)))
        chosen = [(t.instruction, t.id) for t in picked]
        n_seeds = min(params.prompt_instructions - len(chosen), len(seeds))
        chosen += [(s.instruction, s.id) for s in rng.sample(seeds, n_seeds)]
        rng.shuffle(chosen)
        text = si.instruction_prompt([c[0] for c in chosen], params.classification_only)
        seed = row_seed(f"{params.seed}:{rnd}", STAGE, i)
        out.append((Request(as_prompt(params, text), sampling, seed), text, [c[1] for c in chosen]))
    return out


def bootstrap(
    params: SelfInstructParams,
    engine: CachedEngine,
    seeds: list[si.SeedTask],
    rows: list[Generated],
) -> list[_Task]:
    """Instruction generation rounds; filtered candidates are appended to ``rows``."""
    pool = NoveltyIndex(params.rouge_threshold)
    pool.extend(s.instruction for s in seeds)
    machine: list[_Task] = []
    for rnd in range(params.max_rounds):
        if len(machine) >= params.target_instructions:
            break
        batch = round_requests(params, seeds, machine, rnd)
        outputs = engine.generate([request for request, _, _ in batch])
        for (request, text, parents), samples in zip(batch, outputs, strict=True):
            sample = samples[0]
            base = {"parents": parents, "round": rnd, "seed": request.seed}
            if sample.finish_reason == "length":
                rows.append(Generated(user_prompt(text), sample.text, reason=si.TRUNCATED, **base))
                continue
            candidates = si.split_instructions(sample.text)
            if not candidates:
                rows.append(
                    Generated(user_prompt(text), sample.text, reason=si.NO_INSTRUCTION, **base)
                )
                continue
            for candidate in candidates:
                extra: dict[str, Any] = {}
                reason = si.instruction_reject_reason(candidate)
                if reason is None and (match := pool.check(candidate)) is not None:
                    reason = si.SIMILAR
                    extra = {"rouge_l_max": match.score, "rouge_l_nearest": pool.texts[match.index]}
                if reason is not None:
                    rows.append(
                        Generated(user_prompt(candidate), "", reason=reason, extra=extra, **base)
                    )
                    continue
                pool.add(candidate)
                machine.append(_Task(task_id(candidate), candidate, rnd, parents, request.seed))
    return machine


def _classify(
    params: SelfInstructParams, engine: CachedEngine, seeds: list[si.SeedTask], tasks: list[_Task]
) -> list[bool]:
    demos = si.classification_demos(seeds, params.clf_demos_yes, params.clf_demos_no)
    sampling = Sampling(temperature=0.0, max_tokens=params.clf_max_tokens, stop=si.CLF_STOP)
    requests = [
        Request(
            as_prompt(params, si.classification_prompt(t.instruction, demos)),
            sampling,
            row_seed(t.id, f"{STAGE}:clf"),
        )
        for t in tasks
    ]
    return [si.parse_is_classification(out[0].text) for out in engine.generate(requests)]


def _instances(
    params: SelfInstructParams,
    engine: CachedEngine,
    seeds: list[si.SeedTask],
    tasks: list[_Task],
    is_clf: list[bool],
    rows: list[Generated],
) -> None:
    demos = {k: si.instance_demos(seeds, k, params.instance_demos) for k in (True, False)}
    requests = []
    for task, clf in zip(tasks, is_clf, strict=True):
        budget = params.instance_max_tokens_clf if clf else params.instance_max_tokens_gen
        sampling = Sampling(temperature=0.0, max_tokens=budget, stop=si.INSTANCE_STOP)
        prompt = as_prompt(params, si.instance_prompt(task.instruction, clf, demos[clf]))
        requests.append(Request(prompt, sampling, row_seed(task.id, f"{STAGE}:instances")))
    outputs = engine.generate(requests)
    for task, clf, request, samples in zip(tasks, is_clf, requests, outputs, strict=True):
        sample = samples[0]
        extra = {"self_instruct_task": task.id, "self_instruct_classification": clf}
        base = {"parents": task.parents, "round": task.round, "seed": request.seed, "extra": extra}
        pairs = si.parse_instances(sample.text, clf, truncated=sample.finish_reason == "length")
        found = si.filter_instances(pairs, params.max_instances)
        if not found.kept and not found.dropped:
            rows.append(
                Generated(user_prompt(task.instruction), sample.text, reason=si.NO_INSTANCE, **base)
            )
        for inp, out in found.kept:
            rows.append(Generated(user_prompt(task.instruction, inp), out, **base))
        for inp, out, reason in found.dropped:
            rows.append(Generated(user_prompt(task.instruction, inp), out, reason=reason, **base))


def run_self_instruct(
    table: pa.Table, params: SelfInstructParams, engine: CachedEngine
) -> StageResult:
    """Self-Instruct over ``engine``; ``table`` passes through, generated rows are added."""
    seeds = si.load_seed_tasks(params.seeds_path)  # fails before any generation
    prompt_seeds = (
        [t for t in seeds if t.is_classification] if params.classification_only else seeds
    )
    if not prompt_seeds:
        where = params.seeds_path or si.bundled_seeds()
        raise si.SeedError(f"{where}: no classification seed tasks")
    rows: list[Generated] = []
    tasks = bootstrap(params, engine, prompt_seeds, rows)
    is_clf = _classify(params, engine, seeds, tasks) if tasks else []
    if tasks:
        _instances(params, engine, seeds, tasks, is_clf, rows)
    kept, rejected = generated_tables(rows, STAGE, engine.fingerprint, EXTRA)
    stats = {
        "engine_self_instruct": engine.stats.to_dict(),
        "instructions": len(tasks),
        "classification_tasks": sum(is_clf),
        "generated_rows": len(rows),
    }
    return with_generated(table, kept, rejected, stats)


def self_instruct_stage(
    table: pa.Table, params: SelfInstructParams, context: StageContext
) -> StageResult:
    """The ``self_instruct`` stage (whole table): opens the engine, runs, closes it."""
    si.load_seed_tasks(params.seeds_path)  # a bad seed file fails before the model loads
    engine = open_engine(params, GenerationCache(context.cache_dir))
    try:
        return run_self_instruct(table, params, engine)
    finally:
        close_engine(engine)
