"""Train the proxy CLIP with SGD and keep m checkpoints with their step and learning rate.

Also fixes, with the run's seed, the sets every later stage needs and stores
them in the run directory: the reference negatives R, the target set V (held
out of training) and the k batches that define g_B and H_B.
"""

from __future__ import annotations

import io
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from pipeline.data.reader import iter_shard
from pipeline.data.sample import Sample
from pipeline.data.shards import resolve_shards
from pipeline.errors import ConfigError
from pipeline.model import factory
from pipeline.model.batches import encode
from pipeline.provenance import provenance
from pipeline.rundir import RunDir, sha256, write_bytes_atomic, write_json
from pipeline.tensors import save_tensors
from pipeline.train.config import TrainConfig
from pipeline.train.loop import batch_order, train_loop
from pipeline.train.schedule import checkpoint_steps

log = logging.getLogger(__name__)


@dataclass
class Pool:
    train: list[Sample]
    target: list[Sample]
    reference: list[Sample]
    read: int  # rows read, errors included
    errors: int


def load_pool(cfg: TrainConfig) -> Pool:
    """Read the pool's decodable pairs and split off the held-out target set, seeded."""
    try:
        shards = resolve_shards(cfg.data)
    except ConfigError as exc:
        raise ConfigError(f"data: {exc}") from exc
    ok: list[Sample] = []
    read = errors = 0
    for url in tqdm(shards, desc="read pool", unit="shard", leave=False):
        for s in iter_shard(url, **cfg.reader_options()):
            read += 1
            if s.ok:
                ok.append(s)
            else:
                errors += 1
    rng = random.Random(cfg.seed)
    if len(ok) > cfg.max_samples:
        ok = rng.sample(ok, cfg.max_samples)
    need = cfg.target_size + cfg.batch_size
    if len(ok) < need:
        raise ConfigError(
            f"data: {len(ok)} decodable pairs; need at least target_size + batch_size = {need}"
        )
    order = list(range(len(ok)))
    rng.shuffle(order)
    target = [ok[i] for i in sorted(order[: cfg.target_size])]
    train = [ok[i] for i in sorted(order[cfg.target_size :])]
    ref_idx = sorted(rng.sample(range(len(train)), min(cfg.reference_size, len(train))))
    return Pool(train, target, [train[i] for i in ref_idx], read, errors)


def _save_set(run: RunDir, name: str, samples: list[Sample], bundle: factory.ClipBundle) -> None:
    images, tokens = encode(samples, bundle)
    save_tensors(
        run.set_file(name),
        {"images": images, "tokens": tokens},
        {"uids": [s.uid for s in samples], "keys": [s.key for s in samples]},
    )


def _save_checkpoint(run: RunDir, model: torch.nn.Module, step: int) -> str:
    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, buf)
    url = run.checkpoint(step)
    write_bytes_atomic(url, buf.getvalue())
    return url


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run proxy training; returns the trajectory record (also RUN/trajectory/trajectory.json)."""
    cfg.validate()
    factory.model_config(cfg.model)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.run)
    t0 = time.time()
    pool = load_pool(cfg)
    torch.manual_seed(cfg.seed)
    bundle = factory.create(cfg.model, pretrained=cfg.pretrained)
    model = bundle.model
    images, tokens = encode(pool.train, bundle)
    n = images.shape[0]
    for name, subset in (("reference", pool.reference), ("target", pool.target)):
        _save_set(run, name, subset, bundle)

    gen = torch.Generator().manual_seed(cfg.seed + 1)  # independent of the data order
    grad_idx = torch.stack(
        [torch.randperm(n, generator=gen)[: cfg.batch_size] for _ in range(cfg.grad_batches)]
    )
    save_tensors(
        run.set_file("grad_batches"),
        {"images": images[grad_idx], "tokens": tokens[grad_idx]},
        {"k": cfg.grad_batches, "batch_size": cfg.batch_size, "seed": cfg.seed},
    )

    ckpt_steps = checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.spacing, cfg.seed)
    saved: list[dict[str, Any]] = []

    def keep(step: int, lr: float, m: torch.nn.Module) -> None:
        url = _save_checkpoint(run, m, step)
        saved.append(
            {"step": step, "lr": lr, "path": url.rsplit("/", 1)[-1], "sha256": sha256(url)}
        )

    order = batch_order(n, cfg.batch_size, cfg.steps, cfg.seed)
    losses = train_loop(model, images, tokens, cfg, order, ckpt_steps, keep)

    record = {
        "model": cfg.model,
        "model_config": factory.model_config(cfg.model),
        "pretrained": cfg.pretrained,
        "optimizer": {
            "name": cfg.optimizer,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
        },
        "lr_note": "lr is the rate applied to the update theta_t -> theta_{t+1}",
        "spacing": cfg.spacing,
        "n_train": n,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "checkpoints": saved,
        "loss_curve": losses,
        "pool": {
            "rows_read": pool.read,
            "errors": pool.errors,
            "target": len(pool.target),
            "reference": len(pool.reference),
        },
        "config": cfg.to_dict(),
        "seconds": round(time.time() - t0, 2),
        **provenance(),
    }
    write_json(run.trajectory_json, record)
    run.update_run_json("train", {"config": cfg.to_dict(), "seconds": record["seconds"]})
    log.info("trained %d steps on %d pairs in %.1fs", cfg.steps, n, record["seconds"])
    return record
