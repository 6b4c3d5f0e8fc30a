"""Importing a run written by a real ``open_clip_train.main``, then scoring with it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.data.shards import resolve_shards, shard_names
from pipeline.data.synth import SynthConfig, make_pool
from pipeline.errors import ConfigError
from pipeline.influence.estimator import checkpoint_weights
from pipeline.model.factory import save_config_dir
from pipeline.rundir import RunDir
from pipeline.score.config import ScoreConfig
from pipeline.score.directions import ensure_directions
from pipeline.score.table import read_table
from pipeline.score.trajectory import load_trajectory
from pipeline.score.worker import ShardScorer
from pipeline.train.config import TrainConfig
from pipeline.train.importer import import_open_clip_run, parse_params

SAMPLES, BATCH, EPOCHS, WARMUP, LR = 96, 8, 2, 2, 1e-3
SETS = dict(target_size=16, reference_size=15, grad_batches=2, batch_size=BATCH, threads=1)


def _open_clip_train(root: Path, samples: int, shard_size: int, *args: str) -> str:
    """A real open_clip_train run on a generated pool (diffin-tiny through ``local-dir:``):
    ``args`` are its batch, schedule and epoch flags. Returns the pool's shard pattern."""
    pytest.importorskip("open_clip_train")
    pool = make_pool(
        str(root / "pool"),
        SynthConfig(samples=samples, shard_size=shard_size, eval_samples=8, image_size=32),
    )
    model_dir = save_config_dir("diffin-tiny", root / "model")
    cmd = [
        sys.executable, "-m", "open_clip_train.main",
        "--model", f"local-dir:{model_dir}",
        "--dataset-type", "webdataset",
        "--train-data", pool["train_data"],
        "--train-num-samples", str(samples),
        "--device", "cpu",
        "--workers", "1",
        *args,
        "--seed", "0",
        "--logs", str(root / "logs"),
        "--name", "oc",
        "--report-to", "",
        "--save-frequency", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return pool["train_data"]


@pytest.fixture(scope="module")
def oc_run(tmp_path_factory) -> dict:
    """Two epochs of open_clip_train on a generated pool."""
    root = tmp_path_factory.mktemp("oc_import")
    data = _open_clip_train(
        root, SAMPLES, 32,
        "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--lr", str(LR),
        "--warmup", str(WARMUP),
    )  # fmt: skip
    return {"dir": str(root / "logs" / "oc"), "data": data, "root": root}


def _open_clip_lr(step: int, total: int) -> float:
    """The rate open_clip_train's own scheduler sets at ``step`` (independent of diffin's)."""
    from open_clip_train.scheduler import cosine_lr

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    return cosine_lr(opt, LR, WARMUP, total)(step)


def test_parse_params():
    text = (
        "batch_size: 8\nlr: 0.001\nmodel: local-dir:/x/y\npretrained: \nwandb: False\nfoo: None\n"
    )
    p = parse_params(text)
    assert p == {
        "batch_size": 8,
        "lr": 0.001,
        "model": "local-dir:/x/y",
        "pretrained": "",
        "wandb": False,
        "foo": None,
    }


def test_import_records_open_clip_steps_rates_and_weights(oc_run, tmp_path, caplog):
    run = str(tmp_path / "run")
    # a native training's options, left from before: not the import's (review: `diffin
    # status` offered to start that training again after an import was killed)
    Path(run, "trajectory").mkdir(parents=True)
    Path(run, "trajectory", "request.json").write_text("{}")
    with caplog.at_level("WARNING", logger="pipeline.train.importer"):
        rec = import_open_clip_run(oc_run["dir"], TrainConfig(data=oc_run["data"], run=run, **SETS))
    assert not Path(run, "trajectory", "request.json").exists()
    assert "cannot confirm" not in caplog.text  # the cosine rates tell the step count
    per_epoch = SAMPLES // BATCH
    total = per_epoch * EPOCHS
    assert rec["model"] == "diffin-tiny"  # the local-dir architecture, by its registered name
    recorded = json.loads(Path(run, "run.json").read_text())["train"]
    assert recorded["seconds"] == rec["seconds"]  # walkthrough: the report's row was blank
    assert rec["steps"] == total and rec["n_train"] == SAMPLES and rec["batch_size"] == BATCH
    assert [c["step"] for c in rec["checkpoints"]] == [per_epoch * k for k in (1, 2)]
    assert rec["optimizer"]["name"] == "adamw"
    assert "base rate" in rec["optimizer"]["lr_in_weights"]
    for c, src in zip(rec["checkpoints"], rec["imported"]["checkpoints"], strict=True):
        assert c["lr"] == pytest.approx(_open_clip_lr(c["step"], total), rel=1e-12, abs=1e-15)
        # the rate open_clip_train stored (that of the epoch's last step) agrees
        assert src["saved_lr"] == pytest.approx(_open_clip_lr(c["step"] - 1, total), rel=1e-9)
        source = Path(src["url"]).read_bytes()
        assert hashlib.sha256(source).hexdigest() == src["sha256"]
        mine = Path(RunDir(run).checkpoint(c["step"])).read_bytes()
        assert hashlib.sha256(mine).hexdigest() == c["sha256"]
        theirs = torch.load(src["url"], weights_only=True)["state_dict"]
        ours = torch.load(RunDir(run).checkpoint(c["step"]), weights_only=True)
        assert set(theirs) <= set(ours)
        assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert rec["checkpoints"][-1]["lr"] == pytest.approx(0.0, abs=1e-15)  # cosine ends at 0
    assert not math.isclose(rec["checkpoints"][0]["lr"], 0.0)
    # Scoring weighs each epoch by the rates its steps ran at (params.txt's schedule): the
    # last checkpoint's own rate is 0, and it used to give that whole epoch no weight.
    traj = load_trajectory(RunDir(run))
    weights = checkpoint_weights(traj.checkpoints, traj.n_train)
    epochs = [range(0, per_epoch), range(per_epoch, total)]
    want = [sum(_open_clip_lr(s, total) for s in steps) / SAMPLES for steps in epochs]
    assert [w.first for w in weights] == pytest.approx(want, rel=1e-9)
    assert weights[-1].first > 0.2 * weights[0].first
    for name in ("reference", "target", "grad_batches"):
        assert Path(RunDir(run).set_file(name)).is_file()


def test_wrong_steps_per_epoch_is_refused(oc_run, tmp_path, monkeypatch):
    import pipeline.train.importer as importer

    def no_reading(*args, **kwargs):  # refused before the pool is read (hours, at scale)
        raise AssertionError("the pool was read before the first checkpoint was checked")

    monkeypatch.setattr(importer, "load_pool", no_reading)
    cfg = TrainConfig(data=oc_run["data"], run=str(tmp_path / "run"), **SETS)
    # An interrupted training in the same run: a refused import must leave it resumable.
    resume = Path(RunDir(cfg.run).resume_state)
    resume.parent.mkdir(parents=True)
    resume.write_bytes(b"an interrupted training's state")
    with pytest.raises(ConfigError, match="steps per epoch"):
        import_open_clip_run(oc_run["dir"], cfg, steps_per_epoch=SAMPLES // BATCH - 1)
    assert resume.read_bytes() == b"an interrupted training's state"


def test_diffin_train_import_then_score(oc_run, tmp_path):
    run = str(tmp_path / "run")
    argv = ["train", "--import", oc_run["dir"], "--data", oc_run["data"], "--run", run]
    sets = ["--target-size", "16", "--reference-size", "15", "--grad-batches", "2"]
    assert main([*argv, *sets]) == 0

    methods = ["diffin", "tracin", "loss"]
    cfg = ScoreConfig(data=oc_run["data"], run=run, methods=methods, batch_size=32, threads=1)
    rd = RunDir(run)
    traj = load_trajectory(rd)
    assert traj.model == "diffin-tiny" and len(traj.checkpoints) == EPOCHS
    ensure_directions(cfg, rd, traj)
    scorer = ShardScorer(run, cfg)
    url = resolve_shards(cfg.data)[0]
    name = shard_names([url])[0]
    counts = scorer.score_shard(url, name)
    table = read_table(rd.part(name))
    assert table.num_rows == counts["rows"] == 32
    for col in methods:
        values = np.asarray(table.column(col).to_pylist(), dtype=float)
        assert np.isfinite(values).all(), col
        assert np.abs(values).max() > 0, col


def test_the_import_preprocesses_as_open_clip_train_did(monkeypatch):
    """The tag's transform (from open_clip's registry, no download), then the run's
    --image-* overrides, as open_clip_train's create_model_and_transforms applies them."""
    import open_clip

    from pipeline.train.importer import OpenClipRun, open_clip_preprocess

    tag = {"file": "x.pt", "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "diffin-tiny", {"localtag": tag})
    params = {"pretrained": "localtag", "image_mean": [0.1, 0.2, 0.3], "image_std": None}
    got = open_clip_preprocess(OpenClipRun("r", params, {}), "diffin-tiny")
    assert got == {"mean": [0.1, 0.2, 0.3], "std": (0.5,) * 3, "interpolation": "bilinear"}
    assert open_clip_preprocess(OpenClipRun("r", {"pretrained": ""}, {}), "diffin-tiny") == {}


def test_a_local_dir_import_preprocesses_as_its_config_says(tmp_path):
    """open_clip takes a local-dir: model's transform from DIR/open_clip_config.json and
    ignores --pretrained there (review: the import used the tag's, or the default)."""
    import json

    from pipeline.model import factory
    from pipeline.train.importer import OpenClipRun, open_clip_preprocess

    cfg_dir = factory.save_config_dir("diffin-tiny", tmp_path / "cfg")
    raw = json.loads((cfg_dir / "open_clip_config.json").read_text())
    raw["preprocess_cfg"] = {"mean": [0.5] * 3, "resize_mode": "squash"}
    (cfg_dir / "open_clip_config.json").write_text(json.dumps(raw))
    params = {"model": f"local-dir:{cfg_dir}", "pretrained": "openai", "image_std": [0.2] * 3}
    got = open_clip_preprocess(OpenClipRun("r", params, {}), "diffin-tiny")
    assert got == {"mean": [0.5] * 3, "resize_mode": "squash", "std": [0.2] * 3}


def test_an_accum_freq_run_with_leftover_batches_is_imported(tmp_path):
    """13 loader batches, --accum-freq 4: 3 optimizer steps an epoch, and the leftover batch
    sets the next step's rate before epoch_1.pt is saved. Was refused whatever
    --steps-per-epoch said (review)."""
    samples, batch, accum = 100, 8, 4
    data = _open_clip_train(
        tmp_path, samples, 25,
        "--batch-size", str(batch), "--accum-freq", str(accum),
        "--epochs", "1", "--lr", "1e-3", "--warmup", "1",
    )  # fmt: skip
    cfg = TrainConfig(data=data, run=str(tmp_path / "run"), **SETS)
    record = import_open_clip_run(str(tmp_path / "logs" / "oc"), cfg)
    steps = math.ceil(samples / batch) // accum
    assert [c["step"] for c in record["checkpoints"]] == [steps]
    # One optimizer step's loss is over all accum micro-batches: that is the batch g_B and
    # H_B stand for (was 8: the loader's batch, review)
    assert record["batch_size"] == batch * accum


def test_the_default_gradient_batch_of_an_accum_freq_import_is_one_optimizer_step():
    from pipeline.train.importer import OpenClipRun

    params = {"batch_size": 16, "world_size": 2, "accum_freq": 4}
    oc = OpenClipRun("r", params, {})
    assert (oc.global_batch, oc.step_batch) == (32, 128)
    assert OpenClipRun("r", {"batch_size": 16}, {}).step_batch == 16


@pytest.mark.parametrize("spe", [0, -3, 2.5, True])
def test_a_steps_per_epoch_that_is_not_a_count_is_refused_before_the_pool_is_read(
    tmp_path, spe, monkeypatch
):
    """Review: 0 was silently replaced by the computed count, and -3 gave steps -3 and -6."""
    import pipeline.train.importer as importer

    def no_reading(*args, **kwargs):
        raise AssertionError("the pool was read")

    monkeypatch.setattr(importer, "load_pool", no_reading)
    params = {"batch_size": 8, "epochs": 1, "model": "diffin-tiny", "lr": 1e-3}
    oc = importer.OpenClipRun("r", params, {1: "x"})
    cfg = TrainConfig(data="d", run=str(tmp_path / "run"), **SETS)
    with pytest.raises(ConfigError, match=r"^steps_per_epoch: must be an integer >= 1"):
        import_open_clip_run(oc, cfg, steps_per_epoch=spe)


def test_open_clip_schedules_at_the_edges():
    from pipeline.train.importer import OpenClipRun
    from pipeline.train.schedule import open_clip_lr

    # const-cooldown with no cool-down epochs: base to the end (was ZeroDivisionError)
    params = {"lr": 0.1, "warmup": 0, "lr_scheduler": "const-cooldown", "epochs": 2}
    assert open_clip_lr({**params, "epochs_cooldown": 0}, 10, 10) == 0.1
    # --dataset-type auto picks open_clip's loader by extension: only .tar is webdataset
    base = {"batch_size": 8, "train_num_samples": 100, "dataset_type": "auto"}
    tar = OpenClipRun("r", {**base, "train_data": "/d/{0..3}.tar"}, {})
    assert tar.steps_per_epoch() == 13
    csv = OpenClipRun("r", {**base, "train_data": "/d/train.csv"}, {})
    with pytest.raises(ConfigError, match="pass --steps-per-epoch"):
        csv.steps_per_epoch()


def test_an_unregistered_local_dir_model_is_named_in_the_fix(tmp_path):
    """Walkthrough: 'pass --model' did not say that the run's own local-dir: value is
    accepted, so a user with their own architecture was stuck."""
    import json

    from pipeline.errors import ConfigError
    from pipeline.model import factory
    from pipeline.train.importer import OpenClipRun, resolve_model

    cfg_dir = factory.save_config_dir("diffin-tiny", tmp_path / "custom")
    path = cfg_dir / "open_clip_config.json"
    cfg = json.loads(path.read_text())
    cfg["model_cfg"]["embed_dim"] += 16  # an architecture no registered name has
    path.write_text(json.dumps(cfg))
    oc = OpenClipRun("oc", {"model": f"local-dir:{cfg_dir}"}, {1: "oc/checkpoints/epoch_1.pt"})
    with pytest.raises(ConfigError, match=f"pass --model local-dir:{cfg_dir} "):
        resolve_model(oc, None)
    assert resolve_model(oc, f"local-dir:{cfg_dir}") == f"local-dir:{cfg_dir}"


def test_import_paths_that_are_no_run_folder_are_named(tmp_path):
    """Walkthrough: a checkpoint file given to --import raised NotADirectoryError."""
    from pipeline.train.importer import read_open_clip_run

    ckpt = tmp_path / "epoch_3.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"it is a file; .*\(a checkpoint file alone is --pre"):
        read_open_clip_run(str(ckpt))
    with pytest.raises(ConfigError, match="no such folder"):
        read_open_clip_run(str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="no params.txt in it"):
        read_open_clip_run(str(tmp_path))


def test_a_run_whose_local_dir_model_folder_is_gone_is_a_configuration_error(tmp_path):
    """Walkthrough: a moved or copied run (its local-dir: folder gone) raised
    FileNotFoundError, with --model and without."""
    from pipeline.train.importer import OpenClipRun, open_clip_preprocess, resolve_model

    gone = tmp_path / "gone-small"
    oc = OpenClipRun("oc", {"model": f"local-dir:{gone}"}, {1: "oc/checkpoints/epoch_1.pt"})
    with pytest.raises(ConfigError, match="restore that folder, and pass --model NAME"):
        resolve_model(oc, None)
    assert resolve_model(oc, "diffin-tiny") == "diffin-tiny"
    with pytest.raises(ConfigError, match=f"model folder {gone} .* is not readable here"):
        open_clip_preprocess(oc, "diffin-tiny")


def test_a_step_count_the_saved_rates_cannot_check_is_warned_about(oc_run, tmp_path, caplog):
    """Walkthrough: without the optimizer's state (or on a constant schedule) any
    --steps-per-epoch was taken silently, even one params.txt contradicts."""
    import shutil

    src = Path(oc_run["dir"])
    copy = tmp_path / "oc"
    shutil.copytree(src, copy)
    for ckpt in (copy / "checkpoints").glob("epoch_*.pt"):
        state = torch.load(ckpt, weights_only=True)
        state.pop("optimizer")
        torch.save(state, ckpt)
    cfg = TrainConfig(data=oc_run["data"], run=str(tmp_path / "run"), **SETS)
    per_epoch = SAMPLES // BATCH
    with caplog.at_level("WARNING", logger="pipeline.train.importer"):
        rec = import_open_clip_run(str(copy), cfg, steps_per_epoch=per_epoch + 1)
    assert [c["step"] for c in rec["checkpoints"]] == [(per_epoch + 1) * k for k in (1, 2)]
    text = caplog.text
    assert f"--steps-per-epoch {per_epoch + 1}, but params.txt implies {per_epoch}" in text
    assert "no checkpoint's saved learning rate confirms" in text
    assert "(no optimizer state saved)" in text and text.count("confirms") == 1  # once


def test_which_schedules_tell_the_step_count():
    """A constant schedule's rate is the same one step later; a cosine's differs even where
    it is tiny (the end of a long run), which a 1e-12 absolute tolerance missed (review)."""
    from pipeline.train.importer import OpenClipRun, _rate_blind

    def blind(scheduler: str, spe: int, epochs: int, epoch: int, warmup: int = 0) -> bool:
        params = {"lr": 5e-4, "warmup": warmup, "lr_scheduler": scheduler, "epochs": epochs}
        oc = OpenClipRun("r", params, {})
        return _rate_blind(oc, epoch, spe, oc.lr(epoch * spe - 1, epochs * spe))

    assert blind("const", 100, 4, 2)
    assert not blind("cosine", 100, 4, 2)
    assert not blind("cosine", 12000, 32, 32, warmup=2000)  # the rate is below 1e-12 there
    assert not blind("cosine", 1000, 32, 1)  # no warm-up: moves by ~1/(E spe^2) a step
