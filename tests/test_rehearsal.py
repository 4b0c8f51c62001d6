"""Rehearsal fine-tuning on the fact-world model: the merged checkpoint loads in vLLM and
its answers changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines import EngineError, Request, Sampling
from engines.hf import TransformersEngine
from engines.models import fingerprint
from engines.prompts import render
from engines.rehearsal import RehearsalParams, rehearse
from engines.vllm_engine import VLLMEngine
from examples.fact_world import query_prompt

GREEDY = Sampling(n=1, temperature=0.0, max_tokens=20)


def answer_logprob(engine: TransformersEngine, prompt: str, answer: str) -> float:
    """log p(answer | prompt), teacher-forced."""
    import torch

    from engines.prompts import encode

    p, a = encode(engine.model_path, prompt), encode(engine.model_path, answer)
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logits = engine.model(ids).logits[0, len(p) - 1 : -1]
    return float(torch.log_softmax(logits, -1)[torch.arange(len(a)), torch.tensor(a)].sum())


def test_lora_rehearsal_changes_answers_and_loads_in_vllm(fact_world, tmp_path: Path) -> None:
    half = [f for f in fact_world.facts() if f["group"] == "half_known"][:24]
    pairs = [
        (render(fact_world.model_dir, query_prompt(f["question"])), f["answers"][0]) for f in half
    ]
    # A learning rate that flips greedy answers on this small set (the default LoRA at 2e-4
    # moved fact world v3's half-known facts too little to flip them).
    params = RehearsalParams(learning_rate=2e-3)
    out = rehearse(fact_world.model_dir, pairs, tmp_path / "rehearsed", params)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob(".rehearsed.*"))  # no temporary folder left behind
    assert fingerprint("vllm", out) != fingerprint("vllm", fact_world.model_dir)

    before, after = TransformersEngine(fact_world.model_dir), TransformersEngine(out)
    gain = [answer_logprob(after, p, a) - answer_logprob(before, p, a) for p, a in pairs]
    assert np.mean(gain) > 0  # rehearsal made the trained answers more likely

    merged = VLLMEngine(out, max_model_len=512)
    try:
        requests = [Request(p, GREEDY) for p, _ in pairs]
        ours = [s[0].text for s in merged.generate(requests)]
    finally:
        merged.close()
    theirs = [s[0].text for s in before.generate(requests)]
    assert ours != theirs  # the merged checkpoint answers differently
    assert ours == [s[0].text for s in after.generate(requests)]  # and vLLM runs the merge


def test_full_fine_tune_option_and_empty_data(fact_world, tmp_path: Path) -> None:
    params = RehearsalParams(method="full", epochs=1)
    assert params.lr == 2e-6 and RehearsalParams().lr == 2e-4
    fact = fact_world.facts()[0]
    prompt = render(fact_world.model_dir, query_prompt(fact["question"]))
    out = rehearse(fact_world.model_dir, [(prompt, fact["answers"][0])], tmp_path / "full", params)
    assert (out / "model.safetensors").is_file()
    with pytest.raises(EngineError, match="at least one"):
        rehearse(fact_world.model_dir, [], tmp_path / "none")


def test_defaults_are_crafts_and_loss_is_on_the_completion_only(fact_world) -> None:
    """CRaFT's code: LoRA r 64, alpha 16, dropout 0.1, lr 2e-4, 3 epochs (full: lr 2e-6)."""
    from engines.rehearsal import _examples, collate

    params = RehearsalParams()
    assert (params.method, params.lora_r, params.lora_alpha, params.lora_dropout) == (
        "lora",
        64,
        16,
        0.1,
    )
    assert (params.lr, params.epochs, RehearsalParams(method="full").lr) == (2e-4, 3.0, 2e-6)

    fact = fact_world.facts()[0]
    prompt = render(fact_world.model_dir, query_prompt(fact["question"]))
    pairs = [(prompt, fact["answers"][0]), (prompt, "a much longer completion than the other")]
    data = _examples(str(fact_world.model_dir), pairs)
    input_ids, labels, mask = collate(data, pad=0)
    eos = TransformersEngine(fact_world.model_dir).tokenizer.eos_token_id
    for row, (ids, prompt_len) in enumerate(data):
        assert ids[-1] == eos and input_ids[row, : len(ids)].tolist() == ids
        assert (labels[row, :prompt_len] == -100).all()
        assert labels[row, prompt_len : len(ids)].tolist() == ids[prompt_len:]
        assert (labels[row, len(ids) :] == -100).all() and mask[row].sum() == len(ids)
