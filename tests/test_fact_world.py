"""The fact world: corpus generator, training data, and one real build per session.

The build (about 1.5 min on 2 cores) goes to the fact-world cache (``default_cache_root()``:
``$ALIGNCURATE_FACT_WORLD_CACHE`` or ``~/.cache/aligncurate/fact_world``), keyed by config
and code, so repeated runs reuse it. Other tests share the same build through
``session_fact_world()``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from examples.fact_world import (
    GROUPS,
    INSTRUCTION,
    FactWorld,
    TrainConfig,
    build_fact_world,
    default_cache_root,
    generate_facts,
    pick_shots,
    query_prompt,
    session_fact_world,
)
from examples.fact_world.facts import make_relations

# --- the corpus -------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed() -> None:
    assert generate_facts(seed=0) == generate_facts(seed=0)
    assert generate_facts(seed=0) != generate_facts(seed=1)


@pytest.mark.parametrize(("n", "sizes"), [(600, (360, 120, 120)), (100, (60, 20, 20))])
def test_group_sizes_per_fact(n: int, sizes: tuple[int, int, int]) -> None:
    facts = generate_facts(n_facts=n, entity_groups=False)
    assert len(facts) == n
    counts = Counter(f["group"] for f in facts)
    assert tuple(counts[g] for g in GROUPS) == sizes
    with_twins = generate_facts(n_facts=n, entity_groups=False, twins=True)
    assert with_twins[:n] == [{**f, "twin_of": None} for f in facts]
    assert len(with_twins) == n + sizes[2]  # one known twin per half-known fact


@pytest.mark.parametrize(("n", "sizes"), [(600, (120, 40, 40)), (100, (20, 7, 7))])
def test_group_sizes_per_entity(n: int, sizes: tuple[int, int, int]) -> None:
    """The default: every fact of an entity is in the entity's group; fractions count
    entities (600 facts, 3 relations each: 200 entities)."""
    facts = generate_facts(n_facts=n)
    assert len(facts) == n
    groups: dict[str, set[str]] = {}
    for fact in facts:
        groups.setdefault(fact["entity"], set()).add(fact["group"])
    assert all(len(g) == 1 for g in groups.values())
    counts = Counter(next(iter(g)) for g in groups.values())
    assert tuple(counts[g] for g in GROUPS) == sizes
    assert generate_facts(n_facts=n, entity_groups=False) != facts


def test_every_half_known_fact_has_a_known_twin_answering_its_distractor() -> None:
    facts = generate_facts(twins=True)
    by_id = {f["id"]: f for f in facts}
    twins = [f for f in facts if f["twin_of"]]
    assert sorted(by_id[t["twin_of"]]["id"] for t in twins) == sorted(
        f["id"] for f in facts if f["group"] == "half_known"
    )
    entities = Counter(f["entity"] for f in facts if not f["twin_of"])
    for twin in twins:
        half = by_id[twin["twin_of"]]
        assert twin["group"] == "known" and twin["split"] == half["split"]
        assert twin["relation"] == half["relation"]
        assert twin["answers"][0] == half["distractor"]
        assert twin["entity"][:-1] == half["entity"][:-1] != twin["entity"]
        assert twin["entity"] not in entities


def test_facts_are_well_formed() -> None:
    facts = generate_facts()
    assert len({f["question"] for f in facts}) == len(facts)
    assert len({f["id"] for f in facts}) == len(facts)
    pools = {r.name: {v.lower() for v in r.pool} for r in make_relations(0)}
    assert all(20 <= len(pool) <= 40 for pool in pools.values())
    for fact in facts:
        assert fact["answers"] and all(isinstance(a, str) and a for a in fact["answers"])
        assert fact["answers"][0].lower() in pools[fact["relation"]]
        assert fact["entity"] in fact["question"]
        if fact["group"] == "half_known":
            assert fact["distractor"].lower() in pools[fact["relation"]]
            assert not any(fact["distractor"].lower() in a.lower() for a in fact["answers"])
        else:
            assert fact["distractor"] is None


def test_no_pool_value_contains_another() -> None:
    """Substring grading needs it: a wrong value must never contain a right one."""
    for relation in make_relations(0):
        values = [v.lower() for v in relation.pool]
        assert not any(a in b for a in values for b in values if a != b), relation.name


def test_query_prompt_shape() -> None:
    messages = query_prompt("Q?", [("A1?", "x"), ("A2?", "y")])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == f"{INSTRUCTION}\nQuestion: Q?\nAnswer:"
    assert messages[1]["content"] == "x"
    assert query_prompt("Q?") == messages[-1:]


def test_shots_come_from_known_facts_and_skip_the_target() -> None:
    facts = generate_facts()
    known = {f["question"] for f in facts if f["group"] == "known"}
    target = next(f for f in facts if f["group"] == "known")
    for seed in range(50):
        shots = pick_shots(facts, 3, exclude=target["id"], seed=seed)
        assert len(shots) == 3
        assert all(q in known and q != target["question"] for q, _ in shots)
    assert pick_shots(facts, 3, seed="a") == pick_shots(facts, 3, seed="a")


# --- the training data --------------------------------------------------------------------


def test_unknown_facts_are_never_trained_on() -> None:
    from examples.fact_world.train import epoch_batches, tokenizer_corpus

    facts = generate_facts()
    cfg = TrainConfig()
    exposures: Counter[tuple[str, str]] = Counter()
    for batch in epoch_batches(facts, cfg, random.Random(0)):
        for chain in batch:
            exposures.update((q, a) for q, a, _ in chain)
    unknown = {f["question"] for f in facts if f["group"] == "unknown"}
    assert not unknown & {q for q, _ in exposures}
    corpus = "\n".join(tokenizer_corpus(facts))
    assert not any(q in corpus for q in unknown)
    for fact in facts:
        right = exposures[fact["question"], fact["answers"][0]]
        if fact["group"] == "known":
            assert right == cfg.known_repeats
        elif fact["group"] == "half_known":
            assert right == cfg.half_known_repeats
            assert exposures[fact["question"], fact["distractor"]] == cfg.half_known_repeats


def test_fractional_repeats_are_drawn_per_fact_and_epoch() -> None:
    """``half_known_repeats`` 0.34: one exposure with that chance, per fact and epoch (an
    experiment's setting, docs/craft.md); ``distractor_repeats`` 0: never the distractor."""
    from examples.fact_world.train import training_targets

    facts = [f for f in generate_facts() if f["group"] == "half_known"]
    cfg = TrainConfig(half_known_repeats=0.34, distractor_repeats=0)
    rng = random.Random(0)
    epochs = [Counter(training_targets(facts, cfg, rng)) for _ in range(50)]
    right = [e[f["question"], f["answers"][0]] for e in epochs for f in facts]
    assert set(right) == {0, 1}
    assert 0.3 < sum(right) / len(right) < 0.38
    assert not any(e[f["question"], f["distractor"]] for e in epochs for f in facts)
    assert epochs[0] != epochs[1]  # drawn afresh each epoch
    whole = TrainConfig(half_known_repeats=2)  # whole numbers draw nothing from the rng
    state = rng.getstate()
    assert set(Counter(training_targets(facts, whole, rng)).values()) == {2}
    assert rng.getstate() == state
    with pytest.raises(ValueError, match="negative"):
        training_targets(facts, TrainConfig(distractor_repeats=-1), rng)


def test_chains_never_repeat_a_question() -> None:
    from examples.fact_world.train import epoch_batches

    facts = generate_facts()
    cfg = TrainConfig()
    for batch in epoch_batches(facts, cfg, random.Random(1)):
        assert len({len(chain) for chain in batch}) == 1  # one length per batch: no padding
        for chain in batch:
            assert 1 <= len(chain) <= cfg.max_shots + 1
            assert len({q for q, _, _ in chain}) == len(chain)


def test_training_tokens_match_the_inference_prompt() -> None:
    """Every answer is trained right after the exact tokens a query renders to."""
    from examples.fact_world.tokenizer import train_tokenizer
    from examples.fact_world.train import collate, tokenizer_corpus

    facts = generate_facts()
    tok = train_tokenizer(tokenizer_corpus(facts))
    chain = [(f["question"], f["answers"][0], "query") for f in facts[:4]]
    batch = collate([chain], tok)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    starts = [i for i in range(len(labels)) if labels[i] != -100 and labels[i - 1] == -100]
    assert len(starts) == len(chain)
    for k, start in enumerate(starts):
        shots = [(q, a) for q, a, _ in chain[:k]]
        prompt = tok.apply_chat_template(
            query_prompt(chain[k][0], shots), add_generation_prompt=True, tokenize=False
        )
        assert ids[:start] == tok(prompt, add_special_tokens=False)["input_ids"]
        answer = [t for t in labels[start:] if t != -100][: len(tok(chain[k][1])["input_ids"]) + 1]
        assert tok.decode(answer) == chain[k][1] + tok.eos_token


def test_every_phrasing_is_trained_right_before_its_answer() -> None:
    """A turn asked with the bare question or the RAIT prompt is rendered exactly as
    ``aligncurate evaluate`` renders that prompt (one user turn, then the answer)."""
    from examples.fact_world.prompts import PHRASINGS, phrase
    from examples.fact_world.tokenizer import train_tokenizer
    from examples.fact_world.train import collate, tokenizer_corpus
    from transforms.craft.evaluation import basic_prompt_text
    from transforms.craft.relabel import rait_prompt_text

    facts = generate_facts()
    tok = train_tokenizer(tokenizer_corpus(facts))
    fact = facts[0]
    asked = {"basic": basic_prompt_text("open_qa", fact["question"])}
    asked["refuse"] = rait_prompt_text("open_qa", fact["question"])
    for phrasing in PHRASINGS:
        batch = collate([[(fact["question"], fact["answers"][0], phrasing)]], tok)
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        start = next(i for i, label in enumerate(labels) if label != -100)
        user = asked.get(phrasing, phrase(fact["question"], phrasing))
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        assert ids[:start] == tok(prompt, add_special_tokens=False)["input_ids"], phrasing


def test_splits_hold_out_whole_relations_and_every_fifth_fact() -> None:
    from examples.fact_world.facts import ID_EVERY, OOD_RELATIONS

    facts = generate_facts()
    by_split = Counter(f["split"] for f in facts)
    assert set(by_split) == {"rait", "id", "ood"}
    assert {f["relation"] for f in facts if f["split"] == "ood"} == set(OOD_RELATIONS)
    assert not {f["relation"] for f in facts if f["split"] != "ood"} & set(OOD_RELATIONS)
    in_domain = by_split["rait"] + by_split["id"]
    assert by_split["id"] == -(-in_domain // ID_EVERY)
    for split in ("rait", "id", "ood"):  # every split holds every group
        assert {f["group"] for f in facts if f["split"] == split} == set(GROUPS), split


# --- one real build -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def fact_world() -> FactWorld:
    """The default fact world, built once per session (shared with session_fact_world())."""
    return session_fact_world()


@pytest.fixture(scope="session")
def loaded(fact_world: FactWorld) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The saved model and tokenizer, loaded fresh from disk."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(fact_world.model_dir)
    return model.eval(), AutoTokenizer.from_pretrained(fact_world.model_dir)


def test_world_files_and_manifest(fact_world: FactWorld) -> None:
    assert fact_world.root.name == fact_world.manifest["config_hash"]
    assert fact_world.root.parent == default_cache_root().absolute()
    assert fact_world.facts() == generate_facts(seed=0)
    assert (fact_world.model_dir / "model.safetensors").is_file()
    manifest = json.loads((fact_world.root / "manifest.json").read_text())
    assert manifest == fact_world.manifest
    assert manifest["seed"] == 0
    assert manifest["counts"] == {"facts": 600, "known": 360, "unknown": 120, "half_known": 120}
    assert set(manifest["accuracy"]["greedy"]) == {"0_shot", "3_shot"}
    # The training time is recorded, not asserted: it is a benchmark figure (docs/performance.md),
    # and a world trained under load once took 749.5 s on CI.
    assert manifest["training"]["seconds"] > 0
    assert not [p for p in fact_world.root.parent.iterdir() if ".tmp-" in p.name]


def test_saved_model_and_tokenizer_load(fact_world: FactWorld, loaded) -> None:
    model, tok = loaded
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (4, 256, 768)
    assert config.head_dim == config.hidden_size // config.num_attention_heads == 64
    assert config.num_key_value_heads == 4 and config.max_position_embeddings == 512
    assert len(tok) == config.vocab_size == 1024
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert model.generation_config.eos_token_id == tok.eos_token_id
    rendered = tok.apply_chat_template(
        query_prompt("Q?", [("S?", "x")]), add_generation_prompt=True, tokenize=False
    )
    shot, target = (f"{INSTRUCTION}\nQuestion: {q}\nAnswer:" for q in ("S?", "Q?"))
    assert rendered == (
        f"<s><|user|>\n{shot}\n<|assistant|>\nx</s>\n<|user|>\n{target}\n<|assistant|>\n"
    )


def test_greedy_accuracy_meets_the_goals(fact_world: FactWorld, loaded) -> None:
    """Measured afresh from the saved model, not read from the manifest."""
    from examples.fact_world.evaluate import greedy_accuracy

    model, tok = loaded
    accuracy = greedy_accuracy(model, tok, fact_world.facts(), shot_counts=(0, 3))
    for form in ("0_shot", "3_shot"):
        acc = accuracy[form]
        assert acc["known"] >= 0.9, accuracy
        assert acc["unknown"] <= 0.1, accuracy
        assert acc["unknown"] < acc["half_known"] < acc["known"], accuracy
    assert accuracy == fact_world.manifest["accuracy"]["greedy"]


def test_half_known_facts_spread_under_sampling(fact_world: FactWorld, loaded) -> None:
    """What CRaFT needs: sampled correctness μ of half-known facts is neither all 0 nor all 1."""
    from examples.fact_world.evaluate import sampled_correctness

    model, tok = loaded
    facts = fact_world.facts()
    half = [f for f in facts if f["group"] == "half_known"]
    mu = sampled_correctness(model, tok, half, n_shots=0, n=10, temperature=1.0)
    values = list(mu.values())
    assert sum(0 < v < 1 for v in values) >= 0.3 * len(values)
    assert 0.1 < sum(values) / len(values) < 0.9


def test_second_call_hits_the_cache(fact_world: FactWorld) -> None:
    again = build_fact_world()  # not rebuilt: the manifest keeps its created_at
    assert again.root == fact_world.root
    assert again.manifest == fact_world.manifest


def test_build_refuses_to_overwrite_a_foreign_dir(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_fact_world(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_facts"):
        build_fact_world(tmp_path / "world", n_facts=5)
    assert list(tmp_path.iterdir()) == []


def test_a_changed_config_replaces_the_world_atomically(tmp_path: Path) -> None:
    """A tiny world (seconds to build) rebuilt in place under another config."""
    tiny = {"epochs": 1, "known_repeats": 1}
    (tmp_path / ".w.tmp-killed").mkdir()  # what a killed build leaves
    first = build_fact_world(tmp_path / "w", n_facts=30, train=tiny)
    assert first.manifest["counts"]["facts"] == 30
    assert build_fact_world(tmp_path / "w", n_facts=30, train=tiny).manifest == first.manifest
    second = build_fact_world(tmp_path / "w", n_facts=40, train=tiny)
    assert second.root == first.root
    assert second.manifest["config_hash"] != first.manifest["config_hash"]
    assert len(second.facts()) == 40
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temp or old dirs left
