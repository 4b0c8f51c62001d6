"""The ``llm`` judge against a real ``vllm serve`` (OpenAI engine), the target model in-process.

The fact-world model is no judge: it answers the rubric with a fictional fact, not with a
``Verdict:`` line. That is the case the stage must handle: every such judgment is rejected
as unparseable (never guessed), with the judge's text kept for inspection.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.cached import CachedEngine
from engines.openai import OpenAIEngine
from engines.server import VLLMServer
from pipelines.judge import JudgeParams, llm_fingerprint, run_judge
from pipelines.synthesis import GeneratorSettings
from storage.gencache import GenerationCache
from transforms.ingest import read_source
from transforms.synthesis import judge as jd

QUERY = "Answer the following question as simple as possible.\nQuestion: {content}\nAnswer:"


@pytest.fixture
def server(vllm_server: VLLMServer) -> VLLMServer:
    """The session's ``vllm serve`` (tests/conftest.py)."""
    return vllm_server


def test_llm_judge_through_the_openai_engine(
    server: VLLMServer, vllm_engine, fact_world, tmp_path: Path
) -> None:
    table = next(iter(read_source(fact_world.facts_path, format="open_qa"))).kept.slice(0, 12)
    model = str(fact_world.model_dir)
    params = JudgeParams(
        model=model,
        judge="llm",
        judge_llm=GeneratorSettings(model=model, engine="openai", url=server.url),
        user_template=QUERY,
        judge_max_tokens=32,
    )
    cache = GenerationCache(tmp_path / "cache")
    target = CachedEngine(vllm_engine, cache)
    judge = CachedEngine(OpenAIEngine(server.url, model), cache)
    result = run_judge(table, params, target, judge)
    assert result.counts(table.num_rows)["added"] == table.num_rows
    assert result.stats["engine_judge"]["engine_calls"] == 1
    fingerprint = llm_fingerprint(judge)
    assert fingerprint.startswith("llm:openai:")
    judged = result.kept.slice(table.num_rows).to_pylist() + result.rejected.to_pylist()
    assert len(judged) == table.num_rows
    for row in judged:
        assert row["judge"] == fingerprint and row["judgment"]
        verdict = jd.parse_verdict(row["judgment"])
        if row.get("reject_reason"):
            assert row["reject_reason"] == jd.UNPARSEABLE and row["judgment_ok"] is None
            assert verdict.ok is None  # the raw judge text is kept and is no verdict
        else:
            assert row["judgment_ok"] is not None
    assert result.rejected.num_rows > 0  # the fact-world model writes no verdicts
    again_target = CachedEngine(vllm_engine, cache)
    again_judge = CachedEngine(OpenAIEngine(server.url, model), cache)
    again = run_judge(table, params, again_target, again_judge)
    assert again.stats["engine_judge"]["engine_calls"] == 0
    assert again.stats["engine_target"]["engine_calls"] == 0
    assert again.rejected.equals(result.rejected)
