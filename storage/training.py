"""Training-oriented exports: response-only data and the loss-over-prompt switch.

- ``response_only``: Response Tuning (An & Kim, arXiv 2410.02465) trains on the responses
  alone: each record is a conversation holding just the assistant turn,
  ``{"messages": [{"role": "assistant", "content": ...}]}`` (JSONL, TRL's conversational
  language-modelling type).
- The loss-over-prompt switch (Instruction Modelling, Shi et al., arXiv 2405.14394):
  ``export(..., loss_over_prompt=True|False|"auto")`` writes the matching trainer settings
  into the export's ``README.md`` and manifest (``training``): TRL
  ``completion_only_loss`` (prompt-completion data) / ``assistant_only_loss`` (messages
  data) and LLaMA-Factory ``train_on_prompt``. ``"auto"`` follows the recommendation of
  the split's instruction/response statistics (:mod:`transforms.response.stats`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Literal

import pyarrow as pa

from transforms.response.stats import dataset_stats

RESPONSE_ONLY = "response_only"
README = "README.md"
LossOverPrompt = bool | Literal["auto"] | None


def response_only(row: dict[str, Any]) -> dict[str, Any]:
    """The row as a conversation of one assistant turn."""
    return {"messages": [{"role": "assistant", "content": row["response"]}]}


def trainer_settings(fmt: str, loss_over_prompt: bool) -> dict[str, Any]:
    """The trainer switches that make the loss cover the prompt (or not) for ``fmt``."""
    settings: dict[str, Any] = {"loss_over_prompt": loss_over_prompt}
    if fmt == "trl_prompt_completion":
        settings["trl"] = {"completion_only_loss": not loss_over_prompt}
    elif fmt == "trl_messages":
        settings["trl"] = {"assistant_only_loss": not loss_over_prompt}
    elif fmt.startswith("llamafactory"):
        settings["llamafactory"] = {"train_on_prompt": loss_over_prompt}
    else:
        settings["trl"] = {"completion_only_loss": not loss_over_prompt}
        settings["llamafactory"] = {"train_on_prompt": loss_over_prompt}
    return settings


def resolve_switch(
    value: LossOverPrompt, batches: Callable[[], Iterable[pa.RecordBatch]]
) -> tuple[bool | None, dict[str, Any] | None]:
    """``(loss_over_prompt, statistics)``: ``"auto"`` computes the statistics of the rows
    ``batches()`` yields and takes their recommendation; a bool is taken as given."""
    if value != "auto":
        return value, None
    stats = dataset_stats(pa.Table.from_batches([b]) for b in batches())
    return bool(stats["recommendation"]["loss_over_prompt"]), stats


def readme_text(ref: str, fmt: str, settings: dict[str, Any], stats: dict[str, Any] | None) -> str:
    """The export's ``README.md``: what the files are and how to train on them."""
    lines = [f"# {ref} ({fmt})", ""]
    if fmt == RESPONSE_ONLY:
        lines += [
            "Response-only data (Response Tuning, An & Kim 2024): each conversation is just",
            "the assistant turn, so the loss covers the response alone.",
            "",
        ]
    lop = settings["loss_over_prompt"]
    lines += [
        "## Loss over the prompt",
        "",
        f"Loss over the prompt (Instruction Modelling, Shi et al. 2024): **{lop}**.",
        "",
    ]
    if "trl" in settings:
        ((key, value),) = settings["trl"].items()
        lines += ["TRL:", "```python", f"SFTConfig(..., {key}={value})", "```", ""]
    if "llamafactory" in settings:
        value = str(settings["llamafactory"]["train_on_prompt"]).lower()
        lines += [
            "LLaMA-Factory (training YAML):",
            "```yaml",
            f"train_on_prompt: {value}",
            "```",
            "",
        ]
    if stats is not None:
        lines += [
            "Chosen from the instruction/response statistics of this split:",
            "```json",
            json.dumps(stats, indent=2),
            "```",
            "",
        ]
    return "\n".join(lines)
