"""Connecting to Ray: an address nothing answers at is refused at once, not retried for minutes."""

from __future__ import annotations

import dataclasses
import re
import socket
import time

import pytest

from pipeline.errors import ConfigError
from pipeline.raylocal import check_address, reachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reachable_tells_a_listening_port_from_a_closed_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert reachable(f"127.0.0.1:{port}") is True
        assert reachable(f"ray://127.0.0.1:{port}") is True
    assert reachable(f"127.0.0.1:{_closed_port()}") is False
    assert reachable("auto") is None and reachable("127.0.0.1") is None


def test_an_address_nothing_answers_at_is_a_config_error_before_any_work(tmp_path, capsys):
    """Walkthrough: `score --address 127.0.0.1:9999` in a Ray job retried the GCS for more
    than 5 minutes while the job showed RUNNING."""
    from pipeline.cli import main

    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(ConfigError, match=f"address: nothing answers at {address}"):
        check_address(address)
    check_address(None)
    check_address("auto")
    t0 = time.time()
    argv = ["score", "--data", str(tmp_path), "--run", str(tmp_path / "run"), "--address", address]
    (tmp_path / "00000.tar").write_bytes(b"")  # a pattern that resolves: the address decides
    assert main(argv) == 2
    assert f"nothing answers at {address}" in capsys.readouterr().err
    assert time.time() - t0 < 30


def test_distributed_training_refuses_the_address_before_reading_the_pool(tmp_path):
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    address = f"127.0.0.1:{_closed_port()}"
    cfg = TrainConfig(data=str(tmp_path / "none.tar"), run=str(tmp_path / "r"), workers=1)
    with pytest.raises(ConfigError, match="^address: nothing answers"):
        train(dataclasses.replace(cfg, address=address))


def test_a_stale_ray_address_in_the_environment_is_refused_by_name(monkeypatch):
    """Review: only --address was checked; a RAY_ADDRESS exported in a shell and long dead
    gave the minutes of ray.init retries the check exists to prevent."""
    stale = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", stale)
    with pytest.raises(
        ConfigError, match=rf"^address \(from RAY_ADDRESS\): nothing answers at {stale}"
    ):
        check_address(None)
    with socket.socket() as server:  # an explicit --address is the one asked
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_address(f"127.0.0.1:{server.getsockname()[1]}")


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("http://127.0.0.1:8265", "is an HTTP address"),
        ("https://head:8265", "is an HTTP address"),
        ("127.0.0.1", "is not HOST:PORT"),
        ("grpc://127.0.0.1:6379", "is not HOST:PORT"),
    ],
)
def test_an_address_of_the_wrong_form_is_a_config_error(address, says):
    """Walkthrough: these ended in Ray's own ValueError traceback (an HTTP --address was
    blamed on RAY_ADDRESS), exit 1 rather than a configuration error."""
    with pytest.raises(ConfigError, match=f"^address: {re.escape(address)} {says}"):
        check_address(address)


def test_the_dashboard_port_is_refused_not_waited_on():
    """Walkthrough: --address HOST:8265 (the port the docs give `ray job submit`) answered,
    and ray.init waited on it for more than 7 minutes."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ConfigError, match="answers HTTP: that is Ray's dashboard"):
            check_address(address)
        check_address(f"ray://{address}")  # a Ray Client gateway may speak HTTP: not probed
    finally:
        server.shutdown()
        server.server_close()


def test_the_embedded_ray_is_its_own_whatever_ray_current_cluster_names():
    """A plain ray.init() joins the cluster /tmp/ray/ray_current_cluster names (a `ray start`
    on the machine), and with num_cpus fails: "When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided" (a killed cluster leaves that file behind)."""
    from pathlib import Path

    import ray

    from pipeline.raylocal import connect

    stale = Path("/tmp/ray/ray_current_cluster")
    before = stale.read_bytes() if stale.exists() else None
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text(f"127.0.0.1:{_closed_port()}")
    try:
        assert connect(None, num_cpus=1) is True
        assert ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()
        if before is None:
            stale.unlink(missing_ok=True)
        else:
            stale.write_bytes(before)


def test_a_token_auth_cluster_refusing_us_says_how_to_authenticate(tmp_path):
    """Walkthrough: `ray start --head` turns token auth on where ~/.ray/auth_token exists
    (any local ray.init writes it); `diffin score --address` then retried for 74 s and ended
    in "Failed to connect", the missing token said only in warnings."""
    import os
    import subprocess
    import sys
    import tempfile

    from tests.score.raycluster import HEAD_IP, RAY, free_port, kill_all, procs_naming, tree

    temp = tempfile.mkdtemp(prefix="diffin-ray-")
    address = f"{HEAD_IP}:{free_port(HEAD_IP)}"
    # A home of its own holding a token, as one left by an earlier local ray.init: a
    # fresh machine has none, and `ray start` with token auth then refuses to start
    # (CI on a clean clone); the user's own home is neither read nor written.
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(home)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").exists()
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--num-cpus=1",
            f"--node-ip-address={HEAD_IP}",
            f"--port={address.rsplit(':', 1)[1]}",
            f"--temp-dir={temp}",
            "--include-dashboard=false",
        ],
        env={**env, "RAY_AUTH_MODE": "token"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while not reachable(address, timeout=1) and time.time() < deadline:
            time.sleep(0.5)
        client = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from pipeline.raylocal import connect; connect({address!r}, 1)",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        kill_all(tree(head.pid) + procs_naming(temp))
    assert client.returncode != 0
    last = client.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.errors.ConfigError: address: "), last
    assert "run with RAY_AUTH_MODE=token" in last, last
