"""Instruction/response statistics and the loss-over-prompt recommendation.

*Instruction Tuning With Loss Over Instructions* (Shi et al., arXiv 2405.14394) finds
that training on the instruction tokens too ("Instruction Modelling", IM) helps most when
(1) the instructions are long relative to the outputs and (2) there are few training
examples (the Superficial-Alignment setting of LIMA, about 1k rows); on large sets with
long responses it helps little or hurts. The paper gives no single cut-off, so the
recommendation below is our reading of it, with the thresholds as parameters:

- ``ratio`` = mean prompt tokens / mean response tokens (the paper's length ratio);
- recommend loss over the prompt when ``ratio >= long_prompt_ratio`` (1.0: prompts longer
  than responses on average), or when the set is small (``rows <= low_resource_rows``,
  2,000) and ``ratio >= low_resource_min_ratio`` (0.25);
- otherwise recommend loss on completions only (the default of TRL and LLaMA-Factory).

Everything here is vectorised and reads only the two text columns, so the build computes
it on every build at a small cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from transforms.response.lengths import length_columns


@dataclass(frozen=True)
class Thresholds:
    long_prompt_ratio: float = 1.0
    low_resource_rows: int = 2_000
    low_resource_min_ratio: float = 0.25


def _describe(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    p50, p90 = np.percentile(values, [50, 90])
    return {
        "mean": round(float(values.mean()), 2),
        "p50": round(float(p50), 2),
        "p90": round(float(p90), 2),
        "max": round(float(values.max()), 2),
    }


def lengths_of(table: pa.Table, tokenizer: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Prompt and response token counts and their unit: the ``prompt_tokens`` and
    ``response_tokens`` columns where ``rule_filter`` already filled them, else counted now
    (with ``tokenizer``, else whitespace words), row by row, so that the result does not
    depend on how rows are grouped into tables."""
    if not {"prompt_tokens", "response_tokens"} <= set(table.column_names):
        cols = length_columns(table, tokenizer)
        return cols["prompt_tokens"], cols["response_tokens"], tokenizer or "whitespace"
    prompt = table.column("prompt_tokens").to_numpy(zero_copy_only=False).astype(float)
    response = table.column("response_tokens").to_numpy(zero_copy_only=False).astype(float)
    missing = np.isnan(prompt) | np.isnan(response)
    unit = "rule_filter columns"
    if missing.any():
        cols = length_columns(table.filter(pa.array(missing)), tokenizer)
        prompt[missing], response[missing] = cols["prompt_tokens"], cols["response_tokens"]
        unit += f" + {tokenizer or 'whitespace'}"
    return prompt.astype(np.int64), response.astype(np.int64), unit


def summarize(
    prompt_tokens: np.ndarray,
    response_tokens: np.ndarray,
    unit: str = "whitespace",
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """Per-dataset summary of the lengths and the loss-over-prompt recommendation."""
    t = thresholds or Thresholds()
    rows = len(prompt_tokens)
    mean_prompt = float(prompt_tokens.mean()) if rows else 0.0
    mean_response = float(response_tokens.mean()) if rows else 0.0
    ratio = mean_prompt / mean_response if mean_response else float("inf") if rows else 0.0
    per_row = prompt_tokens / np.maximum(response_tokens, 1) if rows else np.zeros(0)
    reasons = []
    if rows and ratio >= t.long_prompt_ratio:
        reasons.append(f"long prompts: prompt/response ratio {ratio:.2f} >= {t.long_prompt_ratio}")
    if rows and rows <= t.low_resource_rows and ratio >= t.low_resource_min_ratio:
        reasons.append(
            f"few rows: {rows} <= {t.low_resource_rows} (low-resource setting) "
            f"with ratio {ratio:.2f} >= {t.low_resource_min_ratio}"
        )
    loss_over_prompt = bool(reasons)
    if not reasons:
        reasons.append(
            f"ratio {ratio:.2f} < {t.long_prompt_ratio} and "
            + (f"{rows} rows > {t.low_resource_rows}" if rows > t.low_resource_rows else "")
            + (f"ratio < {t.low_resource_min_ratio}" if rows <= t.low_resource_rows else "")
        )
    return {
        "rows": rows,
        "unit": unit,
        "prompt_tokens": _describe(prompt_tokens),
        "response_tokens": _describe(response_tokens),
        "length_ratio": round(ratio, 4) if np.isfinite(ratio) else None,
        "row_ratio": _describe(per_row),
        "recommendation": {
            "loss_over_prompt": loss_over_prompt,
            "trl": {"completion_only_loss": not loss_over_prompt},
            "llamafactory": {"train_on_prompt": loss_over_prompt},
            "reasons": reasons,
            "source": "Shi et al. 2024, Instruction Tuning With Loss Over Instructions",
        },
    }


def dataset_stats(
    tables: Iterable[pa.Table], tokenizer: str | None = None, thresholds: Thresholds | None = None
) -> dict[str, Any]:
    """:func:`summarize` over the rows of ``tables`` (e.g. the train shards, one at a time)."""
    return summarize_lengths(
        (lengths_of(table, tokenizer) for table in tables), tokenizer, thresholds
    )


def summarize_lengths(
    parts: Iterable[tuple[np.ndarray, np.ndarray, str]],
    tokenizer: str | None = None,
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """:func:`summarize` over the :func:`lengths_of` of several tables, in order."""
    prompts, responses, units = [], [], set()
    for p, r, unit in parts:
        prompts.append(p)
        responses.append(r)
        units.update(unit.split(" + "))
    prompt = np.concatenate(prompts) if prompts else np.zeros(0, dtype=np.int64)
    response = np.concatenate(responses) if responses else np.zeros(0, dtype=np.int64)
    unit = " + ".join(sorted(units)) or tokenizer or "whitespace"
    return summarize(prompt, response, unit=unit, thresholds=thresholds)


STAT_COLUMNS = ("prompt", "response", "prompt_tokens", "response_tokens")


ReadColumns = Callable[[str, Sequence[str]], pa.Table]


def parquet_columns(path: str, columns: Sequence[str]) -> pa.Table:
    """The ``columns`` a Parquet file has, only those read."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    return pq.read_table(path, columns=[c for c in columns if c in names])


def shard_stats(
    paths: Iterable[str],
    tokenizer: str | None = None,
    map_shards: Callable[[Callable[[str], Any], Iterable[str]], Iterable[Any]] = map,
    read_columns: ReadColumns = parquet_columns,
) -> dict[str, Any]:
    """:func:`dataset_stats` over shards, reading only the columns it needs, one shard at a
    time (what the build summary shows for the train split). ``map_shards`` maps the
    per-shard work over the paths in order (the build gives its shard threads);
    ``read_columns`` reads a shard's columns (default: Parquet files; the build reads its
    scratch shards too)."""

    def lengths(path: str) -> tuple[np.ndarray, np.ndarray, str]:
        return lengths_of(read_columns(path, STAT_COLUMNS), tokenizer)

    return summarize_lengths(map_shards(lengths, paths), tokenizer)
