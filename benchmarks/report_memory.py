"""Peak memory and time of `diffin report` on a score table of millions of rows.

    .venv/bin/python benchmarks/report_memory.py [--rows 2000000] [--scorers 5]
        [--before DIR] [--table PATH] [--out benchmarks/results/report_memory.json]

1. writes a Parquet score table like a pool's (``prune_memory.generate``: uid,
   key, shard, index, status, error, caption and one N(0, 1) column per scorer;
   2% error rows; shards of 10,000 rows), as RUN/scores.parquet of a run
   directory that holds nothing else (the shards it names do not exist: the
   galleries say so, as for a pool moved away);
2. in a fresh process, builds the report with this checkout's code and
   reports the process's peak RSS (VmHWM), the RSS after imports, and the
   seconds;
3. with ``--before DIR`` (a checkout of an earlier commit, e.g.
   ``git worktree add /tmp/before a256778``), the same with that code, in the
   same run: the ratio of the two is the claim, not the absolute figures.

Results go to benchmarks/results/report_memory.json, written up in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.prune_memory import ROW_GROUP, _rss_mb, generate  # noqa: E402

SCORERS = ("diffin", "tracin", "loss", "clip_score", "random", "el2n", "grand")


def child(run: str) -> dict:
    import logging

    logging.disable(logging.WARNING)  # one "cannot be read now" per gallery shard
    from pipeline.report.build import build_report

    base = _rss_mb()
    t0 = time.perf_counter()
    out = build_report(run, method="diffin", top=12)
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "rss_after_imports_mb": round(base, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
        "html_kb": round(os.path.getsize(out) / 1024, 1),
        "rows_line": _rows_line(out),
    }


def _rows_line(html_path: str) -> str:
    import re

    m = re.search(r"<p>(\d+ rows \(\d+ scored, \d+ errors\))", Path(html_path).read_text())
    return m.group(1) if m else ""


def measure(code: Path, run: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", "--run", run],
        capture_output=True,
        text=True,
        env=env,
        cwd=code,
    )
    if proc.returncode:
        raise SystemExit(f"report with {code} failed:\n{proc.stderr[-3000:]}")
    return {"code": str(code), **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--scorers", type=int, default=5, help=f"score columns (of {SCORERS})")
    ap.add_argument("--before", type=Path, help="a checkout of earlier code to measure beside")
    ap.add_argument("--table", help="reuse (or create and keep) the table at PATH")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "report_memory.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.run)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        os.makedirs(run)
        table = os.path.join(run, "scores.parquet")
        methods = SCORERS[: args.scorers]
        t0 = time.perf_counter()
        if args.table and os.path.exists(args.table):
            os.symlink(os.path.abspath(args.table), table)
        else:
            generate(args.table or table, args.rows, methods=methods)
            if args.table:
                os.symlink(os.path.abspath(args.table), table)
        gen = {
            "rows": args.rows,
            "scorers": list(methods),
            "row_group": ROW_GROUP,
            "file_mb": round(os.path.getsize(table) / 2**20, 1),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print("table:", json.dumps(gen), flush=True)
        results: dict = {"table": gen}
        for name, code in [("now", ROOT)] + ([("before", args.before)] if args.before else []):
            results[name] = measure(code.resolve(), run)
            print(f"{name}:", json.dumps(results[name]), flush=True)
        if args.before:
            now, before = results["now"], results["before"]
            results["ratio_before_over_now"] = {
                "peak_rss": round(before["peak_rss_mb"] / now["peak_rss_mb"], 2),
                "peak_rss_above_imports": round(
                    (before["peak_rss_mb"] - before["rss_after_imports_mb"])
                    / (now["peak_rss_mb"] - now["rss_after_imports_mb"]),
                    2,
                ),
                "seconds": round(before["seconds"] / now["seconds"], 2),
            }
            print("ratio:", json.dumps(results["ratio_before_over_now"]), flush=True)
    write_json(args.out, results)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
