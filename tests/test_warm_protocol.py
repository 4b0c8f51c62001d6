"""The warm runner's framing and refusals, in one process (pipelines/warm_client.py,
pipelines/warm.py); the runner itself is tested in tests/test_server_lifecycle.py."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from pipelines.warm import PROJECT_PACKAGES, Project, Request
from pipelines.warm_client import CODE_CHANGED, mismatch, receive, send


def test_two_messages_sent_at_once_are_read_one_at_a_time() -> None:
    """The runner's "pid" and "exit" replies can arrive in one read: the second is kept."""
    left, right = socket.socketpair()
    with left, right:
        send(left, {"pid": 123})
        send(left, {"exit": 0, "pad": "x" * 100_000})
        left.close()
        assert receive(right)[0] == {"pid": 123}
        assert receive(right)[0]["exit"] == 0
        with pytest.raises(EOFError):
            receive(right)


def test_descriptors_arrive_with_their_message_and_are_closed_on_a_bad_one(tmp_path) -> None:
    left, right = socket.socketpair()
    with left, right, open(tmp_path / "f", "w") as handle:
        send(left, {"argv": []}, [handle.fileno()] * 3)
        message, fds = receive(right, with_fds=True)
        assert message == {"argv": []} and len(fds) == 3
        for fd in fds:
            os.close(fd)
        data = b"[1, 2]"  # JSON, but not an object
        socket.send_fds(left, [len(data).to_bytes(4, "big") + data], [handle.fileno()])
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ValueError, match="JSON object"):
            receive(right, with_fds=True)
        assert len(os.listdir("/proc/self/fd")) == before  # received, then closed


def test_a_request_without_its_fields_or_streams_is_refused() -> None:
    with pytest.raises(ValueError, match="not a request"):
        Request.parse({"argv": ["build"]}, [0, 1, 2])
    good = {"argv": ["x"], "cwd": "/", "env": {}, "path": [], "process": {}}
    assert Request.parse(good, [5, 6, 7]).argv == ["x"]
    with pytest.raises(ValueError, match="stdin, stdout and stderr"):
        Request.parse(good, [5])


def test_what_refuses_a_caller_is_named_and_only_new_code_restarts_the_runner() -> None:
    runner = {
        "executable": "py",
        "code": "a",
        "cgroup": "c",
        "env": {"PREFECT_HOME": "/h"},
        "files": {"prefect.toml": None},
    }
    assert mismatch(runner, dict(runner)) == ""
    assert mismatch(runner, runner | {"code": "b"}) == CODE_CHANGED
    other = runner | {"code": "b", "env": {"PREFECT_HOME": "/other"}}
    assert mismatch(runner, other) == "environment variables differ: PREFECT_HOME"
    files = runner | {"files": {"prefect.toml": "1234"}}
    assert mismatch(runner, files) == "Prefect settings files differ: prefect.toml"
    assert mismatch(runner, runner | {"executable": "py2"}).startswith("another interpreter")
    assert mismatch(runner, {}).startswith("another interpreter")


def test_a_project_differs_when_a_module_file_changes_and_not_for_other_files(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What decides whether a command may use the runner's imported modules."""
    for name in PROJECT_PACKAGES:
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "sub" / "__init__.py").write_text("")
        (tmp_path / name / "sub" / "mod.py").write_text("X = 1\n")
    # only these packages on the path (`python -m pytest` puts the checkout's there too)
    others = [p for p in sys.path if not any(os.path.isdir(f"{p}/{n}") for n in PROJECT_PACKAGES)]
    monkeypatch.setattr(sys, "path", others)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = Project.now()
    assert before.keepable and Project.now() == before
    assert {os.path.dirname(origin) for _, origin in before.origins} == {
        str(tmp_path / name) for name in PROJECT_PACKAGES
    }
    store = tmp_path / "examples" / "store"  # not a package: what a build writes there
    store.mkdir()
    (store / "notes.py").write_text("")
    (tmp_path / "examples" / "sub" / "data.json").write_text("{}")
    assert Project.now() == before
    (tmp_path / "engines" / "sub" / "mod.py").write_text("X = 22\n")
    assert Project.now() != before
    (tmp_path / "engines" / "__init__.py").unlink()  # a namespace package now
    assert not Project.now().keepable
