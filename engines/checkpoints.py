"""Write a fine-tuned model as a folder any engine loads, atomically.

Rehearsal (:mod:`engines.rehearsal`) and RAIT training (:mod:`engines.sft`) both end here:
the weights (safetensors), the base model's tokenizer and its generation config go into a
temporary folder beside ``out_dir``, which is then renamed into place, so a killed run never
leaves a half-written model where a model is expected.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from engines.prompts import tokenizer
from storage.atomic import atomic_dir


def save_checkpoint(model: Any, source: str | Path, out_dir: str | Path) -> Path:
    """Save ``model`` with ``source``'s tokenizer and generation config as ``out_dir``
    (replacing what was there); returns ``out_dir``."""
    source, out_dir = Path(source), Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer(str(source)).save_pretrained(tmp)
        extra = source / "generation_config.json"
        if extra.exists() and not (tmp / extra.name).exists():
            shutil.copy(extra, tmp / extra.name)
    return out_dir
