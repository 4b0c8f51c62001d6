"""The system tools some tests drive for real, and the one place that decides what happens
when one is missing.

``make system-deps`` installs them (Debian packages, with apt-get, as root or with sudo);
``make test`` calls it first. Where a tool is still missing, :func:`require` skips the test
with a one-line reason that names ``make system-deps``. Under CI (``CI=true``) the same
reason is a failure instead: CI must run these tests for real, never skip them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from servers import postgres_bin

INSTALL = "make system-deps"


@dataclass(frozen=True)
class Tool:
    """A system tool: the Debian package that provides it and how to find it."""

    package: str
    find: Callable[[], object]


#: What the tests need, by name (``make system-deps`` installs the same packages).
TOOLS: dict[str, Tool] = {
    # tests/test_report.py renders the HTML report in headless Chromium
    "chromium": Tool("chromium", lambda: shutil.which("chromium")),
    # tests/test_compose.py validates docker-compose.yml with `docker-compose config -q`
    "docker-compose": Tool("docker-compose", lambda: shutil.which("docker-compose")),
    # tests/test_schedule.py runs a Prefect server on a throwaway PostgreSQL cluster
    "postgresql": Tool("postgresql", postgres_bin),
}


def under_ci() -> bool:
    """Whether the tests run under CI (``CI`` set to true, as CI services do)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing_reason(name: str) -> str | None:
    """``None`` when the tool ``name`` is present, else the one-line reason it is not.

    A name not in :data:`TOOLS` is looked up as an executable on ``PATH``.
    """
    tool = TOOLS.get(name, Tool(name, lambda: shutil.which(name)))
    if tool.find():
        return None
    return f"{name} is not installed (Debian package {tool.package}); run `{INSTALL}`"


def require(name: str) -> None:
    """Return when the tool ``name`` is present; else skip the calling test (or module, or
    fixture's dependants), or fail it under CI, with the reason."""
    reason = missing_reason(name)
    if reason is not None:
        unavailable(reason)


def unavailable(reason: str) -> None:
    """Skip the calling test for ``reason`` (something the machine lacks), or fail it under
    CI, which must run every test for real."""
    if under_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
