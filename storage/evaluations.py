"""Evaluations kept next to the dataset version they judge.

``aligncurate evaluate`` of a model trained on ``NAME@VERSION`` (``aligncurate train``)
writes its result to ``<store>/NAME/_evaluations/v<VERSION>/<key>.json``: the model and M0
fingerprints, the question sets and their rates. Delta ignores folders that start with an
underscore, so the table is untouched; the report of that version lists them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.atomic import write_json_atomic
from storage.dataset import DatasetStore

EVALUATIONS = "_evaluations"


def evaluation_dir(store: DatasetStore, name: str, version: int) -> Path | None:
    """Where a version's evaluations live; None for a remote store (not supported yet)."""
    if store.remote:
        return None
    return Path(store.root) / name / EVALUATIONS / f"v{version}"


def save_evaluation(
    store: DatasetStore, name: str, version: int, key: str, result: dict[str, Any]
) -> Path | None:
    """Write one evaluation next to ``name@version``; its path (None for a remote store)."""
    folder = evaluation_dir(store, name, version)
    if folder is None:
        return None
    return write_json_atomic(folder / f"{key}.json", result)


def evaluations_of(store: DatasetStore, name: str, version: int) -> list[dict[str, Any]]:
    """The evaluations kept next to ``name@version``, newest first."""
    folder = evaluation_dir(store, name, version)
    if folder is None or not folder.is_dir():
        return []
    found = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
    return sorted(found, key=lambda r: r.get("created_at", ""), reverse=True)
