"""Stage ``relabel``: turn CRaFT's IdK rows into refusals and write the RAIT training prompt.

Zhu et al., CRaFT, AAAI-25, arXiv 2410.06913, Algorithm 1 lines 7–12, and its public code
(github.com/opendatalab/CRaFT):

- IdK rows (``craft_label == "idk"``) get the refusal as ``response``: ``I don't know`` for
  open QA, ``I don't know.`` for MCQ. Their previous response goes to
  ``original_response``.
- Vanilla rows keep the gold answer (``response`` unchanged; for MCQ the letter).
- With ``rait_prompt`` the prompt becomes one user turn holding the code's RAIT prompt:

  - open QA, verbatim from the code's xtuner map function ``map_fn_triviaqa_REFUSE1``:
    ``Answer the following question, and if you don't know the answer, only reply with
    'I don't know': {question}``;
  - MCQ, the code's English ``REFUSE`` instruction of its MMLU prompt table, laid out as its
    ``map_fn_mmlu`` does (``{hint}\\nQuestion: {q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: ``)
    :data:`MCQ_RAIT_PROMPT`. The subject comes from a ``subject`` column when there is one,
    else from the ``source`` (MMLU's ``anatomy_test`` → ``anatomy``); without one the
    sentence reads "There is a single choice question." Which instruction the code's
    stage-2 construction script writes into ``map_fn_mmlu`` could not be checked, so the
    pairing is our reading of the code.

- ``varied_refusals`` swaps the fixed refusal for one of :data:`VARIED_REFUSALS`, picked
  deterministically from the row id: R-Tuning (Zhang et al., NAACL 2024) trains its
  ``unknown`` variant on 16 varied refusals (``FALSE_RESPONSES`` in its
  ``training/pararel/run_pararel.py``). We keep the eight of them that refuse for lack of
  knowledge (dropping "There is much debate." and the like, which claim something about the
  world) and phrase each around "I don't know", so the CRaFT evaluator's refusal check
  (keyword "I don't know") recognises every one.

Every row gains ``rait_question``: the plain question text (open QA: the user turn; MCQ: the
user turn before its first ``"\\nA. "``), so a row can be traced to its source question.
Row ids are kept, so a RAIT row still joins the scores and the rejected rows of earlier
stages. Nothing is rejected.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import BaseModel, ConfigDict

from transforms.craft.select import IDK, LABEL_COLUMN
from transforms.schema import MESSAGE
from transforms.stage import StageResult

STAGE = "relabel"

OEQA_RAIT_PROMPT = (
    "Answer the following question, and if you don't know the answer, "
    "only reply with 'I don't know': {question}"
)
"""The CRaFT code's open-QA RAIT prompt (``map_fn_triviaqa_REFUSE1``), verbatim."""

MCQ_RAIT_INSTRUCTION = (
    "There is a single choice question{about}. If you know the answer, please directly "
    "respond with the correct answer A, B, C, or D. If you do not know the answer, "
    'please respond with "I don\'t know.".'
)
"""The CRaFT code's ``REFUSE`` MMLU instruction; ``{about}`` is `` about {subject}`` or empty."""

MCQ_RAIT_PROMPT = "{instruction}\nQuestion: {question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer: "
"""The CRaFT code's ``map_fn_mmlu`` layout."""

VARIED_REFUSALS = (
    "I don't know.",
    "I don't know the answer.",
    "I'm not sure. I don't know.",
    "The answer is unknown to me. I don't know.",
    "I don't know; the answer is uncertain to me.",
    "I don't know, so it is impossible for me to answer.",
    "I don't know. I have no reliable information about this.",
    "Sorry, I don't know the answer to this question.",
)
"""R-Tuning-style refusals (see the module docstring); each contains "I don't know"."""

_SPLIT_SUFFIX = re.compile(r"(.+?)_(?:test|dev|val|validation|train)")


class RelabelParams(BaseModel):
    """Refusal texts and prompt switches; the defaults are the CRaFT code's."""

    model_config = ConfigDict(extra="forbid")
    refusal_oeqa: str = "I don't know"
    refusal_mcq: str = "I don't know."
    varied_refusals: bool = False
    rait_prompt: bool = True


def mcq_subject(source: str | None) -> str | None:
    """The MMLU subject in a source name (``high_school_physics_test`` → ``high school
    physics``), or None when the name does not end in a split suffix."""
    if not source:
        return None
    match = _SPLIT_SUFFIX.fullmatch(source)
    return match.group(1).replace("_", " ") if match else None


def varied_refusal(row_id: str) -> str:
    """The varied refusal of one row, chosen from its id (stable across builds)."""
    return VARIED_REFUSALS[xxhash.xxh3_64_intdigest(row_id.encode()) % len(VARIED_REFUSALS)]


def question_text(task: str, prompt: list[dict[str, Any]] | None) -> str | None:
    """The plain question of a QA row: the last user turn (MCQ: before its options)."""
    if task not in ("open_qa", "mcq"):
        return None
    users = [turn["content"] for turn in prompt or [] if turn["role"] == "user"]
    if not users or users[-1] is None:
        return None
    content = users[-1]
    return content.split("\nA. ", 1)[0] if task == "mcq" else content


def rait_prompt_text(
    task: str, question: str, choices: list[str] | None = None, subject: str | None = None
) -> str:
    """The RAIT prompt of one question (see the module docstring)."""
    if task == "open_qa":
        return OEQA_RAIT_PROMPT.format(question=question)
    if task != "mcq":
        raise ValueError(f"no RAIT prompt for task {task!r}")
    if choices is None or len(choices) != 4:
        raise ValueError(f"an mcq RAIT prompt needs 4 choices, got {choices!r}")
    about = f" about {subject}" if subject else ""
    options = dict(zip(("A", "B", "C", "D"), choices, strict=True))
    return MCQ_RAIT_PROMPT.format(
        instruction=MCQ_RAIT_INSTRUCTION.format(about=about), question=question, **options
    )


def relabel(table: pa.Table, params: RelabelParams) -> StageResult:
    """Write refusals into IdK rows, the RAIT prompt into QA rows, and ``rait_question``.

    Raises:
        ValueError: the table has no ``craft_label`` column, or an MCQ row lacks its 4
            choices while ``rait_prompt`` is on.
    """
    if LABEL_COLUMN not in table.column_names:
        raise ValueError(f"relabel needs the {LABEL_COLUMN!r} column written by craft selection")
    tasks = table.column("task").to_pylist()
    ids = table.column("id").to_pylist()
    prompts = table.column("prompt").to_pylist()
    is_idk = pc.fill_null(pc.equal(table.column(LABEL_COLUMN), IDK), False)

    refusals = [
        varied_refusal(row_id)
        if params.varied_refusals
        else (params.refusal_mcq if task == "mcq" else params.refusal_oeqa)
        for row_id, task in zip(ids, tasks, strict=True)
    ]
    response = table.column("response")
    new_response = pc.if_else(is_idk, pa.array(refusals, pa.string()), response)
    original = (
        table.column("original_response")
        if "original_response" in table.column_names
        else pa.nulls(table.num_rows, pa.string())
    )
    new_original = pc.if_else(is_idk, response, original)

    questions = [question_text(t, p) for t, p in zip(tasks, prompts, strict=True)]
    out = _set(table, "response", new_response)
    out = _set(out, "original_response", new_original)
    if params.rait_prompt:
        out = _set(out, "prompt", _rait_prompts(table, tasks, prompts, questions))
    out = _set(out, "rait_question", pa.array(questions, pa.string()))

    idk_mask = is_idk.to_pylist()
    stats = {
        "labels": {"idk": sum(idk_mask), "vanilla": table.num_rows - sum(idk_mask)},
        "refusals": dict(Counter(r for r, idk in zip(refusals, idk_mask, strict=True) if idk)),
        "rait_prompt": params.rait_prompt,
    }
    return StageResult(kept=out, stats=stats)


def _rait_prompts(
    table: pa.Table,
    tasks: list[str],
    prompts: list[list[dict[str, Any]] | None],
    questions: list[str | None],
) -> pa.Array:
    choices = (
        table.column("choices").to_pylist()
        if "choices" in table.column_names
        else [None] * table.num_rows
    )
    given = (
        table.column("subject").to_pylist()
        if "subject" in table.column_names
        else [None] * table.num_rows
    )
    sources = table.column("source").to_pylist()
    subjects = [s or mcq_subject(src) for s, src in zip(given, sources, strict=True)]
    rows = []
    for i, (task, prompt, question) in enumerate(zip(tasks, prompts, questions, strict=True)):
        if question is None:
            rows.append(prompt)
            continue
        try:
            text = rait_prompt_text(task, question, choices[i], subjects[i])
        except ValueError as exc:
            raise ValueError(f"row {i} (id {table.column('id')[i].as_py()}): {exc}") from exc
        rows.append([{"role": "user", "content": text}])
    return pa.array(rows, pa.list_(MESSAGE))


def _set(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Replace column ``name`` in place, or append it."""
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), name, values)
    return table.append_column(name, values)
