"""Judgments in the style of CUT: a natural-language judgment and a verdict per response.

Xu et al., "Reasons to Reject? Aligning Language Models with Judgments" (CUT),
arXiv 2312.14591, and its public code (github.com/wwxu21/CUT). CUT trains on
instruction-response-judgment triplets; a response is *aligned* when its judgment finds
nothing wrong and *misaligned* otherwise. Its training files (``data/iter/*.json``) are
JSON lists of ``{id, instruction, input, output, judgment}`` with ``judgment: null`` for an
aligned response (the loader treats any non-null judgment as negative): that is the layout
of our ``cut`` export (:mod:`storage.preference`).

Two judges:

- ``llm``: any engine, given :func:`judge_prompt` — the instruction, the response (and the
  gold answers when the row has them), asking for the reasons first and a final line
  ``Verdict: good`` or ``Verdict: bad``. :func:`parse_verdict` reads that last line; anything
  else is *unparseable* and the row is rejected, never guessed.
- ``reference``: deterministic, for rows with ``references`` (open QA, MCQ). Open QA: the
  response is correct when it contains a gold alias (case-insensitive substring, the rule
  of the CRaFT code's evaluator); MCQ: when the first standalone option letter it writes is
  the gold letter. The judgment names the expected answer either way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from transforms.craft.scores import normalize_answer

REFERENCE_JUDGE_VERSION = "1"
JUDGE_TEMPLATE = (
    "You are reviewing an AI assistant's response to an instruction.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n{response}\n\n"
    "{references}"
    "First explain briefly whether the response is correct, helpful and follows the "
    "instruction, pointing out each error. Then write the verdict on the last line, exactly "
    '"Verdict: good" or "Verdict: bad".\n\n'
    "### Judgment:\n"
)
_VERDICT = re.compile(r"^\W*verdict\s*[:\-]\s*\**\s*(good|bad)\b\W*$", re.IGNORECASE)

UNPARSEABLE = "judge:unparseable_verdict"
EMPTY_RESPONSE = "judge:empty_response"
DUPLICATE_SAMPLE = "judge:duplicate_sample"
NO_REFERENCES = "judge:no_references"
_LETTER = re.compile(r"\b([ABCD])\b")


@dataclass(frozen=True)
class Judgment:
    """A judgment text and its verdict (``ok`` is None when the verdict is unparseable)."""

    text: str
    ok: bool | None


def judge_prompt(instruction: str, response: str, references: Sequence[str] | None = None) -> str:
    """The rubric prompt of the ``llm`` judge."""
    block = ""
    if references:
        block = "### Reference answers:\n" + "\n".join(f"- {r}" for r in references) + "\n\n"
    return JUDGE_TEMPLATE.format(instruction=instruction, response=response, references=block)


def parse_verdict(text: str) -> Judgment:
    """The judgment (reasons, the verdict line removed) and the verdict of the last
    non-empty line; ``ok=None`` when that line is not a verdict."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return Judgment("", None)
    match = _VERDICT.match(lines[-1].strip())
    if match is None:
        return Judgment(text.strip(), None)
    reasons = "\n".join(lines[:-1]).strip()
    return Judgment(reasons or lines[-1].strip(), match.group(1).lower() == "good")


def mcq_letter(response: str) -> str | None:
    """The first standalone option letter A–D the response writes, if any."""
    match = _LETTER.search(response)
    return match.group(1) if match else None


def reference_judgment(
    response: str, task: str, references: Sequence[str], choices: Sequence[str] | None = None
) -> Judgment:
    """The deterministic ``reference`` judge (see the module docstring)."""
    if task == "mcq":
        gold = references[0].strip().upper()
        option = ""
        if choices and gold in "ABCD" and len(choices) > "ABCD".index(gold):
            option = f" ({choices['ABCD'.index(gold)]})"
        said = mcq_letter(response)
        if said == gold:
            return Judgment(f"The response is correct: it chooses {gold}{option}.", True)
        chose = f"it chooses {said}" if said else "it chooses no option"
        return Judgment(f"The response is incorrect: {chose}; the answer is {gold}{option}.", False)
    text = normalize_answer(response)
    for alias in references:
        if normalize_answer(alias) and normalize_answer(alias) in text:
            return Judgment(f"The response is correct: it contains the answer {alias!r}.", True)
    expected = f"the expected answer is {references[0]!r}"
    if len(references) > 1:
        expected += " (also accepted: " + ", ".join(repr(r) for r in references[1:]) + ")"
    return Judgment(f"The response is incorrect: {expected}.", False)


def reference_fingerprint() -> str:
    """What identifies the reference judge's behaviour."""
    return f"reference:v{REFERENCE_JUDGE_VERSION}:substring"
