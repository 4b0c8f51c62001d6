"""near_dedup and semantic_dedup on real GPTeacher rows with small edits."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engines.embeddings import Embedder
from transforms.ingest import read_source
from transforms.response.lengths import with_columns
from transforms.response.near_dedup import (
    NearDedupIndex,
    NearDedupParams,
    estimated_jaccard,
    lsh_shape,
    minhash_matrix,
    near_dedup,
    optimal_bands,
    signatures,
    similar_pairs,
)
from transforms.response.semantic_dedup import SemanticDedupParams, semantic_dedup
from transforms.response.shingles import raw_texts, row_texts, shingle_hashes
from transforms.schema import REJECTED_SCHEMA, SCHEMA

SENTENCE = re.compile(r"(?<=[.!?])\s+")


@pytest.fixture(scope="module")
def roleplay(shared_data: Path) -> pa.Table:
    path = shared_data / "instructions" / "gpteacher_roleplay.json"
    return pa.concat_tables(r.kept for r in read_source(path))


def typos(text: str, rng: random.Random, count: int = 2) -> str:
    words = text.split(" ")
    for i in rng.sample([i for i, w in enumerate(words) if len(w) > 4], count):
        w = words[i]
        j = rng.randrange(1, len(w) - 2)
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def extra_whitespace(text: str, rng: random.Random) -> str:
    return "  " + text.replace(". ", ".   ").replace(", ", " ,  ") + "\n\n"


def reorder(text: str, rng: random.Random) -> str:
    sentences = SENTENCE.split(text)
    i = rng.randrange(len(sentences) - 1)
    sentences[i], sentences[i + 1] = sentences[i + 1], sentences[i]
    return " ".join(sentences)


EDITS = {"typos": typos, "whitespace": extra_whitespace, "reorder": reorder}


def edited_copies(table: pa.Table, rng: random.Random) -> tuple[pa.Table, dict[str, str]]:
    """One edited copy per eligible row (long responses with several sentences), cycling
    through the edits; returns the copies and copy id → original id."""
    rows = table.to_pylist()
    copies, origin_of = [], {}
    eligible = [
        r
        for r in rows
        if len(r["response"].split()) >= 120 and len(SENTENCE.split(r["response"])) >= 4
    ]
    for k, row in enumerate(eligible[:90]):
        edit = list(EDITS.values())[k % len(EDITS)]
        copy = dict(row)
        copy["response"] = edit(row["response"], rng)
        copy["id"] = f"copy-{k}-{list(EDITS)[k % len(EDITS)]}"
        copy["source_index"] = 100_000 + k
        copies.append(copy)
        origin_of[copy["id"]] = row["id"]
    return pa.Table.from_pylist(copies, schema=table.schema), origin_of


def test_optimal_bands_match_datasketch() -> None:
    from datasketch.lsh import _optimal_param

    for threshold in (0.5, 0.8, 0.9):
        for fn in (0.5, 0.95):
            expected = _optimal_param(threshold, 128, 1 - fn, fn)
            assert optimal_bands(threshold, 128, fn) == expected
    assert lsh_shape(NearDedupParams()) == (16, 8)


def test_signatures_are_datasketchs_bit_for_bit(roleplay: pa.Table) -> None:
    """The signatures are datasketch's default MinHash (affine32, seed 1) of the same 32-bit
    shingle hashes: the same permutations, so the same estimates and LSH bands."""
    from datasketch import MinHash

    params = NearDedupParams()
    table = roleplay.slice(0, 400)
    hashes, offsets = shingle_hashes(row_texts(table), params.ngram)
    values, bounds = (hashes & np.uint64(0xFFFFFFFF)).tolist(), offsets.tolist()
    sets = [values[bounds[i] : bounds[i + 1]] for i in range(table.num_rows)]
    theirs = MinHash.bulk(sets, num_perm=params.num_perm, seed=params.seed, hashfunc=int)
    ours = signatures(table, params)
    assert ours.shape == (400, 128)
    assert np.array_equal(ours, np.stack([m.hashvalues for m in theirs]))
    # another seed gives other permutations, as datasketch's does
    other = signatures(table, params.model_copy(update={"seed": 2}))
    assert (other != ours).mean() > 0.9


def _reference_shingles(text: str, n: int = 5) -> list[int]:
    """The shingle hashes of one normalised text, in plain Python: a word is the sum of
    ``(byte + 1) * P^(i + 1)`` mod 2^64 folded with its length; a shingle folds ``n``
    words (a shorter text: all of them; an empty one: the empty word)."""
    mask, prime, mix = (1 << 64) - 1, 0x100000001B3, 0x9E3779B97F4A7C15

    def fold(parts: list[int]) -> int:
        h = mix
        for part in parts:
            h = ((h ^ part) * prime) & mask
        h ^= h >> 30
        h = (h * 0xBF58476D1CE4E5B9) & mask
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & mask
        return h ^ (h >> 31)

    def word(w: bytes) -> int:
        return fold([sum((b + 1) * prime ** (i + 1) for i, b in enumerate(w)) & mask, len(w)])

    words = [word(w) for w in text.encode().split()] or [word(b"")]
    return [fold(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))]


def test_shingles_match_a_plain_python_reference(roleplay: pa.Table) -> None:
    """The compiled shingles are the documented definition, and the fast path (ASCII rows
    hashed without Arrow's normalisation) gives the shingles and signatures of the
    normalised texts, non-ASCII and punctuation-only rows included."""
    odd = [
        "",
        "  ...  ",
        "Two words",
        "Ünïcode “quotes” — and CAPS, here; Ελλάδα!",
        "tabs\tand\x0bvertical\x0cfeeds\r\nend_of_line 42",
    ]
    rows = roleplay.slice(0, 5).to_pylist()
    rows = [{**r, "response": t} for r, t in zip(rows, odd, strict=True)]
    table = pa.concat_tables([roleplay.slice(0, 300), pa.Table.from_pylist(rows, roleplay.schema)])
    texts = row_texts(table)
    hashes, offsets = shingle_hashes(texts)
    raw, non_ascii = raw_texts(table)
    assert 0 < len(non_ascii) < table.num_rows and table.num_rows - 2 in non_ascii
    ascii_rows = np.setdiff1d(np.arange(table.num_rows), non_ascii)
    fast = shingle_hashes(raw.take(pa.array(ascii_rows)))[0]
    bounds = offsets.astype(np.int64)
    assert np.array_equal(
        fast, np.concatenate([hashes[bounds[i] : bounds[i + 1]] for i in ascii_rows])
    )
    # the signatures (fast path) are those of the normalised texts' shingles
    params = NearDedupParams()
    expected = minhash_matrix(hashes, offsets, params.num_perm, params.seed)
    assert np.array_equal(signatures(table, params), expected)
    bounds = offsets.tolist()
    for i, text in enumerate(texts.to_pylist()):
        assert hashes[bounds[i] : bounds[i + 1]].tolist() == _reference_shingles(text)


def test_decisions_are_datasketchs(roleplay: pa.Table) -> None:
    """Shard after shard, the stage drops exactly the rows datasketch's MinHashLSH (same
    permutations and bands, verified with ``MinHash.jaccard``, keep-first) drops, naming
    the same kept rows."""
    from datasketch import MinHash, MinHashLSH

    copies, _ = edited_copies(roleplay, random.Random(11))
    table = pa.concat_tables([roleplay.slice(0, 1200), copies, roleplay.slice(1200, 1500)])
    params = NearDedupParams()
    shards = [table.slice(s, 1000) for s in range(0, table.num_rows, 1000)]
    ours, state = [], {}
    for shard in shards:
        out = near_dedup(shard, params, state)
        reasons = out.rejected.column("reject_reason").to_pylist()
        ids = out.rejected.column("id").to_pylist()
        ours += [(i, r.split(":", 1)[1]) for i, r in zip(ids, reasons, strict=True)]
    lsh = MinHashLSH(threshold=params.threshold, num_perm=params.num_perm, params=lsh_shape(params))
    kept: dict[str, tuple[int, MinHash]] = {}
    theirs = []
    hashes, offsets = shingle_hashes(row_texts(table), params.ngram)
    values, bounds = (hashes & np.uint64(0xFFFFFFFF)).tolist(), offsets.tolist()
    sets = [values[bounds[i] : bounds[i + 1]] for i in range(table.num_rows)]
    minhashes = MinHash.bulk(sets, num_perm=params.num_perm, seed=params.seed, hashfunc=int)
    for row_id, m in zip(table.column("id").to_pylist(), minhashes, strict=True):
        similar = [k for k in lsh.query(m) if m.jaccard(kept[k][1]) >= params.threshold]
        if similar:
            theirs.append((row_id, min(similar, key=lambda k: kept[k][0])))
        else:
            lsh.insert(row_id, m)
            kept[row_id] = (len(kept), m)
    assert len(theirs) >= 80  # the copies (and a few of GPTeacher's own near-duplicates)
    assert ours == theirs


@pytest.mark.parametrize("threshold", [0.5, 0.75, 0.8, 0.875])
def test_a_pair_reaches_the_threshold_exactly_when_datasketchs_jaccard_does(
    threshold: float,
) -> None:
    """At 32 bits no chance correction: ``m`` equal minhashes of 128 is similar exactly when
    ``m / 128 >= threshold`` (datasketch's ``jaccard``), also where that is an equality."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, (129, 128), dtype=np.uint32)
    b = a.copy()
    for m in range(129):  # row m shares its first m minhashes with a
        b[m, m:] ^= np.uint32(1)
    rows = np.arange(129)
    hit = similar_pairs(a, rows, b, rows, 32, threshold)
    assert hit.tolist() == [m / 128 >= threshold for m in range(129)]


def test_edited_copies_are_caught_across_shards(roleplay: pa.Table) -> None:
    copies, origin_of = edited_copies(roleplay, random.Random(5))
    assert copies.num_rows == 90
    state: dict = {}
    first = near_dedup(roleplay, NearDedupParams(), state)
    second = near_dedup(copies, NearDedupParams(), state)
    # The distinct GPTeacher rows stay; every copy goes, naming the row it copies.
    assert first.kept.num_rows == roleplay.num_rows and first.rejected.num_rows == 0
    assert second.kept.num_rows == 0 and second.rejected.num_rows == copies.num_rows
    assert second.rejected.schema.names[: len(REJECTED_SCHEMA)] == REJECTED_SCHEMA.names
    for row in second.rejected.to_pylist():
        assert row["reject_stage"] == "near_dedup"
        assert row["reject_reason"] == f"near_duplicate_of:{origin_of[row['id']]}"
    index: NearDedupIndex = state["index"]
    assert len(index) == roleplay.num_rows
    # compact, no texts: a 32-bit x 128 signature (512 B), 16 band keys (12 B each), about a
    # byte of radix table per key, a 32-byte id
    assert index.nbytes < 760 * len(index)


def test_non_ascii_text_keeps_its_words(roleplay: pa.Table) -> None:
    """Letters of any script are words (RE2's ``\\w`` alone is ASCII): distinct Russian,
    Greek and accented rows stay, and an edited copy of one is still caught."""
    texts = [
        "Какая самая высокая гора в Европе и где она находится? Эльбрус находится на Кавказе.",
        "Какой город является столицей Франции и почему он знаменит? Париж известен музеями.",
        "Ποια είναι η πρωτεύουσα της Ελλάδας και γιατί είναι διάσημη; Η Αθήνα έχει ιστορία.",
        "Où se trouve le café préféré des étudiants près de la gare? À côté du musée déjà vu.",
    ]
    rows = [
        {**row, "id": f"row-{i}", "prompt": [{"role": "user", "content": text}], "response": "ok"}
        for i, (row, text) in enumerate(zip(roleplay.slice(0, 4).to_pylist(), texts, strict=True))
    ]
    copy = {**rows[0], "id": "copy", "prompt": [{"role": "user", "content": texts[0] + " "}]}
    table = pa.Table.from_pylist([*rows, copy], schema=roleplay.schema)
    out = near_dedup(table, NearDedupParams(), {})
    assert out.kept.column("id").to_pylist() == ["row-0", "row-1", "row-2", "row-3"]
    assert out.rejected.column("reject_reason").to_pylist() == ["near_duplicate_of:row-0"]


def test_copies_inside_one_shard_and_edits_measured(roleplay: pa.Table) -> None:
    copies, origin_of = edited_copies(roleplay.slice(0, 1500), random.Random(9))
    table = pa.concat_tables([roleplay.slice(0, 1500), copies])
    out = near_dedup(table, NearDedupParams(), {})
    assert out.rejected.column("id").to_pylist() == copies.column("id").to_pylist()
    reasons = dict(
        zip(
            out.rejected.column("id").to_pylist(),
            out.rejected.column("reject_reason").to_pylist(),
            strict=True,
        )
    )
    assert all(reasons[c] == f"near_duplicate_of:{o}" for c, o in origin_of.items())
    # The edits are small but real: estimated similarity well below 1 for typos/reorders.
    params = NearDedupParams(signature_bits=32)
    sig = signatures(table, params)
    ids = table.column("id").to_pylist()
    for copy_id, original in list(origin_of.items())[:6]:
        sim = estimated_jaccard(sig[ids.index(copy_id)], sig[ids.index(original)][None], 32)[0]
        assert 0.8 <= sim <= 1.0


def test_threshold_is_configurable(roleplay: pa.Table) -> None:
    copies, _ = edited_copies(roleplay.slice(0, 600), random.Random(3))
    table = pa.concat_tables([roleplay.slice(0, 600), copies])
    strict = near_dedup(table, NearDedupParams(threshold=0.99), {})
    default = near_dedup(table, NearDedupParams(), {})
    # One copy (typos, exact Jaccard 0.88) is estimated at 102/128 = 0.797 by these
    # permutations (datasketch's, seed 1): 2.9 standard deviations of a 128-permutation
    # estimate, and datasketch decides it the same way. The rest are caught.
    assert strict.rejected.num_rows < default.rejected.num_rows == copies.num_rows - 1


def test_semantic_dedup_catches_copies_and_keeps_distinct_rows(roleplay: pa.Table) -> None:
    base = roleplay.slice(0, 40)
    copies = base.slice(0, 8).to_pylist()
    for k, row in enumerate(copies):
        row["response"] = extra_whitespace(row["response"], random.Random(k)).replace("  ", " ")
        row["id"] = f"semantic-copy-{k}"
    table = pa.concat_tables([base, pa.Table.from_pylist(copies, schema=base.schema)])
    out = semantic_dedup(table, SemanticDedupParams(), embedder=Embedder())
    assert out.counts(table.num_rows) == {"in": 48, "kept": 40, "rejected": 8, "added": 0}
    assert out.kept.column("id").to_pylist() == base.column("id").to_pylist()
    first_ids = base.column("id").to_pylist()
    assert out.rejected.column("reject_reason").to_pylist() == [
        f"semantic_duplicate_of:{first_ids[k]}" for k in range(8)
    ]


def test_rule_filter_columns_survive_dedup(roleplay: pa.Table) -> None:
    table = with_columns(roleplay.slice(0, 50), {"prompt_tokens": np.arange(50)})
    out = near_dedup(table, NearDedupParams(), {})
    assert out.kept.column("prompt_tokens").to_pylist() == list(range(50))
    assert set(SCHEMA.names) <= set(out.kept.column_names)
