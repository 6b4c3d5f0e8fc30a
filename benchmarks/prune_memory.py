"""Peak memory of the prune selection on a score table of 10 million rows.

    .venv/bin/python benchmarks/prune_memory.py [--rows 10000000] [--keep 0.3] [--naive]
        [--scores normal|tied] [--out benchmarks/results/prune_memory.json]

1. writes a Parquet score table (uid, key, shard, index, status, error,
   caption, diffin) in row groups of 500,000 rows, never holding more than
   one row group;
2. in a fresh process, runs the streaming selection of ``pipeline.prune``
   (the radix-select cut of the top ``keep`` fraction, then the kept rows
   streamed into keep.parquet, and the kept uids as DataComp's uids.npy),
   and reports that process's peak RSS (``resource.getrusage``), and the RSS
   right after imports, so the difference is what selection costs;
3. with ``--naive``, the same in a fresh process with the whole table read
   into memory and sorted (``pipeline.prune.manifest.select``), for contrast.

``--scores tied`` gives every row the same score (a bucketed or rounded
column at its worst): the cut is then decided by the uid alone.

Results go to benchmarks/results/prune_memory.json and are written up in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROW_GROUP = 500_000


def _rss_mb() -> float:
    """Peak RSS of this process so far, MiB.

    VmHWM (Linux) belongs to the process image and starts afresh at exec;
    ``ru_maxrss`` would carry over the parent's peak from before the fork.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def generate(
    path: str,
    rows: int,
    seed: int = 0,
    scores: str = "normal",
    methods: tuple[str, ...] = ("diffin",),
) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.score.table import schema

    rng = np.random.default_rng(seed)
    hexchars = np.frombuffer(b"0123456789abcdef", np.uint8)
    sch = schema(list(methods))
    with pq.ParquetWriter(path, sch) as w:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
            hexed = np.empty((n, 32), np.uint8)
            hexed[:, 0::2] = hexchars[raw >> 4]
            hexed[:, 1::2] = hexchars[raw & 15]
            uid = pa.array(hexed.view("S32").ravel().astype("U32"))
            idx = np.arange(start, start + n)
            key = pc.utf8_lpad(pc.cast(pa.array(idx), pa.string()), 9, "0")
            shard = pc.binary_join_element_wise(
                "pool/",
                pc.utf8_lpad(pc.cast(pa.array(idx // 10_000), pa.string()), 5, "0"),
                ".tar",
                "",
            )
            err = rng.random(n) < 0.02
            columns = {
                m: rng.normal(size=n) if scores == "normal" else np.zeros(n) for m in methods
            }
            table = pa.table(
                {
                    "uid": uid,
                    "key": key,
                    "shard": shard,
                    "index": pa.array(idx % 10_000, pa.int32()),
                    "status": pa.array(np.where(err, "error", "ok")),
                    "error": pa.array(np.where(err, "undecodable image", None)),
                    "caption": pa.nulls(n, pa.string()),
                    **{m: pa.array(v, mask=err) for m, v in columns.items()},
                },
                schema=sch,
            )
            w.write_table(table)


def run_streaming(path: str, keep: float) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.prune.config import PruneConfig
    from pipeline.prune.datacomp import save_uid_halves, uid_halves
    from pipeline.prune.select import plan

    base = _rss_mb()
    t0 = time.perf_counter()
    sel = plan(PruneConfig(run=os.path.dirname(path), keep=keep, method="diffin"), path)
    t_plan = time.perf_counter() - t0
    peak_plan = _rss_mb()
    kept = 0
    his, los = [], []
    out = os.path.join(os.path.dirname(path), "keep.parquet")
    writer = None
    for batch in sel.kept_batches(["uid", "key", "shard", "index", "diffin"]):
        if writer is None:
            writer = pq.ParquetWriter(out, batch.schema)
        writer.write_batch(batch)
        kept += batch.num_rows
        hi, lo = uid_halves(batch.column("uid").to_pylist())
        his.append(hi)
        los.append(lo)
    if writer is not None:
        writer.close()
    n_uids = save_uid_halves(os.path.join(os.path.dirname(path), "uids.npy"), his, los)
    del his, los
    return {
        "mode": "streaming",
        "rows": sel.rows,
        "scorable": sel.scorable,
        "kept": kept,
        "unique_uids": n_uids,
        "passes": sel.info.get("selection_passes"),
        "seconds_plan": round(t_plan, 2),
        "seconds_total": round(time.perf_counter() - t0, 2),
        "rss_after_imports_mb": round(base, 1),
        "peak_rss_after_plan_mb": round(peak_plan, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
        "uids_npy_mb": round(n_uids * 16 / 2**20, 1),
        "expected_kept": int(round(keep * sel.scorable)),
        "check": kept == int(round(keep * sel.scorable)) == n_uids,
        "_": np.__version__,
    }


def run_naive(path: str, keep: float) -> dict:
    import pyarrow.parquet as pq

    from pipeline.prune.manifest import select

    base = _rss_mb()
    t0 = time.perf_counter()
    table = pq.read_table(path)
    kept = select(table, "diffin", keep)
    return {
        "mode": "naive (read_table + in-memory sort)",
        "rows": table.num_rows,
        "kept": kept.num_rows,
        "seconds_total": round(time.perf_counter() - t0, 2),
        "rss_after_imports_mb": round(base, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--naive", action="store_true", help="also measure the in-memory selection")
    ap.add_argument("--dir", default=None, help="where to write the table (default: a temp dir)")
    ap.add_argument("--table", default=None, help="reuse (or create and keep) the table at PATH")
    ap.add_argument("--scores", choices=["normal", "tied"], default="normal")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_memory.json"))
    ap.add_argument("--child", choices=["streaming", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = run_streaming if args.child == "streaming" else run_naive
        print(json.dumps(fn(args.path, args.keep)))
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = args.table or os.path.join(tmp, "scores.parquet")
        t0 = time.perf_counter()
        reused = os.path.exists(path)
        if not reused:
            generate(path, args.rows, scores=args.scores)
        gen = {
            "reused_table": reused,
            "rows": args.rows,
            "row_group": ROW_GROUP,
            "file_mb": round(os.path.getsize(path) / 2**20, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "generator_peak_rss_mb": round(_rss_mb(), 1),
        }
        print("generated:", json.dumps(gen), flush=True)
        results = {"table": {**gen, "scores": args.scores}, "keep": args.keep}
        for mode in ["streaming"] + (["naive"] if args.naive else []):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--path",
                    path,
                    "--keep",
                    str(args.keep),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[mode].pop("_", None)
            print(f"{mode}:", json.dumps(results[mode]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
