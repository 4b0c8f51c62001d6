"""``aligncurate train``: RAIT training of a model on a version's train split (CRaFT stage 2).

The rows' prompts are rendered with the base model's chat template and their responses are
the completions (:mod:`engines.sft` trains with TRL's ``SFTTrainer``). The preset follows
the version's task (open QA or MCQ, :data:`engines.sft.PRESETS`); every field can be
overridden.

A run is cached on the version (its name, number and data files), the base model's content
hash and the parameters: the output folder holds ``aligncurate-train.json`` with that key,
and a second call with the same key trains nothing. The record also names the dataset
version and the base model, and keeps the loss curve and the time, so a model can always be
traced back to the data it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engines.base import EngineError
from engines.models import model_dir, model_hash
from engines.prompts import render
from engines.sft import TrainParams, preset, train_sft
from storage.atomic import write_json_atomic
from storage.dataset import DatasetStore

RECORD = "aligncurate-train.json"
TRAIN_CODE_VERSION = 1


def training_rows(store: DatasetStore, ref: str) -> tuple[list[str], list[str], str]:
    """The version's prompts, responses and task (the most common one).

    Raises:
        EngineError: the version's train split is empty.
    """
    table = store.read(ref, "train", columns=["prompt", "response", "task"])
    if table.num_rows == 0:
        raise EngineError(f"{ref}: the train split is empty; nothing to train on")
    task = Counter(table.column("task").to_pylist()).most_common(1)[0][0]
    return table.column("prompt").to_pylist(), table.column("response").to_pylist(), task


def _key(name: str, version: int, files: list[str], base: str, params: TrainParams) -> str:
    payload = {
        "code": TRAIN_CODE_VERSION,
        "dataset": name,
        "version": version,
        "files": sorted(Path(f).name for f in files),
        "base_model": base,
        "params": params.model_dump(exclude={"threads"}),  # threads change speed, not weights
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The training record of a model folder written by :func:`train_version`, or None."""
    try:
        return json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def train_version(
    store: DatasetStore,
    ref: str,
    model: str | Path,
    out_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``ref``'s train split into ``out_dir``; the run's record.

    The record has ``cached: true`` when ``out_dir`` already held this exact run.

    Raises:
        EngineError: ``out_dir`` holds something that is not a model this command trained,
            the train split is empty, or the base model is missing.
        StoreError: unknown dataset, version or tag.
    """
    # Every check before the tokenizer loads (seconds): a bad --out or --set fails at once.
    out = Path(out_dir).expanduser().absolute()
    base = model_dir(model)
    if out.exists() and not out.is_dir():
        raise EngineError(f"{out} is a file; --out must be a folder")
    previous = read_record(out)
    if out.exists() and any(out.iterdir()) and previous is None:
        raise EngineError(
            f"{out} exists and is not a model trained by aligncurate; not overwriting"
        )
    name, version = store.resolve(ref)
    exact = f"{name}@{version}"  # resolved once: a tag moved meanwhile cannot split data and key
    prompts, responses, task = training_rows(store, exact)
    params = preset(task, **(overrides or {}))
    key = _key(name, version, store.files(exact, "train"), model_hash(base), params)
    if previous is not None and previous.get("key") == key and (out / "config.json").is_file():
        return {**previous, "cached": True}
    pairs = [(render(base, p), r) for p, r in zip(prompts, responses, strict=True)]
    started = time.perf_counter()
    run = train_sft(base, pairs, out, params, progress=progress, on_log=on_log)
    record = {
        "key": key,
        "dataset": {
            "name": name,
            "version": version,
            "ref": exact,
            "store": store.root,
        },
        "base_model": {"path": str(base), "hash": model_hash(base)},
        "task": task,
        "params": params.model_dump(),
        "examples": run["examples"],
        "steps": run["steps"],
        "loss": run["loss"],
        "train_seconds": run["seconds"],
        "seconds": round(time.perf_counter() - started, 2),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / RECORD, record)
    return {**record, "cached": False}
