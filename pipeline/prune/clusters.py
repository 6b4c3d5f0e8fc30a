"""Groups for the balanced rule: k-means on the proxy model's image embeddings.

The embeddings come from the run's last checkpoint (verified by sha256,
loaded without pickle), computed for the ok rows of the score table by
re-reading their shards. k-means is plain numpy (k-means++ seeding, Lloyd
iterations) with a seed, so the clusters are reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.data.reader import iter_shard
from pipeline.errors import ConfigError
from pipeline.prune.config import PruneConfig


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centroids) of k-means on rows of ``x`` (k is capped at the number of rows)."""
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, x.shape[1] if x.ndim == 2 else 0))
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(n)]]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        j = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centroids.append(x[j])
        d2 = np.minimum(d2, ((x - x[j]) ** 2).sum(1))
    c = np.stack(centroids)
    labels = np.full(n, -1, np.int64)
    for _ in range(iters):
        dist = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
        new = dist.argmin(1)
        if (new == labels).all():
            break
        labels = new
        for g in range(k):
            members = x[labels == g]
            if len(members):
                c[g] = members.mean(0)
    return labels, c


def embed_rows(
    run_url: str, shard: np.ndarray, index: np.ndarray, ok: np.ndarray, batch: int = 256
) -> np.ndarray:
    """L2-normalised image embeddings of the ok rows (in row order) from the last checkpoint."""
    from pipeline.model import factory
    from pipeline.model.batches import encode
    from pipeline.rundir import RunDir
    from pipeline.score.table import scored_reader_options
    from pipeline.score.trajectory import load_state_dict, load_trajectory

    run = RunDir(run_url)
    options = scored_reader_options(run)  # the image and text keys the rows were scored with
    traj = load_trajectory(run)
    last = max(c.step for c in traj.checkpoints)
    bundle = factory.create(traj.model, preprocess_cfg=traj.preprocess_cfg)
    # strict: a checkpoint that does not fit would leave random weights behind, silently
    bundle.model.load_state_dict(load_state_dict(run, traj, last))
    bundle.model.eval()
    rows = np.flatnonzero(ok)
    where = {(str(shard[r]), int(index[r])): i for i, r in enumerate(rows)}
    out: np.ndarray | None = None
    found = np.zeros(len(rows), bool)
    wanted_shards = list(dict.fromkeys(str(shard[r]) for r in rows))

    def flush(samples: list, pos: list[int]) -> None:
        nonlocal out
        images, _ = encode(samples, bundle)
        with torch.no_grad():
            emb = bundle.model.encode_image(images, normalize=True).double().numpy()
        if out is None:
            out = np.zeros((len(rows), emb.shape[1]))
        out[pos] = emb
        found[pos] = True

    for url in wanted_shards:
        samples, pos = [], []
        for s in iter_shard(url, **options):
            i = where.get((url, s.index))
            if i is None:
                continue
            if not s.ok:
                raise ConfigError(
                    f"balance_by: {url}#{s.index} was scored ok but no longer reads ({s.error})"
                )
            samples.append(s)
            pos.append(i)
            if len(samples) == batch:
                flush(samples, pos)
                samples, pos = [], []
        if samples:
            flush(samples, pos)
    if not found.all():
        missing = int((~found).sum())
        raise ConfigError(
            f"balance_by: {missing} scored rows could not be re-read from their shards"
        )
    return out if out is not None else np.zeros((0, 1))


def cluster_rows(
    cfg: PruneConfig, table_url: str, shard: np.ndarray, index: np.ndarray, ok: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """Cluster code per table row (-1 where not ok) and a description for the manifest."""
    emb = embed_rows(cfg.run, shard, index, ok)
    labels, centroids = kmeans(emb, cfg.clusters, cfg.cluster_seed)
    code = np.full(len(ok), -1, np.int64)
    code[ok] = labels
    return code, {
        "k": int(len(centroids)),
        "seed": cfg.cluster_seed,
        "embedding": "image, last checkpoint, L2-normalised",
        "dim": int(emb.shape[1]) if emb.ndim == 2 else 0,
    }
