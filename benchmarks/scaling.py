"""Scaling of the scoring driver: actors, Ray nodes, and the driver's memory against N.

    .venv/bin/python -m benchmarks.scaling            # about 6-8 minutes on 2 CPU cores
    .venv/bin/python benchmarks/scaling.py --quick    # smaller pool, fewer repeats

1. Throughput with 1 versus 2 scoring actors (one Ray node), as a ratio.
2. Throughput with 2 actors on 1 versus 2 Ray nodes (head 127.0.0.2, second
   node 127.0.0.3 on this machine), as a ratio.
   Throughput is the summary's ``steady_samples_per_second`` (each actor's
   rate from its first shard back, so actor start-up, i.e. model loading, is
   excluded; the actors' rates added).
3. Driver peak memory (RSS) at 10,000 versus 100,000 samples: the resume scan
   over completion records and the merge, on synthetic parts, each in a fresh
   process.

The Ray cluster runs under its own temp dir with free ports and is torn down by
killing exactly the processes started here (never `ray stop`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"


# -- a Ray cluster of our own ----------------------------------------------------


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _worker_base(span: int = 60) -> int:
    """Worker ports from below the ephemeral range (32768+) that _free_port draws from."""
    import random
    import socket

    for _ in range(500):
        base = random.randrange(20000, 32000 - span)
        try:
            for port in range(base, base + span + 1):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free worker port range")


def _node_args(ip: str) -> list[str]:
    low = _worker_base()
    return [
        f"--node-ip-address={ip}",
        f"--node-manager-port={_free_port(ip)}",
        f"--object-manager-port={_free_port(ip)}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 60}",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]


class Cluster:
    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="diffin-ray-bench-")
        self.port = _free_port(HEAD_IP)
        self.address = f"{HEAD_IP}:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def _start(self, args: list[str]) -> None:
        self.procs.append(
            subprocess.Popen(
                [RAY, "start", "--block", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "RAY_AUTH_MODE": "disabled"},
            )
        )

    def head(self, cpus: int) -> None:
        self._start(
            [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.temp}",
                "--include-dashboard=false",
                f"--ray-client-server-port={_free_port(HEAD_IP)}",
                f"--num-cpus={cpus}",
                *_node_args(HEAD_IP),
            ]
        )

    def node(self, cpus: int) -> None:
        self._start([f"--address={self.address}", f"--num-cpus={cpus}", *_node_args(NODE_IP)])

    def wait(self, n_nodes: int, timeout: float = 180) -> None:
        code = (
            "import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(
                [sys.executable, "-c", code, self.address],
                capture_output=True,
                text=True,
                env={**os.environ, "RAY_AUTH_MODE": "disabled"},
            )
            if out.returncode == 0 and int(out.stdout.split()[-1]) >= n_nodes:
                return
            time.sleep(2)
        raise TimeoutError("Ray nodes did not come up")

    def stop(self) -> None:
        for p in reversed(self.procs):
            for pid in _tree(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


# -- throughput --------------------------------------------------------------------


def make_run(base: Path, samples: int, shard_size: int) -> tuple[str, str]:
    from pipeline.data.synth import SynthConfig, make_pool
    from pipeline.rundir import RunDir
    from pipeline.score.config import ScoreConfig
    from pipeline.score.directions import ensure_directions
    from pipeline.score.trajectory import load_trajectory
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    pool = make_pool(
        str(base / "pool"), SynthConfig(samples=samples, shard_size=shard_size, eval_samples=16)
    )
    run = str(base / "run")
    train(
        TrainConfig(
            data=pool["train_data"],
            run=run,
            model="diffin-tiny",
            steps=10,
            warmup=2,
            checkpoints=2,
            batch_size=32,
            target_size=32,
            reference_size=31,
            threads=1,
        )
    )
    cfg = ScoreConfig(data=pool["train_data"], run=run, methods=["diffin", "random"])
    ensure_directions(cfg, RunDir(run), load_trajectory(RunDir(run)))
    return pool["train_data"], run


def score_once(data: str, run: str, address: str, workers: int, batch: int) -> dict:
    shutil.rmtree(f"{run}/scores", ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "score",
        "--data",
        data,
        "--run",
        run,
        "--methods",
        "diffin,random",
        "--workers",
        str(workers),
        "--threads",
        "1",
        "--batch-size",
        str(batch),
        "--address",
        address,
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    s = json.loads(out.stdout)
    nodes = sorted({a["node"] for a in s["actors"]})
    return {
        "workers": workers,
        "nodes": nodes,
        "steady_samples_per_second": s["steady_samples_per_second"],
        "samples_per_second": s["samples_per_second"],
        "scoring_seconds": s["scoring_seconds"],
        "rows": s["rows"],
    }


def throughput(samples: int, shard_size: int, batch: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix="diffin-bench-"))
    try:
        data, run = make_run(base, samples, shard_size)
        res = {}
        c = Cluster()
        try:
            c.head(cpus=2)
            c.wait(1)
            res["1 node, 1 actor"] = score_once(data, run, c.address, 1, batch)
            res["1 node, 2 actors"] = score_once(data, run, c.address, 2, batch)
        finally:
            c.stop()
        c = Cluster()
        try:
            c.head(cpus=1)
            c.node(cpus=1)
            c.wait(2)
            res["2 nodes, 2 actors"] = score_once(data, run, c.address, 2, batch)
        finally:
            c.stop()
        return res
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- driver memory -------------------------------------------------------------------

_MEM_CHILD = r"""
import json, resource, sys, time
from pipeline.rundir import RunDir
from pipeline.score.driver import is_done
from pipeline.score.merge import merge_parts
from pipeline.score.progress import Progress
run, n_parts = RunDir(sys.argv[1]), int(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
names = [f"{i:05d}" for i in range(n_parts)]
recs = [is_done(run, f"/pool/{n}.tar", n, "fp") for n in names]  # the resume scan
assert all(recs)
p = Progress(n_parts, len(recs), sum(r["rows"] for r in recs))
p.close()
res = merge_parts([run.part(n) for n in names], run.scores, {}, require_records=True, fingerprint="fp")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": res["rows"], "base_mb": base / 1024, "peak_mb": peak / 1024,
                  "seconds": time.time() - t0}))
"""


def synthetic_parts(run_dir: Path, n_parts: int, rows: int) -> int:
    import numpy as np

    from pipeline.data.sample import Sample
    from pipeline.rundir import RunDir
    from pipeline.score.merge import write_part
    from pipeline.score.table import build_part

    run = RunDir(str(run_dir))
    cols = ["diffin", "diffin_t000010", "diffin_t000020", "random"]
    rng = np.random.default_rng(0)
    for p in range(n_parts):
        url = f"/pool/{p:05d}.tar"
        samples = [
            Sample(
                uid=f"{p:016x}{i:016x}",
                key=f"{p:05d}{i:04d}",
                shard=url,
                index=i,
                caption=f"a red circle at the top left of a blue background, sample {i}",
            )
            for i in range(rows)
        ]
        table = build_part(samples, {c: rng.standard_normal(rows) for c in cols}, cols)
        record = {"status": "ok", "fingerprint": "fp", "shard": url}
        write_part(table, run.part(f"{p:05d}"), record)
    return (run_dir / "scores" / "parts").stat().st_size


def memory(n_parts: int = 100) -> dict:
    out = {}
    base = Path(tempfile.mkdtemp(prefix="diffin-bench-mem-"))
    try:
        for n in (10_000, 100_000):
            d = base / str(n)
            synthetic_parts(d, n_parts, n // n_parts)
            r = subprocess.run(
                [sys.executable, "-c", _MEM_CHILD, str(d), str(n_parts)],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            if r.returncode:
                raise RuntimeError(r.stderr[-2000:])
            res = json.loads(r.stdout)
            res["table_mb"] = (d / "scores.parquet").stat().st_size / 2**20
            out[n] = res
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller pool (about 3 minutes)")
    ap.add_argument("--skip-ray", action="store_true", help="memory only")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.time()
    report: dict = {"machine": f"{os.cpu_count()} CPUs", "command": " ".join(sys.argv)}
    mem = memory()
    report["memory"] = mem
    a, b = mem[10_000], mem[100_000]
    print(
        f"driver peak RSS, resume scan + merge: 10k samples {a['peak_mb']:.0f} MB, "
        f"100k samples {b['peak_mb']:.0f} MB (ratio {b['peak_mb'] / a['peak_mb']:.2f}; "
        f"growth {b['peak_mb'] - a['peak_mb']:.0f} MB vs table {b['table_mb']:.1f} MB)"
    )
    if not args.skip_ray:
        samples, shard = (96, 8) if args.quick else (192, 8)
        tp = throughput(samples, shard, batch=8)
        report["throughput"] = tp
        one, two = tp["1 node, 1 actor"], tp["1 node, 2 actors"]
        nodes2 = tp["2 nodes, 2 actors"]
        report["ratio_2_vs_1_actors"] = round(
            two["steady_samples_per_second"] / one["steady_samples_per_second"], 2
        )
        report["ratio_2_vs_1_nodes"] = round(
            nodes2["steady_samples_per_second"] / two["steady_samples_per_second"], 2
        )
        for k, v in tp.items():
            print(
                f"{k:18s} steady {v['steady_samples_per_second']} samples/s "
                f"(overall {v['samples_per_second']}, {v['scoring_seconds']} s, nodes {v['nodes']})"
            )
        print(
            f"2 vs 1 actors: x{report['ratio_2_vs_1_actors']}; "
            f"2 vs 1 nodes (2 actors): x{report['ratio_2_vs_1_nodes']}"
        )
    report["seconds"] = round(time.time() - t0, 1)
    print(f"total {report['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
