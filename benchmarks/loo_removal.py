"""What does removing a pair from contrastive training change, to first order?

    python -m benchmarks.loo_removal samples=240 target_size=40 reference_size=31 \
        batch_size=32 steps=50 checkpoints=5 lr=0.003 pre_steps=100 removed=24

(arguments: ``pipeline.evaluation.groundtruth.LOOSetting`` fields, plus ``removed``).
At a small rate the leave-one-out effect is linear, so it must equal a first-order
prediction; this compares the harness's measured effects with:

- ``tracin`` / ``diffin``: the registry's scores (the reference-negative g_z of
  METHOD.md section 2, at the checkpoints);
- ``traj_ref``: the same g_z, but summed over exactly the steps where z was in a
  batch (eta / |B| <g_V(theta_T), g_z(theta_s)>): trajectory-specific TracIn;
- ``traj_inbatch``: eta <g_V(theta_T), grad L(B_s) - grad L(B_s without z)> over those
  steps, exactly the first-order change of the harness's removal (z's own terms and
  its role as a negative of its batch mates);
- ``tracin_set_removal``: TracIn at the checkpoints with g_z replaced by z's removal
  gradient from the reference set used as a batch, (K+1) grad L(R + z) - K grad L(R).

Found in review (docs/accuracy.md, section 1g). Nothing here is used by the scorers.
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch
from torch.func import grad

from pipeline.evaluation import groundtruth as G
from pipeline.evaluation.metrics import spearman
from pipeline.influence.directions import target_gradient
from pipeline.influence.estimator import attach_block_rates, checkpoint_weights
from pipeline.influence.functional import derivative_mode
from pipeline.influence.vectors import dot


def main(argv: list[str]) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    args = dict(a.split("=") for a in argv)
    n_removed = int(args.pop("removed", 20))
    types = {f.name: f.type for f in G.LOOSetting.__dataclass_fields__.values()}
    kw = {k: (float(v) if types[k] in ("float", float) else int(v)) for k, v in args.items()}
    s = G.LOOSetting(**kw)
    gt = G.GroundTruth(s)
    t0 = time.perf_counter()
    full = gt.train(keep_checkpoints=True)
    base = gt.target_loss(full.final)
    ckpts = [c for c, _ in full.checkpoints]
    scores = gt.scores(gt.terms(full.checkpoints), ckpts)

    # theta at every step, for the trajectory-specific predictions
    model = copy.deepcopy(gt.init_model)
    model.train()
    at: dict[int, dict[str, torch.Tensor]] = {}

    def keep(step: int, lr: float, m: torch.nn.Module) -> None:
        at[step] = {k: v.detach().clone() for k, v in m.named_parameters() if k in gt.names}

    G.train_loop(
        model, gt.images, gt.tokens, gt.cfg, gt.order, list(range(s.steps + 1)), keep,
        progress=False,
    )  # fmt: skip
    assert all(torch.equal(at[s.steps][k], full.final[k]) for k in gt.names)
    g_V = target_gradient(gt.fns, full.final, gt.target_images, gt.target_tokens)
    rng = np.random.default_rng(s.seed + 2)
    removed = sorted(rng.choice(gt.n_train, size=n_removed, replace=False).tolist())
    actual = np.array(
        [gt.target_loss(gt.train(removed=gt.mask([z])).final) - base for z in removed]
    )
    pos = {z: i for i, z in enumerate(removed)}

    def batch_loss(p, im, tok):
        return gt.fns.batch_loss(p, im, tok)

    def sample_loss(p, im, tok):
        return gt.fns.sample_losses(p, im, tok)[0]

    traj_ref, traj_in = np.zeros(n_removed), np.zeros(n_removed)
    with derivative_mode():
        for st in range(s.steps):
            idx = gt.order[st]
            hit = [z for z in idx.tolist() if z in pos]
            if not hit:
                continue
            eta = s.rate(st)
            p = at[st]
            g_full = grad(batch_loss)(p, gt.images[idx], gt.tokens[idx])
            for z in hit:
                rest = idx[idx != z]
                g_rest = grad(batch_loss)(p, gt.images[rest], gt.tokens[rest])
                traj_in[pos[z]] += eta * float(dot(g_V, {k: g_full[k] - g_rest[k] for k in g_V}))
                g_z = grad(sample_loss)(p, gt.images[[z]], gt.tokens[[z]])
                traj_ref[pos[z]] += eta / len(idx) * float(dot(g_V, g_z))

    k = gt.ref_images.shape[0]
    set_removal = np.zeros(n_removed)
    with derivative_mode():
        # the checkpoints with the block rates, as gt.scores weighs them
        blocked = attach_block_rates(ckpts, s.rate)
        weights = checkpoint_weights(blocked, gt.n_train)
        for (_, p), w in zip(full.checkpoints, weights, strict=True):
            g_V_t = target_gradient(gt.fns, p, gt.target_images, gt.target_tokens)
            g_R = grad(batch_loss)(p, gt.ref_images, gt.ref_tokens)
            for z in removed:
                ims = torch.cat([gt.ref_images, gt.images[[z]]])
                toks = torch.cat([gt.ref_tokens, gt.tokens[[z]]])
                g_Rz = grad(batch_loss)(p, ims, toks)
                g_z = {n: (k + 1) * g_Rz[n] - k * g_R[n] for n in g_Rz}
                set_removal[pos[z]] += w.first * float(dot(g_V_t, g_z))

    out = {}
    for name, pred in (
        ("tracin", scores["tracin"][removed]),
        ("diffin", scores["diffin"][removed]),
        ("traj_ref", traj_ref),
        ("traj_inbatch", traj_in),
        ("tracin_set_removal", set_removal),
    ):
        out[name] = {
            "spearman": round(spearman(pred, actual), 3),
            "pearson": round(float(np.corrcoef(pred, actual)[0, 1]), 3),
            "slope": round(float((pred * actual).sum() / (pred * pred).sum()), 3),
        }
        print(f"{name:20s} {out[name]}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
