"""docker-compose.yml against what the code reads: service names, ports, environment.

No Docker engine runs here. ``docker-compose config -q`` (Debian's docker-compose, installed
by ``make system-deps``) validates the file; without the binary that test skips (fails under
CI). The rest parses the YAML and compares it with the names the code and the other files
use.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from system_deps import require

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _defaults(value: str) -> str:
    """``${VAR:-default}`` as compose resolves it with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: _defaults(str(v)) for k, v in service.get("environment", {}).items()}


def _port_flag(command: list[str] | str, flag: str = "--port") -> int:
    text = command if isinstance(command, str) else " ".join(command)
    match = re.search(rf"{flag}[ =]:?(\d+)", text)
    assert match, f"no {flag} in {text}"
    return int(match.group(1))


def _published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


@pytest.mark.parametrize("profiles", [[], ["gpu"], ["cpu"]])
def test_docker_compose_config_is_valid(profiles: list[str]) -> None:
    require("docker-compose")
    flags = [x for p in profiles for x in ("--profile", p)]
    proc = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *flags, "config", "-q"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_services_health_checks_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "minio-init", "worker"} <= set(services)
    assert {"vllm-gpu", "vllm-cpu"} <= set(services)
    for name, service in services.items():
        if name != "minio-init":  # a one-shot job: its dependants wait for it to exit 0
            assert "healthcheck" in service, f"{name} has no health check"
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency]
            else:
                assert rule["condition"] == "service_completed_successfully"
    assert set(services["worker"]["depends_on"]) == {"prefect-server", "minio", "minio-init"}
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    volume = services["postgres"]["volumes"][0].split(":")
    assert volume[0] in compose["volumes"] and volume[1] == "/var/lib/postgresql/data"


def test_prefect_server_url_database_and_pool(compose: dict[str, Any]) -> None:
    services = compose["services"]
    server = services["prefect-server"]
    port = _port_flag(server["command"])
    assert port in _published(server)
    api = urlsplit(_env(services["worker"])["PREFECT_API_URL"])
    assert (api.hostname, api.port, api.path) == ("prefect-server", port, "/api")

    database = urlsplit(_env(server)["PREFECT_API_DATABASE_CONNECTION_URL"])
    postgres = _env(services["postgres"])
    assert database.scheme == "postgresql+asyncpg"
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == postgres["POSTGRES_PASSWORD"]
    assert database.path == "/" + postgres["POSTGRES_DB"]

    prefect_yaml = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pool = prefect_yaml["definitions"]["work_pool"]["name"]
    command = services["worker"]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == pool
    from pipelines.schedule import DEFAULT_POOL

    assert pool == DEFAULT_POOL


def test_worker_environment_is_what_the_code_reads(compose: dict[str, Any]) -> None:
    from storage.dataset import ENV_STORE
    from storage.gencache import CACHE_ENV
    from storage.s3 import ENV_KEYS
    from storage.uris import WORK_ENV

    services = compose["services"]
    env = _env(services["worker"])
    aws = {k for k in env if k.startswith("AWS_")}
    assert aws <= set(ENV_KEYS), f"variables the store does not read: {aws - set(ENV_KEYS)}"
    assert {"AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_ACCESS_KEY_ID"} <= aws
    assert {ENV_STORE, CACHE_ENV, WORK_ENV, "ALIGNCURATE_HOME"} <= set(env)

    # The store is the bucket minio-init creates, on the MinIO service's API port.
    store = urlsplit(env[ENV_STORE])
    assert store.scheme == "s3"
    init = " ".join(services["minio-init"]["command"])
    assert f"store/{store.hostname}" in init
    endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
    minio = services["minio"]
    assert endpoint.hostname == "minio"
    assert endpoint.port == _port_flag(minio["command"], "--address")
    assert endpoint.port in _published(minio)
    assert endpoint.scheme == "http" and env["AWS_ALLOW_HTTP"] == "true"
    minio_env = _env(minio)
    assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]

    # Local folders on the worker's volume; deployments run from $ALIGNCURATE_HOME.
    mount = services["worker"]["volumes"][0].split(":")[1]
    assert env[CACHE_ENV].startswith(mount + "/") and env[WORK_ENV].startswith(mount + "/")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and env["ALIGNCURATE_HOME"] == "/app"
    assert "ALIGNCURATE_HOME=/app" in dockerfile
    prefect_yaml = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pull = prefect_yaml["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $ALIGNCURATE_HOME }}"


def test_worker_image_and_vllm_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", dockerfile, flags=re.MULTILINE)
    assert stages[0] == ("python:3.11-slim", "base")
    for name in ("worker", "vllm-cpu"):
        build = services[name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).is_file()
        assert build["target"] in {stage for _, stage in stages}
    extras = re.search(r"ARG EXTRAS=(\S+)", dockerfile)
    assert extras is not None
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra in extras.group(1).split(","):
        assert re.search(rf"^{re.escape(extra)} = \[", pyproject, flags=re.MULTILINE), extra

    from engines.openai import OpenAIEngine

    served = inspect.signature(OpenAIEngine).parameters["served_name"].default
    gpu, cpu = services["vllm-gpu"], services["vllm-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert gpu["image"].startswith("vllm/vllm-openai:")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # Both answer as http://vllm:8000, the URL the docs and the GPU example specs use.
    docs = "".join((REPO / "docs" / f).read_text() for f in ("engines.md", "operations.md"))
    urls = set(re.findall(r"http://vllm:(\d+)", docs))
    assert urls == {"8000"}
    for service in (gpu, cpu):
        assert "vllm" in service["networks"]["default"]["aliases"]
        assert _port_flag(service["command"]) == 8000
        assert 8000 in _published(service)
        assert f"--served-model-name {served} " in " ".join(service["command"])
    judge = yaml.safe_load((REPO / "examples" / "synthesis" / "judge_nq_gpu.yaml").read_text())
    judge_urls = re.findall(r"url: (\S+)", yaml.safe_dump(judge))
    assert judge_urls and all(urlsplit(u).port == 8000 for u in judge_urls)
