"""Exact dedup's carried state: memory per distinct key and time per million rows.

``python bench/dedup_state.py [--rows 1048576]`` runs, each in its own child process:

- **memory**: ``--rows`` (and 4x as many) random 128-bit keys (hex digests, as
  ``content_key`` gives them, each with a hex id) fed in 64k-row shards through the dict
  of the previous stage (key → id, Python strings) and through the
  :class:`transforms.keyset.KeySet` the stage carries now; bytes per distinct key from
  ``tracemalloc`` (what stays after the last shard, and the peak while feeding, shard
  temporaries included), from the RSS, and the peak RSS added per key between ``--rows``
  and 4x as many keys (the slope that decides how many distinct rows fit under a memory
  ceiling); for the KeySet, its arrays in memory and its records spilled to temporary
  files, per key.
- **time**: ``--rows`` GSM8K rows made distinct by a numbered suffix, 10% of them copies
  of an earlier row (any shard before, or the same one), through the previous stage
  (kept below as the baseline) and ``exact_dedup``, shard by shard; both compute
  ``content_key`` (its time is given too), and their outputs are checked to be equal.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python bench/X.py` puts bench/ first on sys.path, where bench/engines.py would shadow the
# engines package: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from bench.harness import run_child  # noqa: E402
from transforms.dedup import STAGE, ExactDedupParams, exact_dedup  # noqa: E402
from transforms.ids import content_key, row_ids  # noqa: E402
from transforms.ingest import read_source  # noqa: E402
from transforms.keyset import KeySet, group_keys, hex_words, words_hex  # noqa: E402
from transforms.schema import rejected  # noqa: E402
from transforms.stage import StageResult, reject_table  # noqa: E402

SHARD = 65_536


def _rss_mib() -> tuple[float, float]:
    """This process's (VmRSS, VmHWM) in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def _add_shard(keyset: KeySet, keys: pa.Array, ids: pa.Array) -> None:
    """The stage's path through its KeySet, without the table."""
    distinct, first, _ = group_keys(hex_words(keys)[0])
    found, _ = keyset.find(distinct)
    new = ~found
    keyset.add(distinct[new], hex_words(ids)[0][first[new]])


def memory(kind: str, rows: int, trace: bool) -> dict:
    """Feed ``rows`` random keys; bytes per key from ``tracemalloc`` when ``trace`` (whose
    own bookkeeping inflates the RSS), else from the RSS."""
    rng = np.random.default_rng(0)
    seen: dict[str, str] = {}
    keyset = KeySet()
    rss0, _ = _rss_mib()
    if trace:
        tracemalloc.start()
    for start in range(0, rows, SHARD):
        n = min(SHARD, rows - start)
        keys = words_hex(rng.integers(0, 2**64 - 1, size=(n, 2), dtype=np.uint64))
        ids = words_hex(rng.integers(0, 2**64 - 1, size=(n, 2), dtype=np.uint64))
        if kind == "dict":  # the previous stage's state: key -> kept id, as Python strings
            for key, row_id in zip(keys.to_pylist(), ids.to_pylist(), strict=True):
                seen.setdefault(key, row_id)
        else:
            _add_shard(keyset, keys, ids)
        del keys, ids
    distinct = len(seen) if kind == "dict" else len(keyset)
    result: dict = {"case": f"memory:{kind}", "distinct_keys": distinct}
    if trace:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result["traced_bytes_per_key"] = round(current / distinct, 1)
        result["traced_peak_bytes_per_key"] = round(peak / distinct, 1)
    else:
        rss, hwm = _rss_mib()
        result["rss_bytes_per_key"] = round((rss - rss0) * 2**20 / distinct, 1)
        result["peak_rss_bytes_per_key"] = round((hwm - rss0) * 2**20 / distinct, 1)
    if kind == "keyset":
        result["array_bytes_per_key"] = round(keyset.nbytes / distinct, 1)  # in memory
        result["spilled_bytes_per_key"] = round(keyset.spilled_bytes / distinct, 1)
    return result


def previous_stage(table: pa.Table, seen: dict[str, str]) -> StageResult:
    """The stage as it was before the KeySet (a dict of hex strings): the baseline."""
    keys = content_key(table.column("prompt"), table.column("response")).to_pylist()
    ids = table.column("id").to_pylist()
    keep: list[bool] = []
    reasons: list[str] = []
    for key, row_id in zip(keys, ids, strict=True):
        first = seen.get(key)
        if first is None:
            seen[key] = row_id
            keep.append(True)
        else:
            keep.append(False)
            reasons.append(f"duplicate_of:{first}")
    mask = pa.array(keep, pa.bool_())
    dropped = table.filter(pc.invert(mask))
    return StageResult(
        kept=table.filter(mask),
        rejected=reject_table(rejected(dropped, STAGE, reasons)),
        stats={"distinct_keys": len(seen)},
    )


def timing(rows: int) -> dict:
    path = REPO.parent / "shared" / "data" / "instructions" / "gsm8k_train_alpaca.json"
    base = next(iter(read_source(path))).kept
    rng = np.random.default_rng(1)
    content = np.arange(rows)  # row p holds content number content[p]
    copies = rng.random(rows) < 0.10
    content[copies] = (rng.random(int(copies.sum())) * np.flatnonzero(copies)).astype(np.int64)
    old_state: dict[str, str] = {}
    new_state: dict = {}
    seconds = {"previous": 0.0, "keyset": 0.0, "content_key": 0.0}
    dropped = 0
    for start in range(0, rows, SHARD):
        numbers = content[start : start + SHARD]
        shard = base.take(pa.array(numbers % base.num_rows))
        response = pc.binary_join_element_wise(
            shard.column("response"), pa.array(numbers.astype(str)), " #"
        )
        shard = shard.set_column(shard.schema.get_field_index("response"), "response", response)
        ids = row_ids(shard.column("source"), shard.column("prompt"), shard.column("response"))
        shard = shard.set_column(shard.schema.get_field_index("id"), "id", ids)
        t0 = time.perf_counter()
        content_key(shard.column("prompt"), shard.column("response"))
        t1 = time.perf_counter()
        old = previous_stage(shard, old_state)
        t2 = time.perf_counter()
        new = exact_dedup(shard, ExactDedupParams(), new_state)
        t3 = time.perf_counter()
        seconds["content_key"] += t1 - t0
        seconds["previous"] += t2 - t1
        seconds["keyset"] += t3 - t2
        assert new.kept.equals(old.kept) and new.rejected.equals(old.rejected)
        assert new.stats == old.stats
        dropped += new.rejected.num_rows
    per_million = {k: round(v * 1e6 / rows, 2) for k, v in seconds.items()}
    return {
        "case": "time",
        "rows": rows,
        "rejected": dropped,
        "seconds_per_million_rows": per_million,
        "ratio_previous_to_keyset": round(seconds["previous"] / seconds["keyset"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_048_576)
    parser.add_argument("--child", nargs="*")
    args = parser.parse_args()
    if args.child is not None:
        case = args.child[0]
        if case == "time":
            result = timing(args.rows)
        else:
            result = memory(case, args.rows, trace=args.child[1:] == ["trace"])
        print(json.dumps(result))
        return
    rows = str(args.rows)
    results = [
        run_child(__file__, *case, "--rows", rows)
        for case in (("dict", "trace"), ("keyset", "trace"), ("time",))
    ]
    for kind in ("dict", "keyset"):  # RSS per key at the margin: 4x the keys against 1x
        small, large = (run_child(__file__, kind, "--rows", str(r * args.rows)) for r in (1, 4))
        extra = 3 * args.rows / 2**20
        small["marginal_peak_rss_bytes_per_key"] = round(
            (large["peak_rss_mib"] - small["peak_rss_mib"]) / extra, 1
        )
        small["large"] = large
        results.append(small)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
