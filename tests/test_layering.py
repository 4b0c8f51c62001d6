"""The architecture's one-way dependencies (docs/DESIGN): ``transforms`` is pure curation
logic, so of ``engines`` it may import only the protocol module ``engines.base``; model
objects (engines, embedders) are passed in by ``pipelines``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def engine_imports(path: Path) -> list[str]:
    """``engines.*`` modules other than ``engines.base`` that ``path`` imports (anywhere in
    the file, function-level imports included), as ``line: module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "engines":  # from engines import embeddings
                names = [f"engines.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if (name == "engines" or name.startswith("engines.")) and name != "engines.base":
                found.append(f"{node.lineno}: {name}")
    return found


def test_transforms_import_only_the_engine_protocol() -> None:
    files = sorted((ROOT / "transforms").rglob("*.py"))
    assert files
    offenders = {
        str(path.relative_to(ROOT)): hits for path in files if (hits := engine_imports(path))
    }
    assert offenders == {}, f"transforms may import only engines.base: {offenders}"
