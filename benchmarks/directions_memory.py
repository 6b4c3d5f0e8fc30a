"""Peak memory of the directions stage's derivatives: former methods against chunked ones.

    .venv/bin/python benchmarks/directions_memory.py [--stage target|batch|ggn]
        [--model diffin-small] [--refs 255] [--targets 128] [--batch 512] [--chunk 64]
        [--out docs/figures/directions_memory[_STAGE].json]

The direction vectors are computed once per checkpoint by double backward,
and the propagated form applies a Gauss-Newton product at every training
step. Three stages, each with its former method and the current one:

- ``target``: g_V = grad L_V and u = H_V g_B. L_V ties every target to all
  K reference negatives, so the former method differentiated each chunk of
  up to 256 targets together with all K references (the review's estimate
  for ViT-B-32 at the defaults, 128 targets and 255 references: 88 GiB).
- ``batch``: g_B and w = H_B g_V on one gradient batch of ``--batch`` pairs;
  the former method differentiated the batch whole (about 250 GiB for
  ViT-B-32 at a batch of 512).
- ``ggn``: five products G_B v on one batch of ``--batch`` pairs; the former
  operator kept the batch's graph (``--ggn-kept-pairs`` at least the batch),
  the chunked one applies it through the embeddings (``--ggn-kept-pairs 0``).

The current methods (``directions.chained_gradient_and_hvp`` and the
Gauss-Newton operator's chunked batches) apply the chain rule through the
embeddings and differentiate ``--chunk`` pairs at a time.

Each method runs in a fresh process (same model, seed, pairs and vector),
which reports its peak RSS above the RSS after set-up (``VmHWM``) and its
wall time; the parent checks the two give the same vectors (relative
difference) and writes the ratios. Memory on a GPU follows the same
tensors; this measures the host.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, md_table, one_thread, write_json  # noqa: E402

FORMER_CHUNK = 256  # targets per pass in the former method, each with all K references
STAGES = ("target", "batch", "ggn")
GGN_PRODUCTS = 5
NAMES = {"target": ("g_V", "H_V v"), "batch": ("g_B", "H_B v"), "ggn": ("G_B v", "G_B v")}


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _former(fns, params, images, tokens, vector):
    """The former method: each chunk of targets differentiated with all K references."""
    import torch

    from pipeline.influence.functional import derivative_mode

    n = images.shape[0]
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    h_total = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, n, FORMER_CHUNK):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        with derivative_mode():
            losses = fns.sample_losses(
                p, images[start : start + FORMER_CHUNK], tokens[start : start + FORMER_CHUNK]
            )
            grads = torch.autograd.grad(
                losses.sum() / n, list(p.values()), allow_unused=True, create_graph=True
            )
            gv = sum((g * vector[k]).sum() for g, k in zip(grads, p, strict=True) if g is not None)
            hv = torch.autograd.grad(gv, list(p.values()), allow_unused=True)
        for g, h, k in zip(grads, hv, p, strict=True):
            if g is not None:
                total[k] += g.detach()
            if h is not None:
                h_total[k] += h.detach()
    return total, h_total


def _former_batch(fns, params, images, tokens, vector):
    """The former method: the gradient batch's loss differentiated twice, whole."""
    import torch

    from pipeline.influence.functional import derivative_mode

    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    with derivative_mode():
        loss = fns.batch_loss(p, images, tokens)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        gv = sum((g * vector[k]).sum() for g, k in zip(grads, p, strict=True))
        hv = torch.autograd.grad(gv, list(p.values()), allow_unused=True)
    zero = torch.zeros_like
    return (
        {k: g.detach() for g, k in zip(grads, p, strict=True)},
        {k: zero(p[k]) if h is None else h for h, k in zip(hv, p, strict=True)},
    )


def _ggn(fns, params, images, tokens, vector, kept_pairs, chunk, timing):
    """Products of the Gauss-Newton operator, built once (as per checkpoint)."""
    from pipeline.influence.directions import GaussNewton

    t0 = time.perf_counter()
    ggn = GaussNewton(fns, params, [(images, tokens)], kept_pairs, chunk)
    timing["build_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    for _ in range(GGN_PRODUCTS):
        out = ggn(vector)
    timing["seconds_per_product"] = round((time.perf_counter() - t0) / GGN_PRODUCTS, 3)
    return out, out


def child(args: argparse.Namespace) -> None:
    import torch

    from pipeline.influence.directions import batch_gradient_and_hvp, target_gradient_and_hvp
    from pipeline.influence.functional import ClipFunctions
    from pipeline.model import factory

    one_thread(args.threads)
    torch.manual_seed(0)
    bundle = factory.create(args.model)
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    g = torch.Generator().manual_seed(1)

    def pairs(n: int):
        return (
            torch.randn(n, 3, size, size, generator=g),
            torch.randint(1, 49_000, (n, 77 if args.model.startswith("ViT") else 24), generator=g),
        )

    ref, target = pairs(args.refs), pairs(args.targets)
    batch = pairs(args.batch)
    fns = ClipFunctions(bundle.model, *ref)
    params = factory.param_dict(bundle.model)
    vector = {k: torch.randn(v.shape, generator=g) / v.numel() ** 0.5 for k, v in params.items()}
    base = _peak_mb()
    t0 = time.perf_counter()
    former = args.child == "former"
    timing: dict[str, float] = {}
    if args.stage == "target":
        if former:
            grad, hvp = _former(fns, params, *target, vector)
        else:
            grad, hvp = target_gradient_and_hvp(fns, params, *target, vector, args.chunk)
    elif args.stage == "batch":
        if former:
            grad, hvp = _former_batch(fns, params, *batch, vector)
        else:
            grad, hvp = batch_gradient_and_hvp(fns, params, [batch], vector, args.chunk)
    else:
        kept = args.batch if former else 0
        grad, hvp = _ggn(fns, params, *batch, vector, kept, args.chunk, timing)
    seconds = time.perf_counter() - t0
    torch.save({"grad": grad, "hvp": hvp}, args.vectors)
    print(
        json.dumps({"peak_mb": round(_peak_mb() - base, 1), "seconds": round(seconds, 2), **timing})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=STAGES, default="target")
    ap.add_argument("--model", default="diffin-small")
    ap.add_argument("--refs", type=int, default=255)
    ap.add_argument("--targets", type=int, default=128)
    ap.add_argument("--batch", type=int, default=512, help="pairs of the gradient batch")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="default: docs/figures/directions_memory[_STAGE].json")
    ap.add_argument("--child", choices=["former", "chunked"], help=argparse.SUPPRESS)
    ap.add_argument("--vectors", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch

    args.out = args.out or "docs/figures/directions_memory{}.json".format(
        "" if args.stage == "target" else f"_{args.stage}"
    )
    sizes = (
        {"refs": args.refs, "targets": args.targets, "former_chunk": FORMER_CHUNK}
        if args.stage == "target"
        else {"batch": args.batch}
    )
    out: dict = {
        "stage": args.stage,
        "model": args.model,
        **sizes,
        "chunk": args.chunk,
        "environment": environment(),
    }
    vectors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("former", "chunked"):
            path = f"{tmp}/{method}.pt"
            cmd = [sys.executable, __file__, "--child", method, "--vectors", path]
            for flag in ("stage", "model", "refs", "targets", "batch", "chunk", "threads"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[method] = json.loads(done.stdout.strip().splitlines()[-1])
            vectors[method] = torch.load(path, weights_only=True)
            print(method, out[method], flush=True)

    def rel(kind: str) -> float:
        a, b = vectors["chunked"][kind], vectors["former"][kind]
        num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b) ** 0.5
        den = sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5
        return num / den

    first, second = NAMES[args.stage]
    out["relative_difference"] = {first: rel("grad"), second: rel("hvp")}
    out["memory_ratio_former_over_chunked"] = round(
        out["former"]["peak_mb"] / max(out["chunked"]["peak_mb"], 1e-9), 2
    )
    out["time_ratio_chunked_over_former"] = round(
        out["chunked"]["seconds"] / max(out["former"]["seconds"], 1e-9), 2
    )
    if args.stage == "ggn":  # the propagation builds once per checkpoint, multiplies per step
        out["product_time_ratio_chunked_over_former"] = round(
            out["chunked"]["seconds_per_product"] / out["former"]["seconds_per_product"], 2
        )
    write_json(args.out, out)
    print(
        md_table(
            ["method", "pairs per differentiated pass", "peak MiB above set-up", "seconds"],
            [
                [
                    "former",
                    min(args.targets, FORMER_CHUNK) + args.refs
                    if args.stage == "target"
                    else args.batch,
                    out["former"]["peak_mb"],
                    out["former"]["seconds"],
                ],
                ["chunked", args.chunk, out["chunked"]["peak_mb"], out["chunked"]["seconds"]],
            ],
        )
    )
    print(json.dumps({k: out[k] for k in out if k not in ("environment", "former", "chunked")}))


if __name__ == "__main__":
    main()
