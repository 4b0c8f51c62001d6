"""Rehearsal fine-tuning for CRaFT: fine-tune M0 on what it already knows, get M̃.

Defaults follow the CRaFT public code (Zhu et al., AAAI-25, arXiv 2410.06913): LoRA with
r 64, alpha 16, dropout 0.1, learning rate 2e-4, 3 epochs, cosine schedule; or a full
fine-tune at 2e-6. The loss covers the completion only (prompt tokens are masked with
-100). The result is a *merged* checkpoint folder (LoRA folded into the weights, tokenizer
copied) that the vLLM engine loads like any model.

Deviation: LoRA targets every linear layer (peft's ``all-linear``); the paper does not say
which modules its adapters cover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.base import EngineError
from engines.checkpoints import save_checkpoint
from engines.models import model_dir
from engines.prompts import encode, tokenizer


class RehearsalParams(BaseModel):
    """Fine-tuning hyper-parameters; defaults are the CRaFT code's."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["lora", "full"] = "lora"
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    learning_rate: float | None = Field(
        default=None, description="default: 2e-4 for LoRA, 2e-6 for full fine-tuning"
    )
    epochs: float = 3.0
    batch_size: int = 8
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    seed: int = 42
    device: str = "cpu"

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.method == "lora" else 2e-6


def _examples(model_path: str, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + completion (+ EOS) and the prompt length, for loss masking."""
    eos = tokenizer(model_path).eos_token_id
    out = []
    for prompt, completion in pairs:
        p = encode(model_path, prompt)
        c = encode(model_path, completion) + ([eos] if eos is not None else [])
        out.append((p + c, len(p)))
    return out


def collate(batch: Sequence[tuple[list[int], int]], pad: int) -> tuple[Any, Any, Any]:
    """Right-padded ``input_ids``, ``labels`` and ``attention_mask`` of a batch of
    (token ids, prompt length). Labels are -100 (no loss) on the prompt and the padding:
    the loss is on the completion only, its end token included."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def rehearse(
    model_path: str | Path,
    pairs: Sequence[tuple[str, str]],
    out_dir: str | Path,
    params: RehearsalParams | None = None,
) -> Path:
    """Fine-tune on (rendered prompt, completion) pairs; write a merged checkpoint.

    The checkpoint is built in a temporary folder beside ``out_dir`` and renamed into place,
    so a killed run never leaves a half-written model.
    """
    import torch
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    params = params or RehearsalParams()
    source = str(model_dir(model_path))
    if not pairs:
        raise EngineError("rehearsal needs at least one training example")
    torch.manual_seed(params.seed)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(params.device)
    if params.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=params.lora_r,
                lora_alpha=params.lora_alpha,
                lora_dropout=params.lora_dropout,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    model.train()
    data = _examples(source, pairs)
    pad = tokenizer(source).pad_token_id or 0
    steps_per_epoch = math.ceil(len(data) / params.batch_size)
    total = max(1, math.ceil(steps_per_epoch * params.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(total * params.warmup_ratio), total)
    generator = torch.Generator().manual_seed(params.seed)
    step = 0
    while step < total:
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order), params.batch_size):
            if step >= total:
                break
            batch = [data[i] for i in order[start : start + params.batch_size]]
            input_ids, labels, mask = collate(batch, pad)
            loss = model(
                input_ids=input_ids.to(params.device),
                attention_mask=mask.to(params.device),
                labels=labels.to(params.device),
            ).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
    if params.method == "lora":
        model = model.merge_and_unload()
    return save_checkpoint(model, source, out_dir)
