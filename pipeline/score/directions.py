"""Prepare the per-checkpoint direction vectors, once, before any shard is scored.

Work that exists is skipped: a directions file is reused when its recorded
fingerprint (checkpoint hash, target set, gradient batches, dtype, format
version) matches.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from tqdm import tqdm

from pipeline.data.reader import iter_shard
from pipeline.data.shards import resolve_shards
from pipeline.errors import ConfigError
from pipeline.influence.directions import compute_directions, save_directions
from pipeline.influence.functional import ClipFunctions
from pipeline.model import factory
from pipeline.model.batches import encode
from pipeline.rundir import RunDir, exists
from pipeline.score.config import ScoreConfig
from pipeline.score.trajectory import Trajectory, load_state_dict
from pipeline.tensors import load_tensors, save_tensors

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Bumped when the file's content changes: v2 added u = H_V g_B (older files are recomputed).
DIRECTIONS_VERSION = "directions-v2"


def load_set(run: RunDir, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    tensors, meta = load_tensors(run.set_file(name))
    return tensors["images"].to(dtype), tensors["tokens"], meta


def target_set(cfg: ScoreConfig, run: RunDir, bundle: factory.ClipBundle, dtype: torch.dtype):
    """(images, tokens, fingerprint): a curated target if --target was given, else the held-out sample."""
    if cfg.target is None:
        images, tokens, meta = load_set(run, "target", dtype)
        uids = meta["uids"]
        source = "held-out sample of the pool"
    else:
        samples = []
        for url in resolve_shards(cfg.target):
            for s in iter_shard(url, **cfg.reader_options()):
                if s.ok:
                    samples.append(s)
                if len(samples) >= cfg.target_max:
                    break
            if len(samples) >= cfg.target_max:
                break
        if not samples:
            raise ConfigError(f"target: no decodable pairs in {cfg.target!r}")
        images, tokens = encode(samples, bundle)
        images = images.to(dtype)
        uids = [s.uid for s in samples]
        source = cfg.target
    fp = hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]
    return (
        images,
        tokens,
        {"target_fingerprint": fp, "target_source": source, "target_size": len(uids)},
    )


def ensure_directions(cfg: ScoreConfig, run: RunDir, traj: Trajectory) -> dict:
    """Compute the missing direction files; returns the target description."""
    dtype = DTYPES[cfg.dtype]
    bundle = factory.create(traj.model, dtype=dtype)
    ref_images, ref_tokens, _ = load_set(run, "reference", dtype)
    fns = ClipFunctions(bundle.model, ref_images, ref_tokens)
    t_images, t_tokens, target_info = target_set(cfg, run, bundle, dtype)
    gb, gb_meta = load_tensors(run.set_file("grad_batches"))
    grad_batches = [
        (gb["images"][i].to(dtype), gb["tokens"][i]) for i in range(gb["images"].shape[0])
    ]
    by_step = {int(c["step"]): c["sha256"] for c in traj.record["checkpoints"]}
    for ckpt in tqdm(traj.checkpoints, desc="directions", unit="ckpt", leave=False):
        fingerprint = hashlib.sha256(
            json.dumps(
                [
                    by_step[ckpt.step],
                    target_info["target_fingerprint"],
                    gb_meta,
                    cfg.dtype,
                    DIRECTIONS_VERSION,
                ]
            ).encode()
        ).hexdigest()[:16]
        url = run.directions(ckpt.step)
        if exists(url) and load_tensors(url)[1].get("fingerprint") == fingerprint:
            continue
        state = load_state_dict(run, traj, ckpt.step)
        params = {k: state[k].to(dtype) for k, _ in bundle.model.named_parameters()}
        d = compute_directions(
            fns,
            params,
            grad_batches,
            (t_images, t_tokens),
            meta={
                "fingerprint": fingerprint,
                "step": ckpt.step,
                "lr": ckpt.lr,
                "dtype": cfg.dtype,
                "checkpoint_sha256": by_step[ckpt.step],
                **target_info,
            },
        )
        save_directions(d, url)
        log.info(
            "directions for step %d: |g_B|=%.3g |g_V|=%.3g |w|=%.3g |u|=%.3g",
            ckpt.step,
            d.meta["norm_g_B"],
            d.meta["norm_g_V"],
            d.meta["norm_w"],
            d.meta["norm_u"],
        )
    if "diffin_self" in cfg.methods and cfg.self_hb == "lanczos":
        ensure_eigenpairs(cfg, run, traj, fns, grad_batches, by_step)
    return target_info


def eigen_url(run: RunDir, step: int) -> str:
    return run.path("directions", f"{step:06d}-eigs.safetensors")


def ensure_eigenpairs(
    cfg: ScoreConfig,
    run: RunDir,
    traj: Trajectory,
    fns: ClipFunctions,
    grad_batches: list,
    by_step: dict[int, str],
) -> None:
    """Top eigenpairs of H_B per checkpoint for diffin_self: a cost per checkpoint, not per
    sample, paid once on the driver and stored beside the directions."""
    from pipeline.influence.selfinf import DEFAULT_EXCLUDE, hessian_eigenpairs

    names = [k for k, _ in fns.model.named_parameters()]
    for ckpt in tqdm(traj.checkpoints, desc="H_B eigenpairs", unit="ckpt", leave=False):
        fingerprint = hashlib.sha256(
            json.dumps(
                [by_step[ckpt.step], cfg.self_rank, cfg.seed, cfg.dtype, len(grad_batches)]
            ).encode()
        ).hexdigest()[:16]
        url = eigen_url(run, ckpt.step)
        if exists(url) and load_tensors(url)[1].get("fingerprint") == fingerprint:
            continue
        state = load_state_dict(run, traj, ckpt.step)
        dtype = DTYPES[cfg.dtype]
        params = {k: state[k].to(dtype) for k in names if k not in DEFAULT_EXCLUDE}
        fixed = {k: state[k].to(dtype) for k in names if k in DEFAULT_EXCLUDE}
        vals, vecs = hessian_eigenpairs(fns, params, fixed, grad_batches, cfg.self_rank, cfg.seed)
        save_tensors(
            url,
            {"eigenvalues": vals, **{f"v/{k}": v for k, v in vecs.items()}},
            {"fingerprint": fingerprint, "rank": cfg.self_rank, "step": ckpt.step},
        )
        log.info(
            "H_B eigenpairs at step %d: eigenvalues %.3g .. %.3g",
            ckpt.step,
            float(vals.min()),
            float(vals.max()),
        )


def load_eigenpairs(run: RunDir, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    url = eigen_url(run, step)
    if not exists(url):
        return None
    flat, _ = load_tensors(url)
    return flat["eigenvalues"], {k[2:]: v for k, v in flat.items() if k.startswith("v/")}
