"""Self-influence variants as noise detectors (issue 8): which form of I(z, z) separates mismatched captions?

    python -m benchmarks.self_variants --run RUN --data 'POOL/{00000..00007}.tar' \
        --truth POOL/truth.parquet --out docs/figures/self_variants.json

Reads a trained run (``diffin train``: trajectory, reference negatives,
gradient batches) and, at every checkpoint, the per-sample gradients g_z of
every pool pair (frozen references, token embedding left out: approximation
1 of ``pipeline/influence/selfinf.py``), kept as seeded count-sketches of
``--dim`` coordinates. From them, AUROC of "large value => mismatched
caption" for:

- ``sq_t``: ||g_z(theta_t)||^2 per checkpoint (TracIn self-influence's terms);
  ``tracin_self``: their sum with the first-order weights (eta Delta / N).
- ``final_t``: <g_z(theta_T), g_z(theta_t)>, the first-order effect of z's
  update at t on its own *final* loss (the propagated form's pairing, with no
  curvature); ``final_pairing``: their weighted sum.
- ``fisher_damped``: the same with z's displacement transported to T through
  SGD with momentum on the empirical-Fisher curvature of the gradient-batch
  samples (its exact eigenbasis in the sketch space; the complement is left
  undamped): the propagated self-influence under that curvature.
- ``loss_t``: the per-sample loss (reference negatives) per checkpoint, and
  its mean over the trajectory.

Sketched inner products are unbiased; with ``--dim`` 4096 their relative
error is about 1/sqrt(dim) of ||a|| ||b||.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from benchmarks.common import environment, md_table, write_json


def survival(curvature: np.ndarray, steps: int, lr: float, momentum: float) -> np.ndarray:
    """Displacement j = 0..steps steps after a unit gradient pushed into torch SGD (momentum)
    on the quadratic 0.5 c x^2, for each curvature c: shape (steps + 1, len(c))."""
    c = np.asarray(curvature, dtype=np.float64)
    buf = np.ones_like(c)
    x = -lr * buf
    out = [x.copy()]
    for _ in range(steps):
        buf = momentum * buf + c * x
        x = x - lr * buf
        out.append(x.copy())
    return np.array(out)


def sketched(fns, params, refs, sketch, images, tokens) -> tuple[np.ndarray, np.ndarray]:
    """(count-sketches, exact squared norms) of the per-sample gradients of a set of pairs."""
    from pipeline.influence.selfinf import per_sample_grads

    sk, norms = [], []
    for s in range(0, images.shape[0], 64):
        g = per_sample_grads(fns, params, refs, images[s : s + 64], tokens[s : s + 64])
        norms.append(sum(v.reshape(v.shape[0], -1).double().pow(2).sum(1) for v in g.values()))
        sk.append(sketch(g).double())
    return torch.cat(sk).numpy(), torch.cat(norms).numpy()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.self_variants", description=__doc__)
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="the pool's shard pattern")
    p.add_argument("--truth", required=True, help="truth.parquet of the generated pool")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/figures/self_variants.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from pipeline.data.reader import iter_shard
    from pipeline.data.shards import resolve_shards
    from pipeline.evaluation.metrics import auroc_low_is_positive
    from pipeline.influence.estimator import checkpoint_weights
    from pipeline.influence.functional import ClipFunctions, derivative_mode
    from pipeline.influence.selfinf import (
        DEFAULT_EXCLUDE,
        CountSketch,
        FrozenReferences,
    )
    from pipeline.model import factory
    from pipeline.model.batches import encode
    from pipeline.rundir import RunDir
    from pipeline.score.directions import load_set
    from pipeline.score.table import read_table
    from pipeline.score.trajectory import load_state_dict, load_trajectory
    from pipeline.tensors import load_tensors

    t0 = time.perf_counter()
    run = RunDir(a.run)
    traj = load_trajectory(run)
    opt = traj.record["optimizer"]
    if opt["name"] != "sgd":
        raise SystemExit(
            "self_variants: the transport models torch SGD; this run used " + opt["name"]
        )
    bundle = factory.create(traj.model, preprocess_cfg=traj.preprocess_cfg)
    ri, rt, _ = load_set(run, "reference", torch.float32)
    fns = ClipFunctions(bundle.model, ri, rt)
    names = [n for n, _ in bundle.model.named_parameters()]
    gb, _ = load_tensors(run.set_file("grad_batches"))
    g_images = gb["images"].reshape(-1, *gb["images"].shape[2:]).float()
    g_tokens = gb["tokens"].reshape(-1, gb["tokens"].shape[-1])
    samples = [s for url in resolve_shards(a.data) for s in iter_shard(url) if s.ok]
    images, tokens = encode(samples, bundle)
    truth = read_table(a.truth, columns=["uid", "defect"]).to_pandas().set_index("uid")
    bad = truth.loc[[s.uid for s in samples], "defect"].to_numpy() == "mismatch"

    def auroc_high(v: np.ndarray) -> float:  # large value => mismatched
        return round(float(auroc_low_is_positive(-np.asarray(v, np.float64), bad)), 3)

    steps = [c.step for c in traj.checkpoints]
    sketches, fisher, sq, loss = {}, {}, {}, {}
    for c in traj.checkpoints:
        state = load_state_dict(run, traj, c.step)
        params = {k: state[k] for k in names}
        refs = FrozenReferences.at(fns, params, DEFAULT_EXCLUDE)
        diff = {k: v for k, v in params.items() if k not in DEFAULT_EXCLUDE}
        sketch = CountSketch({k: v.shape for k, v in diff.items()}, a.dim, seed=0)

        sketches[c.step], sq[c.step] = sketched(fns, diff, refs, sketch, images, tokens)
        fisher[c.step], _ = sketched(fns, diff, refs, sketch, g_images, g_tokens)
        with torch.no_grad(), derivative_mode():
            loss[c.step] = torch.cat(
                [
                    fns.sample_losses(params, images[s : s + 256], tokens[s : s + 256])
                    for s in range(0, images.shape[0], 256)
                ]
            ).numpy()
        print(f"checkpoint {c.step}: per-sample gradients done", file=sys.stderr, flush=True)

    T = steps[-1]
    g_T = sketches[T]
    beta = float(opt.get("momentum", 0.0))
    per_t: dict[str, dict[int, float]] = {"sq": {}, "final": {}, "fisher_damped": {}, "loss": {}}
    totals = {"tracin_self": 0.0, "final_pairing": 0.0, "fisher_damped": 0.0}
    prev = 0
    # the first-order weight of each checkpoint, as the tracin_self scorer has it
    first = [w.first for w in checkpoint_weights(traj.checkpoints, traj.n_train)]
    for c, w in zip(traj.checkpoints, first, strict=True):
        t = c.step
        S = fisher[t]
        eig, vec = np.linalg.eigh(S @ S.T / S.shape[0])
        keep = eig > 1e-8 * eig.max()
        eig, vec = eig[keep], vec[:, keep]
        basis = (S.T @ vec) / np.sqrt(eig * S.shape[0])  # orthonormal eigenvectors of the Fisher
        p_T, p_t = g_T @ basis, sketches[t] @ basis
        cross = (g_T * sketches[t]).sum(1)
        # pushes at steps prev..t-1 (each stands for its block), transported to T
        decay = survival(eig, T - prev, c.lr, beta)[T - t : T - prev].sum(0)
        free = survival(np.zeros(1), T - prev, c.lr, beta)[T - t : T - prev].sum(0)[0]
        damped = -(free * (cross - (p_T * p_t).sum(1)) + (p_T * p_t * decay).sum(1)) / traj.n_train
        per_t["sq"][t] = auroc_high(sq[t])
        per_t["final"][t] = auroc_high(cross)
        per_t["fisher_damped"][t] = auroc_high(damped)
        per_t["loss"][t] = auroc_high(loss[t])
        totals["tracin_self"] = totals["tracin_self"] + w * sq[t]
        totals["final_pairing"] = totals["final_pairing"] + w * cross
        totals["fisher_damped"] = totals["fisher_damped"] + damped
        prev = t
    summary = {k: auroc_high(v) for k, v in totals.items()}
    summary["loss_last"] = per_t["loss"][T]
    summary["loss_mean"] = auroc_high(sum(loss.values()))
    summary["grad_norm_last"] = per_t["sq"][T]
    rows = [[k, v] for k, v in summary.items()]
    print(md_table(["variant", "AUROC mismatch"], rows))
    print(
        md_table(
            ["checkpoint", *per_t],
            [[t, *(per_t[k][t] for k in per_t)] for t in steps],
        )
    )
    record = {
        "command": "python -m benchmarks.self_variants " + " ".join(argv or sys.argv[1:]),
        "run": a.run,
        "steps": steps,
        "n": len(samples),
        "mismatched": int(bad.sum()),
        "summary": summary,
        "per_checkpoint": {k: {str(t): v for t, v in d.items()} for k, d in per_t.items()},
        "seconds": round(time.perf_counter() - t0, 1),
        "environment": environment(),
    }
    if a.out:
        write_json(a.out, record)
    return record


if __name__ == "__main__":
    main()
