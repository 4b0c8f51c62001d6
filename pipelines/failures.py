"""Pickled task failures under ``<store>/_work/<name>/results``: marked when a task fails,
deleted once they are stale.

Prefect persists a failed task's exception (pickled, under a random key) in the task's
result storage and never deletes it, so every failed build left files behind for good.
:func:`record_failure`, a task's ``on_failure`` hook, marks each such file in
``results/failed/<task key>.<file>``. They are deleted when they stop being useful:

- when the same task (same cache key) later succeeds (:func:`clear_task_failures`, its
  ``on_completion`` hook);
- when a later build of the dataset commits (:func:`clear_failures`): every task of it
  succeeded, including the ones whose inputs changed since the failure (a fixed source
  gets a new key), so the failures marked before that build began are stale.

Failures of a build still running at the same time are newer than that build's start and
stay.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext

FAILED = "failed"


def _folder(task: Any) -> Path | None:
    """The local folder of the task's result storage (None: not a local folder)."""
    basepath = getattr(task.result_storage, "basepath", None)
    return Path(basepath) if basepath else None


def _task_key() -> str:
    context = TaskRunContext.get()
    return str(context.parameters.get("key", "")) if context is not None else ""


def record_failure(task: Any, task_run: Any, state: Any) -> None:
    """``on_failure`` hook: mark the pickled exception Prefect persisted for this failure."""
    folder = _folder(task)
    stored = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    if folder is None or not stored:
        return
    marks = folder / FAILED
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{_task_key()}.{Path(stored).name}").touch()


def clear_task_failures(task: Any, task_run: Any, state: Any) -> None:
    """``on_completion`` hook: delete the failures marked for this task's key."""
    folder, key = _folder(task), _task_key()
    if folder is not None and key and (folder / FAILED).is_dir():
        for mark in (folder / FAILED).glob(f"{key}.*"):
            _drop(folder, mark)


def clear_failures(results: Path, before: datetime) -> int:
    """Delete the failures marked before ``before`` in ``results``; returns how many."""
    marks = sorted((results / FAILED).glob("*")) if (results / FAILED).is_dir() else []
    dropped = 0
    for mark in marks:
        with contextlib.suppress(FileNotFoundError):  # another build dropped it
            if mark.stat().st_mtime < before.timestamp():
                _drop(results, mark)
                dropped += 1
    return dropped


def _drop(folder: Path, mark: Path) -> None:
    """Delete a marked failure record and its mark (another build may have got there)."""
    with contextlib.suppress(FileNotFoundError):
        (folder / mark.name.rsplit(".", 1)[1]).unlink()
    mark.unlink(missing_ok=True)
