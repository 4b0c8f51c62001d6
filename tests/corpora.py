"""Large inputs made from the real corpora, for resume, scale-out tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path


def enlarged_gsm8k(shared_data: Path, target: Path, rows: int, start: int = 0) -> Path:
    """``rows`` Alpaca rows of GSM8K (``instructions/gsm8k_train_alpaca.json``) as JSONL,
    from row ``start`` of the endless sequence: the corpus repeated, each copy's
    instruction suffixed with its copy number, so the rows stay distinct (exact dedup keeps
    them) and near-duplicate across copies."""
    source = json.loads((shared_data / "instructions" / "gsm8k_train_alpaca.json").read_text())
    with target.open("w") as out:
        for i in range(start, start + rows):
            row = source[i % len(source)]
            copy = i // len(source)
            instruction = f"{row['instruction']} (copy {copy})" if copy else row["instruction"]
            out.write(json.dumps({**row, "instruction": instruction}) + "\n")
    return target
