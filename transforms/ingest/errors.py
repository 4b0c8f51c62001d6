"""The two kinds of bad input: a file that cannot be ingested, and a row that cannot.

A file-level failure (:class:`IngestError`) fails the build before any commit. A row-level
problem (:class:`RowReject`) sends that row to the ``rejected`` split with a reason such as
``missing_field:output`` and the build goes on.
"""

from __future__ import annotations

from typing import Any


class IngestError(ValueError):
    """A file cannot be ingested: unreadable, unparseable, or of unknown format.

    ``str()`` reads ``<path>: <location>: field '<field>': <message>``, leaving out the parts
    that are unknown, e.g. ``nq.jsonl: line 3: invalid JSON: Expecting ',' delimiter``.

    Attributes:
        path: the file (or directory) as given to the reader.
        location: where in the file, e.g. ``line 3`` or ``schema``; ``None`` for the whole file.
        field: the column or key at fault, if one is.
        message: what went wrong.
    """

    def __init__(
        self, path: str, message: str, *, location: str | None = None, field: str | None = None
    ) -> None:
        self.path = str(path)
        self.message = message
        self.location = location
        self.field = field
        parts = [self.path]
        if location:
            parts.append(location)
        if field:
            parts.append(f"field {field!r}")
        parts.append(message)
        super().__init__(": ".join(parts))

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default exception pickling; Prefect
        # pickles a failed task's exception to re-raise it from the flow's state.
        return (_rebuild, (self.path, self.message, self.location, self.field))


def unreadable(path: str, exc: OSError, line: int | None = None) -> IngestError:
    """The error for a file whose bytes cannot be read or decompressed (a truncated ``.gz``,
    say), at ``line`` when the reader knows where it was."""
    location = None if line is None else f"line {line}"
    return IngestError(path, f"cannot read: {exc.strerror or exc}", location=location)


def _rebuild(path: str, message: str, location: str | None, field: str | None) -> IngestError:
    return IngestError(path, message, location=location, field=field)


class RowReject(Exception):
    """One record cannot become a canonical row.

    Attributes:
        reason: the ``reject_reason``, e.g. ``wrong_type:output`` or ``no_assistant_turn``.
        partial: canonical fields that could be filled (``prompt``, ``tools`` ...), kept on
            the rejected row to help whoever inspects it.
    """

    def __init__(self, reason: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial or {}
