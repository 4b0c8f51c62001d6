"""A real S3-compatible server on loopback for tests and benchmarks: ``moto_server``
(moto[server]) with request signing enforced, so a bad credential is refused as on AWS."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
REGION = "us-east-1"
_BOOT = 4  # unauthenticated calls moto allows: create user, policy, key, bucket


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def env(self, **overrides: str) -> dict[str, str]:
        """The ``AWS_*`` variables a client of this server sets."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            **overrides,
        }

    def client(self) -> object:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def list(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2")  # type: ignore[attr-defined]
        return [
            o["Key"]
            for p in pages.paginate(Bucket=self.bucket, Prefix=prefix)
            for o in p.get("Contents", [])
        ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_s3(log: Path, bucket: str = "aligncurate") -> Iterator[S3Server]:
    """Start ``moto_server`` on a free port with authentication on, create an IAM user
    with an access key and a bucket, yield the server; stop it at the end."""
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_BOOT)}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text()[-2000:]
                    raise RuntimeError(f"moto_server did not start: {tail}") from exc
                time.sleep(0.2)
        boot = {"endpoint_url": endpoint, "region_name": REGION}
        iam = boto3.client("iam", aws_access_key_id="boot", aws_secret_access_key="boot", **boot)
        iam.create_user(UserName="aligncurate")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="aligncurate", PolicyName="all", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="aligncurate")["AccessKey"]
        server = S3Server(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"])
        server.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
