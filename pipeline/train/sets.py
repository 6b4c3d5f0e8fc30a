"""The pool and the fixed sets every later stage needs, drawn with the run's seed.

The reference negatives R, the target set V (held out of training) and the k
batches that define g_B and H_B are stored in RUN/sets/. Training and
importing an external run (importer.py) build them the same way.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from pipeline.data.reader import iter_shard
from pipeline.data.sample import Sample
from pipeline.data.shards import resolve_shards
from pipeline.data.unusable import Unusable
from pipeline.errors import ConfigError
from pipeline.memory import available_bytes, human_bytes
from pipeline.model import factory
from pipeline.model.batches import Inputs, encode
from pipeline.rundir import RunDir
from pipeline.tensors import save_tensors
from pipeline.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Pool:
    train: list[Sample]
    target: list[Sample]
    reference: list[Sample]
    read: int  # rows read, errors included
    errors: int
    unusable: Unusable = field(default_factory=Unusable)

    def counts(self) -> dict[str, Any]:
        return {
            "rows_read": self.read,
            "errors": self.errors,
            **self.unusable.record(),
            "target": len(self.target),
            "reference": len(self.reference),
        }


def load_pool(cfg: TrainConfig, transform: Callable[[Any], Any] | None = None) -> Pool:
    """Read the pool's decodable pairs and split off the held-out target set, seeded.

    ``transform`` (``pool_transform``: the model's eval transform up to its
    uint8 pixels) is applied as each pair is read, so the reservoir holds
    small pixels, not up to ``max_samples`` images at full resolution.
    """
    try:
        shards = resolve_shards(cfg.data)
    except ConfigError as exc:
        raise ConfigError(f"data: {exc}") from exc
    # A seeded reservoir over the decodable pairs in read order: memory holds at most
    # max_samples decoded images, however large the pool (rng.sample after reading
    # everything held all of them). A pool within max_samples is kept whole, in order.
    kept: list[tuple[int, Sample]] = []
    draw = random.Random(f"{cfg.seed}/max_samples")
    read = errors = n_ok = 0
    unusable = Unusable()
    room = available_bytes() if transform is not None else None
    fits: int | None = None  # pairs the memory left can hold (known from the first input)
    for url in tqdm(shards, desc="read pool", unit="shard", leave=False, disable=None):
        for s in iter_shard(url, **cfg.reader_options(), transform=transform):
            read += 1
            if not s.ok:
                errors += 1
                unusable.add(s)
                continue
            if fits is None and room is not None and torch.is_tensor(s.image):
                # each pair held as read, then once more while encode_pool stacks them
                fits = room // (2 * s.image.nbytes)
            if n_ok < cfg.max_samples:
                if fits is not None and n_ok >= fits:
                    # refused while reading, before the machine runs out (a pool of
                    # max_samples large inputs was killed for memory, with no word)
                    need = cfg.target_size + cfg.batch_size
                    advice = (
                        f"give --max-samples {fits} or less"
                        if fits >= need
                        else f"that is fewer than target_size + batch_size = {need}: free "
                        "memory, or train a model with smaller inputs"
                    )
                    raise ConfigError(
                        f"max_samples: the proxy trains from memory (up to --max-samples "
                        f"{cfg.max_samples} pairs), and more than {fits} pairs of "
                        f"{tuple(s.image.shape)} inputs do not fit in the "
                        f"{human_bytes(room)} available; {advice}"
                    )
                kept.append((n_ok, s))
            else:
                j = draw.randrange(n_ok + 1)
                if j < cfg.max_samples:
                    kept[j] = (n_ok, s)
            n_ok += 1
    ok = [s for _, s in sorted(kept, key=lambda item: item[0])]
    rng = random.Random(cfg.seed)
    need = cfg.target_size + cfg.batch_size
    if len(ok) < need:
        raise ConfigError(
            f"data: {len(ok)} decodable pairs of {read - len(unusable.damaged)} samples read; "
            "need at least "
            f"target_size + batch_size = {need}{unusable.said()}"
        )
    if errors:
        # the score table will list each; here they would go unsaid (review)
        log.warning("read pool: %d decodable pairs of %d rows%s", n_ok, read, unusable.said())
    order = list(range(len(ok)))
    rng.shuffle(order)
    target = [ok[i] for i in sorted(order[: cfg.target_size])]
    train = [ok[i] for i in sorted(order[cfg.target_size :])]
    if cfg.target_size > len(ok) // 4:
        # walkthrough: the default 128 held out 55% of a 230-pair pool, unsaid
        log.warning(
            "target: --target-size %d takes %.0f%% of the %d decodable pairs read; the "
            "training split keeps %d (a smaller --target-size, or --target at score time, "
            "leaves it more)",
            cfg.target_size,
            100 * cfg.target_size / len(ok),
            len(ok),
            len(train),
        )
    if len(train) < cfg.reference_size:
        # the record's pool.reference says how many; the config still says what was asked
        log.warning(
            "reference: the training split has %d pairs, fewer than --reference-size %d; "
            "R is all of them",
            len(train),
            cfg.reference_size,
        )
    ref_idx = sorted(rng.sample(range(len(train)), min(cfg.reference_size, len(train))))
    return Pool(train, target, [train[i] for i in ref_idx], read, errors, unusable)


def _save_set(run: RunDir, name: str, samples: list[Sample], bundle: factory.ClipBundle) -> None:
    images, tokens = encode(samples, bundle)
    save_tensors(
        run.set_file(name),
        {"images": images, "tokens": tokens},
        {"uids": [s.uid for s in samples], "keys": [s.key for s in samples]},
    )


def save_sets(
    cfg: TrainConfig,
    run: RunDir,
    pool: Pool,
    bundle: factory.ClipBundle,
    images: Inputs,
    tokens: torch.Tensor,
) -> None:
    """Write R, V and the gradient batches; ``images``, ``tokens`` are ``encode_pool(pool.train)``.

    The pool's samples give up their pixels here: only the encoded tensors are used after.
    """
    for name, subset in (("reference", pool.reference), ("target", pool.target)):
        _save_set(run, name, subset, bundle)
    n = images.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # independent of the data order
    grad_idx = torch.stack(
        [torch.randperm(n, generator=gen)[: cfg.batch_size] for _ in range(cfg.grad_batches)]
    )
    save_tensors(
        run.set_file("grad_batches"),
        {"images": images[grad_idx], "tokens": tokens[grad_idx]},
        {"k": cfg.grad_batches, "batch_size": cfg.batch_size, "seed": cfg.seed},
    )
    for s in (*pool.train, *pool.target):  # encoded now: not held twice while training
        s.image = None
