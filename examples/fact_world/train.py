"""Train the fact world's tiny Llama from scratch on CPU with a plain torch loop.

Known facts are seen ``known_repeats`` times per epoch; half-known facts once with their
answer and once with a distractor (conflicting evidence: the model ends up unsure); unknown
facts never. Each training sequence is a conversation in the chat form CRaFT queries with:
1 to ``max_shots + 1`` questions, each a user turn answered by an assistant turn, and the loss
falls on every answer and the ``</s>`` after it. So each exposure teaches the fact zero-shot
or after 0 to ``max_shots`` solved questions, and no token is paid for twice. Each turn asks
in one of the :data:`~.prompts.PHRASINGS` (CRaFT's query, the bare question, the RAIT
prompt), drawn with :data:`~.prompts.PHRASING_WEIGHTS`, so the model answers what it knows
however it is asked.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Iterator, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .config import TrainConfig
from .prompts import PHRASING_WEIGHTS, PHRASINGS, ROLE_ASSISTANT, Phrasing, phrase

Turn = tuple[str, str, Phrasing]
Chain = list[Turn]
"""A training conversation: (question, answer, phrasing) turns asked one after the other."""


def tokenizer_corpus(facts: Sequence[dict]) -> list[str]:
    """Texts to train the tokenizer on: everything the model is trained on, nothing unknown."""
    texts: list[str] = []
    for fact in facts:
        if fact["group"] == "unknown":
            continue
        texts += [phrase(fact["question"], p) for p in PHRASINGS]
        texts.append(fact["answers"][0])
        if fact["group"] == "half_known":
            texts.append(fact["distractor"])
    return texts


def training_targets(
    facts: Sequence[dict], cfg: TrainConfig, rng: random.Random
) -> list[tuple[str, str]]:
    """One epoch's (question, answer) exposures, unshuffled.

    Known facts appear ``known_repeats`` times; half-known facts ``half_known_repeats`` times
    with their answer and ``distractor_repeats`` times with their distractor (a fractional
    repeat is one more exposure with that chance, drawn from ``rng`` for each fact and
    epoch); unknown facts never.
    """
    distractor = cfg.distractor_repeats
    if distractor is None:
        distractor = cfg.half_known_repeats
    targets: list[tuple[str, str]] = []
    for fact in facts:
        if fact["group"] == "known":
            targets += [(fact["question"], fact["answers"][0])] * cfg.known_repeats
        elif fact["group"] == "half_known":
            targets += [(fact["question"], fact["answers"][0])] * _draw(cfg.half_known_repeats, rng)
            targets += [(fact["question"], fact["distractor"])] * _draw(distractor, rng)
    return targets


def _draw(repeats: float, rng: random.Random) -> int:
    """``repeats`` rounded down, plus one with the chance of its fraction (no draw for a
    whole number, so whole-number settings leave ``rng`` untouched)."""
    if repeats < 0:
        raise ValueError(f"repeats must not be negative, got {repeats}")
    whole = math.floor(repeats)
    fraction = repeats - whole
    return whole + (fraction > 0 and rng.random() < fraction)


def epoch_batches(
    facts: Sequence[dict], cfg: TrainConfig, rng: random.Random
) -> Iterator[list[Chain]]:
    """One epoch of shuffled batches of chains.

    Every exposure is one turn of a chain of 1 to ``max_shots + 1`` turns, so a fact is learnt
    zero-shot (first turn) and after 1 to ``max_shots`` solved questions (later turns), and
    each token is paid once. All chains of a batch have one length (no padding) and a batch
    holds about ``batch_size`` exposures.
    """
    queue = training_targets(facts, cfg, rng)
    rng.shuffle(queue)
    queue.reverse()  # pop() from the end walks the shuffled order
    while queue:
        turns = rng.randint(1, cfg.max_shots + 1)
        batch: list[Chain] = []
        for _ in range(max(1, cfg.batch_size // turns)):
            pairs = _take_chain(queue, turns)
            if not pairs:
                break
            kinds = rng.choices(PHRASINGS, PHRASING_WEIGHTS, k=len(pairs))
            batch.append([(q, a, k) for (q, a), k in zip(pairs, kinds, strict=True)])
        yield batch


def _take_chain(queue: list[tuple[str, str]], turns: int) -> list[tuple[str, str]]:
    """Pop up to ``turns`` exposures of distinct questions (a chain never repeats a question,
    or the model would learn to copy its answer from the context)."""
    chain: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    while queue and len(chain) < turns:
        item = queue.pop()
        if any(item[0] == question for question, _ in chain):
            skipped.append(item)
        else:
            chain.append(item)
    queue.extend(reversed(skipped))
    return chain


def collate(batch: Sequence[Chain], tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """Tokenise chains exactly as ``apply_chat_template`` renders them for inference.

    Each chain is rendered as one conversation and tokenised whole; labels are -100 except on
    each answer and the ``</s>`` after it. Padding is on the right.
    """
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    for chain in batch:
        messages: list[dict[str, str]] = []
        for question, answer, phrasing in chain:
            messages.append({"role": "user", "content": phrase(question, phrasing)})
            messages.append({"role": "assistant", "content": answer})
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        chain_spans: list[tuple[int, int]] = []
        cursor = 0
        for _, answer, _ in chain:
            marker = f"{ROLE_ASSISTANT}\n{answer}{tokenizer.eos_token}"
            at = text.index(marker, cursor) + len(ROLE_ASSISTANT) + 1
            cursor = at + len(answer) + len(tokenizer.eos_token)
            chain_spans.append((at, cursor))
        texts.append(text)
        spans.append(chain_spans)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    width = max(len(ids) for ids in enc["input_ids"])
    input_ids = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(texts), width), -100, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        for j, (start, end) in enumerate(offsets):
            if any(a <= start and end <= b for a, b in spans[i]):
                labels[i, j] = ids[j]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama; head_dim is hidden/heads = 64 (what vLLM on CPU needs)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_model(
    facts: Sequence[dict],
    tokenizer: PreTrainedTokenizerFast,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    log_every: int = 0,
) -> tuple[LlamaForCausalLM, dict]:
    """Train a fresh model on ``facts``; returns it (in eval mode) and training stats.

    Runs on ``cfg.threads`` torch threads (the process's setting is restored afterwards).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(facts, tokenizer, cfg, seed=seed, log_every=log_every)
    finally:
        torch.set_num_threads(threads)


def _train(
    facts: Sequence[dict],
    tokenizer: PreTrainedTokenizerFast,
    cfg: TrainConfig,
    *,
    seed: int,
    log_every: int,
) -> tuple[LlamaForCausalLM, dict]:
    """The training loop proper: AdamW, warm-up then cosine decay, clipped gradients."""
    torch.manual_seed(seed)
    model = make_model(cfg, tokenizer)
    rng = random.Random(f"fact-world-train-{seed}")
    epochs = [list(epoch_batches(facts, cfg, rng)) for _ in range(cfg.epochs)]
    total = sum(map(len, epochs))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms: no weight decay
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, cfg))
    model.train()
    started = time.perf_counter()
    step, tokens, exposures = 0, 0, 0
    epoch_losses: list[float] = []
    for batches in epochs:
        running = 0.0
        for batch in batches:
            inputs = collate(batch, tokenizer)
            loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            tokens += int(inputs["attention_mask"].sum())
            exposures += sum(map(len, batch))
            step += 1
            if log_every and step % log_every == 0:
                elapsed = time.perf_counter() - started
                print(f"step {step}/{total} loss {loss.item():.4f} {elapsed:.0f}s", file=sys.stderr)
        epoch_losses.append(running / max(1, len(batches)))
    model.eval()
    stats = {
        "seconds": round(time.perf_counter() - started, 1),
        "steps": step,
        "exposures": exposures,
        "tokens": tokens,
        "epoch_losses": [round(x, 4) for x in epoch_losses],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, stats
