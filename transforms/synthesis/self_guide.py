"""SELF-GUIDE: task-specific synthesis from one instruction and a few examples (no model I/O).

Zhao, Wang, Jiang and Neubig, "SELF-GUIDE: Better Task-Specific Instruction Following via
Self-Synthetic Finetuning", 2024, arXiv 2407.12874, and its public code
(github.com/zhaochenyang20/Prompt2Model-Self-Distill, ``prompt2model/input_generator``,
``output_annotator`` and ``quality_evaluator``).

1. **Inputs.** Each prompt shows the instruction, the given examples' inputs (the
   "high-quality" ones) and up to 10 inputs generated so far (the "low-quality" ones, drawn
   at random), and asks for one new input. Sampling at temperature 1.0 (the code's default),
   at most 500 tokens. Quality filters on each generated input: empty; *template leakage*
   (the prompt's section markers such as ``[input]``, ``[output]``, ``###`` left in the text,
   after the code's ``[input]=`` prefix and quotes are stripped); *noise* (a chat greeting
   from the code's list, e.g. "Sure, I'd be happy to help!"); *too short* (fewer than
   ``min_input_chars`` characters, the code's ``min_input_length`` = 120); *duplicate*
   (of an example or of an earlier input).
2. **Outputs.** Each kept input is annotated with the instruction and the examples as
   few-shot demonstrations; 10 samples at temperature 0.2 (the code's defaults). The
   samples pass the *length* filter (outside mean ± 2σ of the example outputs' lengths, in
   characters) and the *noise* filter; then *self-consistency*: the most frequent remaining
   answer (the shortest among ties) is kept when its share is at least 0.2; otherwise the
   input is rejected.

Choices we made, documented in docs/synthesis.md: the prompt wording is ours, following the
structure of the code's templates; the code's extra "verify" pass (a second model call that
re-extracts the input) and ``top_k``/``best_of`` sampling settings are not applied.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NOISE = (
    "Sure, I'd be happy to help!",
    "Of course!",
    "Let me check on that.",
    "I'm here to help.",
    "Great question!",
    "Let me see.",
    "That's a good question.",
    "Thanks for asking.",
    "Let me help you with that.",
    "No problem, here's the answer.",
    "I'm glad you asked.",
    "Alright, let me explain.",
    "Absolutely!",
    "I understand your question.",
)
"""Chat greetings that mark a generation as noise (the code's list)."""
TEMPLATE_MARKERS = ("[input]", "[output]", "[instruction]", "###", "-----")

EMPTY = "self_guide:empty"
TEMPLATE_LEAK = "self_guide:template_leakage"
NOISY = "self_guide:noise"
TOO_SHORT = "self_guide:input_too_short"
DUPLICATE = "self_guide:duplicate_input"
NO_CONSISTENT_OUTPUT = "self_guide:no_consistent_output"

INPUT_TEMPLATE = """Your task is to write one new [input] for the [instruction] below.
Make it different from the example inputs, but keep their format.
### [instruction]
{instruction}
### Example inputs (follow their format strictly)
{examples}
### Inputs written so far (their quality may be low)
{generated}
### Write one new input only, nothing else.
[input]="""

OUTPUT_TEMPLATE = """### Instructions:
{instruction}
### Examples:
{examples}
### New Input:
{input}
### Your Output:
"""


@dataclass(frozen=True)
class Example:
    """One given demonstration of the task."""

    input: str
    output: str


def _quoted(texts: Sequence[str]) -> str:
    return "\n".join(f'[input]="{t}"' for t in texts) if texts else "N/A"


def input_prompt(instruction: str, examples: Sequence[Example], generated: Sequence[str]) -> str:
    """The input-generation prompt (``generated``: earlier inputs shown as low-quality ones)."""
    return INPUT_TEMPLATE.format(
        instruction=instruction.strip(),
        examples=_quoted([e.input for e in examples]),
        generated=_quoted(list(generated)),
    )


def output_prompt(instruction: str, examples: Sequence[Example], new_input: str) -> str:
    """The output-annotation prompt: instruction, solved examples, the new input."""
    shown = "\n".join(f'[input]="{e.input}"\n[output]="{e.output}"' for e in examples)
    return OUTPUT_TEMPLATE.format(
        instruction=instruction.strip(), examples=shown, input=f'[input]="{new_input}"'
    )


def clean_generation(text: str) -> str:
    """Strip the ``[input]=``/``[output]=`` prefix and surrounding quotes the template invites."""
    text = text.strip()
    text = re.sub(r"^\[(input|output)\]\s*=\s*", "", text, flags=re.I).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text


def is_noise(text: str) -> bool:
    return any(greeting in text for greeting in NOISE)


def input_reject_reason(text: str, min_chars: int, seen: set[str]) -> str | None:
    """The first quality filter a cleaned input fails, or None (see the module docstring)."""
    if not text:
        return EMPTY
    if any(marker in text.lower() for marker in TEMPLATE_MARKERS):
        return TEMPLATE_LEAK
    if is_noise(text):
        return NOISY
    if len(text) < min_chars:
        return TOO_SHORT
    if text in seen:
        return DUPLICATE
    return None


def length_bounds(example_outputs: Sequence[str]) -> tuple[int, int]:
    """mean ± 2σ of the example outputs' character lengths, as integers (the code's bounds)."""
    lengths = np.array([len(o) for o in example_outputs], dtype=float)
    mean, std = float(lengths.mean()), float(lengths.std())
    return int(mean - 2 * std), int(mean + 2 * std)


def consistent_output(
    samples: Sequence[str], bounds: tuple[int, int], min_frequency: float = 0.2
) -> str | None:
    """Self-consistency over the samples that pass the length and noise filters: the most
    frequent (shortest among ties) if its share is at least ``min_frequency``."""
    low, high = bounds
    kept = [s for s in samples if s and low <= len(s) <= high and not is_noise(s)]
    if not kept:
        return None
    counts = Counter(kept)
    top = max(counts.values())
    if top / len(kept) < min_frequency:
        return None
    return min((s for s, c in counts.items() if c == top), key=len)
