"""open_clip_train retrains on a manifest that lives in object storage.

The manifest's ``train_data`` for an S3 run is the AWS CLI as a ``pipe:``
command per shard (open_clip's WebDataset loader cannot open ``s3://``
itself). Here that exact string goes to a real ``open_clip_train.main``; the
AWS CLI (a dev dependency, from the venv) reads the shards from the loopback
S3 server through ``AWS_ENDPOINT_URL``, as a user's would from AWS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.reader import iter_shard
from pipeline.data.shards import resolve_shards
from pipeline.data.synth import SynthConfig, make_pool
from pipeline.model.factory import save_config_dir
from pipeline.prune.config import PruneConfig
from pipeline.prune.manifest import write_manifest
from pipeline.rundir import RunDir, read_json
from pipeline.score.table import build_part, write_table


def test_open_clip_train_reads_the_s3_manifest_through_the_aws_cli(s3_bucket, tmp_path):
    pytest.importorskip("open_clip_train")
    bin_dir = str(Path(sys.executable).parent)
    # the venv's own CLI, not whatever else is on PATH
    assert shutil.which("aws", path=bin_dir), "the AWS CLI is a dev dependency (pyproject)"

    pool = make_pool(
        f"{s3_bucket}/pool", SynthConfig(samples=48, shard_size=24, eval_samples=8, seed=5)
    )
    rows = [s for u in resolve_shards(pool["train_data"]) for s in iter_shard(u)]
    n_ok = sum(r.ok for r in rows)
    table = build_part(rows, {"diffin": np.random.default_rng(0).normal(size=n_ok)}, ["diffin"])
    run = f"{s3_bucket}/my run"  # a space: the pipe command must quote the URL
    write_table(table, RunDir(run).scores)
    m = write_manifest(PruneConfig(run=run, keep=0.75, method="diffin", shard_size=12))
    mj = read_json(f"{m['dir']}/manifest.json")
    assert mj["train_data"].startswith("pipe:aws s3 cp 's3://")
    assert mj["shards"] >= 2 and mj["train_num_samples"] == m["kept"]

    model_dir = save_config_dir("diffin-tiny", tmp_path / "model")
    logs = tmp_path / "logs"
    # exactly the argv the manifest hands to open_clip, plus this machine's settings
    argv = list(mj["open_clip_argv"])
    argv += ["--model", f"local-dir:{model_dir}", "--device", "cpu", "--workers", "1"]
    argv += ["--batch-size", "6", "--epochs", "1", "--lr", "1e-3", "--warmup", "1"]
    argv += ["--seed", "0", "--logs", str(logs), "--name", "s3", "--report-to", ""]
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "open_clip_train.main", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (logs / "s3" / "out.log").read_text()
    n = mj["train_num_samples"]
    # every kept sample came through the pipe: the last step reports N/N
    assert f"[{n}/{n} (100%)]" in log, log[-2000:]
