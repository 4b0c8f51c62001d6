"""The pure parts of the synthesis stages, on real text from ../shared/data: every filter
rejects a real example, the ROUGE-L index agrees with rouge-score, seed files fail clearly."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from engines.prompts import encode
from transforms.synthesis import judge as jd
from transforms.synthesis import self_guide as sg
from transforms.synthesis import self_instruct as si
from transforms.synthesis.fit import fit_prompt
from transforms.synthesis.rouge import NoveltyIndex, novel_mask

REPO = Path(__file__).resolve().parents[1]
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def corpus(shared: Path, name: str) -> list[dict]:
    return json.loads((shared / "instructions" / f"{name}.json").read_text(encoding="utf-8"))


def capitalised(text: str) -> str:
    """An instruction as the Self-Instruct code post-processes a generated one."""
    return re.sub(r"\s+", " ", text).strip().capitalize()


@pytest.fixture(scope="module")
def seeds(shared_data: Path) -> list[si.SeedTask]:
    return si.load_seed_tasks(shared_data / "seeds" / "self_instruct_seed_tasks.jsonl")


def test_seed_file_loads_the_175_seeds(seeds: list[si.SeedTask]) -> None:
    assert len(seeds) == 175
    assert sum(t.is_classification for t in seeds) > 0
    assert seeds[0].id == "seed_task_0" and seeds[0].instances


def test_the_175_seeds_ship_as_package_data_with_attribution(shared_data: Path) -> None:
    """The default seed set is package data (a pip-installed copy has no ../shared), equal to
    the authors' file, with its source and license beside it and in the wheel's package-data."""
    bundled = si.load_seed_tasks()
    assert bundled == si.load_seed_tasks(shared_data / "seeds" / "self_instruct_seed_tasks.jsonl")
    assert len(bundled) == 175
    data = resources.files("transforms.synthesis") / "data"
    notice = (data / "NOTICE").read_text(encoding="utf-8")
    assert "github.com/yizhongw/self-instruct" in notice and "Apache License" in notice
    assert "Apache License" in (data / "LICENSE").read_text(encoding="utf-8")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["transforms.synthesis"]
    for name in (si.BUNDLED_SEEDS, "NOTICE", "LICENSE"):
        assert any(fnmatch.fnmatch(f"data/{name}", p) for p in patterns), name


def test_malformed_seed_line_names_file_and_line(tmp_path: Path, shared_data: Path) -> None:
    lines = (shared_data / "seeds" / "self_instruct_seed_tasks.jsonl").read_text().splitlines()
    bad = tmp_path / "seeds.jsonl"
    bad.write_text("\n".join([*lines[:3], '{"id": "x", "instruction": ', *lines[3:5]]) + "\n")
    with pytest.raises(si.SeedError, match=rf"{re.escape(str(bad))}, line 4: invalid JSON"):
        si.load_seed_tasks(bad)
    bad.write_text(lines[0] + "\n" + json.dumps({"id": "y", "instruction": 3}) + "\n")
    with pytest.raises(si.SeedError, match=r"line 2: field 'instruction' must be"):
        si.load_seed_tasks(bad)


# --- Self-Instruct filters, each on a real rejected example ---------------------------------


def test_too_short_and_write_a_program_on_real_seeds(seeds: list[si.SeedTask]) -> None:
    by_id = {t.id: t.instruction for t in seeds}
    assert by_id["seed_task_79"] == "Complete the lyrics."
    assert si.instruction_reject_reason(by_id["seed_task_79"]) == si.TOO_SHORT
    assert si.instruction_reject_reason(by_id["seed_task_139"]) == si.WRITE_A_PROGRAM
    assert si.instruction_reject_reason(by_id["seed_task_0"]) is None


def test_too_long_punctuation_and_non_ascii_on_gsm8k(shared_data: Path) -> None:
    reasons: dict[str, str] = {}
    for row in corpus(shared_data, "gsm8k_train_alpaca"):
        reason = si.instruction_reject_reason(capitalised(row["instruction"]))
        if reason:
            reasons.setdefault(reason, row["instruction"])
    assert len(reasons[si.TOO_LONG].split()) > 150
    assert reasons[si.PUNCTUATION_START].startswith("$")
    assert not reasons[si.NON_ASCII_START][0].isascii()  # a Cyrillic "А" opening a question


def test_blacklist_on_gpteacher(shared_data: Path) -> None:
    hits = [
        row["instruction"]
        for row in corpus(shared_data, "gpteacher_roleplay")
        if si.instruction_reject_reason(capitalised(row["instruction"])) == si.BLACKLISTED
    ]
    assert hits
    assert all(re.search(r"\b(" + "|".join(si.BLACKLIST) + r")\b", h, re.I) for h in hits)
    # whole words only: "mapping" or "profile" are not blacklisted
    assert si.instruction_reject_reason("Explain the mapping between two sets of numbers") is None
    assert si.instruction_reject_reason("Write a short profile of a famous author") is None


def test_rouge_filter_rejects_real_near_duplicates_like_rouge_score(shared_data: Path) -> None:
    texts = [capitalised(r["instruction"]) for r in corpus(shared_data, "gpteacher_toolformer")]
    texts = texts[:400]
    mask = novel_mask(texts)
    kept: list[str] = []
    plain = []
    for text in texts:
        novel = all(SCORER.score(text, k)["rougeL"].fmeasure < 0.7 for k in kept)
        plain.append(novel)
        if novel:
            kept.append(text)
    assert mask == plain
    assert 0 < sum(mask) < len(texts)  # real near-duplicates were rejected
    index = NoveltyIndex()
    index.extend(kept)
    rejected = next(t for t, keep in zip(texts, mask, strict=True) if not keep)
    match = index.check(rejected)
    assert match is not None and match.score >= 0.7
    assert match.score == SCORER.score(rejected, kept[match.index])["rougeL"].fmeasure


def test_rouge_threshold_is_inclusive() -> None:
    # 7 of 10 tokens in common, same length: F = 0.7 exactly in rouge-score's arithmetic
    a = "one two three four five six seven eight nine ten"
    b = "one two three four five six seven x y z"
    assert SCORER.score(a, b)["rougeL"].fmeasure == pytest.approx(0.7)
    index = NoveltyIndex(0.7)
    index.add(a)
    score = SCORER.score(a, b)["rougeL"].fmeasure
    assert (index.check(b) is not None) == (score >= 0.7)


# --- Self-Instruct prompts and parsers ------------------------------------------------------


def test_instruction_prompt_and_split(seeds: list[si.SeedTask]) -> None:
    prompt = si.instruction_prompt([t.instruction for t in seeds[:8]])
    assert prompt.startswith("Come up with a series of tasks:\n1. ")
    assert prompt.endswith("\n8. " + si.clean_instruction(seeds[7].instruction) + "\n9.")
    text = " Tell me a joke about cats.\n10. Sort the numbers  in order.\n11. Hi"
    assert si.split_instructions(text) == [
        "Tell me a joke about cats.",
        "Sort the numbers in order.",
        "Hi",
    ]


def test_instances_parse_from_the_seed_demonstrations(seeds: list[si.SeedTask]) -> None:
    gen = next(t for t in seeds if not t.is_classification and t.instances[0][0])
    clf = next(t for t in seeds if t.is_classification and t.instances[0][0])
    gen_prompt = si.instance_prompt(gen.instruction, False, [gen])
    clf_prompt = si.instance_prompt(clf.instruction, True, [clf])
    assert gen_prompt.startswith(si.INPUT_FIRST_HEADER) and "Example 1\n" in gen_prompt
    assert clf_prompt.startswith(si.OUTPUT_FIRST_HEADER) and "Class label: " in clf_prompt
    # the demonstration block, as a model would continue it, parses back to the instance
    gen_text = gen_prompt.split(f"Task: {si.clean_instruction(gen.instruction)}\n")[1]
    inp, out = gen.instances[0]
    assert si.parse_instances(gen_text.split("\n\nTask:")[0], False, False) == [
        (inp.strip(), out.strip())
    ]
    clf_text = clf_prompt.split(f"Task: {si.clean_instruction(clf.instruction)}\n")[1]
    inp, out = clf.instances[0]
    assert si.parse_instances(clf_text.split("\n\nTask:")[0], True, False) == [
        (inp.strip(), out.strip())
    ]
    assert si.parse_instances("no markers at all", False, False) == []
    assert si.parse_is_classification(" Yes") and not si.parse_is_classification(" No")


def test_instance_filters() -> None:
    found = si.filter_instances(
        [("2, 3", "5"), ("2, 3", "5"), ("x", "x"), ("List:", "a"), ("", "")], cap=5
    )
    assert found.kept == [("2, 3", "5")]
    assert [d[2] for d in found.dropped] == [
        si.INVALID_INSTANCE,
        si.INVALID_INSTANCE,
        si.INVALID_INSTANCE,
        si.DUPLICATE_INSTANCE,
    ]
    conflicting = si.filter_instances([("2, 3", "5"), ("2, 3", "6")], cap=5)
    assert not conflicting.kept
    assert {d[2] for d in conflicting.dropped} == {si.CONFLICTING_INSTANCES}
    capped = si.filter_instances([(str(i), f"out {i}") for i in range(7)], cap=5)
    assert len(capped.kept) == 5 and {d[2] for d in capped.dropped} == {si.OVER_INSTANCE_CAP}


# --- fitting a prompt into the context (the fact world's tokenizer, 512 tokens) -------------


def test_fit_prompt_drops_instructions_until_the_prompt_fits(
    fact_world, seeds: list[si.SeedTask]
) -> None:
    """Eight long seed instructions overflow 512 tokens (the issue's "prompt of 597 tokens
    does not fit"); the fitted prompt shows as many of them as leave 16 tokens to generate."""
    model = str(fact_world.model_dir)

    def count(text: str) -> int:
        return len(encode(model, text))

    by_length = sorted((t.instruction for t in seeds), key=count)
    long, short = by_length[-8:], by_length[:8]
    render = si.instruction_prompt
    assert count(render(long)) > 512
    fitted = fit_prompt(
        long, render, count, context=512, max_tokens=160, min_new_tokens=16, min_items=1
    )
    assert fitted.fits and 1 <= fitted.shown < 8 and fitted.dropped == 8 - fitted.shown
    assert fitted.text == render(long[: fitted.shown])  # the first ones, renumbered
    assert fitted.tokens == count(fitted.text) <= 512 - 16
    assert count(render(long[: fitted.shown + 1])) > 512 - 16  # one more would not fit
    assert fitted.max_tokens == min(160, 512 - fitted.tokens)
    # A prompt that fits is left alone; its budget is cut only where the context ends.
    same = fit_prompt(short, render, count, context=512, max_tokens=160, min_new_tokens=16)
    assert same.fits and same.dropped == 0 and same.text == render(short)
    assert same.max_tokens == min(160, 512 - count(render(short)))
    # Demonstrations may all go (zero-shot); below min_items nothing fits.
    demos = si.instance_demos(seeds, False, 8)
    instance = si.instance_prompt(long[0], False, [])
    zero = fit_prompt(
        demos,
        lambda shown: si.instance_prompt(long[0], False, shown),
        count,
        context=count(instance) + 3,
        max_tokens=350,
        min_new_tokens=3,
    )
    assert zero.fits and zero.shown == 0 and zero.text == instance and zero.max_tokens == 3
    none = fit_prompt(
        long, render, count, context=20, max_tokens=160, min_new_tokens=16, min_items=1
    )
    assert not none.fits and none.shown == 1 and none.tokens == count(render(long[:1]))
    # Without a context nothing is counted and everything is shown.
    free = fit_prompt(
        long, render, lambda text: 1 // 0, context=None, max_tokens=9, min_new_tokens=1
    )
    assert free.fits and free.shown == 8 and free.tokens is None and free.max_tokens == 9


# --- SELF-GUIDE filters -------------------------------------------------------------------


def test_self_guide_noise_on_real_safety_outputs(shared_data: Path) -> None:
    rows = json.loads((shared_data / "safety" / "safety_only_data_Instructions.json").read_text())
    noisy = [r["output"] for r in rows if sg.is_noise(r["output"])]
    assert "Of course! What would you like to cook?" in noisy
    assert sg.input_reject_reason(noisy[0], 0, set()) == sg.NOISY
    assert sg.consistent_output([noisy[0]] * 5, (0, 1000)) is None


def test_self_guide_input_filters() -> None:
    assert sg.clean_generation('[input]="Who wrote Emma?"') == "Who wrote Emma?"
    assert sg.input_reject_reason(sg.clean_generation("  "), 0, set()) == sg.EMPTY
    leaked = sg.clean_generation('[input]="Who wrote Emma?"\n[output]="Jane Austen"')
    assert sg.input_reject_reason(leaked, 0, set()) == sg.TEMPLATE_LEAK
    assert sg.input_reject_reason("### [instruction]\nAnswer it", 0, set()) == sg.TEMPLATE_LEAK
    assert sg.input_reject_reason("Who wrote Emma?", 120, set()) == sg.TOO_SHORT
    assert sg.input_reject_reason("Who wrote Emma?", 0, {"Who wrote Emma?"}) == sg.DUPLICATE
    assert sg.input_reject_reason("Who wrote Emma?", 0, set()) is None


def test_self_guide_length_and_consistency() -> None:
    bounds = sg.length_bounds(["1841", "harpsichord", "cerulean"])
    assert bounds[0] <= 4 and bounds[1] >= 11
    samples = ["1841", "1841", "cerulean", "x" * 200, "Absolutely! 1841"]
    assert sg.consistent_output(samples, bounds) == "1841"
    assert sg.consistent_output(["a1", "b2", "c3", "d4", "e5", "f6"], (0, 10), 0.2) is None


# --- judgments ------------------------------------------------------------------------------


def test_verdict_parsing_never_guesses() -> None:
    good = jd.parse_verdict("The answer names the right year.\nVerdict: good")
    assert good == jd.Judgment("The answer names the right year.", True)
    assert jd.parse_verdict("Wrong colour.\n**Verdict: Bad**").ok is False
    for text in ("", "looks fine to me", "Verdict: maybe", "Verdict: good\nbut not sure"):
        assert jd.parse_verdict(text).ok is None


def test_reference_judge_names_the_expected_answer() -> None:
    refs = ["1841", "in 1841"]
    ok = jd.reference_judgment("In 1841.", "open_qa", refs)
    assert ok.ok and "'1841'" in ok.text
    bad = jd.reference_judgment("1850", "open_qa", refs)
    assert bad.ok is False and "expected answer is '1841'" in bad.text and "'in 1841'" in bad.text
    choices = ["red", "green", "blue", "grey"]
    assert jd.reference_judgment("C", "mcq", ["C"], choices).ok
    wrong = jd.reference_judgment("The answer is A.", "mcq", ["C"], choices)
    assert wrong.ok is False and "the answer is C (blue)" in wrong.text
    prompt = jd.judge_prompt("Question?", "1850", refs)
    assert "### Reference answers:\n- 1841" in prompt and prompt.endswith("### Judgment:\n")
