"""Self-Instruct: seed tasks, prompts, parsers and filters (no model I/O).

Wang et al., "Self-Instruct: Aligning Language Models with Self-Generated Instructions",
ACL 2023, arXiv 2212.10560, and the authors' public code (github.com/yizhongw/self-instruct:
``bootstrap_instructions.py``, ``identify_clf_or_not.py``, ``generate_instances.py``,
``prepare_for_finetuning.py``). Where paper and code differ we follow the code and say so.

1. **Instruction generation.** A prompt lists 8 pool instructions (6 seeds, 2 machine-made
   once there are any), numbered, under ``Come up with a series of tasks:``, and ends with
   ``9.``; the model continues the list. Sampling: temperature 0.7, top_p 0.5, at most 1024
   tokens, stop at ``\\n\\n``, ``\\n16``, ``16.`` or ``16 .``. A response cut off by
   ``max_tokens`` is dropped whole (the code). The continuation is split at ``\\n<k>.``;
   each piece is whitespace-collapsed and ``str.capitalize()``-d (the code; it lower-cases
   the rest) and must pass the filters below, then the ROUGE-L novelty filter
   (:mod:`transforms.synthesis.rouge`).
2. **Classification check.** A few-shot prompt ``Can the following task be regarded as a
   classification task with finite output labels?`` with ``Task: …\\nIs it classification?
   Yes|No`` demonstrations; greedy, 3 tokens, stop at ``\\n`` or ``Task``; ``Yes`` (any case)
   means classification.
3. **Instance generation.** Classification tasks are prompted output-first (``Class label:``
   then the input), the others input-first (``Example k`` / ``Output:``); greedy, 300 (clf)
   or 350 tokens, stop at ``Example 6`` or ``Task:``. Parsing, the invalid-instance filter
   (input == output, empty output, a field ending with ``:``), the duplicate filter (same
   input with different outputs drops the task) and the cap of 5 instances per task follow
   ``prepare_for_finetuning.py``.

Deviations, all documented in docs/synthesis.md:

- The code's classification and instance templates hold hand-written demonstrations (31 and
  30 of them). We keep their headers and layout but draw the demonstrations from the seed
  tasks themselves (which carry ``is_classification`` and instances), the first ``k`` of each
  kind in file order, so a small model's context can be respected by lowering ``k``; a
  prompt that still does not fit is trimmed (:mod:`transforms.synthesis.fit`).
- ``presence_penalty`` (2 for instructions, 1.5 for instances) is not part of our engine
  protocol and is not applied; greedy decoding is ``temperature=0`` (the code's ``top_p=0``
  is not a valid vLLM value and changes nothing under greedy decoding).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

INSTRUCTION_HEADER = "Come up with a series of tasks:"
CLF_INSTRUCTION_HEADER = (
    "Come up with a series of classification tasks. Try to specify the possible output "
    "labels when possible."
)
CLF_HEADER = (
    "Can the following task be regarded as a classification task with finite output labels?"
)
CLF_QUESTION = "Is it classification?"
OUTPUT_FIRST_HEADER = (
    "Given the classification task definition and the class labels, generate an input that "
    "corresponds to each of the class labels. If the task doesn't require input, just "
    "generate possible class labels."
)
INPUT_FIRST_HEADER = (
    "Come up with examples for the following tasks. Try to generate multiple examples when "
    "possible. If the task doesn't require additional input, you can generate the output "
    "directly."
)
INSTRUCTION_STOP = ("\n\n", "\n16", "16.", "16 .")
CLF_STOP = ("\n", "Task")
INSTANCE_STOP = ("Example 6", "Task:")

BLACKLIST = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
)
"""Words a text-only model cannot act on (the code's list, matched as whole words)."""
_BLACKLIST = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.I)

# Reject reasons, one per filter.
TRUNCATED = "self_instruct:truncated"
NO_INSTRUCTION = "self_instruct:no_instruction"
TOO_SHORT = "self_instruct:too_short"
TOO_LONG = "self_instruct:too_long"
BLACKLISTED = "self_instruct:blacklisted_keyword"
WRITE_A_PROGRAM = "self_instruct:write_a_program"
PUNCTUATION_START = "self_instruct:starts_with_punctuation"
NON_ASCII_START = "self_instruct:starts_with_non_ascii"
SIMILAR = "self_instruct:rouge_l_similar"
NO_INSTANCE = "self_instruct:no_valid_instance"
INVALID_INSTANCE = "self_instruct:invalid_instance"
CONFLICTING_INSTANCES = "self_instruct:same_input_different_output"
DUPLICATE_INSTANCE = "self_instruct:duplicate_instance"
OVER_INSTANCE_CAP = "self_instruct:over_instance_cap"
OVER_TARGET = "self_instruct:over_target"
PROMPT_TOO_LONG = "self_instruct:prompt_too_long"


class SeedError(ValueError):
    """The seed file cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class SeedTask:
    """One seed task of the Self-Instruct format."""

    id: str
    instruction: str
    instances: tuple[tuple[str, str], ...]
    is_classification: bool


BUNDLED_SEEDS = "self_instruct_seed_tasks.jsonl"
"""The bundled seed file's name in ``transforms/synthesis/data``."""


def bundled_seeds() -> Traversable:
    """The paper's 175 seed tasks, shipped as package data (``transforms/synthesis/data``:
    the authors' ``data/seed_tasks.jsonl`` from github.com/yizhongw/self-instruct, unchanged,
    Apache-2.0; see the ``NOTICE`` next to it)."""
    return resources.files("transforms.synthesis") / "data" / BUNDLED_SEEDS


def load_seed_tasks(path: str | Path | None = None) -> list[SeedTask]:
    """Read a Self-Instruct seed file (JSON lines: ``id``, ``instruction``, ``instances``
    [{input, output}], ``is_classification``); ``None``: the bundled 175 seed tasks
    (:func:`bundled_seeds`). Blank lines are skipped.

    Raises:
        SeedError: unreadable file, invalid JSON or a missing/mistyped field, naming the
            file and the line — before any model is called.
    """
    source: Traversable = bundled_seeds() if path is None else Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SeedError(f"{source}: cannot read seed tasks: {exc}") from None
    tasks: list[SeedTask] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}, line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SeedError(f"{where}: invalid JSON: {exc.msg}") from None
        tasks.append(_seed_task(data, where, number))
    if not tasks:
        raise SeedError(f"{source}: no seed tasks")
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SeedError(f"{source}: seed id {dup!r} appears more than once")
    return tasks


def _seed_task(data: Any, where: str, number: int) -> SeedTask:
    if not isinstance(data, dict):
        raise SeedError(f"{where}: expected a JSON object")
    instruction = data.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise SeedError(f"{where}: field 'instruction' must be a non-empty string")
    instances = data.get("instances", [])
    if not isinstance(instances, list) or not all(
        isinstance(i, dict)
        and isinstance(i.get("input", ""), str)
        and isinstance(i.get("output"), str)
        for i in instances
    ):
        raise SeedError(f"{where}: field 'instances' must be a list of {{input, output}} strings")
    is_clf = data.get("is_classification", False)
    if not isinstance(is_clf, bool):
        raise SeedError(f"{where}: field 'is_classification' must be true or false")
    seed_id = data.get("id", f"seed_line_{number}")
    if not isinstance(seed_id, str):
        raise SeedError(f"{where}: field 'id' must be a string")
    pairs = tuple((i.get("input", ""), i["output"]) for i in instances)
    return SeedTask(seed_id, instruction, pairs, is_clf)


# --- 1. instruction generation -------------------------------------------------------------


def clean_instruction(text: str) -> str:
    """Whitespace collapsed, trailing colons dropped: how the code lists pool instructions."""
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


def instruction_prompt(instructions: Sequence[str], classification: bool = False) -> str:
    """The bootstrap prompt: the numbered pool instructions, then the next number."""
    lines = [CLF_INSTRUCTION_HEADER if classification else INSTRUCTION_HEADER]
    lines += [f"{i}. {clean_instruction(text)}" for i, text in enumerate(instructions, 1)]
    return "\n".join(lines) + f"\n{len(instructions) + 1}."


def split_instructions(text: str) -> list[str]:
    """The generated continuation cut into instructions (``\\n<k>.`` starts the next one),
    each whitespace-collapsed and capitalised like the code; empty pieces are dropped."""
    pieces = re.split(r"\n\d+\s?\. ", text)
    out = []
    for piece in pieces:
        piece = re.sub(r"\s+", " ", piece).strip().capitalize()
        if piece:
            out.append(piece)
    return out


def instruction_reject_reason(instruction: str) -> str | None:
    """The first filter ``instruction`` fails (the code's order), or None when it passes."""
    words = instruction.split()
    if len(words) <= 3:
        return TOO_SHORT
    if len(words) > 150:
        return TOO_LONG
    if _BLACKLIST.search(instruction):
        return BLACKLISTED
    if instruction.startswith("Write a program"):
        return WRITE_A_PROGRAM
    if instruction[0] in string.punctuation:
        return PUNCTUATION_START
    if not instruction[0].isascii():
        return NON_ASCII_START
    return None


# --- 2. classification check ---------------------------------------------------------------


def classification_prompt(instruction: str, demos: Sequence[SeedTask]) -> str:
    """The few-shot "is it classification?" prompt for one instruction."""
    blocks = [CLF_HEADER, ""]
    for task in demos:
        answer = "Yes" if task.is_classification else "No"
        blocks += [f"Task: {clean_instruction(task.instruction)}", f"{CLF_QUESTION} {answer}", ""]
    return "\n".join(blocks) + f"Task: {instruction.strip()}\n{CLF_QUESTION}"


def parse_is_classification(text: str) -> bool:
    """``Yes`` (any of Yes/yes/YES, stripped) means classification, as in the code."""
    return text.strip() in ("Yes", "yes", "YES")


def classification_demos(tasks: Sequence[SeedTask], yes: int, no: int) -> list[SeedTask]:
    """The first ``yes`` classification and ``no`` other seed tasks, interleaved in file order."""
    chosen_yes = [t for t in tasks if t.is_classification][:yes]
    chosen_no = [t for t in tasks if not t.is_classification][:no]
    keep = {t.id for t in chosen_yes + chosen_no}
    return [t for t in tasks if t.id in keep]


# --- 3. instances --------------------------------------------------------------------------


def _demo_block(task: SeedTask, output_first: bool) -> str:
    lines = [f"Task: {clean_instruction(task.instruction)}"]
    for k, (inp, out) in enumerate(task.instances, 1):
        if output_first:
            lines.append(f"Class label: {out.strip()}")
            if inp.strip():
                lines.append(inp.strip())
        elif inp.strip():
            lines += [f"Example {k}", inp.strip(), f"Output: {out.strip()}"]
        else:
            lines.append(f"Output: {out.strip()}")
    return "\n".join(lines)


def instance_prompt(instruction: str, is_classification: bool, demos: Sequence[SeedTask]) -> str:
    """Output-first (classification) or input-first instance-generation prompt."""
    header = OUTPUT_FIRST_HEADER if is_classification else INPUT_FIRST_HEADER
    blocks = [header, *(_demo_block(t, is_classification) for t in demos)]
    return "\n\n".join(blocks) + f"\n\nTask: {instruction.strip()}\n"


def instance_demos(tasks: Sequence[SeedTask], is_classification: bool, k: int) -> list[SeedTask]:
    """The first ``k`` seed tasks of the same kind that have an instance with an output."""
    same = [t for t in tasks if t.is_classification == is_classification and t.instances]
    return same[:k]


@dataclass
class Instances:
    """Parsed instances of one task, and the ones dropped with their reasons."""

    kept: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str, str]] = field(default_factory=list)
    """(input, output, reason)"""


def _input_output(text: str) -> tuple[str, str]:
    output_marker = r"Output\s*\d*\s*:"
    if re.search(output_marker, text):
        parts = re.split(output_marker, text)
        inp, out = parts[0].strip(), parts[1].strip()
    else:
        inp, out = "", text.strip()
    if re.search(r"Input\s*\d*\s*:", out):
        out = re.split(r"Input\s*\d*\s*:", out)[0].strip()
    inp = re.sub(r"^Input\s*\d*\s*:", "", inp).strip()
    return inp, out


def parse_instances(text: str, is_classification: bool, truncated: bool) -> list[tuple[str, str]]:
    """(input, output) pairs from an instance-generation response, as the code parses them;
    the last one is dropped when the generation was cut off by ``max_tokens``."""
    pairs: list[tuple[str, str]] = []
    if is_classification:
        if "Class label:" not in text:
            return []
        for piece in text.split("Class label:")[1:]:
            fields = piece.strip().split("\n", 1)
            label = fields[0].strip()
            inp = fields[1].strip() if len(fields) == 2 else ""
            pairs.append((inp, label))
    else:
        text = text.strip()
        if re.search(r"Example\s?\d*\.?", text):
            pieces = [p.strip() for p in re.split(r"Example\s?\d*\.?", text) if p.strip()]
            pairs = [_input_output(p) for p in pieces]
        elif re.search(r"Output\s*\d*\s*:", text):
            pairs = [_input_output(text)]
        else:
            return []
    return pairs[:-1] if truncated else pairs


def filter_instances(pairs: Sequence[tuple[str, str]], cap: int) -> Instances:
    """The code's invalid and duplicate filters, then at most ``cap`` instances (the first
    ones: the code samples 5 at random; we keep the order for reproducibility)."""
    result = Instances()
    valid = []
    for inp, out in pairs:
        if inp == out or not out or inp.strip().endswith(":") or out.strip().endswith(":"):
            result.dropped.append((inp, out, INVALID_INSTANCE))
        else:
            valid.append((inp, out))
    outputs_by_input: dict[str, set[str]] = {}
    for inp, out in valid:
        if inp:
            outputs_by_input.setdefault(inp, set()).add(out)
    if any(len(outs) > 1 for outs in outputs_by_input.values()):
        result.dropped += [(inp, out, CONFLICTING_INSTANCES) for inp, out in valid]
        return result
    seen: set[tuple[str, str]] = set()
    for pair in valid:
        if pair in seen:
            result.dropped.append((*pair, DUPLICATE_INSTANCE))
        elif len(result.kept) >= cap:
            result.dropped.append((*pair, OVER_INSTANCE_CAP))
        else:
            seen.add(pair)
            result.kept.append(pair)
    return result
