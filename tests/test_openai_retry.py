"""The OpenAI engine's retries (tenacity) against real local HTTP servers that fail on purpose.

Each server is a real ``http.server`` on 127.0.0.1 that answers its first ``failures`` posts
with a given status and then a well-formed completions answer; the engine is used as is.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engines import EngineError, Request, Sampling
from engines.openai import OpenAIEngine
from engines.server import free_port


class FlakyServer:
    """Fails the first ``failures`` posts with ``status``, then answers each with one
    choice whose text is ``answer``; counts the posts it received."""

    def __init__(self, failures: int, status: int = 503, answer: str = "ok") -> None:
        self.failures, self.status, self.answer = failures, status, answer
        self.posts = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with owner.lock:
                    owner.posts += 1
                    fail = owner.posts <= owner.failures
                if fail:
                    code, data = owner.status, {"error": {"message": "try again later"}}
                else:
                    choice = {"text": owner.answer, "finish_reason": "stop", "logprobs": None}
                    code, data = 200, {"choices": [choice]}
                payload = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def flaky() -> Iterator[list[FlakyServer]]:
    """Servers made with ``flaky.append(FlakyServer(...))``, closed after the test."""
    servers: list[FlakyServer] = []
    yield servers
    for server in servers:
        server.close()


def one_request() -> list[Request]:
    return [Request("The capital of Veloria is", Sampling(max_tokens=4), seed=1)]


def test_retries_until_the_server_answers(flaky: list[FlakyServer], fact_world) -> None:
    server = FlakyServer(failures=3, status=503, answer="Ostra")
    flaky.append(server)
    client = OpenAIEngine(server.url, fact_world.model_dir, retries=4, backoff=0.01)
    [[sample]] = client.generate(one_request())
    assert sample.text == "Ostra"
    assert server.posts == 4  # three failures, then the answer
    assert client.sent[server.url] == 1


def test_gives_up_after_the_retries(flaky: list[FlakyServer], fact_world) -> None:
    server = FlakyServer(failures=10, status=429)
    flaky.append(server)
    client = OpenAIEngine(server.url, fact_world.model_dir, retries=2, backoff=0.01)
    with pytest.raises(EngineError, match=r"failed after 3 attempts.*HTTP 429: try again later"):
        client.generate(one_request())
    assert server.posts == 3


def test_client_errors_are_not_retried(flaky: list[FlakyServer], fact_world) -> None:
    server = FlakyServer(failures=10, status=400)
    flaky.append(server)
    client = OpenAIEngine(server.url, fact_world.model_dir, retries=4, backoff=0.01)
    with pytest.raises(EngineError, match=r"refused the request \(400\)"):
        client.generate(one_request())
    assert server.posts == 1


def test_retry_moves_to_the_next_server(flaky: list[FlakyServer], fact_world) -> None:
    good = FlakyServer(failures=0, answer="from the second")
    flaky.append(good)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: a connection error
    client = OpenAIEngine([dead, good.url], fact_world.model_dir, retries=1, backoff=0.01)
    [[sample]] = client.generate(one_request())  # request 0 goes to the dead server first
    assert sample.text == "from the second"
    assert good.posts == 1
    assert client.sent == {good.url: 1}
