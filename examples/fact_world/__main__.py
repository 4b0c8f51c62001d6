"""``python -m examples.fact_world --out DIR``: build (or find cached) the fact world."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from .world import build_fact_world


def main(argv: Sequence[str] | None = None) -> int:
    """Build the fact world and print its manifest as JSON."""
    parser = argparse.ArgumentParser(prog="python -m examples.fact_world", description=__doc__)
    parser.add_argument("--out", help="output directory (default: the config-keyed cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-facts", type=int, default=600)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--quiet", action="store_true", help="no training progress")
    args = parser.parse_args(argv)
    world = build_fact_world(
        args.out,
        seed=args.seed,
        n_facts=args.n_facts,
        force=args.force,
        verbose=not args.quiet,
    )
    print(json.dumps({"root": str(world.root), **world.manifest}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
