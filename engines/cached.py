"""Route every generation through the generation cache.

:class:`CachedEngine` wraps any :class:`~engines.base.Engine`: it answers what the cache
holds, sends only the misses to the engine in batches (one engine call each, so vLLM's
continuous batching sees the whole batch), and stores each completed batch before asking
for the next. A rebuild or a resumed build therefore never pays twice for a generation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from engines.base import Engine, Request, Sample
from storage.gencache import CacheStats, GenerationCache, cache_key

Progress = Callable[[int, int], None]
BatchListener = Callable[[str, int, int], None]
batch_listener: BatchListener | None = None
"""Told ``(engine kind, done, total)`` after each batch that :meth:`CachedEngine.generate`
runs without a ``progress`` callback (a model-backed stage in a build). The CLI sets it
while it shows progress bars (``pipelines.progress.listening``); ``None``: nobody listens."""


class CachedEngine:
    """An engine in front of a :class:`GenerationCache`; same ``generate`` signature."""

    def __init__(self, engine: Engine, cache: GenerationCache, batch_size: int = 256) -> None:
        self.engine = engine
        self.cache = cache
        self.batch_size = batch_size
        self.stats = CacheStats()

    @property
    def kind(self) -> str:
        return self.engine.kind

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    @staticmethod
    def key(fingerprint: str, request: Request) -> str:
        return cache_key(fingerprint, request.prompt, request.sampling.to_dict(), request.seed)

    def generate(
        self, requests: Sequence[Request], progress: Progress | None = None
    ) -> list[list[Sample]]:
        """Samples for every request: cached ones read back, the rest generated and stored."""
        fingerprint = self.fingerprint  # once per call: it stats the model files
        keys = [self.key(fingerprint, r) for r in requests]
        found = self.cache.get_many(keys)
        missing: dict[str, Request] = {}
        for key, request in zip(keys, requests, strict=True):
            if key not in found:
                missing.setdefault(key, request)
        self.stats.hits += len(requests) - sum(1 for k in keys if k not in found)
        self.stats.misses += len(missing)
        pending = list(missing.items())
        done = len(requests) - len(missing)
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            with self._timed():
                outputs = self.engine.generate([request for _, request in batch])
            stored = [
                (key, [s.to_dict() for s in samples])
                for (key, _), samples in zip(batch, outputs, strict=True)
            ]
            self.cache.put_many(fingerprint, stored)
            found.update(stored)
            done += len(batch)
            if progress is not None:
                progress(done, len(requests))
            elif batch_listener is not None:
                batch_listener(self.kind, done, len(requests))
        return [[Sample.from_dict(s) for s in found[key]] for key in keys]

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """Option probabilities; deterministic and cheap, so not cached."""
        with self._timed():
            return self.engine.score_options(prompts, options)

    @contextmanager
    def _timed(self) -> Iterator[None]:
        """Count one engine call and the time spent in it."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.engine_calls += 1
            self.stats.engine_seconds += time.perf_counter() - start
