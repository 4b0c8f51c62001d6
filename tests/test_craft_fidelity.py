"""``fidelity: code``: the released CRaFT code's MCQ certainty and selection, on real MMLU rows
(../shared/data/mmlu) with fixed option probabilities, against ``fidelity: paper``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from transforms.craft.scores import mcq_knowledge
from transforms.craft.select import CERTAINTY, CORRECTNESS, FLOW, SelectionParams, select
from transforms.ingest import read_source


@pytest.fixture(scope="module")
def mmlu_rows(shared_data: Path) -> pa.Table:
    """The first 20 anatomy test questions, as ingest reads them."""
    (first, *_) = read_source(shared_data / "mmlu" / "test" / "anatomy_test.csv")
    return first.kept.slice(0, 20)


def _probs() -> tuple[np.ndarray, list[int]]:
    """Fixed option probabilities (gold = A for every row):

    - rows 0–9 answer A with full mass, less sure down the rows; rows 7–9 are identical
      (a tie at the vanilla quota's edge);
    - rows 10–13 put 2% on each option (flat, little mass): the least certain rows after
      renormalising, but with a small *raw* entropy;
    - rows 14–19 lean to a wrong option with full mass: a raw entropy near ln 4, falling
      down the rows.
    """
    rows = []
    for i in range(10):
        p = 0.95 - 0.03 * min(i, 7)
        rows.append([p, *[(1 - p) / 3] * 3])
    for j in range(4):
        rows.append([0.02, 0.02, 0.02, 0.02 * (1 + 0.1 * (j + 1))])
    for k in range(6):
        rest = (0.6 - 0.1 * k) / 2
        rows.append([0.1, 0.3 + 0.1 * k, rest, rest])
    return np.array(rows), [0] * 20


def _scored(table: pa.Table, raw_entropy: bool) -> pa.Table:
    probs, gold = _probs()
    scores = mcq_knowledge(probs, gold, raw_entropy=raw_entropy)
    columns = {
        CORRECTNESS: scores.correctness,
        CERTAINTY: scores.certainty,
        FLOW: np.full(20, -0.2),  # every low-μ row loses ground under rehearsal
    }
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values, pa.float64()))
    return table


def _kept(result, table: pa.Table) -> dict[str, set[int]]:
    index = {row_id: i for i, row_id in enumerate(table.column("id").to_pylist())}
    kept: dict[str, set[int]] = {"vanilla": set(), "idk": set()}
    for row_id, label in zip(
        result.kept.column("id").to_pylist(),
        result.kept.column("craft_label").to_pylist(),
        strict=True,
    ):
        kept[label].add(index[row_id])
    return kept


def test_code_certainty_is_minus_the_raw_entropy(mmlu_rows: pa.Table) -> None:
    probs, gold = _probs()
    paper = mcq_knowledge(probs, gold)
    code = mcq_knowledge(probs, gold, raw_entropy=True)
    assert np.array_equal(paper.correctness, code.correctness)  # μ is renormalised in both
    # row 10 is [0.02, 0.02, 0.02, 0.022]: σ = Σ p ln p over the raw values
    assert code.certainty[10] == pytest.approx(3 * 0.02 * math.log(0.02) + 0.022 * math.log(0.022))
    assert paper.certainty[10] == pytest.approx(-math.log(4), abs=0.01)  # near-uniform
    assert code.certainty[10] > code.certainty[14]  # raw: the flat row looks more certain
    assert paper.certainty[10] < paper.certainty[14]  # renormalised: less certain
    assert np.allclose(paper.certainty[14:], code.certainty[14:])  # full mass: no difference


def test_code_selection_differs_exactly_where_predicted(mmlu_rows: pa.Table) -> None:
    ids = mmlu_rows.column("id").to_pylist()
    params = SelectionParams(size=10, idk_share=0.2)  # quota: 8 vanilla, 2 IdK

    paper = select(_scored(mmlu_rows, raw_entropy=False), params)
    kept = _kept(paper, mmlu_rows)
    first_tied = min((7, 8, 9), key=lambda i: ids[i])  # the paper breaks ties by id
    assert kept["vanilla"] == {0, 1, 2, 3, 4, 5, 6, first_tied}
    assert kept["idk"] == {10, 11}  # the flattest renormalised rows
    assert paper.added == 0

    code_params = params.model_copy(update={"fidelity": "code"})
    code = select(_scored(mmlu_rows, raw_entropy=True), code_params)
    kept = _kept(code, mmlu_rows)
    assert kept["vanilla"] == set(range(10))  # nsmallest(keep='all'): the whole tie
    assert kept["idk"] == {14, 15}  # the highest raw entropy; the flat rows look certain
    assert code.added == 0
    assert any("tied" in w for w in code.stats["warnings"])


def test_code_baselines_sample_with_replacement(mmlu_rows: pa.Table) -> None:
    table = _scored(mmlu_rows, raw_entropy=True)
    for method in ("cor_rait", "vanilla"):
        params = SelectionParams(method=method, size=10, idk_share=0.2, seed=3)
        paper = select(table, params)
        code = select(table, params.model_copy(update={"fidelity": "code"}))
        assert paper.added == 0 and paper.kept.num_rows == 10
        assert code.kept.num_rows == 10  # the quota, drawn with replacement ...
        assert code.added > 0  # ... so some rows come twice
        assert code.kept.num_rows - code.added == len(set(code.kept.column("id").to_pylist()))


def test_code_refills_a_short_pool_with_replacement(mmlu_rows: pa.Table) -> None:
    table = _scored(mmlu_rows, raw_entropy=True)
    params = SelectionParams(size=40, idk_share=0.5)  # 20 IdK wanted from 10 candidates
    paper = select(table, params)
    code = select(table, params.model_copy(update={"fidelity": "code"}))
    assert paper.added == 0
    assert code.added == 10 + 10  # both pools short by 10, refilled by drawing again


def test_open_qa_selection_is_the_same_under_both(mmlu_rows: pa.Table) -> None:
    table = _scored(mmlu_rows, raw_entropy=False)
    table = table.set_column(
        table.schema.get_field_index("task"), "task", pa.array(["open_qa"] * 20)
    )
    for method in ("craft", "cor_rait"):
        params = SelectionParams(method=method, size=10, idk_share=0.2)
        paper = select(table, params)
        code = select(table, params.model_copy(update={"fidelity": "code"}))
        assert paper.kept.equals(code.kept)


def test_code_rehearsal_caps_mcq_and_uses_the_chat_template(
    mmlu_rows: pa.Table, fact_world
) -> None:
    import random

    from engines.prompts import render
    from pipelines.craft import CraftParams, rehearsal_pairs
    from transforms.craft.query import Knowledge

    p_gold = np.where(np.arange(20) < 12, 0.995, 0.5)  # 12 rows the model knows well
    k0 = Knowledge(np.full(20, 0.9), np.full(20, -0.1), [None] * 20, p_gold)

    def rendered(messages):
        return render(fact_world.model_dir, messages)

    base = {"model": str(fact_world.model_dir), "rehearsal_max_rows": 5}
    paper = rehearsal_pairs(mmlu_rows, k0, CraftParams(**base), rendered)
    assert len(paper) == 12  # the paper's setting caps open QA only
    assert {completion for _, completion in paper} <= {" A", " B", " C", " D"}

    code = rehearsal_pairs(mmlu_rows, k0, CraftParams(**base, fidelity="code"), rendered)
    picked = sorted(random.Random(42).sample(range(12), 5))  # the code's random.sample
    golds = mmlu_rows.column("references").to_pylist()
    assert [completion for _, completion in code] == [golds[i][0] + "\n" for i in picked]
    for prompt, _ in code:
        assert prompt.startswith("<s><|user|>\nThere is a single choice question about anatomy.")
        assert "Answer the question by replying A, B, C or D." in prompt  # BASIC instruction
        assert prompt.endswith("Answer: \n<|assistant|>\n")
