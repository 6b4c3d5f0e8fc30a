"""Prepare the per-checkpoint direction vectors, once, before any shard is scored.

Work that exists is skipped: a directions file is reused when its recorded
fingerprint (checkpoint hash, target set, gradient batches, dtype, format
version) matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tqdm import tqdm

from pipeline.data.reader import iter_shard
from pipeline.data.sample import Sample
from pipeline.data.shards import resolve_shards
from pipeline.data.unusable import Unusable
from pipeline.errors import ConfigError
from pipeline.influence.directions import (
    Directions,
    compute_directions,
    curvature_operator,
    load_directions,
    save_directions,
)
from pipeline.influence.estimator import DEFAULT_FORM, Weights
from pipeline.influence.fast import DIRECTIONAL
from pipeline.influence.functional import ClipFunctions, Params
from pipeline.influence.propagate import (
    PropagationDiverged,
    nearest_blocks,
    propagated_directions,
)
from pipeline.influence.selfinf import SELF_TERMS
from pipeline.influence.vectors import norm
from pipeline.model import factory
from pipeline.model.batches import encode
from pipeline.rundir import RunDir, exists, sha256
from pipeline.score.config import AUTO_FORM, AUTO_OBJECTIVE, ScoreConfig
from pipeline.score.trajectory import (
    Trajectory,
    load_state_dict,
    model_identity,
    schedule_disagreement,
)
from pipeline.scorers import ScoreContext, get_scorers, needed_terms
from pipeline.tensors import load_tensors, save_tensors
from pipeline.train.schedule import recorded_rate

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Bumped when the file's content changes, so older files are recomputed: v2 added
# u = H_V g_B; v3 leaves a target pair out of its own reference negatives. The
# eigenpairs' v2: logit_scale's curvature is no longer cut by a clamp at its bounds.
DIRECTIONS_VERSION = "directions-v3"
PROPAGATED_VERSION = "propagated-v2"
EIGEN_VERSION = "eigen-v2"


def load_set(run: RunDir, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    tensors, meta = load_tensors(run.set_file(name))
    return tensors["images"].to(dtype), tensors["tokens"], meta


def target_set(cfg: ScoreConfig, run: RunDir, bundle: factory.ClipBundle, dtype: torch.dtype):
    """(images, tokens, fingerprint): a curated target if --target was given, else the held-out sample."""
    problems: dict[str, Any] = {}  # what of a --target could not be used
    if cfg.target is None:
        images, tokens, meta = load_set(run, "target", dtype)
        uids = meta["uids"]
        source = "held-out sample of the pool"
    else:
        samples: list[Sample] = []
        unusable = Unusable()
        # one more than the cap is read: a target cut short is said (walkthrough: the first
        # 1024 pairs were used without a word, and there was no option to change it)
        for url in resolve_shards(cfg.target):
            for s in iter_shard(url, **cfg.reader_options(), transform=bundle.preprocess):
                if s.ok:
                    samples.append(s)
                else:
                    unusable.add(s)
                if len(samples) > cfg.target_max:
                    break
            if len(samples) > cfg.target_max:
                break
        if len(samples) > cfg.target_max:
            samples = samples[: cfg.target_max]
            log.info(
                "target: the first %d decodable pairs of %s are used (--target-max %d); the "
                "rest are left out",
                cfg.target_max,
                cfg.target,
                cfg.target_max,
            )
        if not samples:
            raise ConfigError(f"target: no decodable pairs in {cfg.target!r}{unusable.said()}")
        if unusable.said():
            log.warning("target: %d decodable pairs used%s", len(samples), unusable.said())
        images, tokens = encode(samples, bundle)
        images = images.to(dtype)
        uids = [s.uid for s in samples]
        source = cfg.target
        problems = {"target_rows_error": unusable.rows, **unusable.record("target_")}
    # The pairs themselves, as the model sees them: a target rewritten in place keeps its
    # uids (md5 of path and key), and its directions and scores must not be reused (review).
    h = hashlib.sha256("\n".join(uids).encode())
    h.update(images.detach().cpu().contiguous().numpy())  # the buffer itself, not a copy
    h.update(tokens.detach().cpu().contiguous().numpy())  # the buffer itself, not a copy
    fp = h.hexdigest()[:16]
    return (
        images,
        tokens,
        {
            "target_fingerprint": fp,
            "target_source": source,
            "target_size": len(uids),
            **problems,
        },
    )


# The per-sample terms that read a checkpoint's direction file.
DIRECTION_TERMS = DIRECTIONAL | SELF_TERMS


def needs_directions(cfg: ScoreConfig, traj: Trajectory) -> bool:
    """Whether any requested scorer reads a direction vector at any checkpoint.

    loss, loss_mean, clip_score, el2n and random do not; they score without
    the per-checkpoint gradient and Hessian-vector products.
    """
    options = {**cfg.score_options(), "second_order": resolve_form(cfg.second_order, traj)}
    ctx = ScoreContext(traj.checkpoints, traj.n_train, cfg.seed, options)
    scorers = get_scorers(cfg.methods)
    return any(needed_terms(scorers, c, ctx) & DIRECTION_TERMS for c in traj.checkpoints)


def set_hashes(run: RunDir) -> dict[str, str]:
    """sha256 of the stored sets the per-sample losses, g_B and H_B are made of.

    Their metadata does not identify them: a re-import may store other
    reference pairs or gradient batches with the same count, size and seed.
    """
    return {name: sha256(run.set_file(name)) for name in ("reference", "grad_batches")}


def ensure_directions(
    cfg: ScoreConfig,
    run: RunDir,
    traj: Trajectory,
    sets: dict[str, str] | None = None,
    device: str = "cpu",
) -> dict | None:
    """Compute the missing direction files on ``device``; returns the target description.

    Nothing is computed, and no target read, when no requested scorer needs directions
    (None then: no scorer points toward a target, so none is in the scores' fingerprint).
    ``sets`` is :func:`set_hashes` of the run, when the caller already has it.
    Which device is the caller's choice (``pipeline.score.driver.prepare_directions``:
    only one this process holds).
    """
    form = resolve_form(cfg.second_order, traj)
    cfg = dataclasses.replace(cfg, objective=resolve_objective(cfg, form))
    propagated = "diffin" in cfg.methods and form == "propagated"
    if propagated:
        sgd_dynamics(traj)  # refuses a trajectory the propagated form cannot model, up front
    if not needs_directions(cfg, traj):
        # walkthrough: `--methods loss` read and encoded the held-out target all the same
        log.info("directions: not needed by %s", ",".join(cfg.methods))
        return None
    dtype = DTYPES[cfg.storage_dtype]
    bundle = factory.create(traj.model, dtype=dtype, preprocess_cfg=traj.preprocess_cfg)
    t_images, t_tokens, target_info = target_set(cfg, run, bundle, dtype)
    if device != "cpu":
        log.info("directions: computed on %s", device)
    factory.exact_float32(device, dtype)
    bundle.model.to(device)
    t_images, t_tokens = t_images.to(device), t_tokens.to(device)
    ref_images, ref_tokens, _ = load_set(run, "reference", dtype)
    fns = ClipFunctions(bundle.model, ref_images.to(device), ref_tokens.to(device))
    gb, gb_meta = load_tensors(run.set_file("grad_batches"))
    # in every fingerprint below: the sets, and the architecture the checkpoints belong to
    gb_meta = {**gb_meta, "sets": sets or set_hashes(run), "model": model_identity(traj.record)}
    grad_batches = [
        (gb["images"][i].to(device, dtype), gb["tokens"][i].to(device))
        for i in range(gb["images"].shape[0])
    ]
    by_step = {int(c["step"]): c["sha256"] for c in traj.record["checkpoints"]}
    reused = []
    for ckpt in tqdm(traj.checkpoints, desc="directions", unit="ckpt", leave=False, disable=None):
        fingerprint = hashlib.sha256(
            json.dumps(
                [
                    by_step[ckpt.step],
                    target_info["target_fingerprint"],
                    gb_meta,
                    cfg.storage_dtype,
                    DIRECTIONS_VERSION,
                ]
            ).encode()
        ).hexdigest()[:16]
        url = run.directions(ckpt.step)
        if exists(url) and load_tensors(url)[1].get("fingerprint") == fingerprint:
            reused.append(ckpt.step)
            continue
        state = load_state_dict(run, traj, ckpt.step)
        params = {k: state[k].to(device, dtype) for k, _ in bundle.model.named_parameters()}
        d = compute_directions(
            fns,
            params,
            grad_batches,
            (t_images, t_tokens),
            meta={
                "fingerprint": fingerprint,
                "step": ckpt.step,
                "lr": ckpt.lr,
                "dtype": cfg.storage_dtype,
                "checkpoint_sha256": by_step[ckpt.step],
                **target_info,
            },
            chunk=cfg.directions_chunk,
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
    if reused:  # walkthrough: a rerun said nothing about the files it did not recompute
        log.info(
            "directions: reused for %d of %d checkpoints (the same checkpoints, target and sets)",
            len(reused),
            len(traj.checkpoints),
        )
    if propagated:
        ensure_propagated(cfg, run, traj, fns, grad_batches, gb_meta, target_info)
    if "diffin_self" in cfg.methods and cfg.self_hb == "lanczos":
        ensure_eigenpairs(cfg, run, traj, fns, grad_batches, gb_meta, by_step)
    return target_info


def self_size(cfg: ScoreConfig, traj: Trajectory, grad_samples: int) -> dict[str, int]:
    """The H_B rank (or sketch size) diffin_self will use: the memory budget can lower the
    one asked for, and the scores depend on this size, not on the budget.
    ``grad_samples``: the pairs of the gradient batches (the sketched Fisher holds them)."""
    self_cfg = cfg.self_config()
    model = factory.create(traj.model, dtype=DTYPES[cfg.storage_dtype]).model
    kept = [p for n, p in model.named_parameters() if n not in self_cfg.exclude]
    plan = self_cfg.plan(sum(p.numel() for p in kept), kept[0].element_size(), grad_samples)
    if cfg.self_hb == "lanczos":
        # The eigenpairs are computed at the rank asked for and cut to the budget's:
        # the top pairs of a larger Lanczos solve differ, so both count.
        return {"rank": plan["rank"], "self_rank": cfg.self_rank}
    return {"dim": plan["dim"]}


def resolve_form(form: str, traj: Trajectory) -> str:
    """``auto``: the propagated form for an SGD trajectory (the default, docs/accuracy.md),
    the derived expansion for any other optimiser (the propagated form models SGD only)."""
    if form != AUTO_FORM:
        return form
    return DEFAULT_FORM if traj.record.get("optimizer", {}).get("name") == "sgd" else "derived"


def resolve_objective(cfg: ScoreConfig, form: str) -> str:
    """``auto``: the checkpoint mean wherever diffin is scored with the propagated form and
    its first-order term (one proxy then meets issue 3's noise AUROC, docs/accuracy.md 2e),
    the final loss otherwise (the only objective of the other forms and of --no-first-order;
    a run without diffin keeps "final", so its tables' fingerprints do not change)."""
    if cfg.objective != AUTO_OBJECTIVE:
        return cfg.objective
    if "diffin" in cfg.methods and form == "propagated" and cfg.first_order:
        return "checkpoint-mean"
    return "final"


def sgd_dynamics(traj: Trajectory) -> tuple[float, float, Callable[[int], float]]:
    """(momentum, weight decay, rate of step s) of an SGD trajectory, for the propagated form."""
    opt = traj.record.get("optimizer", {})
    if opt.get("name") != "sgd":
        raise ConfigError(
            f"second_order propagated: the trajectory was trained with {opt.get('name')!r}; the "
            "propagated form models SGD (momentum, weight decay). Use --second-order derived"
        )
    recorded = recorded_rate(traj.record)
    # A recorded schedule the checkpoints' own rates disagree with is not used, as by
    # the other forms (load_trajectory has said so): it was refused here alone.
    if recorded is not None and not schedule_disagreement(traj.checkpoints, recorded):
        rate = recorded
    else:  # no usable schedule: each checkpoint's rate over the steps it stands for
        owner = {
            s: ck.lr
            for ck, block in zip(
                traj.checkpoints, nearest_blocks([c.step for c in traj.checkpoints]), strict=True
            )
            for s in block
        }
        rate = owner.__getitem__
    return float(opt.get("momentum", 0.0)), float(opt.get("weight_decay", 0.0)), rate


def propagated_url(run: RunDir, step: int, objective: str = "final") -> str:
    """Each objective its own files, so that scoring one after the other reuses both."""
    tag = "" if objective == "final" else f"-{objective}"
    return run.path("directions", f"{step:06d}-propagated{tag}.safetensors")


def _stored(url: str, fingerprint: str) -> bool:
    """A direction file of this fingerprint, and finite (a version before the divergence
    check may have stored NaN: compute it again, which now refuses it with a reason)."""
    if not exists(url):
        return False
    tensors, meta = load_tensors(url)
    return meta.get("fingerprint") == fingerprint and all(
        bool(torch.isfinite(t).all()) for t in tensors.values()
    )


def ensure_propagated(
    cfg: ScoreConfig,
    run: RunDir,
    traj: Trajectory,
    fns: ClipFunctions,
    grad_batches: list,
    gb_meta: dict,
    target_info: dict,
) -> None:
    """The propagated form's direction r_t per checkpoint (``pipeline.influence.propagate``):
    one Hessian-vector product per training step up to the last checkpoint, paid once on the
    driver; every checkpoint's file carries the fingerprint of the whole trajectory."""
    momentum, weight_decay, rate = sgd_dynamics(traj)
    steps = [c.step for c in traj.checkpoints]
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                [c["sha256"] for c in traj.record["checkpoints"]],
                target_info["target_fingerprint"],
                gb_meta,
                cfg.storage_dtype,
                momentum,
                weight_decay,
                [rate(s) for s in range(steps[-1])],
                traj.n_train,
                cfg.propagate_curvature,
                PROPAGATED_VERSION,
                DIRECTIONS_VERSION,  # the g_V it starts from (and adds) is read from those files
                cfg.objective,
            ]
        ).encode()
    ).hexdigest()[:16]
    urls = [propagated_url(run, s, cfg.objective) for s in steps]
    if all(_stored(u, fingerprint) for u in urls):
        log.info("propagated directions: reused (the same trajectory, target and sets)")
        return
    dtype = DTYPES[cfg.storage_dtype]
    names = [k for k, _ in fns.model.named_parameters()]
    device = next(fns.model.parameters()).device
    loaded: dict[int, Callable[[Params], Params]] = {}

    def hvp(i: int, s: int, v: Params) -> Params:  # noqa: ARG001 (same curvature at every s)
        # The mean over the k batches: for independent batches the expected product of the
        # step maps is the product of the expected maps, while a product of single-batch maps
        # is a high-variance sample of it that grows without bound (measured on the demo run).
        if i not in loaded:  # the sweep runs backwards: one checkpoint resident at a time
            loaded.clear()
            state = load_state_dict(run, traj, steps[i])
            params = {k: state[k].to(device, dtype) for k in names}
            loaded[i] = curvature_operator(
                fns,
                params,
                grad_batches,
                cfg.propagate_curvature,
                cfg.ggn_kept_pairs,
                cfg.directions_chunk,
            )
        return loaded[i](v)

    g_V = load_directions(run.directions(steps[-1]), device).ordered(names).g_V
    earlier: Mapping[int, Params] = {}
    if cfg.objective == "checkpoint-mean":  # (1/m) sum_j L_V(theta_{t_j}): each g_V by 1/m
        c = 1.0 / len(steps)
        g_V = {k: c * v for k, v in g_V.items()}
        earlier = _ScaledTargetGradients(run, steps[:-1], names, c)
    with tqdm(
        total=steps[-1], desc="propagating g_V", unit="step", leave=False, disable=None
    ) as bar:
        said, done = [time.monotonic()], [0]

        def progress(n: int) -> None:
            bar.update(n)
            done[0] += n  # not bar.n: a bar disabled off a terminal counts nothing
            if time.monotonic() - said[0] > 60:  # a log line too: the bar is not one (Ray, files)
                said[0] = time.monotonic()
                log.info("propagating g_V: %d of %d steps", done[0], steps[-1])

        try:
            dirs = propagated_directions(
                hvp, steps, rate, g_V, traj.n_train, momentum, weight_decay, progress, earlier
            )
        except PropagationDiverged as e:
            fix = (
                "--propagate-curvature ggn (positive semi-definite, the default)"
                if cfg.propagate_curvature != "ggn"
                else "--second-order derived"
            )
            raise ConfigError(f"second_order propagated: {e}; score with {fix}") from e
    for step, url, r in zip(steps, urls, dirs, strict=True):
        save_tensors(
            url,
            r,
            {
                "fingerprint": fingerprint,
                "step": step,
                "form": "propagated",
                "objective": cfg.objective,
            },
        )
    log.info(
        "propagated g_V (%s objective) back over %d steps (momentum %g, weight decay %g, "
        "curvature %s): |r_t| %s",
        cfg.objective,
        steps[-1],
        momentum,
        weight_decay,
        cfg.propagate_curvature,
        ", ".join(f"{float(norm(r)):.3g}" for r in dirs),
    )


class _ScaledTargetGradients(Mapping):
    """step -> c g_V(theta_step), read from the step's direction file when the sweep reaches
    it: one model-sized copy at a time on the host, not m - 1 (review)."""

    def __init__(self, run: RunDir, steps: list[int], names: list[str], c: float) -> None:
        self.run, self.steps, self.names, self.c = run, list(steps), names, c

    def __getitem__(self, step: int) -> Params:
        if step not in self.steps:
            raise KeyError(step)
        g_V = load_directions(self.run.directions(step), "cpu").ordered(self.names).g_V
        return {k: self.c * v for k, v in g_V.items()}

    def __contains__(self, step: object) -> bool:  # Mapping's would read the file
        return step in self.steps

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def lin_direction(
    run: RunDir,
    step: int,
    directions: Directions,
    weights: Weights,
    form: str,
    objective: str = "final",
) -> Params:
    """The tangent of the engine's ``hlin`` JVP: W_hb w + W_hv u for the expansion forms,
    r_t - W_first g_V for the propagated one (so that hlin is I_t itself)."""
    if form != "propagated":
        return directions.combined(weights.hb, weights.hv)
    flat, _ = load_tensors(propagated_url(run, step, objective))
    return {k: flat[k].to(v.device, v.dtype) - weights.first * v for k, v in directions.g_V.items()}


def eigen_url(run: RunDir, step: int) -> str:
    return run.path("directions", f"{step:06d}-eigs.safetensors")


def ensure_eigenpairs(
    cfg: ScoreConfig,
    run: RunDir,
    traj: Trajectory,
    fns: ClipFunctions,
    grad_batches: list,
    gb_meta: dict,
    by_step: dict[int, str],
) -> None:
    """Top eigenpairs of H_B per checkpoint for diffin_self: a cost per checkpoint, not per
    sample, paid once on the driver and stored beside the directions."""
    from pipeline.influence.selfinf import DEFAULT_EXCLUDE, hessian_eigenpairs

    names = [k for k, _ in fns.model.named_parameters()]
    device = next(fns.model.parameters()).device
    for ckpt in tqdm(
        traj.checkpoints, desc="H_B eigenpairs", unit="ckpt", leave=False, disable=None
    ):
        fingerprint = hashlib.sha256(
            json.dumps(
                [
                    by_step[ckpt.step],
                    cfg.self_rank,
                    cfg.seed,
                    cfg.storage_dtype,
                    gb_meta,
                    EIGEN_VERSION,
                ]
            ).encode()
        ).hexdigest()[:16]
        url = eigen_url(run, ckpt.step)
        if exists(url) and load_tensors(url)[1].get("fingerprint") == fingerprint:
            continue
        state = load_state_dict(run, traj, ckpt.step)
        dtype = DTYPES[cfg.storage_dtype]
        params = {k: state[k].to(device, dtype) for k in names if k not in DEFAULT_EXCLUDE}
        fixed = {k: state[k].to(device, dtype) for k in names if k in DEFAULT_EXCLUDE}
        vals, vecs = hessian_eigenpairs(
            fns, params, fixed, grad_batches, cfg.self_rank, cfg.seed, cfg.directions_chunk
        )
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
