"""Train the proxy CLIP and keep m checkpoints with their step and learning rate.

Also fixes, with the run's seed, the sets every later stage needs and stores
them in the run directory (sets.py). Training runs in this process, or on
``workers`` Ray Train workers (distributed.py); either way it resumes from
RUN/trajectory/resume.pt when an earlier run of the same config was cut short.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline import runlock
from pipeline.errors import ConfigError
from pipeline.model import factory
from pipeline.model.batches import encode_pool, pool_transform
from pipeline.provenance import provenance
from pipeline.rundir import (
    RunDir,
    check_apart,
    check_dir_target,
    exists,
    read_json,
    remove,
    write_json,
)
from pipeline.train.config import TrainConfig
from pipeline.train.loop import batch_order
from pipeline.train.progress import forget_mark, mark_preparing
from pipeline.train.runner import run_resumable
from pipeline.train.schedule import checkpoint_steps
from pipeline.train.sets import Pool, load_pool, save_sets
from pipeline.train.state import (
    ResumeState,
    adopt_fingerprint,
    clear_resume,
    cpu_state,
    fingerprint,
    load_resume,
    remove_stale_checkpoints,
    resume_fingerprint,
    save_fingerprint_parts,
)

__all__ = ["Pool", "load_pool", "train", "optimizer_record", "LR_NOTE"]

log = logging.getLogger(__name__)

LR_NOTE = "lr is the rate applied to the update theta_t -> theta_{t+1}"
ADAMW_LR = (
    "the scheduled base rate of the step (AdamW's per-coordinate step sizes are not a "
    "scalar; Diff-In's weights assume SGD, see docs/operations.md)"
)


def optimizer_record(name: str, **settings: Any) -> dict[str, Any]:
    """trajectory.json's optimizer entry, saying which rate enters the Diff-In weights."""
    lr_in_weights = "the SGD rate of the step" if name == "sgd" else ADAMW_LR
    return {"name": name, **settings, "lr_in_weights": lr_in_weights}


def _recorded_as_before(run: RunDir, fp: str, older: Callable[[], str]) -> None:
    """A finished trajectory recorded under the older hash of this same training (``--data``
    as typed, ``older``) is recorded under ``fp``, so it is found trained. ``older`` runs
    only when the recorded fingerprint is not ``fp``."""
    if not exists(run.trajectory_json):
        return
    record = read_json(run.trajectory_json)
    if record.get("fingerprint") not in (None, fp) and record["fingerprint"] == older():
        write_json(run.trajectory_json, {**record, "fingerprint": fp})


def warn_if_at_chance(losses: list[tuple[int, float]], batch_size: int) -> None:
    """Say when the proxy ended where it started: at the contrastive loss of guessing, ln B.

    A rate so high that the weights blow up without a NaN (`--lr 1000`: logit_scale
    driven to 0) left a dead proxy and exit 0 (walkthrough); its checkpoints rank at noise.
    """
    if not losses:
        return
    tail = [v for _, v in losses[-max(1, len(losses) // 10) :]]
    end, chance = sum(tail) / len(tail), math.log(batch_size)
    if end >= 0.98 * chance:
        log.warning(
            "train: the loss ended at %.3f, at or above the chance level of a batch of %d "
            "(ln %d = %.3f): "
            "the proxy has not learned, and scores from its checkpoints rank at noise; lower "
            "--lr, train longer (--steps), or check that the captions belong to the images",
            end,
            batch_size,
            batch_size,
            chance,
        )


def _already_trained(run: RunDir, fp: str) -> dict[str, Any] | None:
    """The finished record of a training with fingerprint ``fp``, when its files are all
    there (a real proxy trains for hours: the same training again is wasted)."""
    if not exists(run.trajectory_json):
        return None
    record = read_json(run.trajectory_json)
    files = [run.checkpoint(int(c["step"])) for c in record.get("checkpoints", [])]
    files += [run.set_file(name) for name in ("reference", "target", "grad_batches")]
    if record.get("fingerprint") != fp or not all(exists(f) for f in files):
        return None
    return record


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run proxy training; returns the trajectory record (also RUN/trajectory/trajectory.json)."""
    cfg.validate()
    forget_mark(RunDir(cfg.run))  # an interrupt from here is this training's, not the last's
    factory.model_config(cfg.model)
    if cfg.workers:
        from pipeline.raylocal import check_address
        from pipeline.train.distributed import check_placeable

        check_address(cfg.address)  # before the pool is read
        check_placeable(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.run)
    check_dir_target(cfg.run, "run")
    check_apart(cfg.run, "run", "run")
    # one training at a time, and no score reading its checkpoints as they are replaced
    with runlock.hold(cfg.run, ["train"], "train"):
        return _train(cfg, run)


def _train(cfg: TrainConfig, run: RunDir) -> dict[str, Any]:
    t0 = time.time()
    # The model first: a pretrained file that does not load is refused before the
    # pool is read. (load_pool draws from its own seeded generator, not torch's.)
    torch.manual_seed(cfg.seed)
    # Hashed before it is loaded: a file replaced while the pool is read must not be
    # fingerprinted as the weights training started from.
    pretrained = factory.starting_weights(cfg.model, cfg.pretrained)
    bundle = factory.create(cfg.model, pretrained=cfg.pretrained, folder_weights=True)
    model = bundle.model
    if cfg.precision == "fp64":
        model.to(torch.float64)
    pool = load_pool(cfg, pool_transform(bundle))
    images, tokens = encode_pool(pool.train, bundle)
    uids = [s.uid for s in pool.train]
    fp, parts = fingerprint(cfg, uids, images, tokens, pretrained)
    hashed: list[str] = []

    def older() -> str:  # the hash of runs recorded before --data was left out (once)
        if not hashed:
            hashed.append(fingerprint(cfg, uids, images, tokens, pretrained, with_data=True)[0])
        return hashed[0]

    _recorded_as_before(run, fp, older)
    done = _already_trained(run, fp) if cfg.resume else None
    if done is not None:
        log.info(
            "already trained: %s holds this config's %d steps over the same pool and "
            "starting weights (--no-resume trains again)",
            run.url,
            cfg.steps,
        )
        # "seconds" is the earlier training's: flagged, as this call trained nothing
        return {**done, "already_trained": True}
    if not cfg.resume:
        clear_resume(run)
    # refuses a partial run of another config before anything is written
    try:
        found = load_resume(run, fp, parts)
    except ConfigError:
        # a resume state of this training recorded under the older hash: adopted (read
        # again only on a refusal, not on every resume)
        recorded = resume_fingerprint(run)
        if recorded is None or recorded != older():
            raise
        adopt_fingerprint(run, fp)
        found = load_resume(run, fp, parts)
    # the step this call starts at; theta and the optimiser state are read again to train
    start = found.step if found is not None else 0
    del found
    save_fingerprint_parts(run, parts)
    # every option, those that do not change the trajectory too: `diffin status` prints the
    # command that resumes this training as it was started (--workers, --address...)
    write_json(run.path("trajectory", "request.json"), cfg.to_dict())
    mark_preparing(run, cfg.steps, start if exists(run.resume_state) else None)
    # From here the run is being rewritten: a trajectory.json left from an earlier
    # training would describe checkpoints and sets this one replaces.
    if exists(run.trajectory_json) and read_json(run.trajectory_json).get("fingerprint") != fp:
        # said (walkthrough: replaced without a word); the later stages refuse what the
        # old trajectory produced until it is made again. The same config trained again
        # (--no-resume, a checkpoint file gone) is no other training (review).
        log.warning(
            "train: %s held a finished training of another config (or pool, or starting "
            "weights): it is replaced; its scores, manifests and evaluation describe the old "
            "one, and `diffin score` must run again before prune and evaluate",
            run.url,
        )
    remove(run.trajectory_json)
    save_sets(cfg, run, pool, bundle, images, tokens)
    n = images.shape[0]
    ckpt_steps = checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.spacing, cfg.seed)

    state: ResumeState | None
    if cfg.workers:
        from pipeline.train.distributed import train_distributed

        state = train_distributed(cfg, images, tokens, cpu_state(model), ckpt_steps, fp)
    else:
        if cfg.precision == "amp":
            log.warning("precision amp applies to CUDA workers (--workers); training in fp32")
        if torch.cuda.is_available():
            log.warning(
                "a GPU is visible, but training in this process runs on the CPU; --workers 1 "
                "trains on one GPU (Ray Train), --workers N on N"
            )
        order = batch_order(n, cfg.batch_size, cfg.steps, cfg.seed)
        state = run_resumable(model, images, tokens, cfg, order, ckpt_steps, run, fp)
    assert state is not None and state.step == cfg.steps
    if start and state.resumed_at[-1:] != [start]:
        # killed after its last resume state: the state read back is that run's, and this
        # run resumed there (at the end) too
        state = dataclasses.replace(state, resumed_at=[*state.resumed_at, start])
    warn_if_at_chance(state.losses, cfg.batch_size)

    record = {
        "model": cfg.model,
        "model_config": factory.model_config(cfg.model),
        "pretrained": cfg.pretrained,
        # what the weights were (a file's sha256, a tag, a local-dir: folder's files), as
        # typed paths do not say (walkthrough)
        "starting_weights": pretrained,
        # how the sets were preprocessed; later stages preprocess the same way
        "preprocess_cfg": bundle.preprocess_cfg,
        "optimizer": optimizer_record(
            cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        ),
        "lr_note": LR_NOTE,
        "spacing": cfg.spacing,
        "n_train": n,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "checkpoints": state.checkpoints,
        "loss_curve": state.losses,
        "pool": pool.counts(),
        "workers": cfg.workers,
        "precision": cfg.precision,
        # On a CPU the thread count sets the float rounding of every reduction, so another
        # count is another trajectory (and Diff-In's ranking moves with it: docs/accuracy.md
        # 2c); --threads 0 records what torch's default came to on this machine.
        "torch_threads": None if cfg.workers else torch.get_num_threads(),
        "resumed_at": state.resumed_at,
        "config": cfg.to_dict(),
        # what a rerun compares to find the run already trained (config, pool, weights)
        "fingerprint": fp,
        "seconds": round(time.time() - t0, 2),
        **provenance(),
    }
    write_json(run.trajectory_json, record)
    clear_resume(run)
    remove_stale_checkpoints(run, record["checkpoints"])
    run.update_run_json("train", {"config": cfg.to_dict(), "seconds": record["seconds"]})
    if start == cfg.steps:  # killed after its last resume state, before trajectory.json
        log.info("the last resume state holds all %d steps: nothing left to train", cfg.steps)
    elif start:  # not "trained N steps": the steps before were trained by an earlier run
        log.info(
            "trained steps %d to %d on %d pairs in %.1fs (resumed at step %d)",
            start, cfg.steps, n, record["seconds"], start,
        )  # fmt: skip
    else:
        log.info("trained %d steps on %d pairs in %.1fs", cfg.steps, n, record["seconds"])
    return record
