"""The model-free parts of CRaFT: knowledge measures, selection, relabelling, THS.

Every expected number below is worked out by hand from the formulas in the module
docstrings (CRaFT, Zhu et al., AAAI-25, arXiv 2410.06913) or read off the paper's tables.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from transforms.craft import (
    AMBIGUOUS,
    FLOW_NONNEGATIVE,
    LABEL_COLUMN,
    LETTERS,
    METHODS,
    MISSING_SCORE,
    OVER_QUOTA,
    UNSUPPORTED_TASK,
    VARIED_REFUSALS,
    RelabelParams,
    SelectionParams,
    is_correct,
    is_refusal,
    letter_index,
    mcq_knowledge,
    mcq_subject,
    most_frequent_correct,
    normalize_answer,
    oeqa_correctness,
    relabel,
    select,
    truthful_helpfulness_score,
    varied_refusal,
)
from transforms.ids import row_ids
from transforms.schema import REJECTED_SCHEMA, conform, messages, validate
from transforms.stage import StageResult

# ---------------------------------------------------------------- canonical test tables


def canonical(rows: list[dict[str, Any]], source: str = "trivia_train") -> pa.Table:
    """Canonical rows (schema helpers, real content ids) plus the given score columns.

    Each row: ``name`` (kept in the question text), ``task`` (default open_qa), and any of
    ``mu``, ``sigma``, ``flow``. MCQ rows get four choices and the letter B as gold.
    """
    prompts, responses, references, choices, tasks = [], [], [], [], []
    for row in rows:
        task = row.get("task", "open_qa")
        question = f"What is the answer to question {row['name']}?"
        if task == "mcq":
            options = [f"{row['name']} option {letter}" for letter in LETTERS]
            body = "\n".join(
                [question, *(f"{x}. {o}" for x, o in zip(LETTERS, options, strict=True))]
            )
            prompts.append([{"role": "user", "content": body}])
            responses.append("B")
            references.append(["B"])
            choices.append(options)
        else:
            prompts.append([{"role": "user", "content": question}])
            responses.append(f"answer {row['name']}")
            references.append([f"answer {row['name']}"])
            choices.append(None)
        tasks.append(task)
    n = len(rows)
    prompt = messages(prompts)
    sources = pa.array([source] * n, pa.string())
    response = pa.array(responses, pa.string())
    table = pa.table(
        {
            "id": row_ids(sources, prompt, response),
            "source": sources,
            "source_index": pa.array(range(n), pa.int64()),
            "task": pa.array(tasks, pa.string()),
            "prompt": prompt,
            "response": response,
            "references": pa.array(references, pa.list_(pa.string())),
            "choices": pa.array(choices, pa.list_(pa.string())),
            "origin": pa.array(["corpus"] * n, pa.string()),
        }
    )
    table = conform(table)
    validate(table)
    for key, column in (("mu", "correctness_init"), ("sigma", "certainty_init")):
        if any(key in row for row in rows):
            table = table.append_column(column, pa.array([r.get(key) for r in rows], pa.float64()))
    if any("flow" in row for row in rows):
        flows = pa.array([r.get("flow") for r in rows], pa.float64())
        table = table.append_column("knowledge_flow", flows)
    return table


# name, μ, σ, Δμ — open QA, default thresholds 0.51 / 0.49
OEQA_ROWS = [
    {"name": "v1", "mu": 1.0, "sigma": 0.90, "flow": 0.0},
    {"name": "v2", "mu": 0.8, "sigma": 0.95, "flow": 0.1},
    {"name": "v3", "mu": 0.6, "sigma": 0.50, "flow": -0.2},
    {"name": "v4", "mu": 0.9, "sigma": 0.70, "flow": 0.0},
    {"name": "a1", "mu": 0.5, "sigma": 0.10, "flow": -0.5},  # ambiguous
    {"name": "k1", "mu": 0.3, "sigma": 0.20, "flow": -0.1},  # IdK candidate
    {"name": "k2", "mu": 0.4, "sigma": 0.60, "flow": -0.3},  # IdK candidate
    {"name": "k3", "mu": 0.2, "sigma": 0.40, "flow": 0.0},  # zero flow
    {"name": "k4", "mu": 0.1, "sigma": 0.30, "flow": 0.2},  # rising
    {"name": "z1", "mu": 0.0, "sigma": 0.05, "flow": 0.0},  # never correct
    {"name": "z2", "mu": 0.0, "sigma": 0.15, "flow": 0.1},  # never correct under M0
]


@pytest.fixture
def oeqa() -> pa.Table:
    return canonical(OEQA_ROWS)


def names(table: pa.Table) -> list[str]:
    """The row names (``v1`` ...) of a table built by :func:`canonical`, in row order."""
    out = []
    for prompt in table.column("prompt").to_pylist():
        text = prompt[-1]["content"]
        out.append(text.split("question ")[1].split("?")[0])
    return out


def by_label(result: StageResult) -> dict[str, set[str]]:
    labels = result.kept.column(LABEL_COLUMN).to_pylist()
    out: dict[str, set[str]] = {"vanilla": set(), "idk": set()}
    for name, label in zip(names(result.kept), labels, strict=True):
        out[label].add(name)
    return out


def by_reason(result: StageResult) -> dict[str, str]:
    reasons = result.rejected.column("reject_reason").to_pylist()
    return dict(zip(names(result.rejected), reasons, strict=True))


def check_accounting(result: StageResult, table: pa.Table) -> None:
    """rows in = kept + rejected (+ added); every rejected row has a stage and a reason."""
    counts = result.counts(table.num_rows)
    assert counts["kept"] + counts["rejected"] == table.num_rows + result.added
    assert result.rejected.schema.names[: len(REJECTED_SCHEMA)] == REJECTED_SCHEMA.names
    assert set(result.rejected.column("reject_stage").to_pylist()) <= {"craft"}
    assert all(result.rejected.column("reject_reason").to_pylist())
    seen = set(result.kept.column("id").to_pylist()) | set(result.rejected.column("id").to_pylist())
    assert seen == set(table.column("id").to_pylist())
    if result.added == 0:
        assert result.kept.num_rows == len(set(result.kept.column("id").to_pylist()))


# ------------------------------------------------------------------------- open-QA scores


def test_normalize_and_refusal() -> None:
    assert normalize_answer("  Paris \n") == "paris"
    assert is_refusal("I don't know")
    assert is_refusal("Well... i DON'T KNOW, sorry")
    assert is_refusal("I don\u2019t know.")  # curly apostrophe
    assert not is_refusal("I do not know")
    assert not is_refusal("Paris")


def test_is_correct_substring_vs_exact() -> None:
    refs = ["Paris", "  City of Light "]
    assert is_correct("The capital is PARIS.", refs)  # substring, the code's rule
    assert not is_correct("The capital is PARIS.", refs, rule="exact")
    assert is_correct("  paris ", refs, rule="exact")
    assert is_correct("city of light", refs, rule="exact")
    assert not is_correct("Lyon", refs)
    assert not is_correct("I don't know, maybe Paris", refs)  # a refusal is never correct
    assert not is_correct("I don't know", ["I don't know"], rule="exact")
    assert not is_correct("anything", ["", "  "])  # empty aliases match nothing
    assert is_correct("answer x", ["", "x"])
    with pytest.raises(ValueError, match="match rule"):
        is_correct("x", ["x"], rule="fuzzy")  # type: ignore[arg-type]


def test_oeqa_correctness_is_the_share_of_correct_samples() -> None:
    samples = [
        ["Paris", "paris.", "London", "I don't know, Paris?"],
        ["Rome", "Rome", "Rome", "Milan", "rome"],
        [],
    ]
    refs = [["Paris"], ["Rome"], ["x"]]
    mu = oeqa_correctness(samples, refs)
    assert mu[:2].tolist() == [0.5, 0.8]  # 2/4 (refusal not correct), 4/5
    assert math.isnan(mu[2])  # no samples: missing, not 0
    exact = oeqa_correctness([["Paris", "paris.", " PARIS "]], [["Paris"]], rule="exact")
    assert exact.tolist() == pytest.approx([2 / 3])
    with pytest.raises(ValueError, match="2 sample lists but 1"):
        oeqa_correctness([["a"], ["b"]], [["a"]])


def test_most_frequent_correct_answer() -> None:
    refs = ["Paris"]
    samples = ["the city of Paris", "Paris ", "London", " Paris", "London", "London"]
    assert most_frequent_correct(samples, refs) == "Paris"  # 2 vs 1; London is not correct
    tie = ["Lyon", "in Paris", "Paris", "Paris", "in Paris"]
    assert most_frequent_correct(tie, refs) == "in Paris"  # 2 each: the first one seen wins
    assert most_frequent_correct(["Lyon", "I don't know Paris"], refs) is None
    assert most_frequent_correct(["paris", "Paris"], refs, rule="exact") == "paris"


# ---------------------------------------------------------------------------- MCQ scores


def test_mcq_knowledge_by_hand() -> None:
    probs = np.array(
        [
            [0.5, 0.3, 0.1, 0.1],
            [0.2, 0.2, 0.2, 0.2],  # sums to 0.8: renormalised to uniform
            [0.0, 0.0, 0.0, 0.0],  # all zero: uniform
            [0.9, 0.0, 0.0, 0.0],  # all mass on A
            [0.02, 0.06, 0.01, 0.01],  # sums to 0.1
        ]
    )
    k = mcq_knowledge(probs, [0, 3, 1, 0, 1])
    assert k.p_gold.tolist() == pytest.approx([0.5, 0.2, 0.0, 0.9, 0.06])
    assert k.correctness.tolist() == pytest.approx([0.5, 0.25, 0.25, 1.0, 0.6])
    sigma0 = 0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 2 * 0.1 * math.log(0.1)
    assert sigma0 == pytest.approx(-1.168282, abs=1e-6)
    sigma4 = 0.2 * math.log(0.2) + 0.6 * math.log(0.6) + 2 * 0.1 * math.log(0.1)
    expected = [sigma0, -math.log(4), -math.log(4), 0.0, sigma4]
    assert k.certainty.tolist() == pytest.approx(expected)
    assert k.renormalised[4].tolist() == pytest.approx([0.2, 0.6, 0.1, 0.1])
    assert k.renormalised[2].tolist() == [0.25] * 4


def test_mcq_knowledge_bounds_on_many_rows() -> None:
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.full(5, 0.3), size=500)[:, :4]  # a 5th "other token" takes mass
    probs[::50] = 0.0
    gold = rng.integers(0, 4, size=500)
    k = mcq_knowledge(probs, gold)
    assert np.allclose(k.renormalised.sum(axis=1), 1.0)
    assert np.all((k.correctness >= 0) & (k.correctness <= 1))
    assert np.all((k.certainty >= -math.log(4)) & (k.certainty <= 0))
    assert np.allclose(k.correctness, k.renormalised[np.arange(500), gold])


def test_mcq_knowledge_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="n×k"):
        mcq_knowledge(np.zeros(4), [0])
    with pytest.raises(ValueError, match="row 1: option probabilities"):
        mcq_knowledge(np.array([[0.1] * 4, [0.1, -0.1, 0.1, 0.1]]), [0, 0])
    with pytest.raises(ValueError, match="row 0: gold index 4"):
        mcq_knowledge(np.full((1, 4), 0.25), [4])
    with pytest.raises(ValueError, match="2 rows of probabilities but 1"):
        mcq_knowledge(np.full((2, 4), 0.25), [0])


def test_letters() -> None:
    assert [letter_index(x) for x in LETTERS] == [0, 1, 2, 3]
    assert letter_index(" c ") == 2
    with pytest.raises(ValueError, match="is not one of A, B, C, D"):
        letter_index("E")


# ----------------------------------------------------------------------------- selection


def test_params_defaults_and_validation() -> None:
    params = SelectionParams()
    assert params.method == "craft" and params.idk_share == 0.2 and params.size is None
    assert params.thresholds("open_qa") == (0.51, 0.49)
    assert params.thresholds("mcq") == (0.5, 0.5)
    assert SelectionParams(tau_hi=0.7).thresholds("mcq") == (0.7, 0.5)
    with pytest.raises(ValueError, match="tau_lo"):
        SelectionParams(tau_hi=0.3, tau_lo=0.4)
    with pytest.raises(ValueError):
        SelectionParams(idk_ratio=0.2)  # type: ignore[call-arg]  # extra="forbid"
    assert set(METHODS) == {"craft", "cor_rait", "craft_wo_flow", "craft_wo_cer", "vanilla"}


def test_craft_reasons_quota_and_certainty_order(oeqa: pa.Table) -> None:
    result = select(oeqa, SelectionParams(size=5))
    check_accounting(result, oeqa)
    # quota: round(5 × 0.2) = 1 IdK, 4 vanilla; k1 (σ 0.2) is less certain than k2 (σ 0.6)
    assert by_label(result) == {"vanilla": {"v1", "v2", "v3", "v4"}, "idk": {"k1"}}
    assert by_reason(result) == {
        "a1": AMBIGUOUS,
        "k2": OVER_QUOTA,
        "k3": FLOW_NONNEGATIVE,  # Δμ = 0 is not IdK for open QA by default
        "k4": FLOW_NONNEGATIVE,
        "z1": FLOW_NONNEGATIVE,  # μ = 0 under the strict rule
        "z2": FLOW_NONNEGATIVE,
    }
    assert result.stats["labels"] == {"vanilla": 4, "idk": 1}
    assert result.stats["candidates"] == {"vanilla": 4, "idk": 2}
    assert result.stats["quota"] == {"vanilla": 4, "idk": 1}
    assert result.stats["reasons"] == {AMBIGUOUS: 1, OVER_QUOTA: 1, FLOW_NONNEGATIVE: 4}
    assert result.stats["warnings"] == [] and result.added == 0
    # kept rows keep their input order
    assert names(result.kept) == ["v1", "v2", "v3", "v4", "k1"]

    smaller = select(oeqa, SelectionParams(size=3))  # 1 IdK + 2 most certain vanilla
    assert by_label(smaller) == {"vanilla": {"v2", "v1"}, "idk": {"k1"}}
    assert by_reason(smaller)["v4"] == by_reason(smaller)["v3"] == OVER_QUOTA
    check_accounting(smaller, oeqa)


def test_size_none_takes_as_many_as_the_share_allows(oeqa: pa.Table) -> None:
    # 4 vanilla and 2 IdK candidates at share 0.2: 5 rows (1 IdK); 6 would need 5 vanilla
    result = select(oeqa, SelectionParams())
    assert result.stats["labels"] == {"vanilla": 4, "idk": 1}
    half = select(oeqa, SelectionParams(idk_share=0.5))  # 2 + 2
    assert by_label(half) == {"vanilla": {"v1", "v2"}, "idk": {"k1", "k2"}}
    assert by_reason(half)["v4"] == OVER_QUOTA
    only_vanilla = select(oeqa, SelectionParams(idk_share=0.0))
    assert only_vanilla.stats["labels"] == {"vanilla": 4, "idk": 0}
    assert by_reason(only_vanilla)["k1"] == OVER_QUOTA
    only_idk = select(oeqa, SelectionParams(idk_share=1.0))
    assert only_idk.stats["labels"] == {"vanilla": 0, "idk": 2}
    vanilla_only = oeqa.filter(pa.array([n.startswith("v") for n in names(oeqa)]))
    two = select(vanilla_only, SelectionParams())  # round(2 × 0.2) = 0 IdK still fits
    assert two.stats["labels"] == {"vanilla": 2, "idk": 0}
    nothing = select(vanilla_only, SelectionParams(idk_share=0.5))  # round(1 × 0.5) = 1
    assert nothing.kept.num_rows == 0 and "cannot fill any row" in nothing.stats["warnings"][0]
    empty = select(oeqa.slice(0, 0), SelectionParams())
    assert empty.counts(0) == {"in": 0, "kept": 0, "rejected": 0, "added": 0}


def test_idk_share_within_rounding() -> None:
    rng = np.random.default_rng(3)
    rows = [
        {"name": f"r{i}", "mu": float(m), "sigma": float(s), "flow": float(f)}
        for i, (m, s, f) in enumerate(
            zip(
                rng.integers(0, 11, 400) / 10, rng.random(400), rng.normal(0, 0.2, 400), strict=True
            )
        )
    ]
    table = canonical(rows)
    for share in (0.2, 0.25, 0.3):
        for size in range(1, 60, 7):
            result = select(table, SelectionParams(size=size, idk_share=share))
            labels = result.stats["labels"]
            assert labels["vanilla"] + labels["idk"] == size
            assert labels["idk"] == math.floor(size * share + 0.5)  # round half up
            assert abs(labels["idk"] / size - share) <= 0.5 / size + 1e-12
            assert result.stats["warnings"] == []
            check_accounting(result, table)
        free = select(table, SelectionParams(idk_share=share)).stats["labels"]
        total = free["vanilla"] + free["idk"]
        assert free["idk"] == math.floor(total * share + 0.5)


def test_too_few_candidates_warns_and_never_repeats_rows(oeqa: pa.Table) -> None:
    result = select(oeqa, SelectionParams(size=20))  # quota 16 vanilla + 4 IdK
    assert result.stats["labels"] == {"vanilla": 4, "idk": 2}
    assert result.added == 0 and result.kept.num_rows == 6
    warnings = result.stats["warnings"]
    assert len(warnings) == 2
    assert "only 4 vanilla candidates for a quota of 16" in warnings[0]
    assert "only 2 idk candidates for a quota of 4" in warnings[1]
    assert all("no sampling with replacement" in w for w in warnings)
    check_accounting(result, oeqa)

    again = select(oeqa, SelectionParams(size=20, replace=True, seed=5))
    assert again.stats["labels"] == {"vanilla": 16, "idk": 4}
    assert again.added == 14 and again.counts(oeqa.num_rows)["kept"] == 20
    assert set(by_label(again)["idk"]) == {"k1", "k2"}
    assert all("with replacement" in w for w in again.stats["warnings"])
    check_accounting(again, oeqa)
    same = select(oeqa, SelectionParams(size=20, replace=True, seed=5))
    assert same.kept.column("id").to_pylist() == again.kept.column("id").to_pylist()


def test_never_correct_open_qa_rows_can_be_admitted(oeqa: pa.Table) -> None:
    strict = select(oeqa, SelectionParams(size=10, idk_share=0.4))
    assert by_label(strict)["idk"] == {"k1", "k2"}
    assert by_reason(strict)["z1"] == by_reason(strict)["z2"] == FLOW_NONNEGATIVE

    admitted = select(oeqa, SelectionParams(size=10, idk_share=0.4, admit_never_correct=True))
    # 4 IdK: k1, k2, z1, z2 (Δμ ≥ 0 but μ = 0); k3 (μ 0.2, Δμ 0) stays out
    assert by_label(admitted)["idk"] == {"k1", "k2", "z1", "z2"}
    assert by_reason(admitted)["k3"] == FLOW_NONNEGATIVE
    least_certain = select(oeqa, SelectionParams(size=5, admit_never_correct=True))
    assert by_label(least_certain)["idk"] == {"z1"}  # σ 0.05 is the lowest
    check_accounting(admitted, oeqa)

    zero_flow = select(oeqa, SelectionParams(size=10, idk_share=0.4, oeqa_zero_flow_is_idk=True))
    assert by_label(zero_flow)["idk"] == {"k1", "k2", "k3", "z1"}  # Δμ = 0 now counts
    assert by_reason(zero_flow)["z2"] == FLOW_NONNEGATIVE


MCQ_ROWS = [
    {"name": "m1", "task": "mcq", "mu": 0.9, "sigma": -0.2, "flow": 0.05},
    {"name": "m2", "task": "mcq", "mu": 0.5, "sigma": -0.5, "flow": -0.1},  # boundary: vanilla
    {"name": "m3", "task": "mcq", "mu": 0.49, "sigma": -1.0, "flow": 0.0},  # zero flow
    {"name": "m4", "task": "mcq", "mu": 0.2, "sigma": -1.3, "flow": 0.1},
    {"name": "m5", "task": "mcq", "mu": 0.1, "sigma": -1.2, "flow": -0.2},
]


def test_mcq_threshold_boundary_and_zero_flow() -> None:
    table = canonical(MCQ_ROWS, source="anatomy_test")
    result = select(table, SelectionParams(size=4, idk_share=0.5))
    assert by_label(result) == {"vanilla": {"m1", "m2"}, "idk": {"m3", "m5"}}
    assert by_reason(result) == {"m4": FLOW_NONNEGATIVE}  # no ambiguous band for MCQ
    check_accounting(result, table)

    strict = select(table, SelectionParams(size=4, idk_share=0.5, mcq_zero_flow_is_idk=False))
    assert by_label(strict)["idk"] == {"m5"}
    assert by_reason(strict)["m3"] == FLOW_NONNEGATIVE
    assert "only 1 idk candidates for a quota of 2" in strict.stats["warnings"][0]


def test_mcq_idk_order_is_least_certain_first() -> None:
    table = canonical(MCQ_ROWS, source="anatomy_test")
    result = select(table, SelectionParams(size=2, idk_share=0.5))
    # IdK candidates m3 (σ −1.0) and m5 (σ −1.2): m5 is the less certain
    assert by_label(result) == {"vanilla": {"m1"}, "idk": {"m5"}}
    assert by_reason(result) == {"m2": OVER_QUOTA, "m3": OVER_QUOTA, "m4": FLOW_NONNEGATIVE}


def test_thresholds_are_per_task_in_a_mixed_table() -> None:
    rows = [*OEQA_ROWS, *MCQ_ROWS]
    table = canonical(rows)
    result = select(table, SelectionParams(size=8, idk_share=0.25))
    # size 8 split 11:5 between the tasks → 5.5 / 2.5 → 6 open QA (tie to the first) + 2 MCQ
    per_task = result.stats["per_task"]
    assert per_task["open_qa"]["quota"] == {"vanilla": 4, "idk": 2}
    assert per_task["mcq"]["quota"] == {"vanilla": 1, "idk": 1}
    assert per_task["mcq"]["thresholds"] == {"tau_hi": 0.5, "tau_lo": 0.5}
    assert per_task["open_qa"]["thresholds"] == {"tau_hi": 0.51, "tau_lo": 0.49}
    assert by_reason(result)["a1"] == AMBIGUOUS
    check_accounting(result, table)


def test_cor_rait_is_correctness_only_with_a_seeded_random_fill(oeqa: pa.Table) -> None:
    table = oeqa.drop_columns(["certainty_init", "knowledge_flow"])
    result = select(table, SelectionParams(method="cor_rait", size=5))
    labels = by_label(result)
    assert labels["vanilla"] == {"v1", "v2", "v3", "v4"}
    assert len(labels["idk"]) == 1
    assert labels["idk"] <= {"k1", "k2", "k3", "k4", "z1", "z2"}  # no flow condition
    assert by_reason(result)["a1"] == AMBIGUOUS
    assert result.stats["candidates"] == {"vanilla": 4, "idk": 6}
    assert set(by_reason(result).values()) == {AMBIGUOUS, OVER_QUOTA}
    check_accounting(result, table)
    # deterministic for a seed, whatever the row order
    reverse = table.take(pa.array(range(table.num_rows - 1, -1, -1)))
    again = select(reverse, SelectionParams(method="cor_rait", size=5))
    assert by_label(again) == labels
    picks = {
        frozenset(by_label(select(table, SelectionParams(method="cor_rait", seed=s)))["idk"])
        for s in range(12)
    }
    assert len(picks) > 1  # the seed matters


def test_craft_wo_flow_orders_by_certainty_without_the_flow(oeqa: pa.Table) -> None:
    table = oeqa.drop_columns(["knowledge_flow"])
    result = select(table, SelectionParams(method="craft_wo_flow", size=10))
    # IdK candidates by σ ascending: z1 .05, z2 .15, k1 .2, k4 .3, ...; quota 2
    assert by_label(result) == {"vanilla": {"v1", "v2", "v3", "v4"}, "idk": {"z1", "z2"}}
    assert by_reason(result)["k1"] == OVER_QUOTA
    assert "only 4 vanilla candidates for a quota of 8" in result.stats["warnings"][0]
    check_accounting(result, table)


def test_craft_wo_cer_uses_the_flow_then_random(oeqa: pa.Table) -> None:
    table = oeqa.drop_columns(["certainty_init"])
    result = select(table, SelectionParams(method="craft_wo_cer", size=5))
    assert len(by_label(result)["idk"]) == 1
    assert by_label(result)["idk"] <= {"k1", "k2"}
    assert by_reason(result)["k3"] == FLOW_NONNEGATIVE
    check_accounting(result, table)
    seeds = {
        frozenset(by_label(select(table, SelectionParams(method="craft_wo_cer", seed=s)))["idk"])
        for s in range(12)
    }
    assert seeds == {frozenset({"k1"}), frozenset({"k2"})}


def test_vanilla_keeps_every_row(oeqa: pa.Table) -> None:
    instruction = canonical([{"name": "i1", "task": "instruction"}])
    mixed = pa.concat_tables([oeqa, instruction], promote_options="default")
    bare = mixed.select([c for c in mixed.column_names if c in oeqa.column_names])
    result = select(bare.drop_columns(["correctness_init"]), SelectionParams(method="vanilla"))
    assert result.rejected.num_rows == 0 and result.kept.num_rows == bare.num_rows
    assert set(result.kept.column(LABEL_COLUMN).to_pylist()) == {"vanilla"}
    assert result.kept.column("response").to_pylist() == bare.column("response").to_pylist()
    sized = select(oeqa, SelectionParams(method="vanilla", size=4, seed=1))
    assert sized.stats["labels"] == {"vanilla": 4, "idk": 0}
    assert set(by_reason(sized).values()) == {OVER_QUOTA}
    check_accounting(sized, oeqa)


def test_unsupported_tasks_missing_scores_and_columns(oeqa: pa.Table) -> None:
    extra = canonical(
        [
            {"name": "i1", "task": "instruction", "mu": 0.9, "sigma": 0.9, "flow": 0.0},
            {"name": "n1", "mu": None, "sigma": 0.5, "flow": -0.1},
            {"name": "n2", "mu": 0.2, "sigma": 0.5, "flow": None},
            {"name": "n3", "mu": 0.9, "sigma": float("nan"), "flow": 0.0},
            {"name": "n4", "mu": 0.7, "sigma": 0.5, "flow": None},  # vanilla: flow not needed
        ]
    )
    table = pa.concat_tables([oeqa, extra])
    result = select(table, SelectionParams(size=5))
    reasons = by_reason(result)
    assert reasons["i1"] == UNSUPPORTED_TASK
    assert reasons["n1"] == reasons["n2"] == reasons["n3"] == MISSING_SCORE
    # n4 ties v3 on σ (0.5): the higher μ (0.7 > 0.6) goes first, so v3 is over quota
    assert by_label(result)["vanilla"] == {"v2", "v1", "v4", "n4"}
    assert reasons["v3"] == OVER_QUOTA
    check_accounting(result, table)
    with pytest.raises(ValueError, match="knowledge_flow"):
        select(oeqa.drop_columns(["knowledge_flow"]), SelectionParams())
    with pytest.raises(ValueError, match="certainty_init"):
        select(oeqa.drop_columns(["certainty_init"]), SelectionParams(method="craft_wo_flow"))


def test_selection_is_deterministic(oeqa: pa.Table) -> None:
    a = select(oeqa, SelectionParams(size=5))
    b = select(oeqa.take(pa.array([10, 3, 5, 0, 1, 2, 4, 6, 7, 8, 9])), SelectionParams(size=5))
    assert by_label(a) == by_label(b) and by_reason(a) == by_reason(b)
    rerun = select(a.kept, SelectionParams(method="vanilla"))  # an old label is replaced
    assert rerun.kept.column_names.count(LABEL_COLUMN) == 1


# ----------------------------------------------------------------------------- relabel

OEQA_PROMPT = (
    "Answer the following question, and if you don't know the answer, only reply with "
    "'I don't know': What is the answer to question {}?"
)
MCQ_PROMPT = (
    "There is a single choice question about {subject}. If you know the answer, please "
    "directly respond with the correct answer A, B, C, or D. If you do not know the answer, "
    'please respond with "I don\'t know.".\n'
    "Question: What is the answer to question {name}?\n"
    "A. {name} option A\nB. {name} option B\nC. {name} option C\nD. {name} option D\n"
    "Answer: "
)


def test_relabel_open_qa(oeqa: pa.Table) -> None:
    selected = select(oeqa, SelectionParams(size=5)).kept
    result = relabel(selected, RelabelParams())
    assert result.rejected.num_rows == 0
    result.counts(selected.num_rows)
    rows = {name: row for name, row in zip(names(selected), result.kept.to_pylist(), strict=True)}
    assert rows["k1"]["response"] == "I don't know"
    assert rows["k1"]["original_response"] == "answer k1"
    assert rows["v1"]["response"] == "answer v1" and rows["v1"]["original_response"] is None
    for name, row in rows.items():
        assert row["prompt"] == [{"role": "user", "content": OEQA_PROMPT.format(name)}]
        assert row["rait_question"] == f"What is the answer to question {name}?"
        assert row["id"] == selected.column("id")[names(selected).index(name)].as_py()
    assert result.stats["labels"] == {"idk": 1, "vanilla": 4}
    assert result.stats["refusals"] == {"I don't know": 1}

    plain = relabel(selected, RelabelParams(rait_prompt=False)).kept
    assert plain.column("prompt").to_pylist() == selected.column("prompt").to_pylist()
    assert "rait_question" in plain.column_names


def test_relabel_mcq_prompt_and_refusal() -> None:
    selected = select(
        canonical(MCQ_ROWS, source="high_school_physics_test"),
        SelectionParams(size=4, idk_share=0.5),
    ).kept
    result = relabel(selected, RelabelParams())
    rows = {name: row for name, row in zip(names(selected), result.kept.to_pylist(), strict=True)}
    assert rows["m5"]["response"] == "I don't know." and rows["m5"]["original_response"] == "B"
    assert rows["m1"]["response"] == "B"  # vanilla keeps the gold letter
    expected = MCQ_PROMPT.format(subject="high school physics", name="m1")
    assert rows["m1"]["prompt"] == [{"role": "user", "content": expected}]
    assert rows["m3"]["rait_question"] == "What is the answer to question m3?"
    assert rows["m3"]["choices"] == [f"m3 option {x}" for x in LETTERS]

    generic = relabel(
        select(canonical(MCQ_ROWS, source="mmlu"), SelectionParams(size=2)).kept,
        RelabelParams(),
    ).kept
    text = generic.column("prompt")[0].as_py()[0]["content"]
    assert text.startswith("There is a single choice question. If you know the answer")
    assert mcq_subject("abstract_algebra_dev") == "abstract algebra"
    assert mcq_subject("mmlu") is None


def test_relabel_varied_refusals_are_deterministic() -> None:
    rows = [{"name": f"q{i}", "mu": 0.2, "sigma": 0.1 + i / 100, "flow": -0.1} for i in range(40)]
    selected = select(canonical(rows), SelectionParams(size=40, idk_share=1.0)).kept
    params = RelabelParams(varied_refusals=True)
    first = relabel(selected, params).kept
    second = relabel(selected.take(pa.array(range(39, -1, -1))), params).kept
    by_id = dict(
        zip(second.column("id").to_pylist(), second.column("response").to_pylist(), strict=True)
    )
    responses = first.column("response").to_pylist()
    for row_id, response in zip(first.column("id").to_pylist(), responses, strict=True):
        assert response == varied_refusal(row_id) == by_id[row_id]
    assert len(set(responses)) > 3  # really varied
    assert set(responses) <= set(VARIED_REFUSALS)
    assert len(VARIED_REFUSALS) == 8 and all(is_refusal(r) for r in VARIED_REFUSALS)
    assert first.column("original_response").to_pylist() == [f"answer q{i}" for i in range(40)]


def test_relabel_needs_labels(oeqa: pa.Table) -> None:
    with pytest.raises(ValueError, match="craft_label"):
        relabel(oeqa, RelabelParams())
    with pytest.raises(ValueError):
        RelabelParams(refusal="x")  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------- THS

# Table 2 of the paper (AAAI-25 version): (initial Pc, Pw), (method Pc, Pw), published THS.
TABLE_2 = [
    # LLaMA3-8B-Instruct, MMLU (ID), against Init-Basic (66.8, 33.1)
    ("llama3 mmlu CRaFT", (66.8, 33.1), (53.3, 9.6), 34.0),
    ("llama3 mmlu Cor-RAIT", (66.8, 33.1), (63.9, 21.6), 20.4),
    ("llama3 mmlu w/o Cer", (66.8, 33.1), (62.1, 18.4), 25.0),
    ("llama3 mmlu Init-Refuse", (66.8, 33.1), (50.0, 17.0), 15.6),
    ("llama3 mmlu Van-Tuning", (66.8, 33.1), (69.5, 30.5), 8.0),
    # LLaMA3-8B-Instruct, TriviaQA (ID), against (66.8, 33.2)
    ("llama3 triviaqa CRaFT", (66.8, 33.2), (43.5, 10.9), 21.5),
    ("llama3 triviaqa Cor-RAIT", (66.8, 33.2), (45.4, 13.2), 18.8),
    ("llama3 triviaqa Van-Tuning", (66.8, 33.2), (55.0, 38.1), -21.8),
    # LLaMA3-8B-Instruct, NQ (OOD), against (40.3, 59.7)
    ("llama3 nq CRaFT", (40.3, 59.7), (19.0, 27.5), 0.4),
    # LLaMA2-7B-Chat, MMLU / TriviaQA / NQ, against their Init-Basic rows
    ("llama2 mmlu CRaFT", (45.6, 52.8), (43.9, 36.4), 12.5),
    ("llama2 triviaqa CRaFT", (54.0, 46.0), (38.5, 12.9), 23.3),
    ("llama2 triviaqa Cor-RAIT", (54.0, 46.0), (41.3, 18.3), 19.7),
    ("llama2 nq CRaFT", (29.3, 70.7), (15.8, 22.4), 6.5),
]


@pytest.mark.parametrize(("row", "initial", "refined", "published"), TABLE_2)
def test_ths_reproduces_table_2(
    row: str, initial: tuple[float, float], refined: tuple[float, float], published: float
) -> None:
    ths = truthful_helpfulness_score(*initial, *refined, percent=True)
    assert ths == pytest.approx(published, abs=0.2), row
    fractions = [x / 100 for x in (*initial, *refined)]
    assert truthful_helpfulness_score(*fractions) == pytest.approx(ths)


def test_ths_hand_cases() -> None:
    # Table 1 of the paper: M0 = (Pc 0.5, Pw 0.5) (worked back from its THS row)
    assert truthful_helpfulness_score(0.5, 0.5, 0.3, 0.2) == pytest.approx(10.0)
    assert truthful_helpfulness_score(0.5, 0.5, 0.3, 0.15) == pytest.approx(15.0)
    assert truthful_helpfulness_score(0.5, 0.5, 0.5, 0.0) == pytest.approx(50.0)
    assert truthful_helpfulness_score(0.5, 0.5, 1.0, 0.0) == pytest.approx(100.0)
    # unchanged model: 0; same error rate per correct answer: 0; more errors: negative
    assert truthful_helpfulness_score(0.6, 0.4, 0.6, 0.4) == pytest.approx(0.0)
    assert truthful_helpfulness_score(0.6, 0.4, 0.3, 0.2) == pytest.approx(0.0)
    # (0.5·0.4 − 0.3·0.6) / 0.4 = 0.05 → 5; (0.2·0.4 − 0.4·0.6) / 0.4 = −0.4 → −40
    assert truthful_helpfulness_score(0.6, 0.4, 0.5, 0.3) == pytest.approx(5.0)
    assert truthful_helpfulness_score(0.6, 0.4, 0.2, 0.4) == pytest.approx(-40.0)
    with pytest.raises(ValueError, match="pw1 = 0"):
        truthful_helpfulness_score(1.0, 0.0, 0.5, 0.1)
    with pytest.raises(ValueError, match="outside"):
        truthful_helpfulness_score(66.8, 33.1, 53.3, 9.6)  # percentages need percent=True


def test_static_conflict_rate_by_hand() -> None:
    from transforms.craft.diagnostics import static_conflict_rate

    vanilla = np.array([[1.0, 0.0], [0.0, 1.0]])
    # cos to (1,0): 0.995 > 0.97 (conflict); cos to nearest of the second: 0.8 (none)
    idk = np.array([[1.0, 0.1], [0.6, 0.8]])
    out = static_conflict_rate(idk, vanilla)
    assert out["conflicts"] == 1 and out["rate"] == pytest.approx(0.5)
    assert out["idk"] == 2 and out["vanilla"] == 2 and out["threshold"] == 0.97
    assert static_conflict_rate(idk, vanilla, threshold=0.7)["conflicts"] == 2
    assert static_conflict_rate(idk[:0], vanilla)["rate"] is None


def test_knowledge_state_png_is_a_picture() -> None:
    from transforms.craft.diagnostics import knowledge_state_png

    png = knowledge_state_png(
        np.array([1.0, 0.0, 0.5]), np.array([-0.1, -1.2, -0.7]), ["vanilla", "idk", "rejected"], "t"
    )
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
