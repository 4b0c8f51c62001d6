"""rule_filter and the instruction/response statistics on real rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from transforms.ingest import read_source
from transforms.response.lengths import token_counts, word_counts
from transforms.response.rules import RuleFilterParams, rule_filter
from transforms.response.stats import dataset_stats, summarize


def rows_of(path: Path) -> pa.Table:
    return pa.concat_tables(r.kept for r in read_source(path))


@pytest.fixture(scope="module")
def roleplay(shared_data: Path) -> pa.Table:
    return rows_of(shared_data / "instructions" / "gpteacher_roleplay.json").slice(0, 200)


@pytest.fixture(scope="module")
def safety(shared_data: Path) -> pa.Table:
    return rows_of(shared_data / "safety" / "safety_only_data_Instructions.json")


def with_responses(table: pa.Table, responses: dict[int, str]) -> pa.Table:
    values = table.column("response").to_pylist()
    for i, text in responses.items():
        values[i] = text
    return table.set_column(table.column_names.index("response"), "response", pa.array(values))


def reasons(table: pa.Table, params: RuleFilterParams) -> dict[int, str]:
    out = rule_filter(table, params)
    assert out.counts(table.num_rows)["in"] == table.num_rows
    index = {row_id: i for i, row_id in enumerate(table.column("id").to_pylist())}
    return {
        index[row_id]: reason
        for row_id, reason in zip(
            out.rejected.column("id").to_pylist(),
            out.rejected.column("reject_reason").to_pylist(),
            strict=True,
        )
    }


def test_real_rows_pass_and_broken_ones_are_rejected_with_their_rule(roleplay) -> None:
    clean = reasons(roleplay, RuleFilterParams())
    first = roleplay.column("response")[0].as_py()
    sentence = first.split(". ")[0] + ". "
    broken = with_responses(
        roleplay,
        {
            0: sentence * 12,  # a degenerate loop
            1: "As an AI language model, I " + roleplay.column("response")[1].as_py(),
            2: roleplay.column("response")[2].as_py().rsplit(" ", 3)[0] + " and",
            3: "```python\nprint('hi')\n",
            4: "I'm sorry, but I cannot help with that request.",
            5: "",
        },
    )
    found = reasons(broken, RuleFilterParams())
    assert found[0].startswith("repetition:")
    assert found[1] == "boilerplate:as_an_ai_language_model"
    assert found[2] == found[3] == "truncated"
    assert found[4] == "refusal_on_benign"
    assert found[5] == "response_tokens<1"
    assert {k: v for k, v in found.items() if k > 5} == {k: v for k, v in clean.items() if k > 5}
    switched_off = RuleFilterParams(
        max_repetition=None, boilerplate=[], truncated=False, refusal_on_benign=False
    )
    bounds = {k for k, v in clean.items() if k > 5 and v.startswith(("prompt_", "response_"))}
    assert set(reasons(broken, switched_off)) == {5} | bounds


def test_refusals_from_the_refusal_mix_are_not_benign(safety: pa.Table) -> None:
    table = safety.slice(0, 300)
    mixed = table.set_column(
        table.column_names.index("origin"), "origin", pa.array(["refusal_mix"] * 300)
    )
    params = RuleFilterParams(boilerplate=[])
    assert "refusal_on_benign" in reasons(table, params).values()
    assert "refusal_on_benign" not in reasons(mixed, params).values()
    unsafe = RuleFilterParams(boilerplate=[], unsafe_prompt_pattern=r"\w")  # every prompt
    assert "refusal_on_benign" not in reasons(table, unsafe).values()


def test_language_rule_with_lingua(roleplay) -> None:
    table = with_responses(
        roleplay.slice(0, 30),
        {
            0: "Die Französische Revolution begann 1789 und veränderte die politische "
            "Ordnung Europas grundlegend, weil das Bürgertum mehr Rechte verlangte.",
            1: "La Révolution française a commencé en 1789 et a profondément transformé "
            "l'ordre politique de l'Europe pendant les années suivantes.",
        },
    )
    params = RuleFilterParams(languages=["en"], language_fields=["response"])
    found = reasons(table, params)
    assert found == {0: "language:de:response", 1: "language:fr:response"}
    with pytest.raises(ValueError, match="unknown ISO 639-1"):
        RuleFilterParams(languages=["xx"])


def test_word_counts_are_arrows_whitespace_words(roleplay, monkeypatch) -> None:
    """Counted on the bytes, the words Arrow's Unicode whitespace split makes: on real rows
    and on every kind of white space, with byte chunks far smaller than the texts."""
    import pyarrow.compute as pc

    from transforms import text

    def split(texts: pa.Array) -> list[int]:
        trimmed = pc.utf8_trim_whitespace(pc.fill_null(texts, ""))
        words = pc.utf8_split_whitespace(trimmed).to_pylist()
        return [len(w) if t else 0 for t, w in zip(trimmed.to_pylist(), words, strict=True)]

    odd = pa.array(
        ["", " ", None, "a\u00a0b", "a\u2003b c", "x\x0by\x0cz", "\x85z\x85", "  two words  ",
         "tab\tsep\nnl\r", "a\u200bb", "\u3000全角\u3000字", "“smart” quotes’", "café ünïcode", "x"]
    )  # fmt: skip
    assert word_counts(odd).tolist() == split(odd)
    assert word_counts(odd.slice(3, 6)).tolist() == split(odd.slice(3, 6))
    responses = pc.fill_null(roleplay.column("response").combine_chunks(), "")
    assert word_counts(responses).tolist() == split(responses)
    monkeypatch.setattr(text, "CHUNK_BYTES", 64)
    assert word_counts(responses).tolist() == split(responses)
    assert word_counts(odd).tolist() == split(odd)


def test_token_bounds_whitespace_and_model_tokenizer(roleplay, fact_world) -> None:
    words = word_counts(roleplay.column("response"))
    bound = int(np.median(words))
    found = reasons(roleplay, RuleFilterParams(max_response_tokens=bound))
    too_long = {i for i, r in found.items() if r == f"response_tokens>{bound}"}
    assert too_long == set(np.flatnonzero(words > bound).tolist())
    tokenizer = str(fact_world.model_dir)
    tokens = token_counts(roleplay.column("response"), tokenizer)
    assert (tokens > words).mean() > 0.9  # a 1,024-token BPE splits words
    out = rule_filter(roleplay, RuleFilterParams(tokenizer_path=tokenizer))
    kept = out.kept.column("response_tokens").to_numpy()
    assert set(kept.tolist()) <= set(tokens.tolist())
    ratio = out.kept.column("length_ratio").to_numpy()
    prompt = out.kept.column("prompt_tokens").to_numpy()
    assert np.allclose(ratio, prompt / np.maximum(kept, 1))


def test_statistics_and_recommendation(roleplay, shared_data: Path) -> None:
    stats = dataset_stats([roleplay])
    assert stats["rows"] == 200 and stats["unit"] == "whitespace"
    prompt = stats["prompt_tokens"]["mean"]
    assert stats["length_ratio"] == pytest.approx(prompt / stats["response_tokens"]["mean"], 1e-3)
    # Long prompts and short answers (NQ): loss over the prompt, as Shi et al. recommend.
    nq = rows_of(shared_data / "nq" / "dev.csv")
    qa = dataset_stats([nq])
    assert qa["length_ratio"] > 1 and qa["recommendation"]["loss_over_prompt"]
    assert qa["recommendation"]["llamafactory"] == {"train_on_prompt": True}
    # Short prompts, long answers, many rows: completions only.
    many = summarize(np.full(5000, 10), np.full(5000, 200))
    assert not many["recommendation"]["loss_over_prompt"]
    assert many["recommendation"]["trl"] == {"completion_only_loss": True}
    # The same shape with few rows (LIMA-sized) and a moderate ratio: loss over the prompt.
    few = summarize(np.full(1000, 60), np.full(1000, 200))
    assert few["recommendation"]["loss_over_prompt"]
    filtered = rule_filter(roleplay, RuleFilterParams()).kept
    assert dataset_stats([filtered])["unit"] == "rule_filter columns"
