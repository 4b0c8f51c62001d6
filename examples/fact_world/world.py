"""Build the fact world once and cache it: facts, tokenizer, trained model, manifest.

A build is keyed by a hash of its configuration and of this package's code, so a changed
generator or trainer never serves a stale cache. It is written to a temporary sibling
directory and renamed into place at the end, under a lock on the parent directory: a killed
build leaves no half cache (the next build sweeps its temp dir away), and two processes
asking at once build once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .config import TrainConfig

FACT_WORLD_VERSION = 4
CACHE_ENV = "ALIGNCURATE_FACT_WORLD_CACHE"
MANIFEST = "manifest.json"
FACTS = "facts.jsonl"
SPLIT_FILE = "{split}.jsonl"
"""Each split's facts (``rait.jsonl``, ``id.jsonl``, ``ood.jsonl``), e.g. for a build's source
and ``aligncurate evaluate --questions``."""
MODEL = "model"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class FactWorldConfig:
    """Everything a build depends on. ``train`` holds the model and optimiser settings."""

    seed: int = 0
    n_facts: int = 600
    known_fraction: float = 0.6
    unknown_fraction: float = 0.2
    relations_per_entity: int = 3
    twins: bool = False
    entity_groups: bool = True
    train: dict = field(default_factory=dict)

    def resolved_train(self) -> TrainConfig:
        """The training settings: the defaults overridden by ``train``."""
        return TrainConfig(**self.train)

    def as_dict(self) -> dict:
        """The full configuration, training defaults included."""
        return {**asdict(self), "train": self.resolved_train().as_dict()}

    def config_hash(self) -> str:
        """A short hash of the configuration, the format version and the package's code."""
        payload = json.dumps(
            {"version": FACT_WORLD_VERSION, "code": code_version(), "config": self.as_dict()},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: The modules whose code decides what a build produces (not this one: caching and copying
#: do not change the world).
_BUILD_MODULES = ("config.py", "evaluate.py", "facts.py", "prompts.py", "tokenizer.py", "train.py")


@functools.cache
def code_version() -> str:
    """A hash of the source files that decide what a build produces."""
    from transforms.craft.relabel import OEQA_RAIT_PROMPT  # the model is trained on it

    digest = hashlib.sha256(OEQA_RAIT_PROMPT.encode())
    for path in sorted(Path(__file__).parent / name for name in _BUILD_MODULES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class FactWorld:
    """A built fact world on disk."""

    root: Path
    model_dir: Path
    facts_path: Path
    manifest: dict

    def split_path(self, split: str) -> Path:
        """The JSONL file of one split's facts (``rait``, ``id`` or ``ood``)."""
        return self.root / SPLIT_FILE.format(split=split)

    def facts(self) -> list[dict]:
        """All facts, one dict each (``id``, ``question``, ``answers``, ``group``, ...)."""
        with self.facts_path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> FactWorld:
        """Open a built world; raises ``FileNotFoundError`` if it is incomplete."""
        root = Path(root)
        if not is_complete(root):
            raise FileNotFoundError(f"no complete fact world at {root}")
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        return cls(root, root / MODEL, root / FACTS, manifest)


def is_complete(root: Path, config_hash: str | None = None) -> bool:
    """Whether ``root`` holds a finished build (of ``config_hash``, when given)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if config_hash is not None and manifest.get("config_hash") != config_hash:
        return False
    from .facts import SPLITS

    files = [root / FACTS, *(root / MODEL / name for name in _MODEL_FILES)]
    files += [root / SPLIT_FILE.format(split=split) for split in SPLITS]
    return all(p.is_file() for p in files)


def default_cache_root() -> Path:
    """``$ALIGNCURATE_FACT_WORLD_CACHE``, else ``~/.cache/aligncurate/fact_world``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "aligncurate" / "fact_world"


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target``'s parent directory (one builder there at a time).

    The lock is on the directory itself, so no lock file is left behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def build_fact_world(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    n_facts: int = 600,
    known_fraction: float = 0.6,
    unknown_fraction: float = 0.2,
    relations_per_entity: int = 3,
    twins: bool = False,
    entity_groups: bool = True,
    train: dict | None = None,
    force: bool = False,
    verbose: bool = False,
) -> FactWorld:
    """Build the fact world into ``out_dir``, or return it at once if it is already there.

    With ``out_dir`` None the world goes to ``default_cache_root() / <config hash>``.
    ``train`` overrides fields of ``TrainConfig``. ``force`` rebuilds even a complete world.
    A directory that exists but is not a fact world (no manifest, not empty) is never
    overwritten: that raises ``FileExistsError``.
    """
    config = FactWorldConfig(
        seed=seed,
        n_facts=n_facts,
        known_fraction=known_fraction,
        unknown_fraction=unknown_fraction,
        relations_per_entity=relations_per_entity,
        twins=twins,
        entity_groups=entity_groups,
        train=dict(train or {}),
    )
    key = config.config_hash()
    target = Path(out_dir) if out_dir is not None else default_cache_root() / key
    target = target.expanduser().absolute()
    if not force and is_complete(target, key):
        return FactWorld.open(target)
    with _locked(target):
        if not force and is_complete(target, key):  # another process built it meanwhile
            return FactWorld.open(target)
        if target.exists() and not (target / MANIFEST).is_file() and any(target.iterdir()):
            raise FileExistsError(f"{target} exists and is not a fact world; not overwriting")
        for stale in target.parent.glob(f".{target.name}.*-*"):  # left by a killed build
            if stale.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-")):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _build_into(tmp, config, key, verbose=verbose)
            tmp.chmod(0o755)  # mkdtemp made it private
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                target.rename(old / "world")
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return FactWorld.open(target)


@functools.cache
def session_fact_world() -> FactWorld:
    """The default world, built (or found in the cache) once per process.

    Tests share it: the first caller pays for the build, later ones get the same object.
    Where it lives is decided by ``$ALIGNCURATE_FACT_WORLD_CACHE`` at the first call.
    """
    return build_fact_world()


def _build_into(root: Path, config: FactWorldConfig, key: str, *, verbose: bool) -> None:
    """Generate, train, evaluate and save a world into the empty directory ``root``."""
    import tokenizers
    import torch
    import transformers

    from .evaluate import greedy_accuracy
    from .facts import SPLITS, generate_facts, make_relations
    from .tokenizer import train_tokenizer
    from .train import tokenizer_corpus, train_model

    started = time.perf_counter()
    cfg = config.resolved_train()
    facts = generate_facts(
        config.seed,
        config.n_facts,
        relations_per_entity=config.relations_per_entity,
        known_fraction=config.known_fraction,
        unknown_fraction=config.unknown_fraction,
        twins=config.twins,
        entity_groups=config.entity_groups,
    )
    _write_jsonl(root / FACTS, facts)
    for split in SPLITS:
        _write_jsonl(
            root / SPLIT_FILE.format(split=split), [f for f in facts if f["split"] == split]
        )
    tokenizer = train_tokenizer(tokenizer_corpus(facts), cfg.vocab_size)
    model, stats = train_model(
        facts, tokenizer, cfg, seed=config.seed, log_every=100 if verbose else 0
    )
    eval_started = time.perf_counter()
    accuracy = greedy_accuracy(model, tokenizer, facts)
    eval_seconds = time.perf_counter() - eval_started
    model.save_pretrained(root / MODEL)
    tokenizer.save_pretrained(root / MODEL)
    manifest = {
        "fact_world_version": FACT_WORLD_VERSION,
        "config_hash": key,
        "code_version": code_version(),
        "seed": config.seed,
        "config": config.as_dict(),
        "counts": {"facts": len(facts), **Counter(f["group"] for f in facts)},
        "splits": {s: dict(Counter(f["group"] for f in facts if f["split"] == s)) for s in SPLITS},
        "relations": {r.name: len(r.pool) for r in make_relations(config.seed)},
        "model": {
            "architecture": type(model).__name__,
            "parameters": stats["parameters"],
            "hidden_size": model.config.hidden_size,
            "num_layers": model.config.num_hidden_layers,
            "num_heads": model.config.num_attention_heads,
            "head_dim": model.config.head_dim,
            "vocab_size": len(tokenizer),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "training": stats,
        "accuracy": {"greedy": accuracy, "eval_seconds": round(eval_seconds, 1)},
        "build_seconds": round(time.perf_counter() - started, 1),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def copy_world(world: FactWorld, out_dir: str | os.PathLike[str]) -> FactWorld:
    """Copy a built world (facts, model, manifest) to ``out_dir``; no retraining.

    ``out_dir`` must be absent, empty, or a fact world already (which is replaced).
    """
    target = Path(out_dir).expanduser().absolute()
    if target == world.root:
        return world
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise FileExistsError(f"{target} exists and is not a fact world; not overwriting")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        shutil.copytree(world.root, tmp / "world")
        if target.exists():
            shutil.rmtree(target)
        (tmp / "world").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FactWorld.open(target)
