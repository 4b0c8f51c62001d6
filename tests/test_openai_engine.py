"""The OpenAI-compatible engine against a real ``vllm serve`` on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engines import EngineError, Request, Sampling, row_seed
from engines.cached import CachedEngine
from engines.openai import OpenAIEngine
from engines.prompts import render
from engines.server import VLLMServer, free_port
from engines.vllm_engine import VLLMEngine
from examples.fact_world import query_prompt
from storage.gencache import GenerationCache

OEQA = Sampling(n=4, temperature=1.0, max_tokens=30)


def requests_for(world, k: int, stage: str = "openai") -> list[Request]:
    facts = world.facts()[:k]
    return [
        Request(
            render(world.model_dir, query_prompt(f["question"])), OEQA, row_seed(f["id"], stage)
        )
        for f in facts
    ]


@pytest.fixture
def server(vllm_server: VLLMServer) -> VLLMServer:
    """The session's ``vllm serve`` (tests/conftest.py)."""
    return vllm_server


def test_server_matches_in_process_vllm(
    server: VLLMServer, vllm_engine: VLLMEngine, fact_world
) -> None:
    client = OpenAIEngine(server.url, fact_world.model_dir)
    requests = requests_for(fact_world, 12)

    def texts(outputs: list) -> list[list[tuple[str, str | None]]]:
        return [[(s.text, s.finish_reason) for s in out] for out in outputs]

    assert texts(client.generate(requests)) == texts(vllm_engine.generate(requests))
    with_logprobs = [
        Request(r.prompt, Sampling(n=2, max_tokens=8, logprobs=2), r.seed) for r in requests[:4]
    ]
    remote, local = client.generate(with_logprobs), vllm_engine.generate(with_logprobs)
    for a, b in zip(remote, local, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.text == y.text
            np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)
    prompts = [r.prompt for r in requests[:3]]
    np.testing.assert_allclose(
        client.score_options(prompts, list("ABCD")),
        vllm_engine.score_options(prompts, list("ABCD")),
        rtol=1e-4,
    )


def test_bad_request_is_a_clear_error(server: VLLMServer, fact_world) -> None:
    client = OpenAIEngine(server.url, fact_world.model_dir)
    with pytest.raises(EngineError, match=r"refused the request \(400\)"):
        client.generate([Request("word " * 2000, Sampling(max_tokens=5))])


def test_server_down_fails_fast_and_clearly(fact_world) -> None:
    client = OpenAIEngine(
        f"http://127.0.0.1:{free_port()}", fact_world.model_dir, retries=2, backoff=0.05
    )
    start = time.monotonic()
    with pytest.raises(EngineError, match=r"failed after 3 attempts \(is it running"):
        client.generate(requests_for(fact_world, 2))
    assert time.monotonic() - start < 10


def test_server_killed_mid_run_keeps_the_cache_consistent(fact_world, tmp_path: Path) -> None:
    requests = requests_for(fact_world, 240, stage="kill")
    cache = GenerationCache(tmp_path / "cache")
    server = VLLMServer(fact_world.model_dir, max_model_len=512).start()
    try:
        client = OpenAIEngine(server.url, fact_world.model_dir, retries=1, backoff=0.1)
        engine = CachedEngine(client, cache, batch_size=40)
        done: list[int] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                engine.generate(requests, progress=lambda n, total: done.append(n))
            except BaseException as exc:
                failure.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        while not done:  # the first batch is stored: now kill the server mid-run
            time.sleep(0.05)
            assert worker.is_alive() or done, failure
        server.stop(grace=0)
        worker.join(120)
    finally:
        server.stop()
    assert failure and isinstance(failure[0], EngineError)
    stored = len(cache)
    assert stored % 40 == 0 and 40 <= stored < 240  # whole batches only

    # The rerun starts while the server is still down, so every request it sends fails
    # and is retried until the server comes back on the same address.
    client = OpenAIEngine(server.url, fact_world.model_dir, retries=10, backoff=0.5)
    rerun = CachedEngine(client, cache, batch_size=40)
    outputs: list[list] = []
    worker = threading.Thread(target=lambda: outputs.extend(rerun.generate(requests)))
    worker.start()
    time.sleep(1)
    with VLLMServer(fact_world.model_dir, port=server.port, max_model_len=512):
        worker.join(300)
    assert len(outputs) == 240
    assert rerun.stats.hits == stored and rerun.stats.misses == 240 - stored
    # Each missing request was answered exactly once, retries or not, and stored once.
    assert sum(client.sent.values()) == 240 - stored and len(cache) == 240
    again = CachedEngine(client, cache, batch_size=40)
    assert again.generate(requests) == outputs and again.stats.engine_calls == 0


def test_cli_generate_attaches_to_a_running_server(
    server: VLLMServer, fact_world, tmp_path: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from pipelines.cli import app

    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        "".join(
            json.dumps({"messages": query_prompt(f["question"])}) + "\n"
            for f in fact_world.facts()[:5]
        )
    )
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(fact_world.model_dir),
            "--engine",
            "openai",
            "--url",
            server.url,
            "--in",
            str(source),
            "--out",
            str(target),
            "--n",
            "3",
            "--json",
            "--store",
            str(tmp_path / "store"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["misses"] == 5 and stats["engine"].startswith("openai:")
    assert all(len(json.loads(line)["samples"]) == 3 for line in target.open())


def test_server_command_uses_cpu_settings_only_on_cpu(fact_world) -> None:
    from engines.server import CPU_FLAGS
    from engines.vllm_engine import on_cpu

    default = VLLMServer(fact_world.model_dir, port=8000).command()
    assert ("--no-enable-chunked-prefill" in default) == on_cpu()
    assert all(flag in default for flag in CPU_FLAGS) == on_cpu()
    custom = VLLMServer(fact_world.model_dir, port=8000, extra_args=("--dtype", "bfloat16"))
    assert custom.command()[-2:] == ["--dtype", "bfloat16"]
    assert "--no-enable-chunked-prefill" not in custom.command()
