"""Noise AUROC of TracIn and the propagated Diff-In with g_z as z's removal gradient.

    python -m benchmarks.removal_noise --run RUN --data 'POOL/{00000..00007}.tar' \
        --truth POOL/truth.parquet

RUN must hold the propagated directions (a `diffin score` run of the default
form). The removal gradient (``per_sample_loss(removal=True)``) is the gradient of
l_rem(z) = (K+1) L(R + z) - K L(R): z's own reference-negative loss plus what z
adds as a negative to each reference pair's loss, R being the K references used
as a batch (docs/accuracy.md, section 1g). The plain columns reproduce the
pipeline's `tracin` and `diffin`.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.func import jvp

from benchmarks.self_influence import auroc
from pipeline.data.reader import iter_shard
from pipeline.data.shards import resolve_shards
from pipeline.influence.directions import load_directions
from pipeline.influence.functional import ClipFunctions, derivative_mode
from pipeline.model import factory
from pipeline.model.batches import encode
from pipeline.rundir import RunDir
from pipeline.score.directions import load_set, propagated_url
from pipeline.score.trajectory import load_state_dict, load_trajectory
from pipeline.scorers import ScoreContext
from pipeline.tensors import load_tensors


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = RunDir(a.run)
    traj = load_trajectory(run)
    bundle = factory.create(traj.model, preprocess_cfg=traj.preprocess_cfg)
    ref_images, ref_tokens, _ = load_set(run, "reference", torch.float32)
    fns = ClipFunctions(bundle.model, ref_images, ref_tokens)
    samples = [s for u in resolve_shards(a.data) for s in iter_shard(u) if s.ok]
    images, tokens = encode(samples, bundle)
    names = [n for n, _ in bundle.model.named_parameters()]
    ctx = ScoreContext(traj.checkpoints, traj.n_train, 0, {"second_order": "propagated"})
    out = {k: np.zeros(len(samples)) for k in ("tracin", "diffin", "tracin_rem", "diffin_rem")}
    for c, w in zip(traj.checkpoints, ctx.weights(), strict=True):
        state = load_state_dict(run, traj, c.step)
        params = {k: state[k].float() for k in names}
        g_V = load_directions(run.directions(c.step)).ordered(names).g_V
        flat, _ = load_tensors(propagated_url(run, c.step))
        r_t = {k: flat[k].float() for k in names}
        for at in range(0, len(samples), 128):
            im, tok = images[at : at + 128], tokens[at : at + 128]
            with torch.no_grad(), derivative_mode():
                for suffix, loss in (
                    ("", lambda p, im=im, tok=tok: fns.sample_losses(p, im, tok)),
                    ("_rem", lambda p, im=im, tok=tok: fns.sample_losses(p, im, tok, removal=True)),
                ):
                    along_v = jvp(loss, (params,), (g_V,))[1]
                    along_r = jvp(loss, (params,), (r_t,))[1]
                    out["tracin" + suffix][at : at + 128] += w.first * along_v.double().numpy()
                    out["diffin" + suffix][at : at + 128] += along_r.double().numpy()
        print(f"checkpoint {c.step} done", flush=True)
    truth = pq.read_table(a.truth, columns=["uid", "defect"]).to_pydict()
    defect = dict(zip(truth["uid"], truth["defect"], strict=True))
    bad = np.array([defect.get(s.uid, "clean") == "mismatch" for s in samples])
    result = {k: round(auroc(v, bad), 4) for k, v in out.items()}  # low score => mismatched
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"command": "python -m benchmarks.removal_noise", **vars(a), **result}, fh)
    return result


if __name__ == "__main__":
    main()
