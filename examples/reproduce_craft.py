"""Reproduce CRaFT's THS table (Zhu et al., AAAI-25, Table 2) on the fact world, on a CPU.

``make reproduce-craft`` (or ``python -m examples.reproduce_craft``):

1. builds the fact world (cached) and, from its ``rait`` split, one dataset per method
   (``vanilla``, ``cor_rait``, ``craft_wo_flow``, ``craft_wo_cer``, ``craft``) with the same
   M0 scores and the same rehearsal (the generation cache and the rehearsal cache are
   shared, so only the first build asks the model anything);
2. trains M0 on each dataset with ``aligncurate train`` (TRL), once per seed;
3. evaluates M0 and every trained model on the held-out facts of the same relations
   (``id``) and on the facts of relations no dataset holds (``ood``) with
   ``aligncurate evaluate``;
4. writes ``<out>/results.json`` (``{"rows": [{variant, seed, set, n, pc, pw, refusal, ths,
   model, dataset}]}``) and prints the table, mean ± spread over seeds.

Every step is cached: a rerun builds no version, trains nothing and makes no engine call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

VARIANTS = ("vanilla", "cor_rait", "craft_wo_flow", "craft_wo_cer", "craft")
SETS = ("id", "ood")
SIZE = 150
"""Rows of every variant's dataset (the paper fixes one N for all methods: 10,000 on TriviaQA),
20% of them refusals; fixed before any result was seen."""
TRAIN_OVERRIDES: dict[str, Any] = {"learning_rate": 3e-4, "batch_size": 8, "threads": 1}
"""Stage-2 settings for the 3.7M-parameter fact-world model (see docs/craft.md): the open-QA
preset (full fine-tune, 3 epochs, cosine) with a learning rate of 3e-4 instead of 8e-6
(raised from 1e-4 after no method learned to refuse at that rate), on one torch thread (this
small model trained 8 steps in 1.6 s on one thread against 6.3 s on two, the other core
busy)."""


REHEARSAL: dict[str, Any] = {"method": "full", "learning_rate": 3e-4, "batch_size": 8}
"""Rehearsal with the recipe of the stage-2 training it stands in for (:data:`TRAIN_OVERRIDES`),
as the CRaFT code does for MCQ (LoRA at 2e-4 in both stages). With the project's default
(LoRA r 64 at 2e-4) the 3.7M-parameter model barely moved on fact world v3: on one random
stream, Δμ < 0 for 6 of 58 half-known facts and > 0 for 2, leaving CRaFT 3 IdK candidates
for a quota of 30."""


def spec_for(variant: str, world: Any, selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The build spec of one variant: the ``rait`` facts through CRaFT with ``method``;
    ``selection`` adds selection parameters (experiments, e.g. ``admit_never_correct``)."""
    return {
        "name": f"fact-world-{variant.replace('_', '-')}",
        "sources": [{"path": str(world.split_path("rait")), "format": "open_qa"}],
        "stages": [
            {"normalize": {}},
            {"exact_dedup": {}},
            {
                "craft": {
                    "model": str(world.model_dir),
                    "engine": "vllm",
                    "method": variant,
                    "static_conflict": False,
                    "rehearsal": REHEARSAL,
                    "selection": {"size": SIZE, "idk_share": 0.2, **(selection or {})},
                }
            },
        ],
    }


def build_variant(
    variant: str, world: Any, store: Any, folder: Path, selection: dict[str, Any] | None = None
) -> str:
    """The variant's version ``NAME@N``, built unless the latest version has this spec."""
    from pipelines.build import build_dataset
    from pipelines.spec import load_spec

    path = folder / f"{variant}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(spec_for(variant, world, selection), sort_keys=False), encoding="utf-8"
    )
    spec = load_spec(path)
    if store.exists(spec.name):
        latest = store.versions(spec.name)[-1]
        if latest.metadata.get("spec_hash") == spec.spec_hash():
            return f"{spec.name}@{latest.version}"
    summary = build_dataset(str(path), store.root)
    return f"{spec.name}@{summary['version']}"


def rows_of(result: dict[str, Any], variant: str, seed: int | None, dataset: str | None) -> list:
    """results.json rows of one evaluation."""
    return [
        {
            "variant": variant,
            "seed": seed,
            "set": name,
            **{k: line[k] for k in ("n", "pc", "pw", "refusal", "ths")},
            "model": result["model"],
            "dataset": dataset,
        }
        for name, line in result["sets"].items()
    ]


def group_rows(
    folder: Path, facts: dict[str, str], variant: str, seed: int | None
) -> list[dict[str, Any]]:
    """Pc / Pw / refusal per fact group (known, half_known, unknown) from ``--rows-out``."""
    from transforms.craft.evaluation import rates

    rows = []
    for name in SETS:
        lines = [json.loads(x) for x in (folder / f"{name}.jsonl").read_text().splitlines()]
        for group in ("known", "half_known", "unknown"):
            labels = [r["label"] for r in lines if facts[r["question"]] == group]
            rows.append({"variant": variant, "seed": seed, "set": name, "group": group,
                         **rates(labels)})  # fmt: skip
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The THS table as markdown: mean ± spread (half the range) over seeds."""
    lines = [
        "| variant | set | seeds | Pc % | Pw % | refusal % | THS |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for variant in ("m0", *VARIANTS):
        for name in SETS:
            group = [r for r in rows if r["variant"] == variant and r["set"] == name]
            if not group:
                continue
            cells = []
            for key, scale in (("pc", 100), ("pw", 100), ("refusal", 100), ("ths", 1)):
                values = [r[key] * scale for r in group if r[key] is not None]
                if not values:
                    cells.append("undefined")
                    continue
                spread = (max(values) - min(values)) / 2
                cells.append(f"{statistics.fmean(values):.1f} ± {spread:.1f}")
            lines.append(f"| {variant} | {name} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_table(rows: Sequence[dict[str, Any]]) -> str:
    """What each model does with known, half-known and unknown facts (mean over seeds)."""
    lines = [
        "| variant | set | known: Pc % | known: refusal % | half-known: refusal % "
        "| unknown: Pw % | unknown: refusal % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    cells = (("known", "pc"), ("known", "refusal"), ("half_known", "refusal"),
             ("unknown", "pw"), ("unknown", "refusal"))  # fmt: skip
    for variant in ("m0", *VARIANTS):
        for name in SETS:
            values = []
            for group, key in cells:
                found = [
                    100 * r[key]
                    for r in rows
                    if (r["variant"], r["set"], r["group"]) == (variant, name, group)
                ]
                values.append(f"{statistics.fmean(found):.1f}" if found else "–")
            if any(v != "–" for v in values):
                lines.append(f"| {variant} | {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def selection_rows(store: Any, versions: dict[str, str], groups: dict[str, str]) -> list[dict]:
    """Why each variant refuses what it does, from the per-row scores of its version (train
    and rejected splits): per fact group, how many rows, their mean μ under M0, how many have
    μ = 0 and 0 < μ < 0.5, a negative and a positive knowledge flow Δμ, and how many the
    variant trained as IdK and as vanilla."""
    rows = []
    for variant, ref in versions.items():
        frame = store.to_pandas(ref, split=None)
        frame = frame[frame["correctness_init"].notna()]
        # train rows carry the bare question in rait_question; rejected rows are unchanged
        bare = frame["prompt"].map(lambda turns: turns[-1]["content"])
        frame = frame.assign(group=frame["rait_question"].fillna(bare).map(groups))
        train = frame["split"] == "train"
        for group in ("known", "half_known", "unknown"):
            part = frame[frame["group"] == group]
            mu = part["correctness_init"]
            rows.append({
                "variant": variant, "group": group, "rows": len(part),
                "mean_mu": round(float(mu.mean()), 3) if len(part) else None,
                "never_right": int((mu == 0).sum()),
                "partly_right": int(((mu > 0) & (mu < 0.5)).sum()),
                "flow_negative": int((part["knowledge_flow"] < 0).sum()),
                "flow_positive": int((part["knowledge_flow"] > 0).sum()),
                "idk": int((train[part.index] & (part["craft_label"] == "idk")).sum()),
                "vanilla": int((train[part.index] & (part["craft_label"] == "vanilla")).sum()),
            })  # fmt: skip
    return rows


def selection_table(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`selection_rows` as markdown."""
    lines = [
        "| variant | group | rows | mean μ (M0) | μ = 0 | 0 < μ < 0.5 | Δμ < 0 | Δμ > 0 "
        "| trained IdK | trained vanilla |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['group']} | {r['rows']} | {r['mean_mu']} | "
            f"{r['never_right']} | {r['partly_right']} | {r['flow_negative']} | "
            f"{r['flow_positive']} | {r['idk']} | {r['vanilla']} |"
        )
    return "\n".join(lines)


def reproduce(
    out: Path,
    seeds: Sequence[int],
    overrides: dict[str, Any],
    *,
    variants: Sequence[str] = VARIANTS,
    world_config: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build, train and evaluate everything (see the module docstring); the results.

    ``world_config``: keyword arguments of ``build_fact_world`` (experiments; the default
    world otherwise); ``selection``: extra selection parameters of every variant's spec."""
    from examples.fact_world import build_fact_world
    from pipelines.evaluate import evaluate
    from pipelines.train import train_version
    from storage.dataset import DatasetStore
    from storage.gencache import GenerationCache, cache_dir

    started = time.perf_counter()
    world = build_fact_world(**(world_config or {}))
    store = DatasetStore(str(out / "store"))
    cache = GenerationCache(cache_dir(store.root))
    questions = [str(world.split_path(name)) for name in SETS]
    timings: dict[str, float] = {}
    calls = 0
    versions = {}
    for variant in variants:
        t = time.perf_counter()
        versions[variant] = build_variant(variant, world, store, out / "specs", selection)
        timings[f"build {variant}"] = round(time.perf_counter() - t, 1)
    groups = {f["question"]: f["group"] for f in world.facts()}
    rows: list[dict[str, Any]] = []
    by_group: list[dict[str, Any]] = []

    def evaluated(
        model: Path, variant: str, seed: int | None, dataset: str | None
    ) -> dict[str, Any]:
        nonlocal calls
        answers = out / "answers" / (f"{variant}-seed{seed}" if seed is not None else variant)
        t = time.perf_counter()
        result = evaluate(
            str(model), str(world.model_dir), questions, store, cache,
            engine="transformers", rows_out=answers,
        )  # fmt: skip
        timings[f"evaluate {answers.name}"] = round(time.perf_counter() - t, 1)
        calls += result["engine_calls"]
        rows.extend(rows_of(result, variant, seed, dataset))
        by_group.extend(group_rows(answers, groups, variant, seed))
        return result

    m0 = evaluated(world.model_dir, "m0", None, None)  # M0 under the RAIT prompt: Init-Refuse
    trained = 0
    for variant in variants:
        for seed in seeds:
            model = out / "models" / f"{variant}-seed{seed}"
            t = time.perf_counter()
            record = train_version(
                store, versions[variant], world.model_dir, model, {**overrides, "seed": seed},
                progress=False,
            )  # fmt: skip
            trained += not record["cached"]
            timings[f"train {variant} {seed}"] = round(time.perf_counter() - t, 1)
            evaluated(model, variant, seed, versions[variant])
    results = {
        "rows": rows,
        "by_group": by_group,
        "selection": selection_rows(store, versions, groups),
        "init_basic": {name: line["init_basic"] for name, line in m0["sets"].items()},
        "versions": versions,
        "train_overrides": overrides,
        "selection_overrides": selection or {},
        "seeds": list(seeds),
        "engine_calls": calls,
        "trainings": trained,
        "seconds": round(time.perf_counter() - started, 1),
        "timings": timings,
        "fact_world": {
            "root": str(world.root),
            "config": world.manifest.get("config"),
            "splits": world.manifest.get("splits"),
            "greedy": world.manifest.get("accuracy", {}).get("greedy"),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.reproduce_craft", description=__doc__)
    parser.add_argument("--out", default="reports/craft-ths", help="results and work folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lr",
        type=float,
        default=TRAIN_OVERRIDES["learning_rate"],
        help="learning rate of stage 2 and of the rehearsal",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--world",
        type=json.loads,
        default={},
        help="JSON keyword arguments of build_fact_world overriding the defaults (experiments)",
    )
    parser.add_argument(
        "--selection",
        type=json.loads,
        default={},
        help="JSON selection parameters added to every variant's spec (experiments)",
    )
    args = parser.parse_args(argv)
    overrides = {**TRAIN_OVERRIDES, "learning_rate": args.lr}
    REHEARSAL["learning_rate"] = args.lr  # rehearsal keeps the stage-2 recipe
    results = reproduce(
        Path(args.out),
        args.seeds,
        overrides,
        variants=args.variants,
        world_config=args.world,
        selection=args.selection,
    )
    print(table(results["rows"]))
    print()
    print(group_table(results["by_group"]))
    print()
    print(selection_table(results["selection"]))
    print(
        f"\n{results['seconds']} s; {results['trainings']} models trained, "
        f"{results['engine_calls']} engine calls → {Path(args.out) / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
