"""The generation cache: content addressing, durability per batch, two writers at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.gencache import CACHE_ENV, GenerationCache, cache_dir, cache_key

BATCH = 50


def samples(i: int) -> list[dict]:
    return [{"text": f"answer {i}", "finish_reason": "stop", "cumulative_logprob": -1.5}]


def test_keys_cover_engine_prompt_sampling_and_seed() -> None:
    base = cache_key("vllm:m:abc", "Q?", {"n": 1, "temperature": 1.0}, 7)
    assert base == cache_key("vllm:m:abc", "Q?", {"temperature": 1.0, "n": 1}, 7)
    variants = [
        cache_key("vllm:m:abd", "Q?", {"n": 1, "temperature": 1.0}, 7),
        cache_key("vllm:m:abc", "Q? ", {"n": 1, "temperature": 1.0}, 7),
        cache_key("vllm:m:abc", "Q?", {"n": 2, "temperature": 1.0}, 7),
        cache_key("vllm:m:abc", "Q?", {"n": 1, "temperature": 1.0}, 8),
        cache_key("vllm:m:abc", "Q?", {"n": 1, "temperature": 1.0}, None),
    ]
    assert len({base, *variants}) == 6


def test_round_trip_and_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = GenerationCache(tmp_path / "c")
    cache.put_many("fp", [(f"k{i}", samples(i)) for i in range(3)])
    cache.put_many("fp", [("k0", samples(99))])  # same content address: first write wins
    assert cache.get_many(["k0", "k2", "missing"]) == {"k0": samples(0), "k2": samples(2)}
    assert len(cache) == 3
    assert cache_dir(str(tmp_path / "store")) == tmp_path / "store" / "_cache"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_dir(str(tmp_path / "store")) == tmp_path / "elsewhere"


def _writer(folder: str, offset: int) -> None:
    cache = GenerationCache(folder)
    for start in range(0, 400, BATCH):
        cache.put_many("fp", [(f"k{offset + i}", samples(i)) for i in range(start, start + BATCH)])
        # overlapping keys on purpose: both processes write k200..k399
        cache.put_many(
            "fp", [(f"k{200 + i}", samples(200 + i)) for i in range(start // 2, start // 2 + 10)]
        )


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), off)) for off in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = GenerationCache(tmp_path)
    assert len(cache) == 400 + 400
    assert cache.get_many(["k210"]) == {"k210": samples(210)}


KILLED_WRITER = """
import sys, time
from storage.gencache import GenerationCache
cache = GenerationCache(sys.argv[1])
for b in range(10_000):
    cache.put_many("fp", [(f"k{b}-{i}", [{"text": "x" * 200}]) for i in range({batch})])
    print(b, flush=True)
"""


def test_sigkill_loses_at_most_the_batch_in_flight(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER.replace("{batch}", str(BATCH)), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo,
    )
    assert proc.stdout is not None
    for _ in range(20):  # let it commit 20 batches, then kill it mid-stream
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.1)
    db = sqlite3.connect(tmp_path / "generations.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT key FROM generations").fetchall()
    assert len(rows) >= 20 * BATCH
    assert len(rows) % BATCH == 0  # only whole batches: the one in flight is gone or whole
