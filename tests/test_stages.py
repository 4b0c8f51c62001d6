"""The foundation stages on real rows: normalize, exact_dedup, filter."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.segments import ChainStep, content_ids, split_segments
from transforms.dedup import ID_KEYS, ExactDedupParams, exact_dedup
from transforms.filters import FilterParams, filter_rows
from transforms.ids import content_key, row_ids
from transforms.ingest import read_source
from transforms.keyset import SPILL_KEYS, KeySet, group_keys, hex_words, words_hex
from transforms.normalize import NormalizeParams, normalize
from transforms.schema import REJECTED_SCHEMA, validate
from transforms.text import prompt_chars


@pytest.fixture(scope="module")
def gsm8k(shared_data: Path) -> pa.Table:
    """The first 500 GSM8K rows as canonical rows."""
    path = shared_data / "instructions" / "gsm8k_train_alpaca.json"
    return next(iter(read_source(path))).kept.slice(0, 500)


def with_text(table: pa.Table, prompts: list[str], responses: list[str]) -> pa.Table:
    """``table``'s first rows with their user turn and response replaced."""
    n = len(prompts)
    head = table.slice(0, n)
    prompt = pa.array(
        [[{"role": "user", "content": p}] for p in prompts], head.schema.field("prompt").type
    )
    head = head.set_column(head.schema.get_field_index("prompt"), "prompt", prompt)
    head = head.set_column(
        head.schema.get_field_index("response"), "response", pa.array(responses, pa.string())
    )
    ids = row_ids(head.column("source"), head.column("prompt"), head.column("response"))
    return head.set_column(head.schema.get_field_index("id"), "id", ids)


def test_normalize_nfc_control_chars_and_whitespace(gsm8k: pa.Table) -> None:
    table = with_text(gsm8k, ["  Cafe\u0301 bill?\x07 ", "plain"], ["\x00 e\u0301 \n", "ok"])
    out = normalize(table, NormalizeParams())
    assert out.rejected.num_rows == 0
    rows = out.kept.to_pylist()
    assert rows[0]["prompt"][0]["content"] == "Café bill?"
    assert rows[0]["response"] == "é"
    assert rows[1] == table.slice(1, 1).to_pylist()[0]  # unchanged row keeps its id
    assert rows[0]["id"] != table.column("id")[0].as_py()
    assert (
        rows[0]["id"]
        == row_ids(
            out.kept.column("source"), out.kept.column("prompt"), out.kept.column("response")
        )[0].as_py()
    )
    off = normalize(table, NormalizeParams(nfc=False, strip_control=False, trim=False)).kept
    assert off.column("response").to_pylist() == table.column("response").to_pylist()


def test_normalize_text_runs_nfc_and_the_pattern_only_where_needed(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path (ASCII rows skip NFC; the control pattern runs only on non-ASCII rows
    and rows a byte scan flags) gives what running every step on every string gives."""
    from transforms import text
    from transforms.normalize import CONTROL_CHARS, normalize_text

    def everywhere(values: pa.Array) -> pa.Array:
        out = pc.utf8_normalize(values, form="NFC")
        out = pc.replace_substring_regex(out, CONTROL_CHARS, replacement="")
        return pc.utf8_trim_whitespace(out)

    roleplay = next(iter(read_source(shared_data / "instructions" / "gpteacher_roleplay.json")))
    real = roleplay.kept.column("response").combine_chunks()
    odd = pa.array(
        [" tab\tand\x07bell ", "\x00", None, "Cafe\u0301", "\u212a kelvin", "c1\x85\x9f end",
         "\x7f del", "clean", "", "ok\r\n", "e\u0301\x01", "\x1f\x1e", "\u00a0nbsp\u3000",
         "\u2028line\u2029", "\u1680ogham", "\x1cfs\x1f", "tail \u00e9 ", " ", "\u200bzw"] * 3
    )  # fmt: skip
    assert pc.sum(pc.invert(pc.string_is_ascii(real))).as_py() > 0  # real non-ASCII rows
    for values in (real, odd, odd.slice(5, 20), pa.concat_arrays([real.slice(0, 50), odd])):
        assert normalize_text(values, NormalizeParams()).equals(everywhere(values))
    monkeypatch.setattr(text, "CHUNK_BYTES", 16)
    assert normalize_text(odd, NormalizeParams()).equals(everywhere(odd))


def test_nfc_runs_on_what_python_cannot_clear() -> None:
    """Python's quick check clears strings already in NFC, but not those with characters
    its Unicode database lacks: U+05C8 is unassigned in Python 3.11's, a combining mark in
    Arrow's, so Arrow composes "a" with the acute after it. The result is Arrow's NFC."""
    from transforms.normalize import maybe_not_nfc, normalize_text

    values = pa.array(
        ["a\u05c8\u0301", "caf\u00e9", "e\u0301", "\u212a", "plain", None,
         "tab\t\u00e9\n", "\u00a0x"]
    )  # fmt: skip
    rows = pc.invert(pc.fill_null(pc.string_is_ascii(values), True))
    # a tab or a no-break space is not printable: such strings are left to Arrow, as before
    want = [True, False, True, True, False, False, True, True]
    assert maybe_not_nfc(values, rows).to_pylist() == want
    params = NormalizeParams(strip_control=False, trim=False)
    assert normalize_text(values, params).equals(pc.utf8_normalize(values, form="NFC"))
    assert normalize_text(values, params)[0].as_py() == "\u00e1\u05c8"


def test_normalize_leaves_clean_real_rows_untouched(gsm8k: pa.Table) -> None:
    out = normalize(gsm8k, NormalizeParams()).kept
    assert out.column("id").to_pylist() == gsm8k.column("id").to_pylist()
    validate(out)


def test_normalize_trims_only_strings_with_a_whitespace_edge() -> None:
    """Trimming runs on the strings whose first or last byte can start or end whitespace;
    that gives what trimming every string gives, with every step on or only trim on."""
    from transforms.normalize import edge_bytes, normalize_text

    values = pa.array(
        ["a b", " lead", "trail\t", "\u00a0x", "x\u3000", "\u2028", "é", "mid\u00a0dle",
         None, "", "\x1cx", "x\x7f", "plain"]
    )  # fmt: skip
    assert edge_bytes(values).tolist() == [
        False, True, True, True, True, True, True, False, False, False, True, True, False
    ]  # fmt: skip
    for params in (NormalizeParams(), NormalizeParams(nfc=False, strip_control=False)):
        want = pc.utf8_trim_whitespace(
            normalize_text(values, params.model_copy(update={"trim": False}))
        )
        assert normalize_text(values, params).equals(want)
        assert normalize_text(values.slice(3), params).equals(want.slice(3))
    assert edge_bytes(values.cast(pa.large_string())).tolist() == edge_bytes(values).tolist()


def test_normalize_returns_an_unchanged_batch_as_it_came(gsm8k: pa.Table) -> None:
    """Nothing to normalise: the same columns come back (no copy, no id recomputed)."""
    clean = normalize(gsm8k, NormalizeParams()).kept
    again = normalize(clean, NormalizeParams()).kept
    assert again is clean


def test_exact_dedup_within_and_across_shards(gsm8k: pa.Table) -> None:
    seen: dict[str, str] = {}
    first = exact_dedup(gsm8k.slice(0, 300), ExactDedupParams(), seen)
    assert first.kept.num_rows == 300 and first.rejected.num_rows == 0
    shard = pa.concat_tables([gsm8k.slice(250, 100), gsm8k.slice(340, 10)])  # 50 old + 10 repeats
    second = exact_dedup(shard, ExactDedupParams(), seen)
    assert second.counts(110) == {"in": 110, "kept": 50, "rejected": 60, "added": 0}
    assert second.rejected.schema.names == REJECTED_SCHEMA.names
    ids = set(gsm8k.column("id").to_pylist())
    reasons = second.rejected.column("reject_reason").to_pylist()
    assert all(r.startswith("duplicate_of:") and r.split(":", 1)[1] in ids for r in reasons)
    assert set(second.rejected.column("reject_stage").to_pylist()) == {"exact_dedup"}


def reference_dedup(shards: list[pa.Table]) -> list[tuple[list[str], list[str], list[str]]]:
    """Exact dedup as a plain dict loop: per shard, the kept ids, the rejected ids and their
    reasons."""
    seen: dict[str, str] = {}
    out = []
    for shard in shards:
        kept, dropped, reasons = [], [], []
        keys = content_key(shard.column("prompt"), shard.column("response")).to_pylist()
        for key, row_id in zip(keys, shard.column("id").to_pylist(), strict=True):
            if key in seen:
                dropped.append(row_id)
                reasons.append(f"duplicate_of:{seen[key]}")
            else:
                seen[key] = row_id
                kept.append(row_id)
        out.append((kept, dropped, reasons))
    return out


def duplicated_shards(shared_data: Path, *, mixed: bool = True) -> list[pa.Table]:
    """Real GSM8K rows in 16 shards of 60-400 rows, with duplicates of rows of the same
    shard, of the shard before and of much earlier shards (so that they sit in merged
    runs); ``mixed`` adds the same pairs under another source (another id, the same key)
    and one shard whose ids are not hex digests."""
    path = shared_data / "instructions" / "gsm8k_train_alpaca.json"
    rows = next(iter(read_source(path))).kept.slice(0, 3000)
    rng = np.random.default_rng(7)
    shards, start = [], 0
    for i in range(16):
        size = int(rng.integers(60, 400))
        fresh = np.arange(start, min(start + size, rows.num_rows))
        start += len(fresh)
        old = rng.integers(0, max(start, 1), size=len(fresh) // 4)  # any earlier row
        shard = rows.take(pa.array(np.concatenate([fresh, old])))
        shard = shard.take(pa.array(rng.permutation(shard.num_rows)))
        if mixed and i % 5 == 4:  # a second source holding some of the same pairs
            other = shard.slice(0, 40).set_column(
                shard.schema.get_field_index("source"), "source", pa.array(["copy"] * 40)
            )
            ids = row_ids(other.column("source"), other.column("prompt"), other.column("response"))
            other = other.set_column(other.schema.get_field_index("id"), "id", ids)
            shard = pa.concat_tables([shard, other])
        if mixed and i == 9:  # ids that are not hex digests are kept as they are
            names = pa.array([f"row-{i}-{j}" for j in range(shard.num_rows)])
            shard = shard.set_column(shard.schema.get_field_index("id"), "id", names)
        shards.append(shard)
    return shards


@pytest.mark.parametrize("spill_keys", [SPILL_KEYS, 300])
def test_exact_dedup_matches_a_dict_over_many_shards(shared_data: Path, spill_keys: int) -> None:
    """The kept ids, reasons and counts are the dict's over :func:`duplicated_shards`, with
    the key set in memory or (runs of 300 keys or more) spilled to temporary files."""
    shards = duplicated_shards(shared_data)
    expected = reference_dedup(shards)
    state: dict = {"keys": KeySet(spill_keys=spill_keys)}
    distinct = 0
    for shard, (kept, dropped, reasons) in zip(shards, expected, strict=True):
        out = exact_dedup(shard, ExactDedupParams(), state)
        assert out.kept.column("id").to_pylist() == kept
        assert out.rejected.column("id").to_pylist() == dropped
        assert out.rejected.column("reject_reason").to_pylist() == reasons
        distinct += len(kept)
        assert out.stats == {"distinct_keys": distinct}
    assert sum(len(reasons) for _, _, reasons in expected) > 800
    later = [reason for _, _, reasons in expected[10:] for reason in reasons]
    assert any(reason.startswith("duplicate_of:row-9-") for reason in later)
    keyset: KeySet = state["keys"]
    assert len(keyset) == distinct and 1 < len(keyset.runs) < 8  # runs were merged
    assert any(run.file is not None for run in keyset.runs) == (spill_keys < distinct)
    assert len(pickle.loads(pickle.dumps(state))["keys"]) == distinct


def test_keyset_exact_when_first_words_collide() -> None:
    """Keys that share their first 64-bit word (XXH3 would take ~2^32 rows to give one
    such pair) are still told apart, in a shard and across merged runs."""
    rng = np.random.default_rng(3)
    keyset, reference = KeySet(), {}
    for size in (300, 100, 120, 400, 50, 200, 260):
        hi = rng.integers(0, 8, size=size, dtype=np.uint64)  # many shared first words
        lo = rng.integers(0, 200, size=size, dtype=np.uint64)
        keys = np.stack([hi, lo], axis=1)
        distinct, first, group = group_keys(keys)
        assert (distinct[group] == keys).all()
        assert [tuple(k) for k in distinct.tolist()] == sorted({(a, b) for a, b in keys.tolist()})
        assert (first == [np.flatnonzero(group == g)[0] for g in range(len(distinct))]).all()
        found, values = keyset.find(distinct)
        for key, hit, value in zip(distinct.tolist(), found, values.tolist(), strict=True):
            assert hit == (tuple(key) in reference)
            assert not hit or tuple(value) == reference[tuple(key)]
        new = distinct[~found]
        values = rng.integers(0, 2**63, size=(len(new), 2), dtype=np.uint64)
        reference.update(zip(map(tuple, new.tolist()), map(tuple, values.tolist()), strict=True))
        keyset.add(new, values)
    assert len(keyset) == len(reference) and len(keyset.runs) < 4  # runs were merged


def test_hex_words_round_trip(gsm8k: pa.Table) -> None:
    ids = gsm8k.column("id")
    words, plain = hex_words(ids)
    assert plain.all() and words_hex(words).to_pylist() == ids.to_pylist()
    words, plain = hex_words(pa.array(["ABCDEF" * 5 + "00", None, "a" * 31, ids[0].as_py()]))
    assert plain.tolist() == [False, False, False, True] and not words[:3].any()


def test_ids_and_key_words_are_xxh3_128_of_the_joined_text(gsm8k: pa.Table) -> None:
    """Ids are per-row ``xxh3_128_hexdigest`` of source, prompt and response (also from a
    slice, and with a null response); the key's words are its digest's raw bytes."""
    import xxhash

    from transforms.ids import content_key_words

    table = gsm8k.slice(3, 40)
    rows = table.to_pylist()

    def text(row: dict, *head: str) -> str:
        turns = "\x1e".join(f"{t['role']}\x1f{t['content']}" for t in row["prompt"])
        return "\x1f".join([*head, turns, row["response"] or ""])

    def hexdigest(value: str) -> str:
        return xxhash.xxh3_128_hexdigest(value.encode())

    ids = row_ids(table.column("source"), table.column("prompt"), table.column("response"))
    assert ids.to_pylist() == [hexdigest(text(r, r["source"])) for r in rows]
    key = content_key(table.column("prompt"), table.column("response"))
    assert key.to_pylist() == [hexdigest(text(r)) for r in rows]
    words = content_key_words(table.column("prompt"), table.column("response"))
    assert words.tolist() == hex_words(key)[0].tolist()
    nulls = pa.nulls(len(table), pa.string())
    assert content_key(table.column("prompt"), nulls).to_pylist() == [
        hexdigest(text({**r, "response": None})) for r in rows
    ]


def test_filter_reasons_in_rule_order(gsm8k: pa.Table) -> None:
    table = with_text(
        gsm8k,
        ["q1", "", "q3", "q4 \ufffd", "q5"],
        ["", "answer", "x" * 200, "fine", "fine"],
    )
    out = filter_rows(table, FilterParams(max_chars=100))
    assert out.kept.column("prompt").to_pylist()[0][0]["content"] == "q5"
    assert out.rejected.column("reject_reason").to_pylist() == [
        "empty_response",
        "empty_prompt",
        "too_long:chars>100",
        "invalid_text",
    ]
    relaxed = filter_rows(
        table,
        FilterParams(empty_response=False, empty_prompt=False, max_chars=None, invalid_text=False),
    )
    assert relaxed.kept.num_rows == 5
    # the replacement character in the response, or in any turn of a longer conversation
    table = with_text(gsm8k, ["q1", "q2", "q3"], ["fine \uf000", "bad \ufffd", "fine"])
    turns = table.column("prompt").to_pylist()
    turns[2] = [
        *turns[2],
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "\ufffd"},
    ]
    index = table.schema.get_field_index("prompt")
    table = table.set_column(index, "prompt", pa.array(turns, table.schema.field(index).type))
    out = filter_rows(table, FilterParams())
    assert out.rejected.column("reject_reason").to_pylist() == ["invalid_text"] * 2
    assert out.kept.column("response").to_pylist() == ["fine \uf000"]  # same first byte


def test_the_length_bound_counts_characters_not_bytes(gsm8k: pa.Table) -> None:
    """Rows are measured in bytes first and only those over the bound in characters: a row
    of many multi-byte characters within the bound is kept, one just past it is not."""
    wide = "\u00e9\u4e2d\U0001f600"  # 2, 3 and 4 UTF-8 bytes: 9 bytes, 3 characters
    table = with_text(
        gsm8k,
        ["q" * 40, wide * 10, wide * 10, "\u4e2d" * 30, "q"],
        ["a" * 60, "x" * 70, "x" * 71, "\u00e9" * 70, ""],
    )
    out = filter_rows(table, FilterParams(max_chars=100, empty_response=False))
    assert out.rejected.column("reject_reason").to_pylist() == ["too_long:chars>100"]
    assert [r[0]["content"][:1] for r in out.kept.column("prompt").to_pylist()] == [
        "q",
        "\u00e9",
        "\u4e2d",
        "q",
    ]
    assert out.rejected.column("response").to_pylist() == ["x" * 71]  # 30 + 71 characters


def test_filter_keeps_real_rows_and_accounts(gsm8k: pa.Table) -> None:
    out = filter_rows(gsm8k, FilterParams(max_chars=600))
    lengths = pc.add(pc.utf8_length(gsm8k.column("response")), prompt_chars(gsm8k["prompt"]))
    assert out.rejected.num_rows == pc.sum(pc.greater(lengths, 600)).as_py() > 0
    assert out.counts(500)["kept"] + out.rejected.num_rows == 500
    passing = filter_rows(gsm8k, FilterParams())
    assert passing.kept is gsm8k and passing.rejected.num_rows == 0  # no copy of a shard


def test_exact_dedup_keyed_by_id_decides_as_the_content_keys(shared_data: Path) -> None:
    """Rows of one source whose ids hash their content: with :data:`ID_KEYS` set the ids are
    the keys, and the kept ids, the reasons and the counts are the dict's over the content
    keys. An id that is no XXH3-128 digest breaks that promise and is an error."""
    shards = duplicated_shards(shared_data, mixed=False)
    state: dict = {ID_KEYS: True, "keys": KeySet(spill_keys=300)}
    for shard, (kept, dropped, reasons) in zip(shards, reference_dedup(shards), strict=True):
        out = exact_dedup(shard, ExactDedupParams(), state)
        assert out.kept.column("id").to_pylist() == kept
        assert out.rejected.column("id").to_pylist() == dropped
        assert out.rejected.column("reject_reason").to_pylist() == reasons
    assert sum(len(r) for _, r, _ in reference_dedup(shards)) > 100  # duplicates were found
    named = shards[0].set_column(
        shards[0].schema.get_field_index("id"), "id", pa.array(["x"] * shards[0].num_rows)
    )
    with pytest.raises(ValueError, match="row 0 has no XXH3-128 id"):
        exact_dedup(named, ExactDedupParams(), {ID_KEYS: True})


def test_ids_are_keys_for_one_source_after_stages_that_keep_them_content_hashes() -> None:
    def segments(*names: str) -> list[list[ChainStep]]:
        return split_segments([ChainStep.of(name, {}) for name in names])

    assert content_ids(1, segments("normalize", "exact_dedup", "filter"), 1)
    assert content_ids(1, segments("filter", "exact_dedup"), 1)  # drops rows, changes none
    assert not content_ids(2, segments("normalize", "exact_dedup"), 1)  # a pair, two ids
    assert not content_ids(1, segments("rule_filter", "exact_dedup"), 1)  # not known to
    assert not content_ids(1, segments("normalize", "near_dedup", "exact_dedup"), 2)


def test_exact_dedup_names_a_kept_row_without_id(gsm8k: pa.Table) -> None:
    """A caller's table may lack ids: its duplicates still carry a reason, in this shard
    and in later ones."""
    rows = gsm8k.slice(0, 3)
    rows = rows.set_column(
        rows.schema.get_field_index("id"), "id", pa.array([None, "x", "y"], pa.string())
    )
    state: dict = {}
    first = exact_dedup(pa.concat_tables([rows, rows.slice(0, 1)]), ExactDedupParams(), state)
    later = exact_dedup(gsm8k.slice(0, 2), ExactDedupParams(), state)
    assert first.rejected.column("reject_reason").to_pylist() == ["duplicate_of:<no id>"]
    assert later.rejected.column("reject_reason").to_pylist() == [
        "duplicate_of:<no id>",
        "duplicate_of:x",
    ]
