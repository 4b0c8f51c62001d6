"""Names in the store: dataset names, tags, splits and ``name@selector`` references.

A dataset name becomes a directory (or object prefix) under the store root, so it is
checked before any path is built from it: no separators, no traversal, no hidden or
reserved names. A reference is ``name`` (the latest version), ``name@3`` (version 3),
``name@prod`` (the version tagged ``prod``) or ``name@latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RESERVED = frozenset({"_work", "_cache"})
"""Directories under the store root that belong to the pipeline, not to datasets."""

SPLITS = ("train", "rejected")
"""The partitions of every dataset."""

LATEST = "latest"
"""The selector (and reserved tag) meaning the newest version."""

_MAX_LEN = 128
_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StoreError(ValueError):
    """A store operation got a bad name, reference, version, tag or dataset."""


def _check_token(kind: str, text: str) -> str:
    if not isinstance(text, str) or not text:
        raise StoreError(f"{kind} is empty")
    if "/" in text or "\\" in text:
        raise StoreError(f"{kind} {text!r} must not contain a path separator")
    if text in {".", ".."} or ".." in text:
        raise StoreError(f"{kind} {text!r} must not contain '..' (path traversal)")
    if len(text) > _MAX_LEN:
        raise StoreError(f"{kind} {text[:20]!r}... is longer than {_MAX_LEN} characters")
    if not _PATTERN.fullmatch(text):
        raise StoreError(
            f"{kind} {text!r} must start with a letter or digit and contain only "
            "letters, digits, '.', '_' and '-'"
        )
    return text


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid dataset name, else raise :class:`StoreError`.

    Valid: 1-128 characters of ``[A-Za-z0-9._-]``, starting with a letter or digit, no
    ``..``; ``_work`` and ``_cache`` are reserved.
    """
    if name in RESERVED:
        raise StoreError(f"dataset name {name!r} is reserved for the pipeline's own files")
    return _check_token("dataset name", name)


def _looks_like_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag, else raise :class:`StoreError`.

    Tags follow the dataset-name rules, must not look like an integer (``3`` is a
    version) and must not be ``latest``.
    """
    if isinstance(tag, str) and _looks_like_int(tag):
        raise StoreError(f"tag {tag!r} looks like a version number; tags must not be integers")
    _check_token("tag", tag)
    if tag == LATEST:
        raise StoreError(f"tag {LATEST!r} is reserved: it always means the newest version")
    return tag


def validate_split(split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS`, else raise :class:`StoreError`."""
    if split not in SPLITS:
        raise StoreError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


@dataclass(frozen=True)
class Ref:
    """A dataset version reference: ``name`` plus ``None`` (latest), a number or a tag."""

    name: str
    selector: str | None = None

    @property
    def version(self) -> int | None:
        """The version number, when the selector is one."""
        if self.selector is not None and self.selector.isdigit():
            return int(self.selector)
        return None

    @property
    def tag(self) -> str | None:
        """The tag, when the selector is one (``latest`` is not a tag)."""
        if self.selector is None or self.selector.isdigit() or self.selector == LATEST:
            return None
        return self.selector

    def __str__(self) -> str:
        return self.name if self.selector is None else f"{self.name}@{self.selector}"


def parse_ref(text: str | Ref) -> Ref:
    """Parse ``name``, ``name@<version>``, ``name@<tag>`` or ``name@latest``.

    Raises:
        StoreError: bad syntax, bad name or bad tag, with the offending text.
    """
    if isinstance(text, Ref):
        return text
    if not isinstance(text, str) or not text.strip():
        raise StoreError("dataset reference is empty; expected NAME, NAME@VERSION or NAME@TAG")
    name, sep, selector = text.strip().partition("@")
    if not sep:
        return Ref(validate_name(name), None)
    if not selector or "@" in selector:
        raise StoreError(f"bad dataset reference {text!r}; expected NAME, NAME@VERSION or NAME@TAG")
    validate_name(name)
    if selector.isascii() and selector.isdigit():
        return Ref(name, str(int(selector)))
    if selector == LATEST:
        return Ref(name, None)
    try:
        validate_tag(selector)
    except StoreError as exc:
        raise StoreError(f"bad dataset reference {text!r}: {exc}") from exc
    return Ref(name, selector)
