"""Regenerate the report test fixtures: real CRaFT and synthesis versions on the fact world.

Run once (minutes on a 2-core CPU) with ``.venv/bin/python tests/data/report/make_fixtures.py``.
It builds, through the Prefect flow with in-process vLLM, the CRaFT demo spec
(``examples/fact_world.yaml``) and the synthesis spec (``examples/synthesis/fact_world.yaml``)
against the session fact world, then keeps the report's inputs of each committed version
(both splits, every column, with ``split``) as ``craft.parquet`` and ``synthesis.parquet``
here. ``tests/test_report.py`` commits these tables into a fresh store, so the report is
tested on real CRaFT scores and real lineage without paying for the models in every run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
MAX_ROWS = 400  # per split: enough points for the scatter, small enough to commit


def _spec(template: Path, folder: Path, world: object) -> Path:
    import yaml

    spec = yaml.safe_load(template.read_text())
    spec["sources"] = [{"path": str(world.facts_path), "format": "open_qa"}]  # type: ignore[attr-defined]
    for stage in spec["stages"]:
        for params in stage.values():
            if "model" in params:
                params["model"] = str(world.model_dir)  # type: ignore[attr-defined]
            if "seeds_path" in params:
                params["seeds_path"] = str(template.parent / params["seeds_path"])
    path = folder / template.name
    path.write_text(yaml.safe_dump(spec))
    return path


def main() -> None:
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="aligncurate-prefect-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    sys.path.insert(0, str(REPO))
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from prefect.testing.utilities import prefect_test_harness

    from examples.fact_world import session_fact_world
    from pipelines.build import build_dataset
    from storage.dataset import DatasetStore

    world = session_fact_world()
    folder = Path(tempfile.mkdtemp(prefix="report-fixtures-"))
    store = DatasetStore(str(folder / "store"))
    jobs = {
        "craft.parquet": REPO / "examples" / "fact_world.yaml",
        "synthesis.parquet": REPO / "examples" / "synthesis" / "fact_world.yaml",
    }
    with prefect_test_harness(server_startup_timeout=120):
        for target, template in jobs.items():
            summary = build_dataset(str(_spec(template, folder, world)), store=store.root)
            table = store.read(f"{summary['name']}@{summary['version']}", split=None)
            parts = []
            for split in ("train", "rejected"):
                part = table.filter(pc.equal(table["split"], split))
                if "origin" in part.column_names and target == "synthesis.parquet":
                    synthetic = part.filter(pc.equal(part["origin"], "synthetic"))
                    other = part.filter(pc.not_equal(part["origin"], "synthetic"))
                    part = pa.concat_tables([synthetic, other.slice(0, 60)])
                parts.append(part.slice(0, MAX_ROWS))
            out = pa.concat_tables(parts)
            pq.write_table(out, HERE / target, compression="zstd")
            print(target, out.num_rows, summary["counts"])


if __name__ == "__main__":
    main()
