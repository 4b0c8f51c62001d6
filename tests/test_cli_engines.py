"""``aligncurate fact-world`` and ``aligncurate generate`` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert all(
        len(r["samples"]) == 2 and {"text", "finish_reason"} <= set(r["samples"][0]) for r in rows
    )
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
    source.write_text('{"prompt": "ok"}\n')
    code, _, err = generate(tmp_path / "nope", source, tmp_path / "o")
    assert code == 2 and "does not exist" in err
