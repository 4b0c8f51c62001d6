"""CRaFT's knowledge query: ask the model each question, measure correctness μ and
certainty σ (Zhu et al., AAAI-25, arXiv 2410.06913, and its public code).

- Open QA: a 3-shot chat prompt (each turn ``Answer the following question as simple as
  possible.\\nQuestion: {q}\\nAnswer:``), N = 10 samples at temperature 1.0, at most 50 new
  tokens. μ is the share of correct samples; σ is the mean pairwise cosine similarity of
  the samples' all-MiniLM-L6-v2 embeddings (diagonal excluded).
- Multiple choice: a 5-shot prompt headed ``There is a single choice question about
  {subject}. Answer the question by replying A, B, C or D.``; p(X) is the full-vocabulary
  probability of option token X, μ = p(gold) / Σ p(X), σ = −entropy of the renormalised p(X).

The shots of an open-QA row are the first ``shots`` open-QA rows of the table (other than
the row itself), in id order: deterministic, and drawn from the same corpus, as the code's
fixed shots are. MCQ shots are the first five rows of the subject's dev file when
``mcq_dev_dir`` is given (the code's layout: ``<subject>_dev.csv``), else none.

The engine is passed in (a :class:`engines.cached.CachedEngine`, so a rerun costs no model
calls); this module never constructs one.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from engines.base import Request, Sample, Sampling, TextEmbedder, row_seed
from transforms.similarity import mean_pairwise_cosine

OEQA_INSTRUCTION = "Answer the following question as simple as possible."
MCQ_HEADER = (
    "There is a single choice question about {subject}. Answer the question by replying "
    "A, B, C or D."
)


class QueryParams(BaseModel):
    """The published query settings."""

    model_config = ConfigDict(extra="forbid")
    samples: int = 10
    temperature: float = 1.0
    max_tokens: int = 50
    oeqa_shots: int = 3
    mcq_shots: int = 5
    mcq_dev_dir: str | None = None
    match: Literal["substring", "exact"] = "substring"
    mcq_raw_entropy: bool = False
    """σ of MCQ from the raw option probabilities (the code) instead of the renormalised
    ones (the paper); set by ``fidelity: code``."""


class Generator(Protocol):
    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]: ...
    def score_options(
        self, prompts: Sequence[str], options: Sequence[str]
    ) -> list[list[float]]: ...


class Renderer(Protocol):
    def __call__(self, messages: Sequence[dict[str, str]]) -> str: ...


@dataclass(frozen=True)
class Knowledge:
    """Per-row correctness μ and certainty σ, and the open-QA samples (for rehearsal)."""

    correctness: np.ndarray
    certainty: np.ndarray
    samples: list[list[str] | None]
    p_gold: np.ndarray


def oeqa_turn(question: str) -> str:
    return f"{OEQA_INSTRUCTION}\nQuestion: {question}\nAnswer:"


def oeqa_messages(question: str, shots: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The open-QA chat prompt: solved shots, then the question."""
    messages: list[dict[str, str]] = []
    for q, a in shots:
        messages += [{"role": "user", "content": oeqa_turn(q)}, {"role": "assistant", "content": a}]
    return [*messages, {"role": "user", "content": oeqa_turn(question)}]


def mcq_block(question: str, choices: Sequence[str]) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", choices, strict=False))
    return f"Question: {question}\n{options}\nAnswer:"


def mcq_prompt(
    subject: str,
    question: str,
    choices: Sequence[str],
    shots: Sequence[tuple[str, Sequence[str], str]],
) -> str:
    """The MCQ prompt: header, solved shots (``Answer: X``), then the question."""
    parts = [MCQ_HEADER.format(subject=subject)]
    parts += [f"{mcq_block(q, c)} {gold}" for q, c, gold in shots]
    parts.append(mcq_block(question, choices))
    return "\n\n".join(parts)


def question_of(row: dict[str, Any]) -> str:
    """The plain question of a canonical QA row (the user turn, options cut off)."""
    text = next(t["content"] for t in reversed(row["prompt"]) if t["role"] == "user")
    return text.split("\nA. ", 1)[0] if row["task"] == "mcq" else text


def subject_of(source: str) -> str:
    """MMLU subject from a source name like ``high_school_physics_test``."""
    return re.sub(r"_(test|val|dev)$", "", source).replace("_", " ")


def _dev_shots(folder: str | None, subject: str, k: int) -> list[tuple[str, list[str], str]]:
    if folder is None or k == 0:
        return []
    path = Path(folder) / f"{subject.replace(' ', '_')}_dev.csv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[:k]
    return [(r["question"], [r[x] for x in "ABCD"], r["target"].strip()) for r in rows]


def _embed_unique(embedder: TextEmbedder, groups: list[list[str]]) -> list[np.ndarray]:
    """Each group's embeddings, from one ``embed`` call over the distinct texts of all groups
    (sampled answers repeat a lot: a certain model says the same thing ten times)."""
    unique = list(dict.fromkeys(text for group in groups for text in group))
    index = {text: k for k, text in enumerate(unique)}
    vectors = embedder.embed(unique)
    return [vectors[[index[text] for text in group]] for group in groups]


def query_knowledge(
    table: pa.Table,
    engine: Generator,
    render: Renderer,
    embedder: TextEmbedder,
    params: QueryParams,
    stage: str,
) -> Knowledge:
    """μ and σ of every row of ``table`` (``task`` open_qa or mcq) under ``engine``."""
    from transforms.craft.scores import mcq_knowledge, oeqa_correctness

    rows = table.select(["id", "source", "task", "prompt", "references", "choices"]).to_pylist()
    n = len(rows)
    correctness, certainty = np.full(n, np.nan), np.full(n, np.nan)
    p_gold = np.full(n, np.nan)
    samples: list[list[str] | None] = [None] * n

    qa = [i for i, r in enumerate(rows) if r["task"] == "open_qa"]
    if qa:
        pool = sorted(qa, key=lambda i: rows[i]["id"])
        sampling = Sampling(
            n=params.samples, temperature=params.temperature, max_tokens=params.max_tokens
        )
        requests = []
        for i in qa:
            shots = [(question_of(rows[j]), rows[j]["references"][0]) for j in pool if j != i][
                : params.oeqa_shots
            ]
            prompt = render(oeqa_messages(question_of(rows[i]), shots))
            requests.append(Request(prompt, sampling, row_seed(rows[i]["id"], stage)))
        outputs = engine.generate(requests)
        texts = [[s.text.strip() for s in out] for out in outputs]
        mu = oeqa_correctness(texts, [rows[i]["references"] for i in qa], rule=params.match)
        vectors = _embed_unique(embedder, texts)
        for k, i in enumerate(qa):
            correctness[i], samples[i] = mu[k], texts[k]
            certainty[i] = mean_pairwise_cosine(vectors[k])

    mcq = [i for i, r in enumerate(rows) if r["task"] == "mcq"]
    if mcq:
        prompts, gold = [], []
        for i in mcq:
            row = rows[i]
            subject = subject_of(row["source"])
            shots = _dev_shots(params.mcq_dev_dir, subject, params.mcq_shots)
            prompts.append(mcq_prompt(subject, question_of(row), row["choices"], shots))
            gold.append("ABCD".index(row["references"][0]))
        probs = np.array(engine.score_options(prompts, list("ABCD")))
        scores = mcq_knowledge(probs, gold, raw_entropy=params.mcq_raw_entropy)
        correctness[mcq], certainty[mcq] = scores.correctness, scores.certainty
        p_gold[mcq] = scores.p_gold
    return Knowledge(correctness, certainty, samples, p_gold)
