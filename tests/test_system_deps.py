"""The skip-or-fail helper for system tools: a skip on a developer's machine, a failure
under CI, with the same one-line reason that names ``make system-deps``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from system_deps import TOOLS, missing_reason, require, under_ci

REPO = Path(__file__).resolve().parents[1]
ABSENT = "aligncurate-no-such-tool"


def _outcome(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> BaseException | None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    try:
        require(ABSENT)
    except (pytest.skip.Exception, pytest.fail.Exception) as outcome:
        return outcome
    return None


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_a_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    outcome = _outcome(monkeypatch, ci)
    assert isinstance(outcome, pytest.skip.Exception)
    reason = str(outcome.msg)
    assert reason == missing_reason(ABSENT)
    assert ABSENT in reason and "make system-deps" in reason and "\n" not in reason


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_a_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    outcome = _outcome(monkeypatch, ci)
    assert isinstance(outcome, pytest.fail.Exception)
    assert not isinstance(outcome, pytest.skip.Exception)
    assert str(outcome.msg) == missing_reason(ABSENT)
    assert under_ci()


@pytest.mark.parametrize("ci", [None, "true"])
def test_a_present_tool_passes(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    monkeypatch.setitem(TOOLS, "present", TOOLS["chromium"].__class__("x", lambda: "/bin/x"))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    require("present")  # neither skips nor fails
    assert missing_reason("present") is None
    assert missing_reason("sh") is None  # an unlisted name: an executable on PATH


def test_the_reason_names_the_debian_package() -> None:
    tool = TOOLS["postgresql"]
    assert tool.package == "postgresql"
    if tool.find() is None:
        assert missing_reason("postgresql") == (
            "postgresql is not installed (Debian package postgresql); run `make system-deps`"
        )


def test_make_system_deps_installs_the_same_packages() -> None:
    """The Makefile target and the helper name the same Debian packages."""
    proc = subprocess.run(
        ["make", "-s", "-n", "system-deps"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for tool in TOOLS.values():
        assert tool.package in proc.stdout
