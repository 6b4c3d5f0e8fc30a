"""A real S3-protocol server on loopback (moto in server mode), for the whole process.

The endpoint reaches every consumer through the environment: ``AWS_ENDPOINT_URL``
(read by botocore whenever s3fs makes a client) and ``FSSPEC_S3_ENDPOINT_URL``
(fsspec's per-protocol config, read at import). Both are set before any Ray
worker starts, so an embedded Ray's workers inherit them. fsspec's config
already loaded in this process is updated too, and s3fs' instance cache is
cleared so no filesystem made before the server started is reused.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port) and point fsspec/s3fs at it."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec.config

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**_ENV, "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    saved_conf = dict(fsspec.config.conf.get("s3", {}))
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    _clear_s3fs_cache()
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf:
            fsspec.config.conf["s3"] = saved_conf
        else:
            fsspec.config.conf.pop("s3", None)
        _clear_s3fs_cache()
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the loopback server; returns ``s3://NAME``."""
    import fsspec

    name = f"diffin-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"
