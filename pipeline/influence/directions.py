"""Per-checkpoint direction vectors of METHOD.md section 5: g_B, g_V, w = H_B g_V and u = H_V g_B.

u feeds the target-Hessian term <g_z, H_V g_B> = <u, g_z> of the derived
second-order weights (``pipeline.influence.estimator``).

They do not depend on the scored sample, so they are computed once per
checkpoint, stored in ``RUN/directions/STEP.safetensors`` with what produced
them, and broadcast to every scoring worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp

from pipeline.influence.estimator import CURVATURES
from pipeline.influence.functional import ClipFunctions, Params, derivative_mode
from pipeline.influence.vectors import dot
from pipeline.model.loss import batch_clip_loss, per_sample_loss, scale_of
from pipeline.tensors import load_tensors, save_tensors

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # (images, tokens)
KINDS = ("g_B", "g_V", "w", "u")


@dataclass
class Directions:
    g_B: Params  # mean gradient of the in-batch training loss over k batches
    g_V: Params  # gradient of the target loss L_V (reference-negative per-sample loss, mean over V)
    w: Params  # H_B g_V, with H_B the Hessian of the same batch losses
    u: Params  # H_V g_B, with H_V the Hessian of the target loss L_V
    meta: dict[str, Any] = field(default_factory=dict)

    def as_flat(self) -> dict[str, torch.Tensor]:
        return {
            f"{kind}/{k}": v.contiguous() for kind in KINDS for k, v in getattr(self, kind).items()
        }

    def combined(self, a: float, b: float) -> Params:
        """a w + b u: one direction whose JVP gives a <w, g_z> + b <u, g_z> in one pass."""
        return {k: a * self.w[k] + b * self.u[k] for k in self.w}

    def ordered(self, names: list[str]) -> Directions:
        """Same vectors with keys in ``names`` order (torch.func matches dicts by structure)."""
        return Directions(
            *({k: getattr(self, kind)[k] for k in names} for kind in KINDS), self.meta
        )

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor], meta: dict[str, Any]) -> Directions:
        parts: dict[str, Params] = {kind: {} for kind in KINDS}
        for name, t in flat.items():
            kind, _, key = name.partition("/")
            parts[kind][key] = t
        if not parts["u"]:
            raise ValueError("direction file without u = H_V g_B (written before it existed)")
        return cls(parts["g_B"], parts["g_V"], parts["w"], parts["u"], meta)


def _leaves(params: Params) -> Params:
    # detached views, not copies: a model-sized copy per chunk would be waste (nothing
    # writes to them in place)
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


# Pairs per differentiated pass in the directions stage (targets with their K references,
# and each gradient batch): the memory of those passes grows with it (ViT-B-32: 0.2 to
# 0.25 GiB a pair on the host, docs/benchmarks.md), not with K or --batch-size.
PAIRS_PER_PASS = 64

EmbeddingLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


Embed = Callable[[Params, slice], tuple[torch.Tensor, torch.Tensor]]


def _in_chunks(
    embed: Embed, params: Params, spans: list[slice], vector: Params | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and text embeddings of every span, or (``vector``) their JVP along it:
    forward passes without a graph, one span at a time."""
    with torch.no_grad(), derivative_mode():
        if vector is None:
            parts = [embed(params, span) for span in spans]
        else:
            parts = [
                jvp(lambda p, span=span: embed(p, span), (params,), (vector,))[1] for span in spans
            ]
    return torch.cat([e[0] for e in parts]), torch.cat([e[1] for e in parts])


def _whole_gradient_and_hvp(
    fns: ClipFunctions,
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    loss_of: EmbeddingLoss,
    vector: Params | None,
    fixed: Params,
) -> tuple[Params, Params | None]:
    """The same, all pairs in one differentiated pass, for pairs that fit in one chunk: the
    chained passes took 2.2 times as long and 1.4 times the memory on the proxy's default
    batch of 64 (diffin-small, ``benchmarks/directions_memory.py --stage batch --batch 64``)."""
    p = _leaves(params)
    with derivative_mode():
        full = {**fixed, **p}
        loss = loss_of(*fns.embed(full, images, tokens), full["logit_scale"])
        grads = torch.autograd.grad(
            loss, list(p.values()), allow_unused=True, create_graph=vector is not None
        )
        if vector is not None:
            gv = sum((g * vector[k]).sum() for g, k in zip(grads, p, strict=True) if g is not None)
            hv = torch.autograd.grad(gv, list(p.values()), allow_unused=True)
    zero = torch.zeros_like
    g = {
        k: zero(v) if d is None else d.detach() for d, (k, v) in zip(grads, p.items(), strict=True)
    }
    if vector is None:
        return g, None
    return g, {k: zero(v) if d is None else d for d, (k, v) in zip(hv, p.items(), strict=True)}


def chained_gradient_and_hvp(
    fns: ClipFunctions,
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    loss_of: EmbeddingLoss,
    vector: Params | None,
    chunk: int = PAIRS_PER_PASS,
    fixed: Params | None = None,
) -> tuple[Params, Params | None]:
    """grad L and, if ``vector`` is given, H_L @ vector, for L = loss_of(E(theta), E_t(theta),
    logit_scale), a loss that couples the pairs only through their embeddings; exactly,
    ``chunk`` pairs per differentiated pass.

    With E the embeddings of all the pairs, s the logit scale and L = F(E, s):

        grad L = J' a + (dF/ds) e_s                  with a = dF/dE
        H v    = J' (d a) + sum_i a_i H_{E_i} v + (d dF/ds) e_s

    where d a is F's Hessian (in E and s, a few numbers a pair) applied to
    (J v, v_s). E and J v come from forward passes without a graph, a and d a
    from F alone, and each chunk of pairs then needs one double backward of
    <E_c, a_c>. Differentiating L whole holds the graph of every pair at once;
    pairs that fit in one chunk are differentiated so, which is faster.
    ``fixed``: parameters held constant (the derivatives are in ``params``).
    """
    fixed = fixed or {}
    if vector is not None:
        vector = {k: vector[k] for k in params}  # torch.func matches dicts by key order
    if images.shape[0] <= chunk:
        return _whole_gradient_and_hvp(fns, params, images, tokens, loss_of, vector, fixed)
    spans = [slice(i, i + chunk) for i in range(0, images.shape[0], chunk)]

    def embed(p: Params, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return fns.embed({**fixed, **p}, images[span], tokens[span])

    e_img, e_txt = (e.requires_grad_(True) for e in _in_chunks(embed, params, spans))
    d_emb = _in_chunks(embed, params, spans, vector) if vector is not None else None
    learns_scale = "logit_scale" in params
    scale = {**fixed, **params}["logit_scale"].detach().requires_grad_(learns_scale)
    loss = loss_of(e_img, e_txt, scale)
    inputs = (e_img, e_txt, scale) if learns_scale else (e_img, e_txt)
    a = torch.autograd.grad(loss, inputs, create_graph=vector is not None)
    if vector is not None:
        assert d_emb is not None
        along = (a[0] * d_emb[0]).sum() + (a[1] * d_emb[1]).sum()
        if learns_scale:
            along = along + (a[2] * vector["logit_scale"]).sum()
        da = torch.autograd.grad(along, inputs)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    h_total = {k: torch.zeros_like(v) for k, v in params.items()} if vector is not None else None
    for span in spans:
        p = _leaves(params)
        with derivative_mode():
            img, txt = embed(p, span)
            pulled = (img * a[0][span].detach()).sum() + (txt * a[1][span].detach()).sum()
            grads = torch.autograd.grad(
                pulled, list(p.values()), allow_unused=True, create_graph=vector is not None
            )
            if vector is not None:
                second = sum(
                    (g * vector[k]).sum() for g, k in zip(grads, p, strict=True) if g is not None
                )
                second = second + (img * da[0][span]).sum() + (txt * da[1][span]).sum()
                hv = torch.autograd.grad(second, list(p.values()), allow_unused=True)
        for g, k in zip(grads, p, strict=True):
            if g is not None:
                total[k] += g.detach()
        if h_total is not None:
            for h, k in zip(hv, p, strict=True):
                if h is not None:
                    h_total[k] += h.detach()
            del hv, second
        # before the next chunk's passes: this chunk's graph and model-sized results
        del grads, p, img, txt, pulled
    if learns_scale:
        total["logit_scale"] += a[2].detach()
        if h_total is not None:
            h_total["logit_scale"] += da[2].detach()
    return total, h_total


def batch_gradient_and_hvp(
    fns: ClipFunctions,
    params: Params,
    batches: Sequence[Batch],
    vector: Params | None,
    chunk: int = PAIRS_PER_PASS,
    fixed: Params | None = None,
) -> tuple[Params, Params | None]:
    """Mean over batches of grad L(B) and, if ``vector`` is given, of H_B @ vector, exactly,
    ``chunk`` pairs of a batch at a time (:func:`chained_gradient_and_hvp`).

    ``fixed``: parameters held constant; the derivatives are taken in ``params`` only.
    """
    g_sum = {k: torch.zeros_like(v) for k, v in params.items()}
    h_sum = {k: torch.zeros_like(v) for k, v in params.items()} if vector is not None else None
    for images, tokens in batches:
        g, h = chained_gradient_and_hvp(
            fns, params, images, tokens, batch_clip_loss, vector, chunk, fixed
        )
        for k in g_sum:
            g_sum[k] += g[k]
            if h_sum is not None:
                assert h is not None
                h_sum[k] += h[k]
    n = len(batches)
    g = {k: v / n for k, v in g_sum.items()}
    h = {k: v / n for k, v in h_sum.items()} if h_sum is not None else None
    return g, h


def _logits_of(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return scale_of(logit_scale) * img @ txt.T


def _loss_of_logits(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# Pairs of gradient batches whose graphs the Gauss-Newton operator keeps (k = 4 batches of
# 128; the proxy's default batch is 64): 1.8 times faster products than the batches beyond,
# applied a chunk at a time, but about 0.14 GiB a pair for ViT-B-32 (docs/benchmarks.md).
GGN_KEPT_PAIRS = 512


def _room(device: torch.device) -> int | None:
    """Bytes this process can still allocate on a CUDA device: the device's free memory and
    what PyTorch's caching allocator holds unused (a previous checkpoint's graphs); None for
    the host, whose free memory says little about what this process may take (the kept pairs
    bound it there)."""
    if device.type != "cuda":
        return None
    free = torch.cuda.mem_get_info(device)[0]
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class GaussNewton:
    """v -> mean over batches of G_B v, G_B = J' H_logits J the Gauss-Newton part of H_B.

    The in-batch loss is a convex function (two cross-entropies) of the b x b
    logit matrix, so G_B is positive semi-definite: it keeps the curvature that
    damps a displacement and drops the negative curvature of the network
    itself, along which a linearised trajectory grows without bound.

    Built once per checkpoint. For the first ``kept_pairs`` pairs of batches,
    the forward pass and its pullback J' are kept, and J v is the pullback's
    own transpose (a VJP of the linear map u -> J' u), so each product costs
    two backward passes and no forward pass (1.8 times faster than a JVP plus
    a VJP per product on diffin-small). Their graphs take memory in
    proportion to those pairs, so the batches beyond are applied through
    their embeddings instead (as in :func:`chained_gradient_and_hvp`): J_E v by
    forward-mode passes, H_logits in embedding space, and J_E' by a forward
    and a backward pass per ``chunk`` pairs. On a GPU, graphs stop being kept
    early when less than twice one batch's graph is left free (the products
    need room), or when keeping one runs out of memory (kept batches are then
    chunked until there is that room); a product that runs out of memory chunks
    one more kept batch and starts again.
    """

    def __init__(
        self,
        fns: ClipFunctions,
        params: Params,
        batches: Sequence[Batch],
        kept_pairs: int = GGN_KEPT_PAIRS,
        chunk: int = PAIRS_PER_PASS,
    ) -> None:
        self.fns, self.params, self.chunk = fns, params, chunk
        self.names = list(params)
        self.ops = []  # (images, tokens, logits, pull, push, loss_grad): the batches kept
        self.chunked = []  # (images, tokens, img, txt) of the others: their embeddings only
        kept, keeping, graph_bytes = 0, True, 0
        for images, tokens in batches:
            device = images.device
            if keeping and kept + images.shape[0] <= kept_pairs:
                room = _room(device)
                if room is not None and room < 2 * graph_bytes:
                    # the products need room too: about one batch's graph of temporaries
                    keeping = False
                    log.info("Gauss-Newton: %d pairs kept (GPU memory); the rest chunked", kept)
                else:
                    before, failed = _allocated(device), False
                    try:
                        self.ops.append((images, tokens, *self._kept(images, tokens)))
                    except torch.OutOfMemoryError:
                        failed = True
                    if not failed:
                        kept += images.shape[0]
                        graph_bytes = max(graph_bytes, _allocated(device) - before)
                        continue
                    keeping = False
                    kept -= self._make_room(device, graph_bytes)
                    log.warning(
                        "Gauss-Newton: out of GPU memory keeping a batch's graph; %d pairs kept, "
                        "the rest chunked (lower --ggn-kept-pairs to skip this)",
                        kept,
                    )
            self.chunked.append(self._embedded(images, tokens))

    def _make_room(self, device: torch.device, graph_bytes: int) -> int:
        """After running out of memory (outside the ``except``, whose traceback held the
        partial graph): release the cache, then chunk kept batches until the products have
        twice a graph of room. Returns the pairs no longer kept."""
        torch.cuda.empty_cache()
        moved = 0
        while self.ops and (room := _room(device)) is not None and room < 2 * graph_bytes:
            images, tokens = self.ops.pop()[:2]  # the graph goes with the popped entry
            self.chunked.append(self._embedded(images, tokens))
            moved += images.shape[0]
            torch.cuda.empty_cache()
        return moved

    def _kept(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple:
        fns = self.fns

        def logits_of(p: Params) -> torch.Tensor:
            return _logits_of(*fns.embed(p, images, tokens), p["logit_scale"])

        with derivative_mode():
            logits, pull = vjp(logits_of, self.params)
            _, push = vjp(lambda u: pull(u)[0], torch.zeros_like(logits))
        return logits.detach(), pull, push, grad(_loss_of_logits)

    def _embedded(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple:
        spans = [slice(i, i + self.chunk) for i in range(0, images.shape[0], self.chunk)]

        def embed(p: Params, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fns.embed(p, images[span], tokens[span])

        return images, tokens, *_in_chunks(embed, self.params, spans)

    def __call__(self, vector: Params) -> Params:
        vector = {k: vector[k] for k in self.names}  # torch.func matches dicts by key order
        while True:
            try:
                return self._product(vector)
            except torch.OutOfMemoryError:
                if not self.ops:
                    raise
            # outside the except, whose traceback holds the failed product's tensors
            images, tokens = self.ops.pop()[:2]  # the graph goes with the popped entry
            torch.cuda.empty_cache()
            self.chunked.append(self._embedded(images, tokens))
            log.warning(
                "Gauss-Newton: out of GPU memory in a product; one more batch chunked (%d "
                "kept; lower --ggn-kept-pairs to skip this)",
                len(self.ops),
            )

    def _product(self, vector: Params) -> Params:
        out = {k: torch.zeros_like(v) for k, v in vector.items()}
        with derivative_mode():
            for _, _, logits, pull, push, loss_grad in self.ops:
                (j_v,) = push(vector)
                _, h_j_v = jvp(loss_grad, (logits,), (j_v.detach(),))
                (g,) = pull(h_j_v.detach())
                for k in out:
                    out[k] += g[k].detach()
            for batch in self.chunked:
                self._add_chunked(out, vector, *batch)
        return {k: v / (len(self.ops) + len(self.chunked)) for k, v in out.items()}

    def _add_chunked(
        self,
        out: Params,
        vector: Params,
        images: torch.Tensor,
        tokens: torch.Tensor,
        img: torch.Tensor,
        txt: torch.Tensor,
    ) -> None:
        params = self.params
        spans = [slice(i, i + self.chunk) for i in range(0, len(img), self.chunk)]

        def embed(p: Params, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fns.embed(p, images[span], tokens[span])

        at = (img, txt, params["logit_scale"])
        along = (*_in_chunks(embed, params, spans, vector), vector["logit_scale"])
        logits, j_v = jvp(_logits_of, at, along)
        _, h_j_v = jvp(grad(_loss_of_logits), (logits,), (j_v,))
        _, pull = vjp(_logits_of, *at)
        y_img, y_txt, y_s = pull(h_j_v)
        for span in spans:
            p = _leaves(params)
            e_img, e_txt = embed(p, span)
            pulled = (e_img * y_img[span]).sum() + (e_txt * y_txt[span]).sum()
            for g, k in zip(
                torch.autograd.grad(pulled, list(p.values()), allow_unused=True), p, strict=True
            ):
                if g is not None:
                    out[k] += g
            del p, e_img, e_txt, pulled  # before the next chunk's passes
        out["logit_scale"] += y_s.detach()


def curvature_operator(
    fns: ClipFunctions,
    params: Params,
    batches: Sequence[Batch],
    kind: str,
    kept_pairs: int = GGN_KEPT_PAIRS,
    chunk: int = PAIRS_PER_PASS,
) -> Callable[[Params], Params]:
    """v -> C v with C the mean over batches of the Gauss-Newton part (``ggn``) or the exact
    Hessian (``hessian``) of the in-batch loss: the propagated form's curvature."""
    if kind == "ggn":
        return GaussNewton(fns, params, batches, kept_pairs, chunk)
    if kind != "hessian":
        raise ValueError(f"curvature {kind!r}: expected one of {CURVATURES}")

    def exact(v: Params) -> Params:
        _, h = batch_gradient_and_hvp(fns, params, batches, v, chunk)
        assert h is not None
        return h

    return exact


def target_gradient(
    fns: ClipFunctions,
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    chunk: int = PAIRS_PER_PASS,
) -> Params:
    """grad of L_V = mean_v l_v (see :func:`target_gradient_and_hvp`)."""
    return target_gradient_and_hvp(fns, params, images, tokens, None, chunk)[0]


def target_gradient_and_hvp(
    fns: ClipFunctions,
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    vector: Params | None,
    chunk: int = PAIRS_PER_PASS,
) -> tuple[Params, Params | None]:
    """grad L_V and, if ``vector`` is given, H_V @ vector, exactly, ``chunk`` pairs at a time.

    L_V ties every target to all K reference negatives; differentiating it
    whole took each chunk of targets together with all K references (88 GiB
    for ViT-B-32 at the defaults). Through the embeddings, the passes take
    ``chunk`` pairs whatever K.
    """
    if fns.ref_images is None or fns.ref_tokens is None:
        raise ValueError("the target loss needs reference negatives")
    n = images.shape[0]
    exclude = fns.self_mask(images, tokens)

    def target_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(img[:n], txt[:n], img[n:], txt[n:], scale, exclude).sum() / n

    return chained_gradient_and_hvp(
        fns,
        params,
        torch.cat([images, fns.ref_images.to(images)]),
        torch.cat([tokens, fns.ref_tokens.to(tokens.device)]),
        target_loss,
        vector,
        chunk,
    )


def compute_directions(
    fns: ClipFunctions,
    params: Params,
    grad_batches: Sequence[Batch],
    target: Batch,
    meta: dict[str, Any] | None = None,
    chunk: int = PAIRS_PER_PASS,
) -> Directions:
    g_V = target_gradient(fns, params, *target, chunk=chunk)
    g_B, w = batch_gradient_and_hvp(fns, params, grad_batches, g_V, chunk)
    assert w is not None
    _, u = target_gradient_and_hvp(fns, params, *target, g_B, chunk)
    assert u is not None
    info = dict(meta or {})
    info.update(
        k_batches=len(grad_batches),
        batch_size=int(grad_batches[0][0].shape[0]) if grad_batches else 0,
        target_size=int(target[0].shape[0]),
        norm_g_B=float(dot(g_B, g_B).sqrt()),
        norm_g_V=float(dot(g_V, g_V).sqrt()),
        norm_w=float(dot(w, w).sqrt()),
        norm_u=float(dot(u, u).sqrt()),
    )
    return Directions(g_B, g_V, w, u, info)


def save_directions(directions: Directions, path: str) -> None:
    save_tensors(path, directions.as_flat(), directions.meta)


def load_directions(path: str, device: str | torch.device = "cpu") -> Directions:
    flat, meta = load_tensors(path)
    return Directions.from_flat({k: v.to(device) for k, v in flat.items()}, meta)
