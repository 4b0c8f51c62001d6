"""Model directories: checks and fingerprints.

A fingerprint names exactly which model produced a generation: the engine kind, the model
path and an XXH3-128 hash of its config, tokenizer and weights files. It is part of every
generation-cache key, so a retrained or merged checkpoint at the same path never reuses
the old model's samples.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import xxhash

from engines.base import EngineError

_HASHED = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja")
_CHUNK = 1 << 24


def model_dir(path: str | Path) -> Path:
    """The model folder, resolved; a clear error when it is missing or has no config."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise EngineError(f"model path {str(path)!r} does not exist or is not a folder")
    if not (folder / "config.json").is_file():
        raise EngineError(f"model path {str(folder)!r} has no config.json: not a HF model folder")
    return folder


@cache
def _content_hash(folder: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = xxhash.xxh3_128()
    for name, _, _ in stamp:
        digest.update(name.encode())
        with (folder / name).open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def model_hash(path: str | Path) -> str:
    """Hash of the config, tokenizer and weights files (memoised on size and mtime)."""
    folder = model_dir(path)
    files = sorted({p for pattern in _HASHED for p in folder.glob(pattern) if p.is_file()})
    stamp = tuple(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files
    )
    return _content_hash(folder, stamp)


def fingerprint(kind: str, path: str | Path) -> str:
    """``kind:path:hash`` — what the generation cache keys on."""
    folder = model_dir(path)
    return f"{kind}:{folder}:{model_hash(folder)}"
