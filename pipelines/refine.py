"""The ``refine`` stage: an engine rewrites each response (Response Tuning).

Response Tuning (An & Kim, arXiv 2410.02465) refines responses for clarity, structure and
tone with a strong model, with the prompt in view. This stage asks the configured engine
(vLLM in-process, an OpenAI-compatible server or transformers; every request through the
generation cache, so a rebuild makes no model calls) at temperature 0 with
:data:`TEMPLATE`, rendered with the model's chat template. The rewrite is the text after the
marker ``Refined response:``:

- marker found and text after it: ``response`` = the rewrite, ``original_response`` = the
  response before (an earlier original is kept), ``origin = refined``;
- marker missing or nothing after it: the row keeps its response and origin;
- the rendered request does not fit ``max_model_len`` with at least ``min_new_tokens`` to
  generate: the row is left as is and not sent.

Every row gets ``refine_status``: ``refined``, ``marker_missing``, ``empty_rewrite`` or
``prompt_too_long``. The stage rejects nothing. ``prefill_marker`` starts the assistant turn
with the marker (for models that do not follow the instruction to write it); the template's
fields are ``{prompt}`` (every prompt turn's content), ``{response}`` and ``{marker}``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from engines import Engine, Request, Sampling, row_seed
from engines.cached import CachedEngine
from engines.prompts import encode, render
from pipelines.engine_settings import EngineSettings, open_engine
from storage.gencache import GenerationCache
from transforms.registry import StageContext
from transforms.response.lengths import prompt_plain, with_columns
from transforms.stage import StageResult
from transforms.text import combined

STAGE = "refine"
MARKER = "Refined response:"
TEMPLATE = (
    "Rewrite the response below so that it answers the request with more clarity, a "
    "clearer structure and a helpful, polite tone. Keep every fact it states and add none."
    "\n\nRequest:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Reply with the line '{marker}' followed by the rewritten response."
)


class RefineParams(EngineSettings):
    """The refining model and how it is asked (temperature 0, as the paper)."""

    model: str = Field(description="the refining model: a local HF folder (or server model)")
    max_model_len: int | None = 4096
    max_tokens: int = Field(default=1024, gt=0)
    min_new_tokens: int = Field(default=16, gt=0)
    template: str = TEMPLATE
    marker: str = MARKER
    prefill_marker: bool = False


def requests_for(table: pa.Table, params: RefineParams) -> list[Request | None]:
    """One rendered request per row (``None`` for a row whose prompt does not fit)."""
    prompts = prompt_plain(table.column("prompt")).to_pylist()
    responses = pc.fill_null(combined(table.column("response")), "").to_pylist()
    ids = table.column("id").to_pylist()
    out: list[Request | None] = []
    for row_id, prompt, response in zip(ids, prompts, responses, strict=True):
        text = params.template.format(prompt=prompt, response=response, marker=params.marker)
        rendered = render(params.model, [{"role": "user", "content": text}])
        if params.prefill_marker:
            rendered += params.marker
        budget = params.max_tokens
        if params.max_model_len:
            budget = min(budget, params.max_model_len - len(encode(params.model, rendered)))
        if budget < params.min_new_tokens:
            out.append(None)
            continue
        sampling = Sampling(n=1, temperature=0.0, max_tokens=budget)
        out.append(Request(rendered, sampling, seed=row_seed(row_id, STAGE)))
    return out


def parse_rewrite(text: str, marker: str = MARKER) -> str | None:
    """The text after the first ``marker`` (stripped), ``""`` if nothing follows it, or
    ``None`` when the marker is missing."""
    at = text.find(marker)
    return None if at < 0 else text[at + len(marker) :].strip()


def run_refine(
    table: pa.Table, params: RefineParams, cache: GenerationCache, engine: Engine | None = None
) -> StageResult:
    """Rewrite every response that fits; see the module docstring for the row changes.

    ``engine`` is an already started engine for ``params.model`` (left open); by default
    the stage makes one from ``params`` and closes it when done.
    """
    requests = requests_for(table, params)
    todo = [i for i, r in enumerate(requests) if r is not None]
    cached = (
        CachedEngine(engine, cache, batch_size=params.cache_batch)
        if engine is not None
        else open_engine(params, cache)
    )
    try:
        samples = cached.generate([requests[i] for i in todo]) if todo else []
    finally:
        close = getattr(cached.engine, "close", None)
        if engine is None and close is not None:
            close()
    responses = table.column("response").to_pylist()
    originals = table.column("original_response").to_pylist()
    origins = table.column("origin").to_pylist()
    status = ["prompt_too_long"] * table.num_rows
    for i, sample in zip(todo, samples, strict=True):
        text = (params.marker if params.prefill_marker else "") + sample[0].text
        rewrite = parse_rewrite(text, params.marker)
        if rewrite is None:
            status[i] = "marker_missing"
        elif not rewrite:
            status[i] = "empty_rewrite"
        else:
            status[i] = "refined"
            originals[i] = responses[i] if originals[i] is None else originals[i]
            responses[i] = rewrite
            origins[i] = "refined"
    kept = with_columns(
        table,
        {
            "response": pa.array(responses, pa.string()),
            "original_response": pa.array(originals, pa.string()),
            "origin": pa.array(origins, pa.string()),
            "refine_status": pa.array(status, pa.string()),
        },
    )
    counts = {s: status.count(s) for s in sorted(set(status))}
    return StageResult(kept=kept, stats={"status": counts, "engine_refine": cached.stats.to_dict()})


def refine_stage(table: pa.Table, params: RefineParams, context: StageContext) -> StageResult:
    """The ``refine`` stage over the whole table (one engine for all rows)."""
    return run_refine(table, params, GenerationCache(context.cache_dir))
