"""The durable, content-addressed generation cache.

Every generation goes through it. The key is the SHA-256 of (engine fingerprint, rendered
prompt, sampling parameters, seed); the value is the list of samples. It is a SQLite file
in WAL mode: each completed batch is one transaction, so a SIGKILL mid-run loses at most
the batch in flight, and two processes can read and write it at once (SQLite's locking;
``INSERT OR IGNORE`` makes a race between them harmless, since both computed the same
content). It lives in ``<store>/_cache`` by default; ``ALIGNCURATE_CACHE`` moves it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.uris import local_path

CACHE_ENV = "ALIGNCURATE_CACHE"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    samples TEXT NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID
"""
_CHUNK = 500  # SQLite's host-parameter limit is well above this


def cache_dir(store_root: str | None = None) -> Path:
    """``$ALIGNCURATE_CACHE``, else ``<store>/_cache`` for a local store."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    local = None if store_root is None else local_path(store_root)
    if local is None:
        return Path.home() / ".cache" / "aligncurate" / "generations"
    return Path(local) / "_cache"


def cache_key(fingerprint: str, prompt: str, sampling: Mapping[str, Any], seed: int | None) -> str:
    """The content address of one request."""
    payload = json.dumps([fingerprint, prompt, dict(sampling), seed], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class CacheStats:
    """Requests answered from the cache, requests sent to an engine, engine calls and the
    time they took."""

    hits: int = 0
    misses: int = 0
    engine_calls: int = 0
    engine_seconds: float = 0.0
    """Wall-clock time spent inside the engine's own calls."""

    def to_dict(self) -> dict[str, int]:
        """The cache accounting (``engine_seconds`` is a timing, reported apart)."""
        return {"hits": self.hits, "misses": self.misses, "engine_calls": self.engine_calls}


def _set_up(db: sqlite3.Connection, deadline_s: float = 60.0) -> None:
    """WAL mode and the table, retried while another process is creating the same file.

    Switching to WAL can answer SQLITE_BUSY at once, without waiting on the busy timeout,
    while a second connection is doing the same switch on a new database; the retry covers it.
    """
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            return
        except sqlite3.OperationalError as err:
            contended = "locked" in str(err) or "busy" in str(err)
            if not contended or time.monotonic() > give_up:
                raise
            time.sleep(0.05)


class GenerationCache:
    """A SQLite-backed map from request key to its samples (JSON)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / "generations.sqlite"
        self.stats = CacheStats()
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            _set_up(db)
            self._local.db = db
        return db

    def get_many(self, keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The cached samples of the keys that are present."""
        found: dict[str, list[dict[str, Any]]] = {}
        db = self._db()
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(f"SELECT key, samples FROM generations WHERE key IN ({marks})", chunk)
            found.update((key, json.loads(samples)) for key, samples in rows)
        return found

    def put_many(self, fingerprint: str, items: Iterable[tuple[str, list[dict[str, Any]]]]) -> None:
        """Store one completed batch in a single transaction."""
        now = time.time()
        rows = [(key, fingerprint, json.dumps(samples), now) for key, samples in items]
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR IGNORE INTO generations (key, fingerprint, samples, created)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def __len__(self) -> int:
        return self._db().execute("SELECT count(*) FROM generations").fetchone()[0]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
