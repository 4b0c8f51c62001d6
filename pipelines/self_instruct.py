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

Context: with ``max_model_len`` set, every prompt is fitted to it before it is sent
(:func:`transforms.synthesis.fit.fit_prompt`): it must leave ``min_new_tokens`` to generate,
and its ``max_tokens`` is cut to what the context has left. A prompt that does not fit drops
its last pool instructions (at least one stays) or its last demonstrations (down to none)
until it does. A request that fits with nothing dropped is sent as it is; a trimmed one
shows fewer items (its lineage names only the instructions shown); one that cannot fit even
then is skipped — no instruction request is sent, and a task whose classification or
instance prompt cannot fit is rejected as ``self_instruct:prompt_too_long``. The stage
stats count requests, trimmed and skipped ones per kind (``prompt_fit``). The stage fails
only when no request of a kind fits at all.

Lineage: ``lineage_parents`` holds the pool ids of the instructions shown in the prompt that
produced the row's instruction (seed ids as written in the seed file; ``si-<hash>`` for
machine-made ones); ``self_instruct_task`` is the row's own task id, ``lineage_round`` the
round, ``lineage_seed`` the seed of the request that generated the row's text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import xxhash
from pydantic import Field

from engines.base import EngineError, Request, Sampling, row_seed
from engines.cached import CachedEngine
from engines.prompts import encode
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
from transforms.synthesis.fit import FittedPrompt, fit_prompt
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
    min_new_tokens: int = Field(
        default=16,
        ge=1,
        description="a prompt fits max_model_len when it leaves this many tokens to generate "
        "(or the request's max_tokens, if fewer)",
    )
    seed: int = 0


T = TypeVar("T")
INSTRUCTIONS, CLASSIFICATION, INSTANCES = "instructions", "classification", "instances"
"""The kinds of request, as ``prompt_fit`` counts them."""


class ContextError(EngineError):
    """No prompt of one kind fits ``max_model_len``; the message names the kind and sizes
    (an engine error: the CLI prints it as one line)."""


@dataclass
class PromptFitter:
    """Fits each request's prompt to ``params.max_model_len`` (counted as the engine will see
    it) and counts, per kind, the requests, the trimmed and skipped ones, and the items
    dropped."""

    params: SelfInstructParams
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    smallest: dict[str, int] = field(default_factory=dict)

    def fit(
        self,
        kind: str,
        items: Sequence[T],
        render: Callable[[Sequence[T]], str],
        max_tokens: int,
        min_items: int = 0,
    ) -> FittedPrompt:
        fitted = fit_prompt(
            items,
            render,
            self.count_tokens,
            context=self.params.max_model_len,
            max_tokens=max_tokens,
            min_new_tokens=self.params.min_new_tokens,
            min_items=min_items,
        )
        line = self.counts.setdefault(
            kind, {"requests": 0, "trimmed": 0, "skipped": 0, "dropped_items": 0}
        )
        line["requests"] += 1
        if not fitted.fits:
            line["skipped"] += 1
            tokens = fitted.tokens or 0
            self.smallest[kind] = min(self.smallest.get(kind, tokens), tokens)
        elif fitted.dropped:
            line["trimmed"] += 1
            line["dropped_items"] += fitted.dropped
        return fitted

    def count_tokens(self, text: str) -> int:
        return len(encode(self.params.model, as_prompt(self.params, text)))

    def check(self, kind: str) -> None:
        """Fail when requests of ``kind`` were made and none of them fits."""
        line = self.counts.get(kind)
        if line and line["skipped"] == line["requests"]:
            raise ContextError(
                f"self_instruct: no {kind} prompt fits max_model_len {self.params.max_model_len} "
                f"with {self.params.min_new_tokens} tokens left to generate (the smallest "
                f"takes {self.smallest[kind]} tokens); raise max_model_len or lower "
                "min_new_tokens"
            )

    def stats(self) -> dict[str, Any]:
        return {
            "max_model_len": self.params.max_model_len,
            "trimmed_requests": sum(line["trimmed"] for line in self.counts.values()),
            "skipped_requests": sum(line["skipped"] for line in self.counts.values()),
            **self.counts,
        }


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


def instruction_sampling(params: SelfInstructParams, max_tokens: int | None = None) -> Sampling:
    """The sampling of instruction generation (the code's: 0.7, 0.5, 1024, its stops);
    ``max_tokens`` where the context leaves less than ``params.max_tokens``."""
    return Sampling(
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens if max_tokens is None else max_tokens,
        stop=tuple(params.stop),
    )


def round_requests(
    params: SelfInstructParams,
    seeds: list[si.SeedTask],
    machine: list[_Task],
    rnd: int,
    fitter: PromptFitter | None = None,
) -> list[tuple[Request, str, list[str]]]:
    """One round's requests that fit the context, each with its prompt text and the pool ids
    it shows (a trimmed prompt shows its first instructions only); ``fitter`` counts them."""
    fitter = PromptFitter(params) if fitter is None else fitter
    rng = random.Random(f"{params.seed}:{STAGE}:round:{rnd}")
    out = []
    for i in range(params.requests_per_round):
        picked = rng.sample(machine, min(params.machine_in_prompt, len(machine)))
        chosen = [(t.instruction, t.id) for t in picked]
        n_seeds = min(params.prompt_instructions - len(chosen), len(seeds))
        chosen += [(s.instruction, s.id) for s in rng.sample(seeds, n_seeds)]
        rng.shuffle(chosen)
        fitted = fitter.fit(
            INSTRUCTIONS,
            [c[0] for c in chosen],
            lambda shown: si.instruction_prompt(shown, params.classification_only),
            params.max_tokens,
            min_items=1,
        )
        if not fitted.fits:
            continue
        sampling = instruction_sampling(params, fitted.max_tokens)
        seed = row_seed(f"{params.seed}:{rnd}", STAGE, i)
        request = Request(as_prompt(params, fitted.text), sampling, seed)
        out.append((request, fitted.text, [c[1] for c in chosen[: fitted.shown]]))
    return out


def bootstrap(
    params: SelfInstructParams,
    engine: CachedEngine,
    seeds: list[si.SeedTask],
    rows: list[Generated],
    fitter: PromptFitter | None = None,
) -> list[_Task]:
    """Instruction generation rounds; filtered candidates are appended to ``rows``."""
    fitter = PromptFitter(params) if fitter is None else fitter
    pool = NoveltyIndex(params.rouge_threshold)
    pool.extend(s.instruction for s in seeds)
    machine: list[_Task] = []
    for rnd in range(params.max_rounds):
        if len(machine) >= params.target_instructions:
            break
        batch = round_requests(params, seeds, machine, rnd, fitter)
        outputs = engine.generate([request for request, _, _ in batch]) if batch else []
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
    fitter.check(INSTRUCTIONS)
    return machine


def _too_long(task: _Task, rows: list[Generated], extra: dict[str, Any] | None = None) -> None:
    """The task's row, rejected: its prompt does not fit the context even without demos."""
    base = {"parents": task.parents, "round": task.round, "seed": task.seed}
    extra = {"self_instruct_task": task.id, **(extra or {})}
    rows.append(
        Generated(user_prompt(task.instruction), "", reason=si.PROMPT_TOO_LONG, extra=extra, **base)
    )


def _classify(
    params: SelfInstructParams,
    engine: CachedEngine,
    seeds: list[si.SeedTask],
    tasks: list[_Task],
    fitter: PromptFitter,
) -> list[bool | None]:
    """Each task's classification check (None: its prompt does not fit)."""
    demos = si.classification_demos(seeds, params.clf_demos_yes, params.clf_demos_no)
    requests: dict[int, Request] = {}
    for i, task in enumerate(tasks):
        fitted = fitter.fit(
            CLASSIFICATION,
            demos,
            lambda shown, task=task: si.classification_prompt(task.instruction, shown),
            params.clf_max_tokens,
        )
        if fitted.fits:
            sampling = Sampling(temperature=0.0, max_tokens=fitted.max_tokens, stop=si.CLF_STOP)
            seed = row_seed(task.id, f"{STAGE}:clf")
            requests[i] = Request(as_prompt(params, fitted.text), sampling, seed)
    fitter.check(CLASSIFICATION)
    outputs = dict(zip(requests, engine.generate(list(requests.values())), strict=True))
    return [
        si.parse_is_classification(outputs[i][0].text) if i in outputs else None
        for i in range(len(tasks))
    ]


def _instances(
    params: SelfInstructParams,
    engine: CachedEngine,
    seeds: list[si.SeedTask],
    tasks: list[_Task],
    is_clf: list[bool],
    rows: list[Generated],
    fitter: PromptFitter,
) -> None:
    demos = {k: si.instance_demos(seeds, k, params.instance_demos) for k in (True, False)}
    sent: list[tuple[_Task, bool, Request]] = []
    for task, clf in zip(tasks, is_clf, strict=True):
        budget = params.instance_max_tokens_clf if clf else params.instance_max_tokens_gen
        fitted = fitter.fit(
            INSTANCES,
            demos[clf],
            lambda shown, task=task, clf=clf: si.instance_prompt(task.instruction, clf, shown),
            budget,
        )
        if not fitted.fits:
            _too_long(task, rows, {"self_instruct_classification": clf})
            continue
        sampling = Sampling(temperature=0.0, max_tokens=fitted.max_tokens, stop=si.INSTANCE_STOP)
        seed = row_seed(task.id, f"{STAGE}:instances")
        sent.append((task, clf, Request(as_prompt(params, fitted.text), sampling, seed)))
    fitter.check(INSTANCES)
    outputs = engine.generate([request for _, _, request in sent])
    for (task, clf, request), samples in zip(sent, outputs, strict=True):
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
    fitter = PromptFitter(params)
    tasks = bootstrap(params, engine, prompt_seeds, rows, fitter)
    checked = _classify(params, engine, seeds, tasks, fitter) if tasks else []
    for task, clf in zip(tasks, checked, strict=True):
        if clf is None:
            _too_long(task, rows)
    classified = [(t, c) for t, c in zip(tasks, checked, strict=True) if c is not None]
    if classified:
        _instances(
            params,
            engine,
            seeds,
            [t for t, _ in classified],
            [c for _, c in classified],
            rows,
            fitter,
        )
    kept, rejected = generated_tables(rows, STAGE, engine.fingerprint, EXTRA)
    stats = {
        "engine_self_instruct": engine.stats.to_dict(),
        "instructions": len(tasks),
        "classification_tasks": sum(c for _, c in classified),
        "generated_rows": len(rows),
        "prompt_fit": fitter.stats(),
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
