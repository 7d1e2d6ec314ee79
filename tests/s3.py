"""A real S3 endpoint for tests: ``moto`` in server mode on 127.0.0.1, one per test session.

Use the ``s3_server`` fixture; it yields ``{"endpoint_url", "key", "secret", "region"}`` — the keys
of the S3 settings of both configs (training ``data.s3``, curation ``s3``). Nothing
is written to the process environment: pass these values explicitly, e.g. to fsspec/s3fs as
``storage_options={"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...,
"region_name": ...}}`` or to boto3 as ``endpoint_url=..., aws_access_key_id=...``. Create your
own bucket (a unique name per test) so tests stay independent; with s3fs, `fs.mkdir("bucket")`
works because the region is not us-east-1 (which rejects an explicit location constraint).
"""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).read()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto S3 server at {url} did not come up within {timeout:.0f}s")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
    """A local moto S3 server; fake credentials, torn down at the end of the session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(endpoint)
        yield {
            "endpoint_url": endpoint,
            "key": "testing-access-key",
            "secret": "testing-secret-key",
            "region": "eu-west-1",
        }
    finally:
        server.stop()
