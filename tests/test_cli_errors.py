"""One-line errors (#15 items 5 and 7): every user error is one ``error:`` line on stderr
and exit code 2, the traceback only under ``--verbose``; ``--json`` prints
``{"ok": false, "error", "stage", "file", "line"}``; the spec's lax checks; credentials
redacted. Each runs the real CLI: the console script in its own process where Prefect's
console logging matters, else typer's runner on the app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
import yaml
from s3server import free_port
from test_storage import canonical_table, commit_build, ids
from typer.testing import CliRunner

from pipelines.cli import app
from storage import DatasetStore

runner = CliRunner()
EXE = Path(sys.executable).with_name("aligncurate")
FAILURE_KEYS = {"ok", "error", "stage", "file", "line"}


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def build_process(
    spec: Path, store: Path, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    """``aligncurate build SPEC --store STORE [extra]`` through the console script."""
    command = [str(EXE), "build", str(spec), "--store", str(store), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def one_error_line(err: str) -> str:
    """The stderr of a failed command: exactly one line, the ``error:`` line."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def failure(out: str) -> dict[str, object]:
    """The ``--json`` failure object on stdout."""
    data = json.loads(out)
    assert set(data) == FAILURE_KEYS and data["ok"] is False, data
    return data


def write_spec(folder: Path, text: str) -> Path:
    spec = folder / "spec.yaml"
    spec.write_text(text)
    return spec


@pytest.fixture
def good_source(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def api_env(prefect_harness: None, tmp_path: Path) -> dict[str, str]:
    """The environment of a console-script process that uses the session's Prefect server."""
    from prefect.settings import get_current_settings

    url = str(get_current_settings().api.url)
    return {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path / "prefect")}


# -- builds ------------------------------------------------------------------------------


def test_failed_build_prints_one_line_and_a_json_failure_not_prefect_tracebacks(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    """An unparseable line 2: exit 2, no version, stdout holds the failure with the stage,
    file and line, and stderr holds the one error line, none of Prefect's tracebacks
    (they stay in the run log); ``--verbose`` shows them."""
    source = tmp_path / "broken.jsonl"
    source.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    spec = write_spec(tmp_path, f"name: broken\nsources: [{{path: {source}}}]\n")
    store = tmp_path / "store"
    proc = build_process(spec, store, api_env, "--json")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Finished in state Failed" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: {source}: line 2: invalid JSON: Expecting value (column 17)"]
    assert failure(proc.stdout) == {
        "ok": False,
        "error": errors[0].removeprefix("error: "),
        "stage": "ingest",
        "file": str(source),
        "line": 2,
    }
    assert DatasetStore(str(store)).datasets() == []
    verbose = build_process(spec, store, api_env, "--verbose")
    assert verbose.returncode == 2 and verbose.stdout == ""
    assert "Traceback" in verbose.stderr and "JSONDecodeError" in verbose.stderr
    assert verbose.stderr.splitlines()[-1].startswith(f"error: {source}: line 2")


def test_a_damaged_save_to_disk_folder_is_one_line(tmp_path: Path, api_env: dict[str, str]) -> None:
    """A ``state.json`` entry without ``filename`` was a ``KeyError: 'filename'`` traceback
    and exit 1; now the console script prints one error line naming the metadata file and
    the field, exits 2 and commits no version."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    datasets.Dataset.from_list([{"instruction": "a", "output": "b"}]).save_to_disk(str(folder))
    state = folder / "state.json"
    state.write_text(json.dumps({"_data_files": [{"name": "data-00000-of-00001.arrow"}]}))
    spec = write_spec(tmp_path, f"name: hf\nsources: [{{path: {folder}}}]\n")
    store = tmp_path / "store"
    proc = build_process(spec, store, api_env, "--json")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Finished in state Failed" not in proc.stderr
    message = f"{state}: field '_data_files[0].filename': expected a file name in this folder, "
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: {message}got nothing"]
    assert failure(proc.stdout) == {
        "ok": False,
        "error": f"{message}got nothing",
        "stage": "ingest",
        "file": str(state),
        "line": None,
    }
    assert DatasetStore(str(store)).datasets() == []


@pytest.mark.parametrize(
    ("fault", "message"),
    [(MemoryError, "out of memory during ingest"), (RecursionError, "nested too deeply")],
)
@pytest.mark.parametrize("where", ["reading", "building a batch"])
def test_memory_and_recursion_errors_in_ingest_are_one_line(
    tmp_path: Path,
    good_source: Path,
    prefect_harness: None,
    monkeypatch: pytest.MonkeyPatch,
    fault: type[Exception],
    message: str,
    where: str,
) -> None:
    """Exhausting memory or the recursion limit for real would take the machine with it,
    so the reader raises them (fault injection), or a batch as it is built on a shard
    thread; the flow, Prefect and the CLI are real."""

    def build() -> object:
        raise fault()

    def source_batches(*args: object, **kwargs: object) -> Iterator[object]:
        if where == "reading":
            raise fault()
        yield build  # a generator of batches, as the real reader

    monkeypatch.setattr("pipelines.build.source_batches", source_batches)
    spec = write_spec(tmp_path, f"name: faulty\nsources: [{{path: {good_source}}}]\n")
    code, out, err = cli("build", str(spec), "--store", str(tmp_path / "store"), "--json")
    assert code == 2
    assert message in one_error_line(err)
    assert failure(out)["stage"] == "ingest"


def test_a_source_listed_twice_is_a_warning(
    tmp_path: Path, good_source: Path, prefect_harness: None
) -> None:
    sources = [{"path": str(good_source)}, {"path": "./alpaca.jsonl", "name": "again"}]
    spec = write_spec(tmp_path, yaml.safe_dump({"name": "twice", "sources": sources}))
    code, out, err = cli("build", str(spec), "--store", str(tmp_path / "store"), "--json")
    assert code == 0, err
    assert f"warning: {spec}: sources[1] repeats sources[0] ({good_source})" in err
    assert json.loads(out)["rows"]["in"] == 10  # read twice, as the spec says


def test_an_invalid_option_value_is_one_line(tmp_path: Path, good_source: Path) -> None:
    spec = write_spec(tmp_path, f"name: x\nsources: [{{path: {good_source}}}]\n")
    store = str(tmp_path / "store")
    code, out, err = cli("build", str(spec), "--runner", "nope", "--store", store, "--json")
    assert code == 2
    assert one_error_line(err) == "error: Invalid value: --runner must be threads or dask"
    assert failure(out)["error"] == "Invalid value: --runner must be threads or dask"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["export", "sft", "--out", "x"],
            "Missing option '--format' (see aligncurate export --help)",
        ),
        (["versions", "sft", "--bogus"], "No such option: --bogus"),
        (["generate", "--model", "m", "--in", "i", "--out", "o", "--n", "0"], "'--n'"),
        (["bogus"], "No such command 'bogus' (see aligncurate --help)"),
    ],
)
def test_argument_errors_are_one_line(args: list[str], message: str) -> None:
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert message in one_error_line(err)
    code, out, err = cli(*args, "--json")
    assert code == 2 and message in failure(out)["error"]  # type: ignore[operator]


# -- the spec ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ['"yes"', "1", '"on"', '"true"'])
def test_spec_booleans_are_strict(tmp_path: Path, good_source: Path, value: str) -> None:
    spec = write_spec(
        tmp_path,
        f"name: x\nsources: [{{path: {good_source}}}]\nstages:\n  - normalize: {{nfc: {value}}}\n",
    )
    code, out, err = cli("build", str(spec), "--store", str(tmp_path / "store"), "--json")
    assert code == 2
    assert "stages[0] (normalize): nfc: expected true or false, got" in one_error_line(err)
    assert failure(out)["stage"] == "spec"


def test_a_yaml_error_names_the_spec_file_and_line(tmp_path: Path, good_source: Path) -> None:
    spec = write_spec(tmp_path, f"name: x\nsources: [{{path: {good_source}\nstages: []\n")
    code, out, err = cli("build", str(spec), "--store", str(tmp_path / "store"), "--json")
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: {spec}: line 3, column 7: invalid YAML: ")
    assert "<unicode string>" not in line
    assert failure(out) == {
        "ok": False,
        "error": line.removeprefix("error: "),
        "stage": "spec",
        "file": str(spec),
        "line": 3,
    }


def test_a_symlink_loop_is_named_as_such(tmp_path: Path) -> None:
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop.name)
    broken = tmp_path / "broken.jsonl"
    broken.symlink_to("gone.jsonl")
    missing = tmp_path / "gone.jsonl"
    for source, problem in [
        (loop, f"{loop} is a symlink loop"),
        (broken, f"{missing} does not exist"),
    ]:
        spec = write_spec(tmp_path, f"name: x\nsources: [{{path: {source.name}}}]\n")
        code, _, err = cli("build", str(spec), "--store", str(tmp_path / "store"))
        assert code == 2
        assert one_error_line(err) == f"error: {spec}: sources[0].path: {problem}"


# -- read and write commands -------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> str:
    datasets = DatasetStore(str(tmp_path / "store"))
    commit_build(datasets, "sft", tmp_path, canonical_table(ids("a", 4)))
    return datasets.root


@pytest.mark.parametrize("command", [["export", "sft", "--format", "jsonl"], ["report", "sft"]])
def test_out_that_is_a_file_is_one_line(tmp_path: Path, store: str, command: list[str]) -> None:
    target = tmp_path / "taken"
    target.write_text("mine")
    code, out, err = cli(*command, "--out", str(target), "--store", store, "--json")
    assert code == 2
    assert (
        one_error_line(err)
        == f"error: Invalid value: --out {target} is a file; it must be a folder"
    )
    assert failure(out)["error"] == f"Invalid value: --out {target} is a file; it must be a folder"
    assert target.read_text() == "mine"


def test_every_json_command_prints_the_failure_object(tmp_path: Path, store: str) -> None:
    missing = str(tmp_path / "missing")
    taken = tmp_path / "taken"
    taken.write_text("mine")
    failing = {
        "build": [missing + ".yaml"],
        "versions": ["nope"],
        "inspect": ["nope"],
        "diff": ["nope@0", "nope@1"],
        "report": ["nope", "--out", missing],
        "tag": ["nope@0", "gold"],
        "files": ["nope"],
        "doctor": ["nope"],
        "gc": ["nope"],
        "export": ["nope", "--format", "jsonl", "--out", missing],
        "generate": ["--model", missing, "--in", missing, "--out", missing],
        "schedule": [],  # neither SPEC nor --list
        "train": ["nope", "--model", missing, "--out", missing],
        "evaluate": ["--model", missing, "--baseline", missing, "--questions", missing],
        "fact-world": ["--out", str(taken)],
    }
    group = typer.main.get_command(app)
    with_json = {
        name
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        if any("--json" in p.opts for p in command.params)
    }
    assert with_json <= set(failing), "a new --json command: add a failing call here"
    for name in sorted(with_json):
        args = failing[name]
        command = group.commands[name]  # type: ignore[attr-defined]
        if any("--store" in p.opts for p in command.params):
            args = [*args, "--store", store]
        code, out, err = cli(name, *args, "--json")
        assert code == 2, (name, out, err)
        line = one_error_line(err)
        assert failure(out)["error"] == line.removeprefix("error: "), name


def test_verbose_adds_the_traceback(store: str) -> None:
    code, _, err = cli("versions", "nope", "--store", store, "--verbose")
    assert code == 2
    assert err.startswith("Traceback") and "StoreError" in err
    assert err.splitlines()[-1] == f"error: unknown dataset 'nope' in store {store} (known: sft)"


# -- credentials -------------------------------------------------------------------------


def test_an_endpoint_password_is_redacted_everywhere(tmp_path: Path) -> None:
    env = {
        "AWS_ENDPOINT_URL": f"http://admin:hunter2pw@127.0.0.1:{free_port()}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "admin",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-key-value",
        "AWS_REGION": "us-east-1",
    }
    code, out, err = cli(
        "versions", "sft", "--store", "s3://bucket/x", "--json", "--verbose", env=env
    )
    assert code == 2
    assert "cannot reach the S3 endpoint http://admin:***@127.0.0.1" in err
    assert "Traceback" in err  # the chained client error, redacted too
    for secret in ("hunter2pw", "s3cr3t-key-value"):
        assert secret not in out and secret not in err
    assert "admin:***@" in failure(out)["error"]  # type: ignore[operator]


def test_run_logs_are_redacted_on_the_console_and_in_the_run_log(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    """A build whose source is a URL with a password, in a file named as the secret key:
    the flow fails, and Prefect's records of it (tracebacks included) pass the filters the
    CLI installs on the way to the console (``--verbose`` shows them) and to the run log on
    the API. As a path, the URL reads ``http:/admin:<password>@...``: redacted too."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp

    password, secret = "pw-of-the-source", "s3cr3t-key-of-the-run"
    source = f"http://admin:{password}@127.0.0.1:{free_port()}/{secret}.jsonl"
    spec = write_spec(tmp_path, f"name: leak\nsources: [{{path: '{source}'}}]\n")
    env = {**api_env, "AWS_SECRET_ACCESS_KEY": secret}
    start = datetime.now(UTC)
    proc = build_process(spec, tmp_path / "store", env, "--verbose")
    assert proc.returncode == 2, proc.stderr[-3000:]

    async def run_log() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(timestamp=LogFilterTimestamp(after_=start)))
        return [log.message for log in logs]

    logged = "\n".join(anyio.run(run_log))
    for text in (proc.stderr, logged):  # the failure's records reached both, redacted
        assert "Finished in state Failed" in text and "Traceback" in text, text[-3000:]
        assert "admin:***@127.0.0.1" in text and "/***.jsonl" in text, text[-3000:]
    for text in (proc.stdout, proc.stderr, logged):
        assert password not in text and secret not in text


def test_redact_hides_url_passwords_and_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.uris import redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    text = "GET http://admin:pw@h:9/b, s3://bucket/x, https://user@h/, key wJalrXUtnFEMI, tok"
    assert redact(text, ["tok"]) == (
        "GET http://admin:***@h:9/b, s3://bucket/x, https://user@h/, key ***, tok"
    )  # a secret shorter than 4 characters is not hunted for
    assert redact(str(Path("http://admin:pw@h:9/x"))) == "http:/admin:***@h:9/x"  # as a path
