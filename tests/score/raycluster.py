"""A real Ray cluster on loopback for tests, started and stopped without `ray stop`.

The cluster is started with ``ray start --block`` (head on 127.0.0.2, more
nodes on 127.0.0.3), every port chosen free, under its own ``--temp-dir``.
``ray stop`` would stop every Ray on the machine (other people's too), so
teardown kills exactly the process trees started here, plus any process whose
command line names the temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP = "127.0.0.2"
NODE_IP = "127.0.0.3"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(d))
    return out


def tree(pid: int) -> list[int]:
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def procs_naming(text: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    out.append(int(d))
        except OSError:
            continue
    return out


def kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class RayNode:
    """One `ray start --block` process and everything it spawned."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self.killed = False  # by a test, on purpose: not a start-up failure
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )

    def kill(self) -> None:
        self.killed = True
        kill_all(tree(self.proc.pid))
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


# Worker ports come from a band below the kernel's ephemeral range (32768+),
# where free_port() draws every other component's port: a worker range taken
# from the ephemeral range could contain a port picked later (seen in CI).
WORKER_BAND = (20000, 32000)
WORKER_SPAN = 60
_used_bases: set[int] = set()


def _range_free(low: int, high: int) -> bool:
    for port in range(low, high + 1):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def worker_port_range() -> int:
    """A base port whose WORKER_SPAN + 1 ports are free on every interface; never reused here."""
    import random

    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(WORKER_BAND[0], WORKER_BAND[1] - WORKER_SPAN)
        clash = any(abs(base - b) <= WORKER_SPAN for b in _used_bases)
        if not clash and _range_free(base, base + WORKER_SPAN):
            _used_bases.add(base)
            return base
    raise RuntimeError("no free worker port range in the band")


def node_ports(ip: str, taken: set[int] | None = None) -> list[str]:
    """One node's ports, all different: ports free on two addresses can be one number, and
    `ray start` refuses a node whose components share one (CI: object manager and dashboard
    agent both drew 50013)."""
    taken = set() if taken is None else taken

    def pick(host: str = "127.0.0.1") -> int:
        while (port := free_port(host)) in taken:
            pass
        taken.add(port)
        return port

    low = worker_port_range()
    return [
        f"--node-ip-address={ip}",
        f"--node-manager-port={pick(ip)}",
        f"--object-manager-port={pick(ip)}",
        f"--dashboard-agent-listen-port={pick()}",
        f"--dashboard-agent-grpc-port={pick()}",
        f"--runtime-env-agent-port={pick()}",
        f"--metrics-export-port={pick()}",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + WORKER_SPAN}",
    ]


class Cluster:
    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="diffin-ray-")
        self.port = free_port(HEAD_IP)
        self.dashboard_port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[RayNode] = []

    def start_head(self, num_cpus: int) -> RayNode:
        client_port = free_port(HEAD_IP)
        node = RayNode(
            [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.temp}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client_port}",
                f"--num-cpus={num_cpus}",
                "--object-store-memory=100000000",
                *node_ports(HEAD_IP, {self.port, self.dashboard_port, client_port}),
            ],
            Path(self.temp).parent / f"{Path(self.temp).name}-head.log",
        )
        self.nodes.append(node)
        self.wait_nodes(1)
        return node

    def add_node(self, num_cpus: int, num_gpus: int = 0) -> RayNode:
        """A node on 127.0.0.3; ``num_gpus`` declares GPUs it does not have (a Ray resource)."""
        n = self.alive_nodes()
        node = RayNode(
            [
                f"--address={self.address}",
                f"--num-cpus={num_cpus}",
                f"--num-gpus={num_gpus}",
                "--object-store-memory=100000000",
                *node_ports(NODE_IP),
            ],
            Path(self.temp).parent / f"{Path(self.temp).name}-node{len(self.nodes)}.log",
        )
        self.nodes.append(node)
        self.wait_nodes(n + 1)
        return node

    def alive_nodes(self) -> int:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard, timeout=10, raise_on_missing_output=False)
        except Exception:
            return 0
        return sum(n.state == "ALIVE" for n in nodes)

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_nodes() >= n:
                return
            for node in self.nodes:
                if not node.killed and node.proc.poll() is not None:
                    raise RuntimeError(f"ray start exited: {node.log.read_text()[-2000:]}")
            time.sleep(1)
        raise TimeoutError(f"{n} Ray node(s) not up after {timeout}s")

    @contextlib.contextmanager
    def node_added_when(
        self, said: Callable[[], bool], num_cpus: int, num_gpus: int = 0, timeout: float = 300
    ) -> Iterator[None]:
        """Add a node once ``said()`` (an autoscaler answering a pending actor), from a thread;
        on leaving, remove it and wait until the cluster is as before (later tests must not
        find its CPUs or GPUs)."""
        before = self.alive_nodes()
        added: list[RayNode] = []

        def join() -> None:
            deadline = time.time() + timeout
            while time.time() < deadline and not said():
                time.sleep(0.5)
            added.append(self.add_node(num_cpus=num_cpus, num_gpus=num_gpus))

        joiner = threading.Thread(target=join, daemon=True)
        joiner.start()
        try:
            yield
        finally:
            joiner.join(timeout=timeout)
            for node in added:
                node.kill()
            deadline = time.time() + 120
            while self.alive_nodes() != before and time.time() < deadline:
                time.sleep(1)
        assert self.alive_nodes() == before, "the added node is still in the cluster"

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        kill_all(procs_naming(self.temp))
        shutil.rmtree(self.temp, ignore_errors=True)
        for node in self.nodes:
            node.log.unlink(missing_ok=True)


def fresh_run(score_run: dict[str, Any], dst: Path) -> str:
    """A copy of the scored-ready run without any scores (directions included)."""
    shutil.copytree(score_run["run"], dst, ignore=shutil.ignore_patterns("scores*"))
    return str(dst)


def one_actor_config(
    score_run: dict[str, Any], run: str, address: str, shards: str, **changes: Any
) -> Any:
    """The fault tests' scoring config: ``shards`` (a brace range such as
    ``"{00000..00005}"``) of the pool, scored with ``random`` by one actor on the cluster
    at ``address``; ``changes`` adds to it or overrides it."""
    from pipeline.score.config import ScoreConfig

    base: dict[str, Any] = dict(
        data=score_run["data"].split("{")[0] + shards + ".tar",
        run=run,
        methods=["random"],
        address=address,
        workers=1,
    )
    return ScoreConfig(**{**base, **changes})
