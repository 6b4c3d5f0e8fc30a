"""The real client of the manifest: open_clip_train trains on the pruned shards alone.

The score table here is built from the pool with a seeded random score (no
proxy training or Ray: what is under test is the manifest and its consumer),
then ``write_manifest`` prunes it exactly as ``diffin prune`` does.
"""

from __future__ import annotations

import json
import os
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
from pipeline.prune.datacomp import UID_DTYPE, array_to_uids
from pipeline.prune.manifest import write_manifest
from pipeline.rundir import RunDir
from pipeline.score.table import build_part, read_table, write_table


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("oc")
    pool = make_pool(str(root / "pool"), SynthConfig(samples=64, shard_size=32, eval_samples=8))
    rows = [s for u in resolve_shards(pool["train_data"]) for s in iter_shard(u)]
    rng = np.random.default_rng(0)
    n_ok = sum(r.ok for r in rows)
    table = build_part(rows, {"diffin": rng.normal(size=n_ok)}, ["diffin"])
    run = str(root / "run")
    write_table(table, RunDir(run).scores)
    m = write_manifest(PruneConfig(run=run, keep=0.75, method="diffin", shard_size=16))
    return {**m, "root": root}


def test_uids_npy_is_datacomp_format(manifest):
    out = Path(manifest["dir"])
    # exactly how DataComp's tooling reads a subset file
    arr = np.load(out / "uids.npy", allow_pickle=False)
    assert arr.dtype == UID_DTYPE == np.dtype("u8,u8")
    assert arr.ndim == 1 and len(arr) == manifest["kept"] == manifest["unique_uids"]
    assert (np.sort(arr) == arr).all()  # sorted, as DataComp's np.isin-based filters expect
    keep = read_table(str(out / "keep.parquet")).column("uid").to_pylist()
    back = array_to_uids(arr)
    assert back == sorted(keep)
    # and independently of our helper: hex of the two 64-bit halves
    assert [f"{int(a):016x}{int(b):016x}" for a, b in arr.tolist()] == sorted(keep)


def test_open_clip_train_on_the_manifest(manifest):
    pytest.importorskip("open_clip_train")
    root = manifest["root"]
    out = Path(manifest["dir"])
    mj = json.loads((out / "manifest.json").read_text())
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert mj["shards"] == len(sizes) >= 2 and mj["train_num_samples"] == sum(sizes.values())
    model_dir = save_config_dir("diffin-tiny", root / "model")
    logs = root / "logs"
    cmd = [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--model",
        f"local-dir:{model_dir}",
        "--dataset-type",
        "webdataset",
        "--train-data",
        mj["train_data"],
        "--train-num-samples",
        str(mj["train_num_samples"]),
        "--device",
        "cpu",
        "--workers",
        "1",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--seed",
        "0",
        "--logs",
        str(logs),
        "--name",
        "retrain",
        "--report-to",
        "",
        "--save-frequency",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = logs / "retrain" / "checkpoints" / "epoch_1.pt"
    assert ckpt.is_file() and ckpt.stat().st_size > 0
    log = (logs / "retrain" / "out.log").read_text()
    # it saw every kept sample: the last step reports N/N
    n = mj["train_num_samples"]
    assert f"[{n}/{n} (100%)]" in log, log[-2000:]
