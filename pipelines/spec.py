"""The build spec: a YAML file validated by pydantic (see docs/spec.md).

```yaml
name: sft-mix
store: ./datasets            # optional
sources:
  - path: data/alpaca.jsonl  # relative to this file's folder
    format: alpaca           # optional: auto-detected
stages:                      # optional: the default chain is normalize, exact_dedup, filter
  - normalize: {}
  - exact_dedup: {}
  - filter: {max_chars: 20000}
```
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.stages import stage
from storage.names import validate_name
from transforms.ingest import FORMATS, IngestParams
from transforms.registry import DEFAULT_CHAIN


class SpecError(ValueError):
    """The spec file cannot be read or does not validate; the message names the key.

    Attributes:
        file: the spec file, when known.
        line: the line in it (1-based), when known (YAML syntax errors).
    """

    stage = "spec"

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None):
        super().__init__(message)
        self.file = file
        self.line = line


class SourceSpec(BaseModel):
    """One input corpus."""

    model_config = ConfigDict(extra="forbid")
    path: str
    format: str | None = None
    name: str | None = Field(default=None, description="source name; default: the file stem")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; known formats: {', '.join(FORMATS)}")
        return value


class StageSpec(BaseModel):
    """One stage of the chain, with validated parameters."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    name: str
    params: BaseModel

    def dump(self) -> dict[str, Any]:
        return {self.name: self.params.model_dump(mode="json")}


class BuildSpec(BaseModel):
    """A validated build spec. Paths are as written; :func:`load_spec` resolves them."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    name: str
    sources: list[SourceSpec] = Field(min_length=1)
    stages: list[StageSpec] = Field(default_factory=list)
    store: str | None = None
    ingest: IngestParams = Field(default_factory=IngestParams)
    allow_empty: StrictBool = Field(
        False, description="commit a version even when the sources hold no rows"
    )
    _digest: str | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("stages", mode="before")
    @classmethod
    def _parse_stages(cls, value: Any) -> list[StageSpec]:
        if value is None:
            value = list(DEFAULT_CHAIN)
        if not isinstance(value, list):
            raise ValueError("stages must be a list of {stage_name: {params}} mappings")
        return [_parse_stage(item, i) for i, item in enumerate(value)]

    @model_validator(mode="after")
    def _default_chain(self) -> BuildSpec:
        if not self.stages and "stages" not in self.model_fields_set:
            self.stages = [_parse_stage(name, i) for i, name in enumerate(DEFAULT_CHAIN)]
        return self

    def canonical(self) -> dict[str, Any]:
        """The spec with every default filled in, as plain JSON data."""
        data = self.model_dump(mode="json", exclude={"stages"})
        data["stages"] = [s.dump() for s in self.stages]
        return data

    def spec_hash(self) -> str:
        """SHA-256 of the canonical spec as written (before paths were resolved); for a
        spec from :func:`parse_spec`, with paths inside the spec's folder written relative
        to it, so the hash does not depend on where the folder (or the checkout) lies."""
        if self._digest is not None:
            return self._digest
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def map_paths(self, fn: Callable[[str], str]) -> None:
        """Apply ``fn`` to every path: source paths, the store and the stage parameters
        named ``model``, ``*_dir`` or ``*_path`` (nested)."""
        for source in self.sources:
            source.path = fn(source.path)
        if self.store is not None:
            self.store = fn(self.store)
        for step in self.stages:
            _map_params(step.params, fn)


def _parse_stage(item: Any, index: int) -> StageSpec:
    if isinstance(item, str):
        item = {item: {}}
    if isinstance(item, StageSpec):
        return item
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"stages[{index}] must be a single-key mapping {{stage_name: {{params}}}}")
    ((name, params),) = item.items()
    try:
        definition = stage(name)
    except KeyError as exc:
        raise ValueError(f"stages[{index}]: {exc.args[0]}") from None
    for where, value in _loose_booleans(definition.params, params or {}):
        raise ValueError(f"stages[{index}] ({name}): {_not_boolean(where, value)}")
    try:
        validated = definition.params.model_validate(params or {})
    except ValidationError as exc:
        raise ValueError(f"stages[{index}] ({name}): {_first_error(exc)}") from None
    return StageSpec(name=name, params=validated)


def _loose_booleans(annotation: Any, value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of each value in ``value`` (spec data as written) that fills a
    ``bool`` field of ``annotation`` (a model, nested models, lists and mappings of them)
    but is not ``true`` or ``false``: pydantic alone would take ``"yes"``, ``1`` or
    ``"on"`` as true."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is bool:
        if not isinstance(value, bool):
            yield where, value
    elif origin is Annotated:
        yield from _loose_booleans(args[0], value, where)
    elif origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if value is not None and len(members) == 1:
            yield from _loose_booleans(members[0], value, where)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if isinstance(value, dict):
            for name, info in annotation.model_fields.items():
                key = info.alias or name
                if key in value:
                    yield from _loose_booleans(info.annotation, value[key], _join(where, key))
    elif origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            yield from _loose_booleans(args[0], item, f"{where}[{i}]")
    elif origin is dict and isinstance(value, dict) and len(args) == 2:
        for key, item in value.items():
            yield from _loose_booleans(args[1], item, _join(where, str(key)))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _not_boolean(where: str, value: Any) -> str:
    return f"{where}: expected true or false, got {json.dumps(value, default=str)}"


def _first_error(exc: ValidationError) -> str:
    return _describe(exc.errors()[0])


def _describe(err: Any) -> str:
    """``where: what`` of one pydantic error (without pydantic's ``Value error,`` prefix)."""
    where = ".".join(str(p) for p in err["loc"])
    what = err["msg"].removeprefix("Value error, ")
    return f"{where}: {what}" if where else what


def parse_spec(data: Any, base_dir: Path) -> BuildSpec:
    """Validate spec data and resolve its relative paths against ``base_dir``."""
    if not isinstance(data, dict):
        raise SpecError("the spec must be a mapping with at least 'name' and 'sources'")
    loose = [_not_boolean(where, value) for where, value in _loose_booleans(BuildSpec, data)]
    if loose:
        raise SpecError(f"invalid spec: {'; '.join(loose)}")
    try:
        spec = BuildSpec.model_validate(data)
    except ValidationError as exc:
        errors = "; ".join(_describe(e) for e in exc.errors())
        raise SpecError(f"invalid spec: {errors}") from None
    portable = spec.model_copy(deep=True)
    portable.map_paths(lambda value: _relative_inside(value, base_dir))
    spec._digest = portable.spec_hash()
    spec.map_paths(lambda value: _resolve(value, base_dir))
    return spec


def _map_params(params: BaseModel, fn: Callable[[str], str]) -> None:
    """Stage parameters named ``model``, ``*_dir`` or ``*_path`` are paths (nested too)."""
    for name in type(params).model_fields:
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            _map_params(value, fn)
        elif isinstance(value, str) and (name == "model" or name.endswith(("_dir", "_path"))):
            setattr(params, name, fn(value))


def check_sources(spec: BuildSpec, spec_path: str | Path) -> None:
    """Fail, naming the spec and its entry, when a local source cannot be read: it does
    not exist (a broken link: its target does not), or it is a symlink loop."""
    for index, source in enumerate(spec.sources):
        if "://" not in source.path and (problem := _unreadable(source.path)):
            raise SpecError(
                f"{spec_path}: sources[{index}].path: {source.path} {problem}", file=str(spec_path)
            )


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be opened (``does not exist``, ``is a symlink loop`` ...), or None."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        if exc.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be read: {exc.strerror}"
    return None


def spec_warnings(spec: BuildSpec) -> list[str]:
    """What is valid but probably a mistake: a source listed more than once (its rows
    would be read twice; under another ``name`` they would not even be deduplicated)."""
    warnings = []
    seen: dict[str, int] = {}
    for index, source in enumerate(spec.sources):
        key = source.path if "://" in source.path else os.path.realpath(source.path)
        if key in seen:
            warnings.append(
                f"sources[{index}] repeats sources[{seen[key]}] ({source.path}): "
                "its rows are read twice"
            )
        seen.setdefault(key, index)
    return warnings


def load_spec(path: str | Path) -> BuildSpec:
    """Read and validate a YAML build spec; relative paths resolve against its folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    try:
        return parse_spec(data, _real(path).parent)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}", file=str(path)) from None


def _yaml_error(path: Path, exc: yaml.YAMLError) -> SpecError:
    """``<spec>: line L, column C: invalid YAML: <what>``, naming the spec file, not
    PyYAML's ``<unicode string>``."""
    mark = getattr(exc, "problem_mark", None)
    what = ", ".join(
        str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part
    )
    if mark is None:
        return SpecError(f"{path}: invalid YAML: {what or exc}", file=str(path))
    line = mark.line + 1
    return SpecError(
        f"{path}: line {line}, column {mark.column + 1}: invalid YAML: {what}",
        file=str(path),
        line=line,
    )


def _real(path: Path) -> Path:
    """``path`` with its links resolved; made absolute only, when it is a symlink loop
    (which :func:`check_sources` reports)."""
    try:
        return path.resolve()
    except RuntimeError:  # Python < 3.13 raises on a symlink loop
        return Path(os.path.abspath(path))


def _relative_inside(value: str, base_dir: Path) -> str:
    """An absolute path inside ``base_dir`` as the relative path that names the same file
    from the spec's folder (POSIX form); any other value as written."""
    if "://" in value or not Path(value).is_absolute():
        return value
    for candidate in (Path(os.path.normpath(value)), _real(Path(value))):
        if candidate.is_relative_to(base_dir):
            return candidate.relative_to(base_dir).as_posix()
    return value


def _resolve(value: str, base_dir: Path) -> str:
    if "://" in value:
        return value
    candidate = Path(value).expanduser()
    return str(candidate if candidate.is_absolute() else _real(base_dir / candidate))
