"""Connecting to Ray: a given cluster, the job's cluster, or an embedded local one.

Shared by the two distributed stages (scoring actors, proxy training on Ray
Train) so both start the same embedded Ray when no cluster is named.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

import ray

from pipeline.errors import ConfigError, handle_sigterm, raise_terminated

# Ray advertises 127.0.0.1 as the machine's network address; another loopback
# address keeps the embedded cluster's advertised address on loopback.
LOCAL_NODE_IP = "127.0.0.2"
# Ray Train's placement-group cleaner asks the dashboard's state API whether the training
# controller still lives; the embedded Ray has no dashboard (nothing listening beyond what
# Ray needs), so it warned every few seconds for the whole training (walkthrough).
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_embedded_workers() -> None:
    """Worker setup hook of the embedded Ray: silence the cleaner's state-API warning. Its
    job (removing a dead controller's placement group) is done there by the cluster ending
    with this process.

    The cleaner finds the cluster with address "auto"; with another Ray running on the
    machine that fails ("Found multiple active Ray instances") and its thread died with a
    traceback in the training's log (walkthrough). The worker's own cluster is named."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
    try:
        if not os.environ.get("RAY_ADDRESS"):  # an empty one means "auto" to Ray
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 (a hook must not stop the worker)
        pass


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``[ray://]HOST:PORT`` address (IPv6 hosts in brackets); None for
    other forms."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def reachable(address: str, timeout: float = 5.0) -> bool | None:
    """Whether something accepts connections at a ``[ray://]HOST:PORT`` address; None for
    other forms ("auto", a bare host), which ray.init resolves itself."""
    where = _host_port(address)
    if where is None:
        return None
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError:
        return False
    return True


def speaks_http(address: str, timeout: float = 2.0) -> bool:
    """Whether the server at ``[ray://]HOST:PORT`` answers an HTTP/1 request: Ray's dashboard
    and Jobs API do, its GCS and Ray Client servers (gRPC) do not."""
    where = _host_port(address)
    got = b""
    if where is None:
        return False
    try:
        with socket.create_connection(where, timeout=timeout) as conn:
            conn.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            while len(got) < 5 and (part := conn.recv(5 - len(got))):
                got += part
    except OSError:
        pass
    return got == b"HTTP/"


def check_address(address: str | None) -> None:
    """Refuse an address ray.init cannot use, before any work: one nothing answers at (it
    would retry for minutes, logging timeouts, while a job shows RUNNING; walkthrough), one
    of the wrong form, or the dashboard's HTTP port (it would wait without end). Without
    ``address``, the ``RAY_ADDRESS`` ray.init would use (a stale export in a shell, review)."""
    given = address or os.environ.get("RAY_ADDRESS")
    if not given or given in ("auto", "local"):
        return
    where = "address" if address else "address (from RAY_ADDRESS)"
    wanted = "the cluster's GCS address, e.g. 127.0.0.1:6379, or ray://HOST:10001 for Ray Client"
    scheme, sep, _ = given.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        raise ConfigError(
            f"{where}: {given} is an HTTP address (Ray's dashboard and Jobs API, which "
            f"`ray job submit` takes); give {wanted}"
        )
    answers = reachable(given) if not sep or scheme == "ray" else None
    if answers is None:
        raise ConfigError(
            f"{where}: {given} is not HOST:PORT, ray://HOST:PORT or auto; give {wanted}"
        )
    if not answers:
        raise ConfigError(
            f"{where}: nothing answers at {given} (is the cluster up, and is this its GCS "
            "address, e.g. 127.0.0.1:6379, or ray://HOST:10001 for Ray Client?)"
        )
    # not ray://: a Ray Client port behind a gateway (Envoy, nginx) may answer HTTP too
    if not sep and speaks_http(given):
        raise ConfigError(
            f"{where}: {given} answers HTTP: that is Ray's dashboard and Jobs API (which `ray "
            f"job submit` takes), not the cluster; give {wanted}"
        )


def _token_hint() -> str:
    """Why a cluster that answers may still refuse us: Ray 2.60's `ray start --head` turns
    token authentication on where ~/.ray/auth_token exists (any local ray.init writes it),
    and a client given an address enables it only with RAY_AUTH_MODE=token (walkthrough:
    74 s of retries, the missing token said only in warnings)."""
    if os.environ.get("RAY_AUTH_MODE") or not (Path.home() / ".ray" / "auth_token").exists():
        return ""
    return (
        "; if the cluster was started with token authentication (`ray start --head` turns "
        "it on where ~/.ray/auth_token exists), run with RAY_AUTH_MODE=token"
    )


def embedded(address: str | None) -> bool:
    """Whether :func:`connect` would start a Ray of its own (sized for this machine)."""
    return not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def connect(address: str | None, num_cpus: int, quiet_train_cleaner: bool = False) -> bool:
    """Connect to ``address`` (or the job's cluster) or start an embedded Ray; True if we started it.

    ``quiet_train_cleaner``: an embedded Ray for Ray Train runs :func:`quiet_embedded_workers`
    in its workers. Only there: a job-level runtime_env keeps Ray's prestarted workers from
    serving the first tasks (about 2 s more at every start, review)."""
    ours = signal.getsignal(signal.SIGTERM) is raise_terminated
    started = _connect(address, num_cpus, quiet_train_cleaner)
    if ours:
        # Ray's core worker takes SIGTERM over in the driver: a C++ stack dump and an abort
        # (exit 134) instead of the interrupt path (walkthrough: `timeout`, `kill`, `ray
        # job stop`). Only where the `diffin` command had set its handler: a program that
        # calls the library keeps what Ray does.
        handle_sigterm()
    return started


def _connect(address: str | None, num_cpus: int, quiet_train_cleaner: bool) -> bool:
    """:func:`connect` itself, before the SIGTERM handler is set again."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit`, RAY_ADDRESS names the cluster.
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as exc:
            raise ConfigError(f"address: {exc}{_token_hint()}") from exc
        return False
    ray.init(
        # "local": a Ray of its own, even where /tmp/ray/ray_current_cluster names another
        # (a `ray start` cluster on the machine, or a stale file after one was killed),
        # which a plain ray.init() joins, or fails on ("num_cpus must not be provided")
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address=LOCAL_NODE_IP,
        log_to_driver=True,
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": f"{__name__}.quiet_embedded_workers"}
        if quiet_train_cleaner
        else None,
    )
    return True
