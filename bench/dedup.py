"""Benchmark: near-dedup of 200k rows (``near_dedup``) against rensa (the anchor) and
datasketch's MinHashLSH, and distribution matching on the same rows.

The corpus: every row of the shared Alpaca corpora and NQ (about 24k distinct rows), then
edited copies of random rows until there are ``--rows`` (200,000): light edits (typos,
extra whitespace, two sentences swapped) and heavy ones (half the response cut, or two
rows joined), so that pairs fall on both sides of the threshold.

Cases, each in its own child process (``bench.harness.run_child``; peak RSS from the
child's own ``VmHWM``, see :func:`_own_peak_rss_mib`), shards of 20k rows, three rounds in
alternating order (``--rounds``), medians reported:

- ``ours``: the ``near_dedup`` stage (compiled shingles, datasketch-equal signatures, the LSH
  index with verification), shard after shard with its carried state. Its Numba kernels
  are cached in a fresh ``NUMBA_CACHE_DIR``: the first run (``ours_cold``, not a round)
  compiles them, and its time is reported as the cold start;
- ``rensa`` (the anchor): rensa 0.5.0 with its own string shingles: the same word 5-grams
  (the words of :func:`row_texts`, joined by spaces, as Python strings; a row of fewer
  words is one shingle of all of them), ``RMinHash(128, seed=1)``, ``RMinHashLSH`` with the
  same 16 bands and threshold 0.8, row after row: query, verify the candidates with
  rensa's own ``jaccard`` (the earliest kept one at or above the threshold is named),
  insert the row only when none is;
- ``datasketch``: the same shingles (the same function, 32-bit values), ``MinHash.bulk``
  with 128 permutations, ``MinHashLSH`` with the same bands (16 × 8) and threshold 0.8,
  and the same verification (``MinHash.jaccard`` against the stored MinHash of each
  candidate; the earliest kept candidate at or above the threshold is named), row after
  row;
- ``match``: ``match_distribution`` with DSIR and with the discriminative variant, target
  the GPTeacher roleplay file, keeping 10%, against a floor: ``HashingVectorizer`` over
  the same texts (the features both methods need).

A second corpus, the shared corpora as published (24,385 rows, file order, no edits): its
only near-duplicates are the data's own (almost all among the GPTeacher toolformer calls).
Both dedup cases run on both corpora, plus ``datasketch_seed2``: datasketch again with other
random permutations (seed 2), to show how far the reference agrees with itself.

Pair agreement: the (duplicate → kept row) pairs of both methods, ``|A ∩ B| / |A ∪ B|``;
dropped-row agreement: the same over the sets of dropped rows; row agreement: the share of
rows on which both methods decide the same (keep or drop), also by kind of row. Against the
exact Jaccard of the shingle sets (a sparse matrix product): pair precision (the share of a
sample of 3,000 of each method's pairs whose exact Jaccard reaches the threshold), and row
precision / recall on a sample of 3,000 rows, where a row should be dropped when an earlier
row has exact Jaccard ≥ the threshold with it; and the exact Jaccard of the pairs the
methods disagree on.

Usage: ``python bench/dedup.py [--rows 200000] [--rounds 3] [--skip-real] [--skip-match]
[--json]``. Prints a JSON report and markdown rows; with ``--json``, only one JSON object
on stdout (progress on stderr), with ``near_dedup_vs_rensa`` and ``near_dedup_vs_datasketch``
(the other's wall seconds ÷ ours, median of the per-round ratios), ``peak_rss_mib`` (ours,
median) and ``decisions_identical_to_datasketch`` at its top level. The quick check of the
dedup cases alone: ``--skip-real --skip-match``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python bench/X.py` puts bench/ first on sys.path, where bench/engines.py would shadow the
# `engines` package: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]
from bench import edits, harness  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
CORPORA = [
    "instructions/gsm8k_train_alpaca.json",
    "instructions/gpteacher_roleplay.json",
    "instructions/gpteacher_toolformer.json",
    "safety/safety_only_data_Instructions.json",
    "nq/dev.csv",
]
TARGET = SHARED / "instructions" / "gpteacher_roleplay.json"
SHARD = 20_000


def make_corpus(path: Path, rows: int, seed: int = 0) -> dict:
    """Real rows plus edited copies, written as a canonical Parquet table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.ids import row_ids
    from transforms.ingest import read_source

    base = pa.concat_tables(
        [r.kept for f in CORPORA for r in read_source(SHARED / f)], promote_options="permissive"
    )
    base = base.select(["id", "source", "source_index", "task", "prompt", "response", "origin"])
    if rows <= base.num_rows:
        raise SystemExit(f"--rows must exceed the {base.num_rows} real rows")
    rng = random.Random(seed)
    light, heavy = [edits.typos, edits.whitespace, edits.swap], [edits.cut]
    prompts = base.column("prompt").to_pylist()
    responses = base.column("response").to_pylist()
    copies: dict[str, list] = {"prompt": [], "response": [], "kind": []}
    kinds = {"light": 0, "heavy": 0, "joined": 0}
    for _ in range(rows - base.num_rows):
        i = rng.randrange(base.num_rows)
        roll = rng.random()
        if roll < 0.75:
            text, kind = rng.choice(light)(responses[i], rng), "light"
        elif roll < 0.9:
            text, kind = rng.choice(heavy)(responses[i], rng), "heavy"
        else:
            text, kind = responses[i] + "\n" + responses[rng.randrange(base.num_rows)], "joined"
        kinds[kind] += 1
        copies["kind"].append(kind)
        copies["prompt"].append(prompts[i])
        copies["response"].append(text)
    n = len(copies["response"])
    extra = pa.table(
        {
            "source": pa.array(["copies"] * n),
            "source_index": pa.array(range(n), pa.int64()),
            "task": pa.array(["instruction"] * n),
            "prompt": pa.array(copies["prompt"], base.schema.field("prompt").type),
            "response": pa.array(copies["response"]),
            "origin": pa.array(["corpus"] * n),
        }
    )
    ids = row_ids(extra.column("source"), extra.column("prompt"), extra.column("response"))
    extra = extra.add_column(0, "id", ids)
    table = pa.concat_tables([base, extra.cast(base.schema)])
    table = table.append_column("kind", pa.array(["real"] * base.num_rows + copies["kind"]))
    order = list(range(table.num_rows))
    rng.shuffle(order)
    table = table.take(pa.array(order))
    pq.write_table(table, path)
    return {"rows": table.num_rows, "distinct_real_rows": base.num_rows, "copies": kinds}


def make_real_corpus(path: Path) -> dict:
    """The shared corpora as published, in file order, no edits: their own near-duplicates
    (templated GPTeacher toolformer calls, repeated refusals, ...) are the only ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.ingest import read_source

    parts = []
    for f in CORPORA:
        t = pa.concat_tables(
            [r.kept for r in read_source(SHARED / f)], promote_options="permissive"
        )
        t = t.select(["id", "source", "source_index", "task", "prompt", "response", "origin"])
        parts.append(t.append_column("kind", pa.array([Path(f).stem] * t.num_rows)))
    table = pa.concat_tables(parts, promote_options="permissive")
    pq.write_table(table, path)
    return {
        "rows": table.num_rows,
        "files": {Path(f).stem: p.num_rows for f, p in zip(CORPORA, parts, strict=True)},
    }


def _shards(path: Path):
    """The corpus in shards. The Parquet reader's scratch (about 300 MiB above the table
    for 200k rows, kept by Arrow's allocator once freed) is handed back to the system
    first, so that a case's peak RSS is its own work on top of the table, not the reader's
    leftovers (the same for every case; the reader's own peak still counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pa.default_memory_pool().release_unused()
    return [table.slice(s, SHARD) for s in range(0, table.num_rows, SHARD)]


def child_ours(corpus: Path) -> dict:
    from transforms.response.near_dedup import NearDedupParams, near_dedup

    shards = _shards(corpus)
    start, cpu_start = time.perf_counter(), time.process_time()
    state: dict = {}
    pairs = []
    named: dict[str, str] = {}  # one string per named row, as the other cases hold them
    for shard in shards:
        out = near_dedup(shard, NearDedupParams(), state)
        pairs += [
            [i, named.setdefault(owner := r.split(":", 1)[1], owner)]
            for i, r in zip(
                out.rejected.column("id").to_pylist(),
                out.rejected.column("reject_reason").to_pylist(),
                strict=True,
            )
        ]
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    index_mib = state["index"].nbytes / 2**20
    return {"seconds": seconds, "cpu_seconds": cpu, "pairs": pairs, "index_mib": index_mib}


def child_datasketch(corpus: Path, seed: int = 1) -> dict:
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from transforms.response.near_dedup import NearDedupParams, lsh_shape
    from transforms.response.shingles import row_texts, shingle_hashes

    params = NearDedupParams()
    shards = _shards(corpus)
    start, cpu_start = time.perf_counter(), time.process_time()
    lsh = MinHashLSH(threshold=params.threshold, num_perm=params.num_perm, params=lsh_shape(params))
    kept: dict[str, tuple[int, MinHash]] = {}
    pairs = []
    for shard in shards:
        hashes, offsets = shingle_hashes(row_texts(shard), params.ngram)
        values = (hashes & np.uint64(0xFFFFFFFF)).tolist()
        bounds = offsets.tolist()
        sets = [values[bounds[i] : bounds[i + 1]] for i in range(shard.num_rows)]
        minhashes = MinHash.bulk(sets, num_perm=params.num_perm, hashfunc=int, seed=seed)
        for row_id, m in zip(shard.column("id").to_pylist(), minhashes, strict=True):
            # the earliest kept candidate at or above the threshold, as near_dedup names
            similar = [k for k in lsh.query(m) if m.jaccard(kept[k][1]) >= params.threshold]
            if similar:
                pairs.append([row_id, min(similar, key=lambda k: kept[k][0])])
            else:
                lsh.insert(row_id, m)
                kept[row_id] = (len(kept), m)
    cpu = time.process_time() - cpu_start
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu, "pairs": pairs}


def child_rensa(corpus: Path) -> dict:
    """rensa with its own string shingles (the anchor): see the module docstring."""
    from rensa import RMinHash, RMinHashLSH

    from transforms.response.near_dedup import NearDedupParams, lsh_shape
    from transforms.response.shingles import row_texts

    params = NearDedupParams()
    n, bands = params.ngram, lsh_shape(params)[0]
    shards = _shards(corpus)
    start, cpu_start = time.perf_counter(), time.process_time()
    lsh = RMinHashLSH(threshold=params.threshold, num_perm=params.num_perm, num_bands=bands)
    kept: list[tuple[str, RMinHash]] = []  # key in the index: the kept number
    pairs = []
    for shard in shards:
        texts = row_texts(shard).to_pylist()
        for row_id, text in zip(shard.column("id").to_pylist(), texts, strict=True):
            words = text.split()
            shingles = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
            m = RMinHash(params.num_perm, params.seed)
            m.update(shingles or [" ".join(words)])
            similar = [k for k in lsh.query(m) if m.jaccard(kept[k][1]) >= params.threshold]
            if similar:
                pairs.append([row_id, kept[min(similar)][0]])
            else:
                lsh.insert(len(kept), m)
                kept.append((row_id, m))
    cpu = time.process_time() - cpu_start
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu, "pairs": pairs}


def child_match(corpus: Path) -> dict:
    import pyarrow.parquet as pq

    from transforms.response.match import MatchParams, featurize, match_distribution, texts_of

    table = pq.read_table(corpus)
    out: dict = {"rows": table.num_rows}
    params = MatchParams(target_path=str(TARGET), size=0.1)
    start = time.perf_counter()
    featurize(texts_of(table, "response"), params)
    out["floor_seconds"] = time.perf_counter() - start
    for method in ("dsir", "discriminative"):
        start = time.perf_counter()
        result = match_distribution(table, params.model_copy(update={"method": method}))
        out[method] = {
            "seconds": time.perf_counter() - start,
            "kl_before": result.stats["kl_before"],
            "kl_after": result.stats["kl_after"],
            "kept": result.kept.num_rows,
        }
    return out


def child_datasketch_seed2(corpus: Path) -> dict:
    """datasketch again with other permutations (seed 2): how far the reference agrees with
    itself when only the random permutations change."""
    return child_datasketch(corpus, seed=2)


CHILDREN = {
    "ours": child_ours,
    "rensa": child_rensa,
    "datasketch": child_datasketch,
    "datasketch_seed2": child_datasketch_seed2,
    "match": child_match,
}


def _own_peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``). Not ``ru_maxrss`` from ``wait4``: Linux keeps
    the parent's high-water mark across fork and exec, so a child started after the
    parent grew reported the parent's peak (1,930 MiB for every case of a first run)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(kind: str, corpus: Path) -> dict:
    """Run one measurement in a fresh process (``bench.harness.run_child``). Its peak RSS
    is the child's own ``VmHWM``; the harness's ``ru_maxrss`` is kept as
    ``ru_maxrss_mib`` (it can carry this parent's peak, see :func:`_own_peak_rss_mib`)."""
    print(f"[dedup bench] {kind} on {corpus.name} ...", file=sys.stderr, flush=True)
    result = harness.run_child(__file__, kind, str(corpus))
    result["ru_maxrss_mib"] = result.pop("peak_rss_mib")
    result["peak_rss_mib"] = result.pop("vmhwm_mib")
    print(f"[dedup bench]   {result.get('seconds', 0):.2f} s", file=sys.stderr, flush=True)
    return result


def _exact_sets(table):
    """Binary (rows × distinct shingles) CSR matrix of the shingle sets and the set sizes."""
    import numpy as np
    from scipy import sparse

    from transforms.response.near_dedup import NearDedupParams
    from transforms.response.shingles import row_texts, shingle_hashes

    hashes, offsets = shingle_hashes(row_texts(table), NearDedupParams().ngram)
    rows = np.repeat(np.arange(table.num_rows), np.diff(offsets.astype(np.int64)))
    columns = np.unique(hashes, return_inverse=True)[1]
    m = sparse.csr_matrix(
        (np.ones(len(hashes), np.float32), (rows, columns)),
        shape=(table.num_rows, columns.max() + 1),
    )
    m.data[:] = 1  # duplicate shingles in a row were summed: sets, not bags
    return m, np.asarray(m.sum(axis=1)).ravel()


def agreement(ours: list, theirs: list, corpus: Path, sample: int = 3000) -> dict:
    """Pair and row agreement (also by kind of row), and each method against the exact
    Jaccard of the shingle sets: pair precision (the share of a sample of its (duplicate,
    named row) pairs whose exact Jaccard reaches the threshold), and row precision and
    recall on a sample of rows, where a row *should* be dropped when some earlier row of
    the corpus has exact Jaccard ≥ threshold with it (an upper bound on what the greedy
    earliest-kept-row rule drops: that earlier row may itself have been dropped). Plus
    where the exact Jaccard of the pairs the methods disagree on lies."""
    import numpy as np
    import pyarrow.parquet as pq

    from transforms.response.near_dedup import NearDedupParams

    a = {tuple(p) for p in ours}
    b = {tuple(p) for p in theirs}
    dropped_a, dropped_b = {p[0] for p in a}, {p[0] for p in b}
    table = pq.read_table(corpus)
    ids = table.column("id").to_pylist()
    kinds = table.column("kind").to_pylist()
    differ = dropped_a ^ dropped_b
    by_kind = {}
    for kind in sorted(set(kinds)):
        rows = [i for i, k in zip(ids, kinds, strict=True) if k == kind]
        by_kind[kind] = round(1 - sum(r in differ for r in rows) / len(rows), 4)
    threshold = NearDedupParams().threshold
    m, sizes = _exact_sets(table)
    where = {row_id: i for i, row_id in enumerate(ids)}

    def exact(pair: tuple) -> float:
        x, y = where[pair[0]], where[pair[1]]
        inter = float(m[x].multiply(m[y]).sum())
        return inter / (sizes[x] + sizes[y] - inter)

    rng = random.Random(0)

    def precision(pairs: set) -> float:
        chosen = rng.sample(sorted(pairs), min(sample, len(pairs)))
        return round(float(np.mean([exact(p) >= threshold for p in chosen])), 4) if chosen else 1.0

    # Rows of the sample with an earlier row at exact Jaccard >= threshold (batches of 256).
    chosen_rows = np.array(sorted(rng.sample(range(len(ids)), min(sample, len(ids)))))
    should = np.zeros(len(chosen_rows), bool)
    mt = m.T.tocsc()
    for s in range(0, len(chosen_rows), 256):
        batch = chosen_rows[s : s + 256]
        inter = (m[batch] @ mt).tocoo()
        row, col = batch[inter.row], inter.col
        jac = inter.data / (sizes[row] + sizes[col] - inter.data)
        hit = (col < row) & (jac >= threshold)
        should[s + np.unique(inter.row[hit])] = True
    sample_ids = [ids[i] for i in chosen_rows]

    def rows_vs_exact(dropped: set) -> dict:
        drop = np.array([r in dropped for r in sample_ids])
        tp = int((drop & should).sum())
        return {
            "row_precision": round(tp / max(int(drop.sum()), 1), 4),
            "row_recall": round(tp / max(int(should.sum()), 1), 4),
        }

    disagreeing = sorted(a ^ b)
    sims = np.array([exact(p) for p in rng.sample(disagreeing, min(sample, len(disagreeing)))])
    return {
        "pairs_ours": len(a),
        "pairs_datasketch": len(b),
        "pair_agreement": round(len(a & b) / max(len(a | b), 1), 4),
        "dropped_ours": len(dropped_a),
        "dropped_datasketch": len(dropped_b),
        "dropped_row_agreement": round(
            len(dropped_a & dropped_b) / max(len(dropped_a | dropped_b), 1), 4
        ),
        "row_agreement": round(1 - len(differ) / len(ids), 4),
        "row_agreement_by_kind": by_kind,
        "exact": {
            "sample_rows": len(chosen_rows),
            "sample_rows_with_earlier_match": int(should.sum()),
            "ours": {"pair_precision": precision(a), **rows_vs_exact(dropped_a)},
            "datasketch": {"pair_precision": precision(b), **rows_vs_exact(dropped_b)},
        },
        "disagreeing_pairs_exact_jaccard": {
            "p5_p50_p95": np.percentile(sims, [5, 50, 95]).round(3).tolist() if len(sims) else [],
            "share_within_0.1_of_threshold": round(float(np.mean(abs(sims - threshold) <= 0.1)), 4)
            if len(sims)
            else None,
        },
    }


CASES = ("ours", "rensa", "datasketch")


def _median_case(runs: list[dict]) -> dict:
    """Medians over the rounds (wall and CPU seconds, peak RSS), and each round's wall."""
    out = {
        k: round(statistics.median(r[k] for r in runs), 3)
        for k in ("seconds", "cpu_seconds", "cpu_s", "peak_rss_mib")
    }
    out["rounds_seconds"] = [round(r["seconds"], 3) for r in runs]
    out.update({k: v for k, v in runs[0].items() if k not in out and k != "pairs"})
    return out


def dedup_case(made: dict, corpus: Path, rounds: int) -> dict:
    """The three methods on one corpus, ``rounds`` rounds in alternating order, each run in
    its own child process; then their agreement (decisions are deterministic: every
    round of a method must name the same pairs)."""
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    for r in range(rounds):
        for case in CASES if r % 2 == 0 else CASES[::-1]:
            runs[case].append(run_child(case, corpus))
    for case, results in runs.items():
        if any(x["pairs"] != results[0]["pairs"] for x in results):
            raise RuntimeError(f"{case}: the rounds decided differently")
    again = run_child("datasketch_seed2", corpus)
    ours, anchor, theirs = (runs[case][0] for case in CASES)
    a, b, c, d = ({tuple(p) for p in x["pairs"]} for x in (ours, theirs, again, anchor))
    da, db, dc, dd = ({p[0] for p in x} for x in (a, b, c, d))

    def ratio(other: str, measure: str = "seconds") -> float:
        pairs = zip(runs[other], runs["ours"], strict=True)
        return round(statistics.median(o[measure] / u[measure] for o, u in pairs), 2)

    return {
        "corpus": made,
        **{case: _median_case(results) for case, results in runs.items()},
        "near_dedup_vs_rensa": ratio("rensa"),
        "near_dedup_vs_datasketch": ratio("datasketch"),
        "near_dedup_vs_rensa_cpu": ratio("rensa", "cpu_seconds"),
        "near_dedup_vs_datasketch_cpu": ratio("datasketch", "cpu_seconds"),
        "decisions_identical_to_datasketch": a == b,
        **agreement(ours["pairs"], theirs["pairs"], corpus),
        "rensa_vs_datasketch": {
            "pairs_rensa": len(d),
            "dropped_rensa": len(dd),
            "pair_agreement": round(len(d & b) / max(len(d | b), 1), 4),
            "dropped_row_agreement": round(len(dd & db) / max(len(dd | db), 1), 4),
        },
        "datasketch_seed1_vs_seed2": {
            "pair_agreement": round(len(b & c) / max(len(b | c), 1), 4),
            "dropped_row_agreement": round(len(db & dc) / max(len(db | dc), 1), 4),
            "row_agreement": round(1 - len(db ^ dc) / made["rows"], 4),
        },
        "ours_vs_datasketch_seed2_pair_agreement": round(len(a & c) / max(len(a | c), 1), 4),
        "ours_vs_datasketch_seed2_dropped_row_agreement": round(
            len(da & dc) / max(len(da | dc), 1), 4
        ),
    }


def print_table(title: str, case: dict) -> None:
    rensa, rows = case["rensa"], case["corpus"]["rows"]
    print(f"\n{title} ({rows:,} rows; medians of {len(rensa['rounds_seconds'])} rounds)\n")
    print("| case | seconds | rows/s | vs rensa | CPU seconds (vs rensa) | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    cases = (("rensa (anchor)", "rensa"), ("datasketch MinHashLSH", "datasketch"))
    for name, key in (*cases, ("near_dedup", "ours")):
        res = case[key]
        ratio = rensa["seconds"] / res["seconds"]
        cpu = f"{res['cpu_seconds']:.2f} ({rensa['cpu_seconds'] / res['cpu_seconds']:.2f})"
        print(
            f"| {name} | {res['seconds']:.2f} | {rows / res['seconds']:,.0f} | {ratio:.2f} "
            f"| {cpu} | {res['peak_rss_mib']:,.0f} MiB |"
        )
    print(
        f"\nnear_dedup vs rensa {case['near_dedup_vs_rensa']:.2f}x, vs datasketch "
        f"{case['near_dedup_vs_datasketch']:.2f}x (median per-round ratios); decisions "
        f"identical to datasketch's: {case['decisions_identical_to_datasketch']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CORPUS"))
    parser.add_argument("--skip-match", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    if args.child:
        kind, corpus = args.child
        result = CHILDREN[kind](Path(corpus))
        result["vmhwm_mib"] = _own_peak_rss_mib()
        print(json.dumps(result))
        return
    from importlib.metadata import version

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="aligncurate-bench-") as tmp:
        # Our kernels compile into a fresh cache: the first run measures the cold start.
        os.environ["NUMBA_CACHE_DIR"] = str(Path(tmp) / "numba")
        synthetic = Path(tmp) / "synthetic.parquet"
        made = make_corpus(synthetic, args.rows)
        cold = run_child("ours", synthetic)
        # The shingle kernel the datasketch and rensa children share with nothing of ours'
        # stage: compiled now, not inside their first timed round.
        warm = "import pyarrow as pa; from transforms.response.shingles import shingle_hashes; "
        warm += "shingle_hashes(pa.array(['one two three four five six']))"
        subprocess.run([sys.executable, "-c", warm], cwd=REPO, check=True)
        report: dict = {"synthetic": dedup_case(made, synthetic, args.rounds)}
        report["synthetic"]["ours_cold_start_seconds"] = round(cold["seconds"], 3)
        if not args.skip_real:
            real = Path(tmp) / "real.parquet"
            report["real"] = dedup_case(make_real_corpus(real), real, args.rounds)
        report["match"] = None if args.skip_match else run_child("match", synthetic)
    report["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        **{p: version(p) for p in ("datasketch", "rensa", "numba", "scikit-learn", "numpy")},
    }
    synth = report["synthetic"]
    report = {
        "near_dedup_vs_rensa": synth["near_dedup_vs_rensa"],
        "near_dedup_vs_datasketch": synth["near_dedup_vs_datasketch"],
        "peak_rss_mib": synth["ours"]["peak_rss_mib"],
        "decisions_identical_to_datasketch": synth["decisions_identical_to_datasketch"],
        "rows": synth["corpus"]["rows"],
        **report,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(json.dumps(report, indent=2))
    print_table("Synthetic copies (edited to straddle the threshold)", report["synthetic"])
    if "real" in report:
        print_table("Real corpora as published (no edits)", report["real"])
    match, rows = report["match"], report["synthetic"]["corpus"]["rows"]
    if match:
        print()
        for method in ("dsir", "discriminative"):
            m = match[method]
            print(
                f"| match_distribution {method} | {m['seconds']:.2f} | "
                f"{rows / m['seconds']:,.0f} | {match['floor_seconds'] / m['seconds']:.2f} "
                f"(vs features) | | {match['peak_rss_mib']:,.0f} MiB |"
            )


if __name__ == "__main__":
    main()
