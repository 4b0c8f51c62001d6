"""The engine protocol: every model-based stage talks to a model through it.

An engine generates ``n`` samples per prompt and scores the options of multiple-choice
prompts. Prompts reach engines already rendered (with the model's chat template, by
:mod:`engines.prompts`), so every engine sees byte-identical text. Seeds are per request:
with one fixed seed vLLM gives every prompt the same random stream, so callers derive a
seed per (row id, stage, sample index) with :func:`row_seed`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one request (the published defaults live in each stage)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """Top-k alternatives per generated token; 0 gives only the sampled token's logprob
    (and with it the sample's cumulative logprob); ``None`` gives neither."""

    def __post_init__(self) -> None:
        problems = [
            message
            for failed, message in (
                (self.n < 1, f"n must be at least 1, got {self.n}"),
                (self.max_tokens < 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
                (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
                (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
                (
                    self.logprobs is not None and self.logprobs < 0,
                    f"logprobs must be >= 0, got {self.logprobs}",
                ),
            )
            if failed
        ]
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data


@dataclass(frozen=True)
class Request:
    """One rendered prompt, its sampling parameters and its seed."""

    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None


@dataclass(frozen=True)
class Sample:
    """One generated completion."""

    text: str
    finish_reason: str | None = None
    cumulative_logprob: float | None = None
    token_logprobs: list[float] | None = None
    """Log-probability of each generated token (when ``logprobs`` was asked)."""
    top_logprobs: list[dict[str, float]] | None = None
    """The top-k alternatives at each position, token text → logprob."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        return cls(**data)


class EngineError(RuntimeError):
    """A model could not be loaded or a request could not be served; the message says why."""


@runtime_checkable
class Engine(Protocol):
    """What every engine implements."""

    kind: str

    @property
    def fingerprint(self) -> str:
        """Engine kind, model path and a hash of the model's config and weights files."""
        ...

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """``n`` samples for each request, in request order, in one batched engine call."""
        ...

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """For each prompt, the full-vocabulary softmax probability of each option's next
        token (``A``, ``B``, ...), in option order (not renormalised)."""
        ...


@runtime_checkable
class TextEmbedder(Protocol):
    """What an embedding engine implements (:class:`engines.embeddings.Embedder`): the
    protocol transforms type their embedder argument with, so they never import an engine."""

    @property
    def fingerprint(self) -> str:
        """Engine kind, model path and a hash of the model's files."""
        ...

    def embed(self, texts: Sequence[str]) -> Any:
        """A ``(len(texts), dim)`` float32 numpy array, each row with unit L2 norm."""
        ...


def row_seed(row_id: str, stage: str, index: int = 0) -> int:
    """A 31-bit seed from (row id, stage, sample index): distinct streams per row."""
    digest = hashlib.blake2b(f"{row_id}\x1f{stage}\x1f{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") & 0x7FFF_FFFF
