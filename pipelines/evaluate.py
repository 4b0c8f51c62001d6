"""``aligncurate evaluate``: Pc, Pw, refusal rate and THS of a model against its M0.

Every question is asked with the RAIT prompt (:func:`transforms.craft.relabel.rait_prompt_text`,
the REFUSE prompt the CRaFT code trains and evaluates with), greedy, through the generation
cache; the answers are graded by :mod:`transforms.craft.evaluation`. The baseline (M0) is
asked twice, as in the paper's Table 2: with the BASIC prompt (Init-Basic, the THS
reference, as in the code's summary) and with the REFUSE prompt (Init-Refuse: refusal by
prompting alone, with its own THS).

A question set is a file in any QA format ingest reads (open-QA JSONL ``{question,
answers}``, NQ-style CSV, MMLU CSV, ...), named after its stem, or a dataset version
(``NAME@VERSION``) whose train split's questions are asked again. An evaluation of a model
trained by ``aligncurate train`` is stored next to the version it was trained on, under
``<store>/<name>/_evaluations/v<version>/``, naming the model and the question sets.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from engines import EngineError, Request, Sampling
from engines.cached import CachedEngine
from engines.prompts import render
from pipelines.generate import GenerateOptions, open_engine
from pipelines.train import read_record
from storage.atomic import write_text_atomic
from storage.dataset import DatasetStore
from storage.evaluations import save_evaluation
from storage.gencache import GenerationCache
from storage.names import StoreError
from transforms.craft.evaluation import Label, basic_prompt_text, classify, rates, ths_against
from transforms.craft.relabel import mcq_subject, question_text, rait_prompt_text
from transforms.ingest import read_source

PromptKind = Literal["refuse", "basic"]
GRADED_TASKS = ("open_qa", "mcq")
MAX_TOKENS = 50
"""Answer length: the CRaFT query's ``max_tokens``; a refusal or a short answer fits."""


@dataclass(frozen=True)
class Question:
    """One graded question: what is asked and what counts as right."""

    task: str
    question: str
    references: tuple[str, ...]
    choices: tuple[str, ...] | None = None
    subject: str | None = None

    def prompt(self, kind: PromptKind = "refuse") -> str:
        """The user turn of the REFUSE (RAIT) or BASIC prompt."""
        choices = list(self.choices) if self.choices else None
        make = rait_prompt_text if kind == "refuse" else basic_prompt_text
        return make(self.task, self.question, choices, self.subject)


@dataclass(frozen=True)
class QuestionSet:
    """Named questions (the file's stem, or the dataset name and version)."""

    name: str
    origin: str
    questions: tuple[Question, ...]

    def digest(self) -> str:
        """A hash of what is asked and what counts as right (names the set's content)."""
        items = [(q.task, q.question, q.references, q.choices, q.subject) for q in self.questions]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _questions_of(rows: Sequence[dict[str, Any]], where: str) -> tuple[Question, ...]:
    found = []
    for number, row in enumerate(rows, 1):
        if row.get("task") not in GRADED_TASKS:
            continue
        question = row.get("rait_question") or question_text(row["task"], row.get("prompt"))
        if not question or not row.get("references"):
            continue
        if row["task"] == "mcq" and len(row.get("choices") or []) != 4:
            raise EngineError(f"{where}: row {number}: field 'choices': an MCQ needs 4 options")
        found.append(
            Question(
                task=row["task"],
                question=question,
                references=tuple(row["references"]),
                choices=tuple(row["choices"]) if row.get("choices") else None,
                subject=mcq_subject(row.get("source")),
            )
        )
    if not found:
        raise EngineError(f"{where}: no open_qa or mcq question with a reference answer")
    return tuple(found)


def read_question_set(spec: str, store: DatasetStore) -> QuestionSet:
    """A question file (any QA format ingest reads) or a version ``NAME@VERSION``.

    Raises:
        EngineError: neither an existing file nor a known version, or no gradable question.
        IngestError: the file cannot be read; the message names the file and line.
    """
    path = Path(spec)
    if path.exists():
        rows: list[dict[str, Any]] = []
        for result in read_source(path):
            rows += result.kept.to_pylist()
        stem = path.name.split(".")[0]
        return QuestionSet(stem, str(path.resolve()), _questions_of(rows, str(path)))
    try:
        name, version = store.resolve(spec)
    except StoreError as exc:
        raise EngineError(f"question set {spec!r} is neither a file nor a version: {exc}") from None
    table = store.read(f"{name}@{version}", "train")
    return QuestionSet(f"{name}@{version}", spec, _questions_of(table.to_pylist(), spec))


def answer(
    engine: CachedEngine,
    model: str,
    questions: Sequence[Question],
    kind: PromptKind = "refuse",
    progress: Any = None,
) -> list[str]:
    """Greedy answers to the prompts of ``kind``, through the cache."""
    sampling = Sampling(n=1, temperature=0.0, max_tokens=MAX_TOKENS)
    requests = [
        Request(render(model, [{"role": "user", "content": q.prompt(kind)}]), sampling, 0)
        for q in questions
    ]
    return [samples[0].text for samples in engine.generate(requests, progress=progress)]


@dataclass(frozen=True)
class Answers:
    """One model's answers and labels for every set, under one prompt."""

    model: str
    kind: PromptKind
    fingerprint: str
    answers: dict[str, list[str]]
    labels: dict[str, list[Label]]
    engine_calls: int


def ask_model(
    model: str,
    sets: Sequence[QuestionSet],
    cache: GenerationCache,
    *,
    engine: str = "vllm",
    url: str | None = None,
    max_model_len: int | None = None,
    progress: Callable[[str], Any] | None = None,
    kinds: Sequence[PromptKind] = ("refuse",),
) -> list[Answers]:
    """Ask ``model`` every question of every set with each prompt of ``kinds`` (one engine
    for all), and grade the answers."""
    options = GenerateOptions(
        engine=engine, model=model, url=url, max_model_len=max_model_len, sampling=Sampling()
    )
    found = []
    with open_engine(options) as raw:
        cached = CachedEngine(raw, cache)
        for kind in kinds:
            answers: dict[str, list[str]] = {}
            for qset in sets:
                label = f"{Path(model).name} ({kind}): {qset.name}"
                bar = progress(label) if progress else None
                answers[qset.name] = answer(cached, model, qset.questions, kind, bar)
            labels = {
                qset.name: [
                    classify(q.task, a, q.references)
                    for q, a in zip(qset.questions, answers[qset.name], strict=True)
                ]
                for qset in sets
            }
            found.append(Answers(model, kind, cached.fingerprint, answers, labels, 0))
    calls = cached.stats.engine_calls
    return [replace(a, engine_calls=calls if i == 0 else 0) for i, a in enumerate(found)]


def summarise(model: Answers, basic: Answers, refuse: Answers) -> dict[str, dict[str, Any]]:
    """Per set: the model's ``n``, ``pc``, ``pw``, ``refusal`` and ``ths`` against M0's
    Init-Basic rates, and M0's ``init_basic`` and ``init_refuse`` rates (the latter with
    its THS)."""
    result = {}
    for name, labels in model.labels.items():
        init_basic = rates(basic.labels[name])
        init_refuse = rates(refuse.labels[name])
        mine = rates(labels)
        result[name] = {
            **mine,
            "ths": ths_against(init_basic, mine),
            "init_basic": {**init_basic, "ths": ths_against(init_basic, init_basic)},
            "init_refuse": {**init_refuse, "ths": ths_against(init_basic, init_refuse)},
        }
    return result


def write_rows(folder: Path, sets: Sequence[QuestionSet], model: Answers) -> None:
    """``<stem>.jsonl`` per set: question, answer, label."""
    for qset in sets:
        lines = [
            json.dumps({"question": q.question, "answer": a, "label": label}, ensure_ascii=False)
            for q, a, label in zip(
                qset.questions, model.answers[qset.name], model.labels[qset.name], strict=True
            )
        ]
        write_text_atomic(folder / f"{qset.name}.jsonl", "".join(line + "\n" for line in lines))


def store_next_to_version(store: DatasetStore, result: dict[str, Any]) -> str | None:
    """Keep the evaluation beside the version the model was trained on (when it was trained
    by ``aligncurate train`` on a dataset of this store); the path, or None."""
    record = read_record(result["model"])
    if record is None or store.remote:
        return None
    dataset = record["dataset"]
    if Path(dataset["store"]).resolve() != Path(store.root).resolve():
        return None
    identity = [result["fingerprint"], result["baseline_fingerprint"], result["questions"]]
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = save_evaluation(
        store, dataset["name"], dataset["version"], key, {**result, "dataset": dataset}
    )
    return str(path) if path else None


def evaluate(
    model: str,
    baseline: str,
    questions: Sequence[str],
    store: DatasetStore,
    cache: GenerationCache,
    *,
    engine: str = "vllm",
    url: str | None = None,
    max_model_len: int | None = None,
    rows_out: Path | None = None,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` and ``baseline`` on every question set; the result (see the
    module docstring), also stored next to the version the model was trained on."""
    if not questions:
        raise EngineError("give at least one question set (--questions)")
    started = time.perf_counter()
    sets = [read_question_set(spec, store) for spec in questions]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise EngineError(f"two question sets have one name: {names}; rename a file")
    options = {"engine": engine, "url": url, "max_model_len": max_model_len, "progress": progress}
    (mine,) = ask_model(model, sets, cache, **options)
    basic, refuse = ask_model(baseline, sets, cache, kinds=("basic", "refuse"), **options)
    if rows_out is not None:
        write_rows(rows_out, sets, mine)
    result: dict[str, Any] = {
        "model": str(Path(model).expanduser().absolute()),
        "fingerprint": mine.fingerprint,
        "baseline": str(Path(baseline).expanduser().absolute()),
        "baseline_fingerprint": basic.fingerprint,
        "origins": {s.name: s.origin for s in sets},
        "questions": {s.name: s.digest() for s in sets},
        "sets": summarise(mine, basic, refuse),
        "engine_calls": mine.engine_calls + basic.engine_calls,
        "seconds": round(time.perf_counter() - started, 2),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    stored = store_next_to_version(store, result)
    result["stored"] = stored
    return result
