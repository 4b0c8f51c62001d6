"""Benchmark: the transformers engine on a ~1B-parameter Llama with random weights (GPU box).

Issue #3 asks for the transformers engine's tokens/s on a GPU with a ~1B Llama built from
a config. No model can be downloaded, so the model is made here: a Llama of
``--hidden``/``--layers`` (default 2048 × 22, intermediate 5632: 1.1B parameters, TinyLlama's
shape) with random weights, saved in bf16 beside a byte-level BPE tokenizer of 1,024 tokens
trained in a second on the script's own text (the fact world's tokenizer recipe). Random
weights give random text, so every request runs to ``max_tokens``: the timing is the
model's, not the data's.

Two cases on the same loaded model, alternating, ``--repeats`` times each (median):

- ``bare``: one ``model.generate`` per prompt with the same token ids, ``n`` sequences,
  temperature, top_p and seed, as the CRaFT reference code queries models;
- ``engine``: ``TransformersEngine.generate`` on the same requests (rendering, context
  check, seeding, decoding into ``Sample`` objects included).

Usage on a GPU box: ``python bench/hf_gpu.py --device cuda``. A CPU smoke run:
``python bench/hf_gpu.py --device cpu --hidden 256 --layers 2 --intermediate 768
--prompts 4 --max-tokens 8``. Needs only torch, transformers and tokenizers besides the
repository. Prints a JSON report (GPU model, parameters, tokens/s, ratio).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]

TEXT = [
    "Question: Where was the violin maker born?\nAnswer: in Quelport",
    "Question: Which instrument does the painter play?\nAnswer: the cello",
    "Question: In which year was the guild founded?\nAnswer: 1847",
] * 50


def make_model(folder: Path, args: argparse.Namespace) -> int:
    """A random-weight Llama and a trained tokenizer saved in HF format; its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from examples.fact_world.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(TEXT, vocab_size=1024)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from engines import Request, Sampling, row_seed
    from engines.hf import TransformersEngine
    from engines.prompts import encode

    with tempfile.TemporaryDirectory(prefix="ac-bench-hf-") as tmp:
        folder = Path(tmp)
        parameters = make_model(folder, args)
        engine = TransformersEngine(folder, device=args.device, dtype=args.dtype)
        t0 = time.perf_counter()
        model, tokenizer = engine.model, engine.tokenizer
        load = time.perf_counter() - t0
        sampling = Sampling(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens)
        requests = [
            Request(TEXT[i % 3].split("Answer:")[0] + "Answer:", sampling, row_seed(str(i), "hf"))
            for i in range(args.prompts)
        ]
        ids = [torch.tensor([encode(str(folder), r.prompt)], device=args.device) for r in requests]

        def bare() -> int:
            tokens = 0
            for request, prompt in zip(requests, ids, strict=True):
                torch.manual_seed(request.seed)
                with torch.no_grad():
                    out = model.generate(
                        prompt,
                        do_sample=True,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        top_k=None,
                        max_new_tokens=sampling.max_tokens,
                        num_return_sequences=sampling.n,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                    )
                for row in out[:, prompt.shape[1] :].tolist():  # up to its end token
                    eos = tokenizer.eos_token_id
                    tokens += row.index(eos) + 1 if eos in row else len(row)
            return tokens

        def ours() -> int:
            engine.generate(requests)
            return 0  # same seeds and settings: the same sequences as ``bare``

        def timed(fn: Any) -> tuple[float, int]:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0, tokens

        timed(lambda: engine.generate(requests[:1]))  # warm-up (kernels, allocator)
        runs: dict[str, list[tuple[float, int]]] = {"bare": [], "engine": []}
        for _ in range(args.repeats):
            runs["bare"].append(timed(bare))
            runs["engine"].append(timed(ours))
    median = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    tokens = runs["bare"][0][1]
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    report = {
        "device": gpu or platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "parameters": parameters,
        "dtype": args.dtype,
        "requests": {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens},
        "load_seconds": round(load, 2),
        "bare_seconds": round(median["bare"], 3),
        "engine_seconds": round(median["engine"], 3),
        "generated_tokens": tokens,
        "bare_tokens_per_s": round(tokens / median["bare"], 1),
        "engine_tokens_per_s": round(tokens / median["engine"], 1),
        "engine_vs_bare": round(median["engine"] / median["bare"], 3),
        "runs_seconds": {k: [round(s, 3) for s, _ in v] for k, v in runs.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
