"""Self-influence I(z, z) at scale (METHOD.md section 3, the authors' data-cleaning form).

    I(z, z) = sum_t a_t ( g_z' H_B g_z  +  g_z' H_z g_B ),   F(z, z) = sum_t (eta_t / N m) ||g_z||^2

Both terms need the per-sample gradient g_z itself, so, unlike I(z, V), no
fixed direction can be precomputed. The scalable form makes three named
approximations, each measured against the exact form
(``reference.exact_self_terms``) in ``benchmarks/self_influence.py``:

1. Frozen references. g_z is the gradient of l_z with the reference
   negatives' embeddings held constant at the checkpoint, so a per-sample
   gradient costs one single-sample forward and backward (``vmap(grad)``)
   instead of a backward pass through all K references per sample.
2. H_B ~= empirical Fisher of the gradient batches:
   H_B ~= (1/M) sum_b g_b g_b'  over the M samples of the k batches that
   define g_B, so g_z' H_B g_z ~= (1/M) sum_b <g_z, g_b>^2.
3. Those inner products are taken in a seeded count-sketch projection to k
   dimensions (unbiased for inner products; memory k per sample instead of
   the model size).

g_z' H_z g_B is exact under (1): forward-over-reverse (a JVP of the batched
per-sample gradient along g_B), with no projection. ||g_z||^2 is exact under (1).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch.func import functional_call, grad, jvp, vmap

from pipeline.influence.directions import PAIRS_PER_PASS, batch_gradient_and_hvp
from pipeline.influence.functional import ClipFunctions, Params, derivative_mode
from pipeline.model.loss import per_sample_loss

log = logging.getLogger(__name__)

# The token-embedding table is most of a small CLIP's parameters, and its
# per-sample gradient is dense in vmap though only ~20 rows are non-zero:
# excluding it made per-sample gradients 5x cheaper on diffin-small
# (approximation 0, measured with the others).
DEFAULT_EXCLUDE = ("token_embedding.weight",)
SELF_TERMS = frozenset({"self_first", "self_hb", "self_hz"})


SKETCH_BYTES_PER_PARAM = 12  # CountSketch: an int64 bucket and a float32 sign per parameter


@dataclass
class SelfConfig:
    hb: str = (
        "lanczos"  # how g_z' H_B g_z is approximated: "lanczos" (top-r eigenpairs) or "fisher"
    )
    rank: int = 16  # r eigenpairs of H_B (hb="lanczos")
    dim: int = 2048  # count-sketch dimension k (hb="fisher")
    memory_mb: int = 1024  # per-actor budget for per-sample gradients in flight
    exclude: tuple[str, ...] = field(default_factory=lambda: DEFAULT_EXCLUDE)
    seed: int = 0

    def plan(
        self, n_params: int, bytes_per_value: int = 4, grad_samples: int = 1024
    ) -> dict[str, int]:
        """What the per-actor memory budget allows, and what was chosen.

        Resident: the r eigenvectors of H_B (hb="lanczos", r x P values) or the
        count-sketch's bucket and sign tables (hb="fisher", 12 bytes per
        parameter: int64 bucket, float32 sign) plus the sketched Fisher,
        k x ``grad_samples`` float64 values. At most
        half the budget goes there: ``rank`` (or ``dim``) is lowered until it
        fits, never below 1. The rest bounds the chunk of samples in flight
        (g_z, H_z g_B and two work copies each).
        """
        budget = self.memory_mb << 20
        vec = n_params * bytes_per_value
        rank, dim, resident = self.rank, self.dim, 0
        if self.hb == "lanczos":
            rank = max(1, min(self.rank, (budget // 2) // vec))
            resident = rank * vec
        elif self.hb == "fisher":
            tables = SKETCH_BYTES_PER_PARAM * n_params
            per_dim = max(1, grad_samples) * 8
            dim = max(1, min(self.dim, max(0, budget // 2 - tables) // per_dim))
            resident = tables + dim * per_dim
        per_sample = 4 * vec
        chunk = max(1, min(256, max(0, budget - resident) // per_sample))
        return {
            "chunk": int(chunk),
            "rank": int(rank),
            "dim": int(dim),
            "params": n_params,
            "mb_per_sample": round(per_sample / 2**20, 2),
            "resident_mb": round(resident / 2**20, 1),
        }


@contextlib.contextmanager
def deterministic_on(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms for the block on a CUDA device, as they were after it.

    CUDA's index_add_ adds with atomics, in no fixed order, so a sketch (and
    the score) would move in the last bits from run to run; its deterministic
    algorithm sorts the indices first. Scoped: cuBLAS refuses to run under the
    global flag without a workspace setting.
    """
    if device.type != "cuda":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


class CountSketch:
    """Seeded count-sketch of model-sized vectors: coordinate i -> bucket h(i), sign s(i)."""

    def __init__(
        self,
        shapes: dict[str, torch.Size],
        dim: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        # Drawn on the host (the same tables whatever the device), then kept on ``device``:
        # 12 bytes a parameter, which a copy per call would move again for every chunk.
        gen = torch.Generator().manual_seed(seed)
        self.dim, self.seed = dim, seed
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.buckets: dict[str, torch.Tensor] = {}
        self.signs: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            n = int(torch.Size(shape).numel())
            self.buckets[name] = torch.randint(0, dim, (n,), generator=gen).to(device)
            self.signs[name] = (torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1).to(device)

    def __call__(self, grads: Params) -> torch.Tensor:
        """(chunk, *shape) per-sample tensors -> (chunk, dim) sketches."""
        first = next(iter(grads.values()))
        out = torch.zeros(first.shape[0], self.dim, dtype=first.dtype, device=first.device)
        for name, g in grads.items():
            flat = g.reshape(g.shape[0], -1) * self.signs[name].to(g.device, g.dtype)
            with deterministic_on(g.device):
                out.index_add_(1, self.buckets[name].to(g.device), flat)
        return out


@dataclass
class FrozenReferences:
    """Reference-negative embeddings at one checkpoint, held constant (approximation 1),
    and the checkpoint's values of the parameters left out of differentiation."""

    images: torch.Tensor
    texts: torch.Tensor
    fixed: Params = field(default_factory=dict)

    @classmethod
    def at(
        cls, fns: ClipFunctions, params: Params, exclude: tuple[str, ...] = ()
    ) -> FrozenReferences:
        assert fns.ref_images is not None and fns.ref_tokens is not None
        with torch.no_grad(), derivative_mode():
            img, txt = fns.embed(params, fns.ref_images, fns.ref_tokens)
        fixed = {k: v for k, v in params.items() if k in exclude}
        return cls(img.detach(), txt.detach(), fixed)


def _loss_one(fns: ClipFunctions, refs: FrozenReferences):
    def f(p: Params, image: torch.Tensor, token: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        # functional_call falls back to the module's own tensors for missing names:
        # pass the checkpoint's values of the excluded parameters explicitly.
        out = functional_call(fns.model, {**refs.fixed, **p}, (image[None], token[None]))
        return per_sample_loss(
            out["image_features"],
            out["text_features"],
            refs.images,
            refs.texts,
            p["logit_scale"],
            own[None],
        )[0]

    return f


def _own_refs(fns: ClipFunctions, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, K) self-match mask of :meth:`ClipFunctions.self_mask`, all False when none."""
    own = fns.self_mask(images, tokens)
    if own is None:
        assert fns.ref_tokens is not None
        own = torch.zeros(
            images.shape[0], fns.ref_tokens.shape[0], dtype=torch.bool, device=images.device
        )
    return own


def per_sample_grads(
    fns: ClipFunctions,
    params: Params,
    refs: FrozenReferences,
    images: torch.Tensor,
    tokens: torch.Tensor,
) -> Params:
    """g_z for a chunk of samples (frozen references), batched with vmap."""
    own = _own_refs(fns, images, tokens)
    with derivative_mode():
        return vmap(grad(_loss_one(fns, refs)), in_dims=(None, 0, 0, 0))(
            params, images, tokens, own
        )


def grads_and_hz_gb(
    fns: ClipFunctions,
    params: Params,
    refs: FrozenReferences,
    g_B: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
) -> tuple[Params, Params]:
    """(g_z, H_z g_B) for a chunk, by one forward-over-reverse pass."""
    g = vmap(grad(_loss_one(fns, refs)), in_dims=(None, 0, 0, 0))
    own = _own_refs(fns, images, tokens)
    with derivative_mode():
        return jvp(lambda p: g(p, images, tokens, own), (params,), (g_B,))


def self_terms(
    fns: ClipFunctions,
    params: Params,
    refs: FrozenReferences,
    g_B: Params,
    hb_form: Callable[[Params], torch.Tensor],
    images: torch.Tensor,
    tokens: torch.Tensor,
    chunk: int,
) -> dict[str, torch.Tensor]:
    """Per-sample self terms: self_first = ||g_z||^2, self_hb ~= g_z' H_B g_z, self_hz = g_z' H_z g_B.

    ``hb_form(g_z) -> (chunk,)`` is the chosen approximation of the quadratic form g_z' H_B g_z.
    """
    firsts, hbs, hzs = [], [], []
    for start in range(0, images.shape[0], chunk):
        gz, hz = grads_and_hz_gb(
            fns, params, refs, g_B, images[start : start + chunk], tokens[start : start + chunk]
        )
        firsts.append(sum(v.reshape(v.shape[0], -1).double().pow(2).sum(1) for v in gz.values()))
        hzs.append(
            sum(
                (v.reshape(v.shape[0], -1).double() * hz[k].reshape(v.shape[0], -1).double()).sum(1)
                for k, v in gz.items()
            )
        )
        hbs.append(hb_form(gz))
        del gz, hz
    return {
        "self_first": torch.cat(firsts).detach(),
        "self_hb": torch.cat(hbs).detach(),
        "self_hz": torch.cat(hzs).detach(),
    }


def hessian_eigenpairs(
    fns: ClipFunctions,
    params: Params,
    fixed: Params,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    seed: int = 0,
    chunk: int = PAIRS_PER_PASS,
) -> tuple[torch.Tensor, Params]:
    """Top-``rank`` eigenpairs (by magnitude) of H_B restricted to ``params``, by Lanczos
    (scipy's eigsh) on exact double-backward Hessian-vector products of the batch loss."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    n = sum(sizes)

    def unflat(v: torch.Tensor) -> Params:
        return {k: t.reshape(sh) for k, t, sh in zip(names, v.split(sizes), shapes, strict=True)}

    dtype, device = params[names[0]].dtype, params[names[0]].device

    def matvec(x: np.ndarray) -> np.ndarray:
        v = unflat(torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype, device=device))
        _, hv = batch_gradient_and_hvp(fns, params, batches, v, chunk, fixed)
        assert hv is not None
        return torch.cat([hv[k].reshape(-1) for k in names]).double().cpu().numpy()

    rank = min(rank, n - 1)
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals, vecs = eigsh(
        LinearOperator((n, n), matvec=matvec, dtype=np.float64),
        k=rank,
        which="LM",
        v0=v0,
        tol=1e-2,
        maxiter=20 * rank,
    )
    basis = torch.as_tensor(vecs.T, dtype=dtype, device=device)  # (rank, n)
    return torch.as_tensor(vals, dtype=torch.float64, device=device), {
        k: t.reshape(rank, *sh)
        for k, t, sh in zip(names, basis.split(sizes, dim=1), shapes, strict=True)
    }


def fisher_sketch(
    fns: ClipFunctions,
    params: Params,
    refs: FrozenReferences,
    sketch: CountSketch,
    images: torch.Tensor,
    tokens: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """(M, k): sketched per-sample gradients of the gradient-batch samples (approximations 2, 3)."""
    out = []
    for start in range(0, images.shape[0], chunk):
        g = per_sample_grads(
            fns, params, refs, images[start : start + chunk], tokens[start : start + chunk]
        )
        out.append(sketch(g).detach())
    return torch.cat(out)


class SelfInfluenceEngine:
    """Everything self-influence needs at one checkpoint, prepared once per worker."""

    def __init__(
        self,
        fns: ClipFunctions,
        params: Params,
        g_B: Params,
        grad_batches: list[tuple[torch.Tensor, torch.Tensor]],
        cfg: SelfConfig,
        eigenpairs: tuple[torch.Tensor, Params] | None = None,
        sketch: CountSketch | None = None,
    ) -> None:
        """``eigenpairs`` (hb="lanczos") may come precomputed from the directions stage;
        ``sketch`` (hb="fisher"): another checkpoint's, whose tables are the same (same
        parameters, dimension and seed), so a worker holds them once."""
        self.fns = fns
        self.params = {k: v for k, v in params.items() if k not in cfg.exclude}
        self.g_B = {k: g_B[k] for k in self.params}
        n = sum(v.numel() for v in self.params.values())
        self.plan = cfg.plan(
            n, params[next(iter(params))].element_size(), sum(b[0].shape[0] for b in grad_batches)
        )
        self.refs = FrozenReferences.at(fns, params, cfg.exclude)
        if cfg.hb == "fisher":
            shapes = {k: v.shape for k, v in self.params.items()}
            same = sketch is not None and (sketch.dim, sketch.seed, sketch.shapes) == (
                self.plan["dim"],
                cfg.seed,
                shapes,
            )
            if not same:
                sketch = CountSketch(
                    shapes, self.plan["dim"], cfg.seed, next(iter(self.params.values())).device
                )
            self.sketch = sketch
            grad_images = torch.cat([b[0] for b in grad_batches])
            grad_tokens = torch.cat([b[1] for b in grad_batches])
            fisher = fisher_sketch(
                fns,
                self.params,
                self.refs,
                self.sketch,
                grad_images,
                grad_tokens,
                self.plan["chunk"],
            ).double()
            self.hb_form = lambda gz: (self.sketch(gz).double() @ fisher.T).pow(2).mean(1)
        elif cfg.hb == "lanczos":
            vals, vecs = eigenpairs or hessian_eigenpairs(
                fns, self.params, self.refs.fixed, grad_batches, self.plan["rank"], cfg.seed
            )
            if len(vals) > self.plan["rank"]:  # precomputed at a rank the budget does not allow
                top = vals.abs().argsort(descending=True)[: self.plan["rank"]].to(vals.device)
                vals = vals[top]
                vecs = {k: v[top.to(v.device)] for k, v in vecs.items()}
            self.eigenvalues, self.eigenvectors = vals, vecs

            def form(gz: Params) -> torch.Tensor:
                proj = sum(
                    torch.einsum("c...,r...->cr", gz[k].double(), vecs[k].double()) for k in gz
                )
                return (proj.pow(2) * vals).sum(1)

            self.hb_form = form
        elif cfg.hb == "none":  # only ||g_z||^2 and g_z' H_z g_B are asked for
            self.hb_form = lambda gz: torch.zeros(
                next(iter(gz.values())).shape[0],
                dtype=torch.float64,
                device=next(iter(gz.values())).device,
            )
        else:
            raise ValueError(f"hb: unknown approximation {cfg.hb!r}")
        self.config = {**asdict(cfg), **self.plan}

    def terms(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self_terms(
            self.fns,
            self.params,
            self.refs,
            self.g_B,
            self.hb_form,
            images,
            tokens,
            self.plan["chunk"],
        )
