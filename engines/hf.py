"""transformers engine: generation, option scoring and hidden states with a HF model.

This is the slow, simple path (one ``generate`` per prompt, as the CRaFT reference code
queries models) and the one that exposes hidden states: CRaFT's static-conflict measure
uses the last-layer hidden states of the question tokens. Generation exists for parity
and as the benchmark's naive baseline; use vLLM for volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engines.base import EngineError, Request, Sample
from engines.models import fingerprint, model_dir
from engines.prompts import encode, option_token_id, tokenizer


class TransformersEngine:
    """A HF causal LM on CPU (or ``device``); loads on first use."""

    kind = "transformers"

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "float32") -> None:
        self.model_path = str(model_dir(model_path))
        self.device = device
        self.dtype = dtype

    @property
    def fingerprint(self) -> str:
        """Model fingerprint plus what changes the numbers: dtype and device type."""
        return f"{fingerprint(self.kind, self.model_path)}:{self.dtype}:{self.device.split(':')[0]}"

    @cached_property
    def tokenizer(self) -> Any:
        return tokenizer(self.model_path)

    @cached_property
    def model(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=getattr(torch, self.dtype)
        ).to(self.device)
        model.eval()
        return model

    def _ids(self, text: str) -> Any:
        import torch

        ids = encode(self.model_path, text)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and len(ids) >= limit:
            raise EngineError(
                f"prompt of {len(ids)} tokens does not fit the model's context of {limit} tokens"
            )
        return torch.tensor([ids], device=self.device)

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """One ``model.generate`` per request (seeded with ``torch.manual_seed``).

        With ``logprobs`` set, each sample carries the log-probability of every generated
        token (its end-of-sequence token included) and the ``logprobs`` most likely
        alternatives, taken from the model's raw logits before temperature and top-p, as
        vLLM reports them (its default ``logprobs_mode="raw_logprobs"``).
        """
        import torch

        out: list[list[Sample]] = []
        eos = self.tokenizer.eos_token_id
        for request in requests:
            s = request.sampling
            ids = self._ids(request.prompt)
            if request.seed is not None:
                torch.manual_seed(request.seed)
            greedy = s.temperature == 0
            with torch.no_grad():
                gen = self.model.generate(
                    ids,
                    do_sample=not greedy,
                    temperature=None if greedy else s.temperature,
                    top_p=None if greedy else s.top_p,
                    max_new_tokens=s.max_tokens,
                    num_return_sequences=s.n,
                    pad_token_id=(
                        eos if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id
                    ),
                    eos_token_id=eos,
                    top_k=None,
                    return_dict_in_generate=True,
                    output_logits=s.logprobs is not None,
                )
            tokens = gen.sequences[:, ids.shape[1] :].tolist()
            steps = (
                torch.log_softmax(torch.stack(gen.logits, dim=1).float(), dim=-1)
                if s.logprobs is not None
                else None
            )
            samples = []
            for index, row in enumerate(tokens):
                finish = "stop" if eos in row else "length"
                row = row[: row.index(eos) + 1] if eos in row else row
                text = self.tokenizer.decode(
                    row[:-1] if finish == "stop" else row, skip_special_tokens=True
                )
                text, stopped = _apply_stop(text, s.stop)
                finish = "stop" if stopped else finish
                if stopped and steps is not None:  # vLLM's tokens end with the stop string's
                    row = self._through_stop(row, s.stop)
                if steps is None:
                    samples.append(Sample(text=text, finish_reason=finish))
                else:
                    samples.append(self._with_logprobs(text, finish, row, steps[index], s.logprobs))
            out.append(samples)
        return out

    def _through_stop(self, row: list[int], stop: Sequence[str]) -> list[int]:
        """The generated tokens up to the one that completes the first stop string."""
        for end in range(1, len(row) + 1):
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
            if _apply_stop(text, stop)[1]:
                return row[:end]
        return row

    def _with_logprobs(
        self, text: str, finish: str, row: list[int], steps: Any, k: int | None
    ) -> Sample:
        """A sample with the logprob of each of its tokens and the top ``k`` alternatives
        at each position (the sampled token always among them, as in vLLM)."""
        chosen = [float(steps[t, token]) for t, token in enumerate(row)]
        top = []
        for t, token in enumerate(row):
            best = steps[t].topk(k).indices.tolist() if k else []
            top.append({self.tokenizer.decode([i]): float(steps[t, i]) for i in [*best, token]})
        return Sample(
            text=text,
            finish_reason=finish,
            cumulative_logprob=sum(chosen),
            token_logprobs=chosen,
            top_logprobs=top,
        )

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """Full-vocabulary softmax probability of each option's first token after the prompt."""
        import torch

        option_ids = [option_token_id(self.model_path, o) for o in options]
        out = []
        for prompt in prompts:
            with torch.no_grad():
                logits = self.model(self._ids(prompt)).logits[0, -1]
            probs = torch.softmax(logits.float(), dim=-1)
            out.append([float(probs[i]) for i in option_ids])
        return out

    def hidden_states(
        self, texts: Sequence[str], pool: Literal["last", "mean"] = "last"
    ) -> np.ndarray:
        """Last-layer hidden states of each text's tokens, pooled to one vector per text:
        the final token's (``last``, the default) or the mean over tokens (``mean``)."""
        import torch

        rows = []
        for text in texts:
            with torch.no_grad():
                hidden = self.model(self._ids(text), output_hidden_states=True).hidden_states[-1][0]
            vector = hidden[-1] if pool == "last" else hidden.mean(dim=0)
            rows.append(vector.float().cpu().numpy())
        return np.stack(rows) if rows else np.zeros((0, self.model.config.hidden_size))


def _apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
