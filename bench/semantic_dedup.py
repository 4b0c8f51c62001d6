"""Benchmark: the ``semantic_dedup`` stage against a bare ``SentenceTransformer.encode`` of the
same texts, and its vector index against exact (brute-force) cosine neighbours.

The corpus (``--rows``, default 400): real rows of the shared corpora (GPTeacher roleplay and
toolformer, GSM8K, the safety refusals, NQ; drawn at random with seed 0), a fifth of them
replaced by edited copies of other drawn rows (typos, extra whitespace, two sentences swapped,
half the response cut), shuffled: pairs on both sides of the 0.95 threshold.

Cases, each in its own child process (:func:`bench.harness.run_child`: peak RSS, CPU seconds),
three rounds with the order of the first two alternated, the model loaded before the clock
starts in both:

- ``encode`` (the anchor): ``SentenceTransformer.encode`` of the stage's texts (built before
  the clock starts), batch 64, the model's max length (256 tokens), unit-normalised;
- ``stage``: :func:`transforms.response.semantic_dedup.semantic_dedup` on the table, with the
  real :class:`engines.embeddings.Embedder` (same model, batch 64): text building, encoding,
  the faiss IVF index, the keep-first pass and the output tables. It saves its vectors and its
  decisions for the next case;
- ``exact``: on those vectors, exact neighbours from a blocked matrix product
  (:func:`~transforms.response.semantic_dedup.exact_pairs`) and the same keep-first rule:
  the reference. It reports, against the stage:

  - ``recall`` (pair recall): of the exact within-threshold pairs (i < j, cosine ≥ 0.95),
    the share the index finds (:func:`~transforms.response.semantic_dedup.index_pairs` on
    the same vectors); the index reports exact cosines, so its precision is 1;
  - ``decision_recall``: of the exact run's (duplicate row → kept row) pairs, the share the
    stage made too; ``decision_agreement``: the share of rows on which both decide the same
    (kept, or dropped naming the same kept row).

- ``scale``: the index against the blocked matrix product on synthetic vectors of ``--scale``
  rows (default 100,000; :func:`synthetic`): mixtures of the stage's real vectors and noisy
  copies of those (cosine about 0.90–0.99 to their source); seconds of each (the index's
  build and queries together), pair recall and decision agreement.

``semantic_dedup_vs_encode`` is the median over rounds of the stage's rows/s over the
anchor's; ``semantic_dedup_vs_encode_cpu`` the same with the CPU seconds of the timed part
(``time.process_time``), the number to look at when the machine is shared: wall-clock rows/s
moves with the load. ``cpu_s`` is each child's whole CPU time (model loading included).
About 5 minutes on a quiet 2-core machine at the defaults (the 100,000-row exact search is
about a minute of it).

Usage: ``python bench/semantic_dedup.py [--rows 400] [--rounds 3] [--scale 100000] [--json]``.
``--json`` prints one JSON object on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python bench/X.py` puts bench/ first on sys.path, where bench/engines.py would shadow the
# `engines` package: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import edits  # noqa: E402 (needs the path fixed above)

SHARED = REPO.parent / "shared" / "data"
CORPORA = [
    "instructions/gpteacher_roleplay.json",
    "instructions/gpteacher_toolformer.json",
    "instructions/gsm8k_train_alpaca.json",
    "safety/safety_only_data_Instructions.json",
    "nq/dev.csv",
]
BATCH = 64
THRESHOLD = 0.95


# the edits of this corpus: at most 3 typos, sentences split and joined at ". "
EDITS = (
    partial(edits.typos, most=3),
    edits.whitespace,
    partial(edits.swap, split=lambda t: t.split(". "), sep=". ", most_typos=3),
    edits.cut,
)


def corpus(rows: int, seed: int = 0):
    """``rows`` rows: real rows drawn at random, a fifth of them edited copies of others."""
    import pyarrow as pa

    from transforms.ingest import read_source

    base = pa.concat_tables(
        [r.kept for f in CORPORA for r in read_source(SHARED / f)], promote_options="permissive"
    )
    rng = random.Random(seed)
    drawn = base.take(rng.sample(range(base.num_rows), rows)).to_pylist()
    for k in range(rows // 5):
        row = dict(drawn[rng.randrange(rows // 5, rows)])
        row["response"] = rng.choice(EDITS)(row["response"] or "", rng)
        row["id"] = f"copy-{k}"
        drawn[k] = row
    rng.shuffle(drawn)
    return pa.Table.from_pylist(drawn, schema=base.schema)


def synthetic(real, rows: int, seed: int = 0):
    """``rows`` unit vectors around real embeddings: two thirds normalised mixtures
    ``a + w·b + noise`` of two real vectors (w uniform in 0–1, noise 0.02 per dimension),
    spread over the region the data occupies so the graph search is as hard as on real rows;
    the last third noisy copies of those mixtures (noise 0.005–0.03 per dimension: cosine
    about 0.99–0.90 to their source), so pairs fall on both sides of the threshold. Few
    copies share a source whatever the number of real vectors."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n, dim = real.shape
    mixed = rows - rows // 3
    out = np.empty((rows, dim), dtype=np.float32)
    weight = rng.uniform(0, 1, (mixed, 1)).astype(np.float32)
    noise = 0.02 * rng.standard_normal((mixed, dim), np.float32)
    out[:mixed] = real[rng.integers(0, n, mixed)] + weight * real[rng.integers(0, n, mixed)]
    out[:mixed] += noise
    out[:mixed] /= np.linalg.norm(out[:mixed], axis=1, keepdims=True)
    scale = rng.uniform(0.005, 0.03, (rows - mixed, 1)).astype(np.float32)
    noise = scale * rng.standard_normal((rows - mixed, dim), np.float32)
    out[mixed:] = out[rng.integers(0, mixed, rows - mixed)] + noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out[rng.permutation(rows)]


def _texts(rows: int) -> tuple:
    from transforms.response.semantic_dedup import SemanticDedupParams, embedding_texts

    table = corpus(rows)
    return table, embedding_texts(table, SemanticDedupParams().max_chars)


def child_encode(rows: int) -> dict:
    """The anchor: a bare ``SentenceTransformer.encode`` of the stage's texts."""
    from sentence_transformers import SentenceTransformer

    from engines.embeddings import default_model_path

    _, texts = _texts(rows)
    model = SentenceTransformer(str(default_model_path()), device="cpu")
    kwargs = {"batch_size": BATCH, "normalize_embeddings": True, "show_progress_bar": False}
    model.encode(texts[:8], **kwargs)  # warm-up, as in the stage case
    start, cpu = time.perf_counter(), time.process_time()
    vectors = model.encode(texts, convert_to_numpy=True, **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "seconds": seconds,
        "timed_cpu_s": cpu,
        "rows": len(vectors),
        "max_seq_length": model.max_seq_length,
    }


class Recording:
    """The real :class:`engines.embeddings.Embedder`, keeping its last output for the
    ``exact`` case (a :class:`engines.base.TextEmbedder`)."""

    def __init__(self, embedder) -> None:
        self.embedder = embedder
        self.vectors = None

    @property
    def fingerprint(self) -> str:
        return self.embedder.fingerprint

    def embed(self, texts):
        self.vectors = self.embedder.embed(texts)
        return self.vectors


def child_stage(rows: int, out: Path) -> dict:
    """The whole stage on the table; saves its vectors and decisions."""
    import numpy as np

    from engines.embeddings import Embedder
    from transforms.response.semantic_dedup import SemanticDedupParams, semantic_dedup

    table, texts = _texts(rows)
    embedder = Embedder(batch_size=BATCH)
    embedder.embed(texts[:8])  # loads the model; warm-up, as in the anchor
    embedder.seconds = 0.0
    recording = Recording(embedder)
    start, cpu = time.perf_counter(), time.process_time()
    result = semantic_dedup(table, SemanticDedupParams(batch_size=BATCH), embedder=recording)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    position = {row_id: i for i, row_id in enumerate(table.column("id").to_pylist())}
    owner = np.full(table.num_rows, -1, dtype=np.int64)
    for row_id, reason in zip(
        result.rejected.column("id").to_pylist(),
        result.rejected.column("reject_reason").to_pylist(),
        strict=True,
    ):
        owner[position[row_id]] = position[reason.split(":", 1)[1]]
    np.save(out / "vectors.npy", recording.vectors)
    np.save(out / "owner.npy", owner)
    return {
        "seconds": seconds,
        "timed_cpu_s": cpu,
        "rows": table.num_rows,
        "encode_s": embedder.seconds,
        "rest_s": seconds - embedder.seconds,
        "duplicates": int((owner >= 0).sum()),
    }


def compare(vectors, owner, threshold: float = THRESHOLD) -> dict:
    """Exact neighbours and keep-first against the index's pairs and ``owner``."""
    import numpy as np

    from transforms.response.semantic_dedup import exact_pairs, index_pairs, keep_first

    n = len(vectors)
    start = time.perf_counter()
    exact = exact_pairs(vectors, threshold)
    exact_owner = keep_first(n, *exact)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    found = index_pairs(vectors, threshold)
    index_s = time.perf_counter() - start
    owner = keep_first(n, *found) if owner is None else owner
    pairs = set(zip(*(a.tolist() for a in exact), strict=True))
    hits = pairs & set(zip(*(a.tolist() for a in found), strict=True))
    dropped = np.flatnonzero(exact_owner >= 0)
    return {
        "rows": n,
        "exact_s": round(exact_s, 3),
        "index_s": round(index_s, 3),
        "exact_pairs": len(pairs),
        "recall": round(len(hits) / len(pairs), 5) if pairs else 1.0,
        "exact_duplicates": len(dropped),
        "duplicates": int((owner >= 0).sum()),
        "decision_recall": (
            round(float((owner[dropped] == exact_owner[dropped]).mean()), 5)
            if len(dropped)
            else 1.0
        ),
        "decision_agreement": round(float((owner == exact_owner).mean()), 6),
    }


def child_exact(out: Path) -> dict:
    """The brute-force baseline on the stage's vectors, compared with the stage."""
    import numpy as np

    result = compare(np.load(out / "vectors.npy"), np.load(out / "owner.npy"))
    return result | {"seconds": result["exact_s"]}


def child_scale(rows: int, out: Path) -> dict:
    """The index against exact neighbours on ``rows`` synthetic vectors."""
    import numpy as np

    return compare(synthetic(np.load(out / "vectors.npy"), rows), None)


def _load() -> float:
    return os.getloadavg()[0]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    from bench.harness import run_child

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", default="100000", help="synthetic sizes, comma-separated")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    script = str(Path(__file__).resolve())
    runs: dict[str, list[dict]] = {"encode": [], "stage": [], "exact": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["encode", "stage"] if r % 2 == 0 else ["stage", "encode"]
            for case in [*order, "exact"]:
                load = _load()
                extra = [tmp] if case == "exact" else [str(args.rows), tmp]
                result = run_child(script, case, *extra) | {"load_before": load}
                runs[case].append(result)
                _log(f"round {r + 1} {case}: {json.dumps(result)}")
        scale = []
        for rows in [int(s) for s in args.scale.split(",") if s]:
            load = _load()
            scale.append(run_child(script, "scale", str(rows), tmp) | {"load_before": load})
            _log(f"scale {rows}: {json.dumps(scale[-1])}")

    def median(case: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[case])

    ratios = [
        (s["rows"] / s["seconds"]) / (e["rows"] / e["seconds"])
        for s, e in zip(runs["stage"], runs["encode"], strict=True)
    ]
    cpu_ratios = [
        e["timed_cpu_s"] / s["timed_cpu_s"]
        for s, e in zip(runs["stage"], runs["encode"], strict=True)
    ]
    last = runs["exact"][-1]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "rows": args.rows,
        "rounds": args.rounds,
        "semantic_dedup_vs_encode": round(statistics.median(ratios), 3),
        "ratios": [round(x, 3) for x in ratios],
        "semantic_dedup_vs_encode_cpu": round(statistics.median(cpu_ratios), 3),
        "encode_rows_per_s": round(args.rows / median("encode", "seconds"), 2),
        "stage_rows_per_s": round(args.rows / median("stage", "seconds"), 2),
        "encode_cpu_s": median("encode", "cpu_s"),
        "stage_cpu_s": median("stage", "cpu_s"),
        "stage_encode_s": round(median("stage", "encode_s"), 3),
        "stage_rest_s": round(median("stage", "rest_s"), 3),
        "exact_s": round(median("exact", "exact_s"), 3),
        "index_s": round(median("exact", "index_s"), 3),
        "recall": last["recall"],
        "exact_pairs": last["exact_pairs"],
        "decision_recall": last["decision_recall"],
        "decision_agreement": last["decision_agreement"],
        "duplicates": last["duplicates"],
        "exact_duplicates": last["exact_duplicates"],
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs["stage"]),
        "encode_peak_rss_mib": max(run["peak_rss_mib"] for run in runs["encode"]),
        "load_before": [round(run["load_before"], 2) for case in runs.values() for run in case],
        "scale": scale,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(json.dumps(report, indent=1))
    print("\n| case | rows/s (median) | peak RSS MiB |\n|---|---|---|")
    for case in ("encode", "stage"):
        rate = report[f"{case}_rows_per_s"]
        print(f"| {case} | {rate} | {max(r['peak_rss_mib'] for r in runs[case])} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        case, rest = sys.argv[2], sys.argv[3:]
        if case == "encode":
            outcome = child_encode(int(rest[0]))
        elif case == "stage":
            outcome = child_stage(int(rest[0]), Path(rest[1]))
        elif case == "exact":
            outcome = child_exact(Path(rest[0]))
        else:
            outcome = child_scale(int(rest[0]), Path(rest[1]))
        print(json.dumps(outcome))
    else:
        main()
