"""``aligncurate fact-world`` and ``aligncurate generate`` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from examples.fact_world import query_prompt
from pipelines.cli import app

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_fact_world_writes_facts_and_model(fact_world, tmp_path: Path) -> None:
    code, out, err = invoke("fact-world", "--out", str(tmp_path / "world"), "--json")
    assert code == 0, err
    assert json.loads(out)["config_hash"] == fact_world.manifest["config_hash"]
    facts = [json.loads(line) for line in (tmp_path / "world" / "facts.jsonl").open()]
    assert {f["group"] for f in facts} == {"known", "unknown", "half_known"}
    assert all(f["question"] and f["answers"] for f in facts)
    assert (tmp_path / "world" / "model" / "config.json").is_file()


def write_prompts(path: Path, world) -> int:
    facts = world.facts()[:6]
    lines = [{"messages": query_prompt(f["question"]), "id": f["id"]} for f in facts[:4]]
    lines += [{"prompt": f"Question: {f['question']}\nAnswer:"} for f in facts[4:]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def generate(model: Path, source: Path, target: Path, *extra: str) -> tuple[int, str, str]:
    """``aligncurate generate`` with the transformers engine."""
    return invoke(
        "generate",
        "--model",
        str(model),
        "--engine",
        "transformers",
        "--in",
        str(source),
        "--out",
        str(target),
        *extra,
    )


def test_generate_with_transformers_then_from_cache(fact_world, tmp_path: Path) -> None:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    count = write_prompts(source, fact_world)
    extra = ("--n", "2", "--max-tokens", "12", "--store", str(tmp_path / "store"), "--json")
    code, out, err = generate(fact_world.model_dir, source, target, *extra)
    assert code == 0, err
    cold = json.loads(out)
    assert cold["misses"] == count and cold["hits"] == 0 and cold["engine_calls"] == 1
    rows = [json.loads(line) for line in target.open()]
    assert len(rows) == count and rows[0]["id"] == fact_world.facts()[0]["id"]
    samples = [sample for r in rows for sample in r["samples"]]
    assert all(len(r["samples"]) == 2 for r in rows)
    assert all(s["finish_reason"] in {"stop", "length"} and s["text"] for s in samples)
    assert all(s["cumulative_logprob"] < 0 and "top_logprobs" not in s for s in samples)
    assert (tmp_path / "store" / "_cache" / "generations.sqlite").is_file()

    code, out, _ = generate(fact_world.model_dir, source, target, *extra)
    warm = json.loads(out)
    assert warm["hits"] == count and warm["misses"] == 0 and warm["engine_calls"] == 0
    assert [json.loads(line) for line in target.open()] == rows


def test_generate_names_the_bad_line(fact_world, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    code, _, err = generate(fact_world.model_dir, source, tmp_path / "o")
    assert code == 2 and "line 2" in err and "'messages'" in err
    source.write_text('{"prompt": "ok"}\n{"messages": [1]}\n')
    code, _, err = generate(fact_world.model_dir, source, tmp_path / "o")
    assert code == 2 and "line 2" in err and "'messages[0]'" in err
    source.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "user"}]}\n')
    code, _, err = generate(fact_world.model_dir, source, tmp_path / "o")
    assert code == 2 and "line 1" in err and "'messages[1]'" in err
    source.write_text('{"prompt": "ok"}\n')
    code, _, err = generate(fact_world.model_dir, source, tmp_path / "o", "--n", "0")
    assert code == 2 and "--n" in err
    code, _, err = generate(fact_world.model_dir, source, tmp_path / "o", "--top-p", "0")
    assert code == 2 and "top_p must be in (0, 1]" in err
    code, _, err = generate(tmp_path / "nope", source, tmp_path / "o")
    assert code == 2 and "does not exist" in err


def test_generate_with_vllm_matches_the_engine(vllm_engine, fact_world, tmp_path: Path) -> None:
    """The default engine through the console script: clean JSON on stdout, per-token
    logprobs with ``--logprobs``, and the same greedy answers as the in-process engine."""
    import subprocess
    import sys

    from engines import Request, Sampling
    from engines.prompts import render

    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    count = write_prompts(source, fact_world)
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "generate",
        "--model",
        str(fact_world.model_dir),
        "--in",
        str(source),
        "--out",
        str(target),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--logprobs",
        "2",
        "--max-model-len",
        "512",
        "--store",
        str(tmp_path / "store"),
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout)
    assert stats["misses"] == count and stats["engine"].startswith("vllm:")
    rows = [json.loads(line) for line in target.open()]
    prompts = [
        render(fact_world.model_dir, r["messages"]) if "messages" in r else r["prompt"]
        for r in rows
    ]
    greedy = Sampling(temperature=0.0, max_tokens=12, logprobs=2)
    expected = vllm_engine.generate([Request(p, greedy) for p in prompts])
    for row, (want,) in zip(rows, expected, strict=True):
        (got,) = row["samples"]
        assert got["text"] == want.text and got["finish_reason"] == want.finish_reason
        assert got["cumulative_logprob"] == pytest.approx(want.cumulative_logprob, abs=1e-3)
        assert len(got["token_logprobs"]) == len(got["top_logprobs"]) > 0
