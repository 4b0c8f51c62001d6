"""Benchmark: the fact-world CRaFT build (``examples/fact_world.yaml``'s chain), cold and warm.

- ``cold``: a new store and a new generation cache, through the ``build_dataset`` flow:
  query M0, rehearsal (LoRA fine-tune and merge), query M̃, selection and relabelling,
  diagnostics, commit. The Prefect ephemeral server is started by a trivial flow before
  the clock starts (a team runs a standing server; its ~10 s start is reported apart).
- ``warm``: the same spec again: every task is reused and no model is called.
- ``stage-warm``: the ``craft`` stage alone over the same rows, with the build's work folder
  and cache: every generation is a cache hit, the checkpoint and hidden states are reused.

The cold time is broken down by phase from the stage's own clock (``stats["seconds"]``),
and split into model time (inside engine calls — the vLLM start-up included, since the
engine loads on its first call —, embeddings, rehearsal training, hidden states) and the
rest: the pipeline's own overhead (Prefect, ingest, prompts, cache, selection, commit).
The goal of issue #4: model time ≥ 90% of the cold build.

Usage: ``python bench/craft.py [--keep DIR]``. Prints a JSON report on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# `python bench/X.py` puts bench/ first on sys.path, where engines.py would shadow the
# `engines` package: put the repository there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p).resolve() != Path(__file__).parent]

MIB = 2**20


def _spec(folder: Path, facts: Path, model: Path) -> Path:
    import yaml

    spec = folder / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "bench-craft",
                "sources": [{"path": str(facts), "format": "open_qa"}],
                "stages": [
                    {"normalize": {}},
                    {"exact_dedup": {}},
                    {"craft": {"model": str(model)}},
                ],
            }
        )
    )
    return spec


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-craft-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.pop("ALIGNCURATE_CACHE", None)

    import pyarrow as pa
    from prefect import flow

    from examples.fact_world import session_fact_world
    from pipelines.build import build_dataset
    from pipelines.craft import CraftParams, run_craft
    from storage.gencache import GenerationCache, cache_dir
    from transforms.ingest import read_source

    world = session_fact_world()

    @flow(name="bench-warm-up")
    def warm_up() -> int:
        return 1

    _, server_start = _timed(warm_up)
    spec = _spec(work, world.facts_path, world.model_dir)
    store = str(work / "store")
    cold, cold_s = _timed(build_dataset, str(spec), store)
    warm, warm_s = _timed(build_dataset, str(spec), store)

    table = pa.concat_tables(r.kept for r in read_source(world.facts_path, format="open_qa"))
    stage_dir = Path(store) / "_work" / "bench-craft" / "stages"
    again, stage_warm_s = _timed(
        run_craft,
        table,
        CraftParams(model=str(world.model_dir)),
        stage_dir,
        GenerationCache(cache_dir(store)),
    )

    stats = cold["stage_stats"]["craft"]
    model_s = stats["model_seconds"]
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "rows": cold["rows"],
        "prefect_server_start_s": round(server_start, 2),
        "cold_s": round(cold_s, 2),
        "cold_phases_s": stats["seconds"],
        "cold_model_s": model_s,
        "cold_model_share": round(model_s / cold_s, 3),
        "cold_overhead_s": round(cold_s - model_s, 2),
        "cold_engine_calls": cold["cache"]["engine_calls"],
        "warm_s": round(warm_s, 2),
        "warm_engine_calls": warm["cache"]["engine_calls"],
        "warm_reused_tasks": warm["reused_tasks"],
        "stage_warm_s": round(stage_warm_s, 2),
        "stage_warm_engine_calls": again.stats["engine_init"]["engine_calls"]
        + again.stats["engine_rehearsal"]["engine_calls"],
        "peak_rss_mib": {
            "bench_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "largest_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        },
        "selection": {k: stats.get(k) for k in ("labels", "candidates", "quota", "reasons")},
        "static_conflict": stats.get("static_conflict"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
