"""OpenAI-compatible completions client (``vllm serve`` started by us or already running).

Requests go out concurrently (bounded by ``concurrency``) over one async HTTP client.
Connection errors, timeouts, 429 and 5xx answers are retried with exponential backoff and
jitter by tenacity (``AsyncRetrying``; the openai client's own retries cannot move a retry
to another server); a request that still fails raises :class:`EngineError` naming the
server, so a dead server is a clear error, not a hang. The prompt is sent as the token ids
of the text we rendered (``prompt`` accepts a token list), so the server sees exactly what
in-process vLLM sees.
Retries happen below the cache: a batch is stored only once all its requests succeeded,
so a retried request is never counted or stored twice.

Model work scales out by giving several servers of the same model (a list of URLs, or one
string with commas): request ``i`` of a batch goes to server ``i mod k`` and its retries
move on to the next servers, so the load is spread evenly and a dead server costs retries,
not the batch. The fingerprint does not depend on the URLs (same model, same outputs for a
seeded request), so each request is still cached once, whichever server answered it.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from engines.base import EngineError, Request, Sample
from engines.models import fingerprint, model_dir
from engines.prompts import encode, option_token_id

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class OpenAIEngine:
    """Completions over HTTP; ``model_path`` is the local copy used for the tokenizer."""

    kind = "openai"

    def __init__(
        self,
        url: str | Sequence[str],
        model_path: str | Path,
        *,
        served_name: str = "model",
        concurrency: int = 32,
        retries: int = 4,
        backoff: float = 0.5,
        timeout: float = 600,
        api_key: str | None = None,
    ) -> None:
        self.urls = _urls(url)
        self.url = self.urls[0]
        self.sent: Counter[str] = Counter()
        """Requests answered by each server (a retry counts where it succeeded)."""
        self.model_path = str(model_dir(model_path))
        self.served_name = served_name
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.kind, self.model_path)

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        bodies = [self._body(r) for r in requests]
        answers = asyncio.run(self._post_all(bodies))
        return [
            [_sample(c, r.sampling.logprobs is not None) for c in a["choices"]]
            for a, r in zip(answers, requests, strict=True)
        ]

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        ids = [option_token_id(self.model_path, o) for o in options]
        bodies = [
            {
                "model": self.served_name,
                "prompt": encode(self.model_path, p),
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": len(ids),
                "logprob_token_ids": ids,
                "return_tokens_as_token_ids": True,
            }
            for p in prompts
        ]
        answers = asyncio.run(self._post_all(bodies))
        out = []
        for answer in answers:
            top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
            out.append([math.exp(top[f"token_id:{i}"]) for i in ids])
        return out

    def _body(self, request: Request) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.served_name,
            "prompt": encode(self.model_path, request.prompt),
            "n": s.n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": request.seed,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
        return body

    async def _post_all(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        limit = asyncio.Semaphore(self.concurrency * len(self.urls))
        clients = [
            httpx.AsyncClient(base_url=url, timeout=self.timeout, headers=self.headers)
            for url in self.urls
        ]
        try:

            async def one(index: int, body: dict[str, Any]) -> dict[str, Any]:
                async with limit:
                    return await self._post(clients, index, body)

            return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))
        finally:
            for client in clients:
                await client.aclose()

    async def _post(
        self, clients: list[httpx.AsyncClient], index: int, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Request ``index`` of a batch: server ``index mod k`` first, the next on retry."""
        tried: list[str] = []

        async def attempt_once() -> dict[str, Any]:
            server = (index + len(tried)) % len(clients)
            url = self.urls[server]
            tried.append(url)
            try:
                response = await clients[server].post("/v1/completions", json=body)
            except httpx.TransportError as exc:
                raise _Retryable(f"{url}: {type(exc).__name__}: {exc}") from exc
            if response.status_code == 200:
                self.sent[url] += 1
                return response.json()
            if response.status_code not in _RETRY_STATUS:
                raise EngineError(
                    f"server {url} refused the request ({response.status_code}): "
                    f"{_message(response)}"
                )
            raise _Retryable(f"{url}: HTTP {response.status_code}: {_message(response)}")

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential_jitter(multiplier=self.backoff, jitter=self.backoff / 4),
        )
        try:
            return await retrying(attempt_once)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            servers = ", ".join(dict.fromkeys(tried))
            raise EngineError(
                f"server {servers} failed after {len(tried)} attempts (is it running?): {last}"
            ) from None


class _Retryable(Exception):
    """A failed attempt worth another try (transport error, 408/429/5xx); its message
    names the server and what went wrong."""


def _urls(url: str | Sequence[str]) -> list[str]:
    """Server URLs from a list or a comma-separated string, without trailing ``/``."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls = [u.strip().rstrip("/") for u in parts if u.strip()]
    if not urls:
        raise EngineError("openai engine: no server URL given")
    return urls


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    error = data.get("error", data)
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]


def _sample(choice: dict[str, Any], with_logprobs: bool) -> Sample:
    lp = choice.get("logprobs") if with_logprobs else None
    token_logprobs = [float(x) for x in lp["token_logprobs"]] if lp else None
    return Sample(
        text=choice["text"],
        finish_reason=choice.get("finish_reason"),
        cumulative_logprob=sum(token_logprobs) if token_logprobs else None,
        token_logprobs=token_logprobs,
        top_logprobs=lp.get("top_logprobs") if lp else None,
    )
