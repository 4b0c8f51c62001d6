"""The ``judge`` stage: sample responses from the target model and judge each, as in CUT.

CUT (Xu et al., arXiv 2312.14591) aligns a model with judgments of its own responses. For
every input row with a user turn, this stage samples ``samples`` (k, default 1) responses
from the target model, at temperature 1.0, top_p 1.0, at most 256 tokens (our defaults: CUT
does not publish its online sampling settings), and judges each one (see
:mod:`transforms.synthesis.judge`): ``reference`` (deterministic, rows with ``references``)
or ``llm`` (any engine, given in ``judge_llm``).

The input rows pass through untouched. Each judged response is a new row (``origin =
synthetic``, ``lineage_method = judge``, ``lineage_parents = [the prompt row's id]``) with the
prompt row's prompt, task and references, the sampled ``response`` and the columns
``judgment`` (text), ``judgment_ok`` (bool) and ``judge`` (the judge's fingerprint).
Rejected, with their reason: empty responses, a sample repeating an earlier sample of the
same prompt, and verdicts the ``llm`` judge wrote in no parseable form (never guessed).
Rows without references are not sampled under the ``reference`` judge, nor rows that are
judged responses already (both counted in ``stats.skipped_prompts``).

``user_template`` reformats the last user turn for generation only (e.g. the CRaFT query
form for the fact world); the stored prompt stays the row's own.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
import xxhash
from pydantic import Field, model_validator

from engines.base import Request, Sampling, row_seed
from engines.cached import CachedEngine
from pipelines.engine_settings import close_engine, open_engine
from pipelines.synthesis import (
    GeneratorSettings,
    as_chat_prompt,
    as_prompt,
    with_generated,
)
from storage.gencache import GenerationCache
from transforms.registry import StageContext
from transforms.stage import StageResult
from transforms.synthesis import judge as jd
from transforms.synthesis.lineage import Generated, generated_tables

STAGE = "judge"
EXTRA = (
    pa.field("judgment", pa.string()),
    pa.field("judgment_ok", pa.bool_()),
    pa.field("judge", pa.string()),
    pa.field("judge_sample", pa.int64()),
)


class JudgeParams(GeneratorSettings):
    """The target model (top-level generator settings), the judge, and the sampling."""

    judge: Literal["reference", "llm"] = "reference"
    judge_llm: GeneratorSettings | None = Field(
        default=None, description="the judging model, for judge: llm"
    )
    samples: int = Field(default=1, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    user_template: str = "{content}"
    judge_temperature: float = 0.0
    judge_max_tokens: int = 256
    seed: int = 0

    @model_validator(mode="after")
    def _judge_model(self) -> JudgeParams:
        if self.judge == "llm" and self.judge_llm is None:
            raise ValueError("judge 'llm' needs judge_llm: {model: <folder>, engine: ...}")
        if "{content}" not in self.user_template:
            raise ValueError("user_template must contain {content}")
        return self


def _generation_messages(prompt: list[dict[str, str]], template: str) -> list[dict[str, str]]:
    last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    turn = {"role": "user", "content": template.replace("{content}", prompt[last]["content"])}
    return [*prompt[:last], turn, *prompt[last + 1 :]]


def _instruction(prompt: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def judgeable(row: dict[str, Any], judge: str) -> bool:
    """Not a judged response itself, has a user turn (and references, for the reference
    judge)."""
    if row.get("judgment_ok") is not None:
        return False
    if not any(m["role"] == "user" for m in row["prompt"] or []):
        return False
    return judge != "reference" or bool(row.get("references"))


def llm_fingerprint(engine: CachedEngine) -> str:
    template = xxhash.xxh3_64_hexdigest(jd.JUDGE_TEMPLATE.encode())
    return f"llm:{engine.fingerprint}:rubric-{template}"


def run_judge(
    table: pa.Table,
    params: JudgeParams,
    target: CachedEngine,
    judge_engine: CachedEngine | None = None,
    release_target: bool = False,
) -> StageResult:
    """Sample and judge (``judge_engine`` is required for ``judge: llm``).
    ``release_target`` closes the target engine once sampled, before the judge loads."""
    columns = ["id", "task", "prompt", "references", "choices"]
    if "judgment_ok" in table.column_names:
        columns.append("judgment_ok")
    all_rows = table.select(columns).to_pylist()
    rows = [r for r in all_rows if judgeable(r, params.judge)]
    sampling = Sampling(
        n=params.samples,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
    )
    requests = [
        Request(
            as_chat_prompt(params, _generation_messages(r["prompt"], params.user_template)),
            sampling,
            row_seed(r["id"], f"{STAGE}:{params.seed}"),
        )
        for r in rows
    ]
    outputs = target.generate(requests)
    generator = target.fingerprint
    if release_target:
        close_engine(target)
    out: list[Generated] = []
    pending: list[tuple[Generated, dict[str, Any]]] = []  # waiting for the llm verdict
    for row, request, samples in zip(rows, requests, outputs, strict=True):
        seen: set[str] = set()
        for j, sample in enumerate(samples):
            response = sample.text.strip()
            g = Generated(
                prompt=row["prompt"],
                response=response,
                parents=[row["id"]],
                seed=request.seed,
                task=row["task"],
                references=row["references"],
                choices=row["choices"],
                extra={"judge_sample": j},
            )
            out.append(g)
            if not response:
                g.reason = jd.EMPTY_RESPONSE
            elif response in seen:
                g.reason = jd.DUPLICATE_SAMPLE
            elif params.judge == "reference":
                verdict = jd.reference_judgment(
                    response, row["task"], row["references"], row["choices"]
                )
                g.extra |= {"judgment": verdict.text, "judgment_ok": verdict.ok}
            else:
                pending.append((g, row))
            seen.add(response)
    stats: dict[str, Any] = {"engine_target": target.stats.to_dict()}
    fingerprint = jd.reference_fingerprint()
    if pending:
        assert judge_engine is not None and params.judge_llm is not None
        fingerprint = llm_fingerprint(judge_engine)
        _llm_verdicts(params, params.judge_llm, judge_engine, pending)
        stats["engine_judge"] = judge_engine.stats.to_dict()
    for g in out:
        if "judgment" in g.extra or g.reason == jd.UNPARSEABLE:
            g.extra["judge"] = fingerprint
    kept, rejected = generated_tables(out, STAGE, generator, EXTRA)
    stats |= {
        "judged_prompts": len(rows),
        "skipped_prompts": len(all_rows) - len(rows),
        "responses": len(out),
        "ok": sum(1 for g in out if g.reason is None and g.extra.get("judgment_ok")),
        "not_ok": sum(1 for g in out if g.reason is None and g.extra.get("judgment_ok") is False),
    }
    return with_generated(table, kept, rejected, stats)


def _llm_verdicts(
    params: JudgeParams,
    settings: GeneratorSettings,
    engine: CachedEngine,
    pending: list[tuple[Generated, dict[str, Any]]],
) -> None:
    sampling = Sampling(temperature=params.judge_temperature, max_tokens=params.judge_max_tokens)
    requests = [
        Request(
            as_prompt(
                settings,
                jd.judge_prompt(_instruction(row["prompt"]), g.response, row["references"]),
            ),
            sampling,
            row_seed(f"{row['id']}:{g.extra['judge_sample']}", f"{STAGE}:llm:{params.seed}"),
        )
        for g, row in pending
    ]
    for (g, _), samples in zip(pending, engine.generate(requests), strict=True):
        verdict = jd.parse_verdict(samples[0].text)
        g.extra |= {"judgment": verdict.text or samples[0].text, "judgment_ok": verdict.ok}
        if verdict.ok is None:
            g.reason = jd.UNPARSEABLE


def judge_stage(table: pa.Table, params: JudgeParams, context: StageContext) -> StageResult:
    """The ``judge`` stage (whole table): opens the target and judge engines, runs, closes."""
    cache = GenerationCache(context.cache_dir)
    judge_engine = open_engine(params.judge_llm, cache) if params.judge_llm else None
    target = open_engine(params, cache)
    try:
        return run_judge(table, params, target, judge_engine, release_target=True)
    finally:
        close_engine(target)
        if judge_engine is not None:
            close_engine(judge_engine)
