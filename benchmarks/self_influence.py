"""Self-influence at scale (issue 8): the scalable form against the exact one, noise AUROC, cost.

    python -m benchmarks.self_influence --run runs/demo [--exact 48] [--out docs/self_influence.json]

Needs a run directory that `diffin demo` (or make-data, train, score with
--methods diffin_self,tracin_self,grand,el2n,loss,tracin,diffin) has filled:
the scores it reads are the pipeline's own, and the exact form is recomputed
here on a subset of samples at every checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from pipeline.data.reader import iter_shard
from pipeline.data.shards import resolve_shards
from pipeline.influence.directions import load_directions
from pipeline.influence.estimator import checkpoint_weights, diffin_components
from pipeline.influence.fast import fast_terms
from pipeline.influence.functional import ClipFunctions, derivative_mode
from pipeline.influence.reference import exact_self_terms
from pipeline.influence.selfinf import DEFAULT_EXCLUDE, SelfConfig, SelfInfluenceEngine
from pipeline.model import factory
from pipeline.model.batches import encode
from pipeline.rundir import RunDir, join
from pipeline.score.directions import load_eigenpairs, load_set
from pipeline.score.table import read_table
from pipeline.score.trajectory import load_state_dict, load_trajectory
from pipeline.tensors import load_tensors


def auroc(score: np.ndarray, bad: np.ndarray) -> float:
    """P(a defect scores below a clean pair): 1.0 = every defect ranks first for pruning."""
    from scipy.stats import rankdata

    r = rankdata(-score)
    n1, n0 = bad.sum(), (~bad).sum()
    return float((r[bad].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def noise_table(run: RunDir, truth_url: str) -> dict[str, dict[str, float]]:
    scores = read_table(run.scores).to_pandas()
    truth = read_table(truth_url, columns=["uid", "defect"]).to_pandas()
    d = scores[scores.status == "ok"].merge(truth, on="uid")
    out = {}
    cols = [
        c
        for c in (
            "diffin_self",
            "tracin_self",
            "grand",
            "el2n",
            "loss",
            "clip_score",
            "tracin",
            "diffin",
            "random",
        )
        if c in d.columns
    ]
    second = [c for c in d.columns if c.startswith("diffin_self_second_t")]
    d["diffin_self_second_only"] = d[second].sum(axis=1)
    for c in cols + ["diffin_self_second_only"]:
        out[c] = {
            defect: round(auroc(d[c].to_numpy(), (d.defect == defect).to_numpy()), 3)
            for defect in ("mismatch", "noise", "duplicate")
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--exact", type=int, default=48, help="samples for the exact comparison")
    ap.add_argument("--out", default="docs/figures/self_influence.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8, help="H_B eigenpairs (as scored in --run)")
    ap.add_argument("--last", type=int, default=2, help="compare at the last N checkpoints")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = RunDir(args.run)
    traj = load_trajectory(run)
    bundle = factory.create(traj.model, preprocess_cfg=traj.preprocess_cfg)
    ri, rt, _ = load_set(run, "reference", torch.float32)
    fns = ClipFunctions(bundle.model, ri, rt)
    names = [n for n, _ in bundle.model.named_parameters()]
    gb, _ = load_tensors(run.set_file("grad_batches"))
    grad_batches = [(gb["images"][i], gb["tokens"][i]) for i in range(gb["images"].shape[0])]

    data = join(args.run, "data")
    shards = resolve_shards(data)
    samples = [s for s in iter_shard(shards[0]) if s.ok][: args.exact]
    images, tokens = encode(samples, bundle)
    weights = dict(
        zip(
            [c.step for c in traj.checkpoints],
            checkpoint_weights(traj.checkpoints, traj.n_train),
            strict=True,
        )
    )

    variants = {
        f"Lanczos r={args.rank}, no token embedding (the default form)": SelfConfig(rank=args.rank),
        "with token embedding": SelfConfig(rank=args.rank, exclude=()),
        "empirical Fisher, sketch k=2048": SelfConfig(hb="fisher", dim=2048),
    }
    totals = {"exact": np.zeros(len(samples)), **{v: np.zeros(len(samples)) for v in variants}}
    first = {"exact": np.zeros(len(samples)), **{v: np.zeros(len(samples)) for v in variants}}
    timing: dict[str, float] = {}
    for ckpt in traj.checkpoints[-args.last :]:
        state = load_state_dict(run, traj, ckpt.step)
        params = {k: state[k] for k in names}
        d = load_directions(run.directions(ckpt.step)).ordered(names)
        t = time.perf_counter()
        ex = {
            k: v.numpy()
            for k, v in exact_self_terms(fns, params, d, grad_batches, images, tokens).items()
        }
        timing["exact"] = timing.get("exact", 0) + time.perf_counter() - t
        # target V = {z}: the hv term <g_z, H_V g_B> is self_hz (as in the diffin_self scorer)
        f, s = diffin_components(
            ex["self_first"], ex["self_hb"], ex["self_hz"], ex["self_hz"], weights[ckpt.step]
        )
        totals["exact"] += f + s
        first["exact"] += f
        for name, cfg in variants.items():
            # The run's own eigenpairs when they are the asked rank and cover the same
            # parameters (scored with the token embedding left out), else computed here.
            eigen = load_eigenpairs(run, ckpt.step) if cfg.hb == "lanczos" else None
            if eigen is not None and (len(eigen[0]) != cfg.rank or cfg.exclude != DEFAULT_EXCLUDE):
                eigen = None
            engine = SelfInfluenceEngine(fns, params, d.g_B, grad_batches, cfg, eigen)
            t = time.perf_counter()
            ap_ = {k: v.numpy() for k, v in engine.terms(images, tokens).items()}
            timing[name] = timing.get(name, 0) + time.perf_counter() - t
            f, s = diffin_components(
                ap_["self_first"],
                ap_["self_hb"],
                ap_["self_hz"],
                ap_["self_hz"],
                weights[ckpt.step],
            )
            totals[name] += f + s
            first[name] += f
        # The cost unit: a plain forward pass of the same samples, as benchmarks/throughput.py
        # uses (the reference-negative loss, which also embeds the K references, is reported
        # beside it: about 6.6 forward passes on diffin-small, not the 3 once assumed).
        t = time.perf_counter()
        with torch.no_grad(), derivative_mode():
            fns.embed(params, images, tokens)
        timing["forward"] = timing.get("forward", 0) + time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad(), derivative_mode():
            fns.sample_losses(params, images, tokens)
        timing["reference-negative loss"] = (
            timing.get("reference-negative loss", 0) + time.perf_counter() - t
        )
        t = time.perf_counter()
        fast_terms(fns, params, d, images, tokens, {"first", "hb", "hz"})
        timing["diffin (target, fast form)"] = (
            timing.get("diffin (target, fast form)", 0) + time.perf_counter() - t
        )

    agreement = {
        name: {
            "spearman_total": round(float(spearmanr(totals["exact"], totals[name]).statistic), 3),
            "spearman_first_order": round(
                float(spearmanr(first["exact"], first[name]).statistic), 3
            ),
        }
        for name in variants
    }
    cost = {k: round(v / timing["forward"], 2) for k, v in timing.items()}
    result = {
        "run": args.run,
        "exact_samples": len(samples),
        "checkpoints": [c.step for c in traj.checkpoints],
        "agreement_with_exact": agreement,
        "cost_forward_equivalents": cost,
        "noise_auroc": noise_table(run, join(data, "truth.parquet")),
        "ratio_second_to_first_median": round(
            float(np.median(np.abs(totals["exact"] - first["exact"]) / np.abs(first["exact"]))), 2
        ),
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
