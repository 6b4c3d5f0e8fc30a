"""Throughput of every scorer's per-sample work, in forward-pass equivalents (METHOD.md 8).

    python -m benchmarks.throughput --out docs/figures/throughput.json --figures docs/figures

One process, one model ("diffin-small" by default), one batch (128 pairs of a
generated pool), one set of direction vectors. Timed, per sample and per
checkpoint (median of --repeats):

- forward:   a plain forward pass of the batch (embeddings only): the unit;
- loss:      the per-sample loss vector against the K reference negatives;
- tracin:    fast_terms(need={"first"}): one JVP;
- diffin:    fast_terms(need={"first","hz","hlin"}): nested JVP + one JVP along
             W_hb w + W_hv u (what the engine runs for the derived weights);
- diffin_propagated: fast_terms(need={"first","hlin"}): two JVPs, what the engine runs
             for the propagated form (hlin along r_t - W_first g_V);
- tracin_removal, diffin_propagated_removal: the same with the removal gradient as g_z
             (--sample-gradient removal, the pipeline's default);
- diffin_separate: the same terms with hb and hv as two JVPs;
- diffin_cd: the same terms with hz by a central difference of JVPs
             (2 JVPs at theta +- h g_B) instead of the nested JVP;
- reference forms, per sample on --ref-samples samples: the authors'
  finite-difference form and the exact double-backward form.

The loss, tracin and diffin rows are what the scoring engine does: the K=255
references' embeddings and their derivatives along the fixed directions
(``fast.reference_jets``) computed once per checkpoint and reused by every
batch (reported). Also measured: ``*_jets_per_batch`` (the references
re-embedded with their derivatives in every batch, the first implementation)
and ``*_K1`` (a single reference negative: a lower bound).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import environment, md_table, one_thread, pyplot, write_json


def _data(n: int, seed: int):
    import tempfile

    from pipeline.data.reader import iter_shard
    from pipeline.data.shards import resolve_shards
    from pipeline.data.synth import SynthConfig, make_pool

    with tempfile.TemporaryDirectory(prefix="diffin-tp-") as d:
        s = make_pool(d, SynthConfig(samples=n, shard_size=n, eval_samples=0, seed=seed))
        return [x for u in resolve_shards(s["train_data"]) for x in iter_shard(u) if x.ok]


def _spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x.double().cpu().numpy(), y.double().cpu().numpy())[0])


def cd_terms(fns, params, d, images, tokens, h: float):
    """first and hz by a central difference of JVPs along g_B (fallback to the nested JVP)."""
    import torch
    from torch.func import jvp

    from pipeline.influence.functional import derivative_mode
    from pipeline.influence.vectors import axpy, norm

    def f(p):
        return fns.sample_losses(p, images, tokens)

    s = h / float(norm(d.g_B))
    with torch.no_grad(), derivative_mode():
        _, jp = jvp(f, (axpy(s, d.g_B, params),), (d.g_V,))
        _, jm = jvp(f, (axpy(-s, d.g_B, params),), (d.g_V,))
        loss, hb = jvp(f, (params,), (d.w,))
    return {"first": 0.5 * (jp + jm), "hz": (jp - jm) / (2 * s), "hb": hb, "loss": loss}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    p.add_argument("--model", default="diffin-small")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--references", type=int, default=255)
    p.add_argument("--grad-batches", type=int, default=4)
    p.add_argument("--grad-batch-size", type=int, default=64)
    p.add_argument("--ref-samples", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cd-h", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (one GPU)")
    p.add_argument(
        "--precision",
        choices=["float32", "amp_bf16"],
        default="float32",
        help="amp_bf16: the timed scorer passes under bfloat16 autocast, as `diffin score "
        "--dtype amp_bf16` runs them (weights, directions and the reference forms in float32)",
    )
    p.add_argument("--out", default="docs/figures/throughput.json")
    p.add_argument("--figures", default="docs/figures")
    a = p.parse_args(argv)
    one_thread(a.threads)
    import torch

    from pipeline.influence.directions import GaussNewton, compute_directions
    from pipeline.influence.fast import fast_terms, reference_jets
    from pipeline.influence.functional import ClipFunctions, derivative_mode
    from pipeline.influence.reference import exact_terms, finite_difference_terms
    from pipeline.model import factory
    from pipeline.model.batches import encode

    t_start = time.perf_counter()
    B, K = a.batch_size, a.references
    n_gb = a.grad_batches * a.grad_batch_size
    samples = _data(B + K + n_gb + B, a.seed)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    factory.exact_float32(device, torch.float32)  # TF32 off, as the scoring actors
    bundle = factory.create(a.model, device=device)
    images, tokens = encode(samples, bundle)
    images, tokens = images.to(device), tokens.to(device)

    def sync() -> None:  # CUDA runs asynchronously: a timer must wait for the kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def amp():  # the timed passes' context: bfloat16 autocast for --precision amp_bf16
        if a.precision == "amp_bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    batch = (images[:B], tokens[:B])
    ref = (images[B : B + K], tokens[B : B + K])
    gb = [
        (
            images[B + K + i * a.grad_batch_size : B + K + (i + 1) * a.grad_batch_size],
            tokens[B + K + i * a.grad_batch_size : B + K + (i + 1) * a.grad_batch_size],
        )
        for i in range(a.grad_batches)
    ]
    target = (images[B + K + n_gb :], tokens[B + K + n_gb :])
    model = bundle.model
    fns = ClipFunctions(model, *ref)
    fns1 = ClipFunctions(model, ref[0][:1], ref[1][:1])
    # the default per-sample gradient (--sample-gradient removal): g_z of diffin/tracin is
    # z's removal gradient from R used as a batch, one K x K logits product more per pass
    fns_rm = ClipFunctions(model, *ref, removal=True)
    params = factory.param_dict(model)
    names = list(params)
    sync()
    t = time.perf_counter()
    d = compute_directions(fns, params, gb, target).ordered(names)
    sync()
    directions_s = time.perf_counter() - t

    # Interleaved rounds (every form once per round, median over rounds): on a shared
    # machine, contention then hits every form alike instead of whichever ran last.
    forms = {
        "forward": lambda: fns.embed(params, *batch),
        "forward_refs_only": lambda: fns.embed(params, *ref),
    }
    # What the scoring engine does: the references' jets once per checkpoint (reused),
    # against recomputing them in every batch ("_jets_per_batch") and K = 1 ("_K1").
    needs = {
        "loss": {"loss"},
        "tracin": {"first"},
        "diffin": {"first", "hz", "hlin"},
        "diffin_propagated": {"first", "hlin"},
        "diffin_separate": {"first", "hb", "hz", "hv"},
    }
    lin = d.combined(-1.0, -0.5)  # the cost does not depend on the weights
    jets = {k: reference_jets(fns, params, d, n, lin) for k, n in needs.items()}
    for k, n in needs.items():
        forms[k] = lambda k=k, n=n: fast_terms(fns, params, d, *batch, n, jets[k], lin)
        forms[k + "_jets_per_batch"] = lambda n=n: fast_terms(fns, params, d, *batch, n, None, lin)
        forms[k + "_K1"] = lambda n=n: fast_terms(fns1, params, d, *batch, n, None, lin)
    for k in ("tracin", "diffin_propagated"):
        n = needs[k]
        jets_rm = reference_jets(fns_rm, params, d, n, lin)
        forms[k + "_removal"] = lambda n=n, j=jets_rm: fast_terms(
            fns_rm, params, d, *batch, n, j, lin
        )
    forms["diffin_first_hz_nested_only"] = lambda: fast_terms(fns, params, d, *batch, {"hz"})
    forms["diffin_hb_jvp_only"] = lambda: fast_terms(fns, params, d, *batch, {"hb"})
    forms["diffin_cd"] = lambda: cd_terms(fns, params, d, *batch, a.cd_h)
    rounds: dict[str, list[float]] = {k: [] for k in forms}
    for rep in range(a.repeats + 1):
        for k, fn in forms.items():
            sync()
            t = time.perf_counter()
            with amp():
                if k.startswith("forward"):
                    with torch.no_grad(), derivative_mode():
                        fn()
                else:
                    fn()
            sync()
            if rep:  # round 0 is the warm-up
                rounds[k].append(time.perf_counter() - t)
    sec = {k: statistics.median(v) for k, v in rounds.items()}
    # the propagated form's fixed cost: one Gauss-Newton product on the k gradient batches
    # per training step, paid once per run on the driver (not per sample)
    sync()
    t = time.perf_counter()
    gauss_newton = GaussNewton(fns, params, gb)  # once per checkpoint
    sync()
    prop_setup = time.perf_counter() - t
    prop_step = []
    for _ in range(3):
        t = time.perf_counter()
        gauss_newton(d.g_V)
        sync()
        prop_step.append(time.perf_counter() - t)
    per_sample = {k: v / B for k, v in sec.items() if not k.startswith("forward_refs")}
    per_sample["forward"] = sec["forward"] / B

    # accuracy of the central difference against the nested JVP (same fp32 run)
    nested = fast_terms(fns, params, d, *batch, {"first", "hb", "hz"})
    cd = cd_terms(fns, params, d, *batch, a.cd_h)
    cd_err = {
        k: float((cd[k] - nested[k]).abs().max() / nested[k].abs().max()) for k in ("first", "hz")
    }

    # the default scorer's terms under the timed precision against float32 (same batch)
    default_need = needs["diffin_propagated"]
    jets_default = reference_jets(fns_rm, params, d, default_need, lin)
    fp32_terms = fast_terms(fns_rm, params, d, *batch, default_need, jets_default, lin)
    with amp():
        timed_terms = fast_terms(fns_rm, params, d, *batch, default_need, jets_default, lin)
    precision_agreement = {
        k: {
            "spearman": _spearman(timed_terms[k], fp32_terms[k]),
            "max_abs_err_over_max_abs": float(
                (timed_terms[k].float() - fp32_terms[k]).abs().max() / fp32_terms[k].abs().max()
            ),
        }
        for k in sorted(default_need)
    }

    # reference forms: per sample, on a few samples, in float32
    m = a.ref_samples
    sub = (batch[0][:m], batch[1][:m])
    sync()
    t = time.perf_counter()
    fd = finite_difference_terms(fns, params, d, gb, *sub)
    sync()
    per_sample["reference_fd"] = (time.perf_counter() - t) / m
    t = time.perf_counter()
    ex = exact_terms(fns, params, d, gb, *sub)
    sync()
    per_sample["reference_exact"] = (time.perf_counter() - t) / m
    ref_err = {
        k: float((fd[k] - nested[k][:m]).abs().max() / nested[k][:m].abs().max())
        for k in ("first", "hb", "hz")
    }
    ex_err = {
        k: float((ex[k] - nested[k][:m]).abs().max() / nested[k][:m].abs().max())
        for k in ("first", "hb", "hz")
    }

    unit = per_sample["forward"]
    fpe = {k: v / unit for k, v in per_sample.items()}
    # the same ratios against the loss with K=1 (a forward of the batch plus one pair)
    fpe_vs_loss_k1 = {k: v / per_sample["loss_K1"] for k, v in per_sample.items()}
    speedup = {
        "fd_over_diffin": per_sample["reference_fd"] / per_sample["diffin"],
        "exact_over_diffin": per_sample["reference_exact"] / per_sample["diffin"],
        "fd_over_diffin_propagated": per_sample["reference_fd"] / per_sample["diffin_propagated"],
        "fd_over_diffin_propagated_removal": per_sample["reference_fd"]
        / per_sample["diffin_propagated_removal"],
    }
    targets = {
        "diffin_fpe<=12": fpe["diffin"] <= 12,
        "diffin_speedup_vs_reference>=30": speedup["fd_over_diffin"] >= 30,
        "tracin_fpe<=4": fpe["tracin"] <= 4,
        "diffin_propagated_fpe<=12": fpe["diffin_propagated"] <= 12,
        # the pipeline's defaults: propagated form, removal gradient
        "default_diffin_fpe<=12": fpe["diffin_propagated_removal"] <= 12,
        "default_diffin_speedup_vs_reference>=30": speedup["fd_over_diffin_propagated_removal"]
        >= 30,
        "default_tracin_fpe<=4": fpe["tracin_removal"] <= 4,
    }
    if a.precision != "float32":
        # the reference forms and the propagation run in float32: ratios of them to the
        # autocast forms would mix precisions (the float32 run gives them)
        speedup = {k: None for k in speedup}
        targets = {k: None if "speedup" in k else v for k, v in targets.items()}
        for k in ("reference_fd", "reference_exact"):
            fpe[k] = fpe_vs_loss_k1[k] = None
    record = {
        "command": "python -m benchmarks.throughput "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(a),
        "n_params": sum(v.numel() for v in params.values()),
        "directions_seconds_per_checkpoint": directions_s,
        "propagate_setup_seconds_per_checkpoint": prop_setup,
        "propagate_seconds_per_training_step": statistics.median(prop_step),
        "propagate_step_in_forward_passes_of_the_batch": statistics.median(prop_step)
        / sec["forward"]
        if a.precision == "float32"
        else None,
        "seconds_per_batch": sec,
        "seconds_per_sample": per_sample,
        "samples_per_second": {k: 1 / v for k, v in per_sample.items()},
        "forward_pass_equivalents": fpe,
        "forward_pass_equivalents_vs_loss_K1": fpe_vs_loss_k1,
        "speedups": speedup,
        "targets_met": targets,
        "precision": a.precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        # diffin_propagated_removal's terms (the default scorer) at --precision vs float32
        "precision_vs_float32": precision_agreement,
        "cd_vs_nested_rel_err": cd_err,
        "fd_reference_vs_fast_rel_err": ref_err,
        "exact_reference_vs_fast_rel_err": ex_err,
        "total_seconds": time.perf_counter() - t_start,
        "environment": environment(),
    }
    if a.figures:
        plt = pyplot()
        Path(a.figures).mkdir(parents=True, exist_ok=True)
        keys = [
            "forward",
            "loss",
            "tracin",
            "diffin",
            "diffin_propagated",
            "tracin_removal",
            "diffin_propagated_removal",
            "loss_jets_per_batch",
            "tracin_jets_per_batch",
            "diffin_jets_per_batch",
            "reference_fd",
            "reference_exact",
        ]
        keys = [k for k in keys if fpe[k] is not None]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        ax.bar(
            keys,
            [fpe[k] for k in keys],
            color=(["gray"] + ["tab:blue"] * 6 + ["tab:cyan"] * 3 + ["tab:red"] * 2)[: len(keys)],
        )
        ax.set_yscale("log")
        ax.set_ylabel("forward-pass equivalents / sample / ckpt")
        ax.axhline(12, ls="--", c="k", lw=0.7)
        ax.axhline(4, ls=":", c="k", lw=0.7)
        where = f"{a.threads} CPU thread(s)" if device.type == "cpu" else record["device"]
        ax.set_title(f"{a.model}, batch {B}, K={K}, {a.precision}, {where}")
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
        fig.tight_layout()
        fig.savefig(Path(a.figures) / "throughput.png", dpi=110)
        plt.close(fig)
        record["figures"] = [str(Path(a.figures) / "throughput.png")]
    if a.out:
        write_json(a.out, record)
    rows = [[k, per_sample[k] * 1e3, 1 / per_sample[k], fpe[k] or ""] for k in per_sample]
    print(md_table(["form", "ms/sample/ckpt", "samples/s", "fwd-pass equiv."], rows))
    print("speedups", speedup, "\ntargets", targets, "\ncd err", cd_err, "\nfd err", ref_err)
    print(f"total {record['total_seconds']:.0f}s")
    return record


if __name__ == "__main__":
    main()
