"""The scorer registry: one interface, one output convention for every method.

A scorer names the per-checkpoint terms it needs (computed once per batch by
the fast engine and shared between scorers) and turns them into columns. The
column named after the scorer is its final score, higher = more useful
(keep first); per-checkpoint components are stored beside it.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from pipeline.errors import ConfigError
from pipeline.influence.estimator import (
    DEFAULT_FORM,
    Checkpoint,
    Weights,
    assemble_diffin,
    checkpoint_weights,
    diffin_components,
)

Terms = dict[int, dict[str, np.ndarray]]  # step -> term -> (batch,)


@dataclass
class ScoreContext:
    checkpoints: list[Checkpoint]
    n_train: int
    seed: int = 0
    options: dict[str, object] = field(default_factory=dict)

    @property
    def last(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def second_order(self) -> str:
        """Which form of the weights (``estimator.FORMS``): option ``second_order``."""
        return str(self.options.get("second_order", DEFAULT_FORM))

    def weights(self, form: str | None = None) -> list[Weights]:
        """The estimator's weights of every checkpoint, in ``checkpoints`` order."""
        return checkpoint_weights(self.checkpoints, self.n_train, form or self.second_order)


class Scorer(ABC):
    name: ClassVar[str]
    terms: ClassVar[frozenset[str]] = frozenset()  # needed at every checkpoint
    last_terms: ClassVar[frozenset[str]] = frozenset()  # needed at the last checkpoint only
    first_terms: ClassVar[frozenset[str]] = frozenset()  # needed at the first checkpoint only
    description: ClassVar[str] = ""
    # What the columns depend on besides the trajectory, its sets, the dtype and the
    # reader: ScoreConfig fields, and "target" for the target set. The scores'
    # fingerprint holds only those of the requested scorers, so a loss-only rerun
    # with another --sample-gradient, say, keeps its parts.
    depends_on: ClassVar[frozenset[str]] = frozenset()

    def columns(self, ctx: ScoreContext) -> list[str]:
        return [self.name]

    def needed(self, ctx: ScoreContext) -> frozenset[str]:
        """The terms needed at every checkpoint under this context's options."""
        return self.terms

    @abstractmethod
    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]: ...


REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    REGISTRY[cls.name] = cls
    return cls


def get_scorers(names: list[str]) -> list[Scorer]:
    """Instantiate scorers by name; unknown names are refused before work starts."""
    unknown = [n for n in names if n not in REGISTRY]
    if not names:
        raise ConfigError(f"methods: none given; available: {sorted(REGISTRY)}")
    if unknown:
        raise ConfigError(f"methods: unknown {unknown}; available: {sorted(REGISTRY)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"methods: listed twice in {names}")
    return [REGISTRY[n]() for n in names]


def depends_on(scorers: list[Scorer]) -> frozenset[str]:
    """The options (``Scorer.depends_on``) any of ``scorers`` depends on."""
    return frozenset().union(*(s.depends_on for s in scorers))


def needed_terms(scorers: list[Scorer], ckpt: Checkpoint, ctx: ScoreContext) -> set[str]:
    need: set[str] = set()
    for s in scorers:
        need |= s.needed(ctx)
        if ckpt == ctx.last:
            need |= s.last_terms
        if ckpt == ctx.checkpoints[0]:
            need |= s.first_terms
    return need


@register
class DiffIn(Scorer):
    name = "diffin"
    # the per-checkpoint terms: <a, g_z>, <a, H_B g_z>, <a, H_z g_B>, <g_z, H_a g_B> with a = g_V
    keys = ("first", "hb", "hz", "hv")
    # what the engine computes: hb and hv come combined as hlin = W_hb hb + W_hv hv (fast.py)
    terms = frozenset({"first", "hz", "hlin"})
    description = "Diff-In influence on the target loss (second order, trajectory)"
    depends_on = frozenset(
        {
            "target",
            "first_order",
            "second_order",
            "propagate_curvature",
            "objective",
            "sample_gradient",
        }
    )

    def form(self, ctx: ScoreContext) -> str:
        return ctx.second_order

    def needed(self, ctx: ScoreContext) -> frozenset[str]:
        if self.form(ctx) == "propagated":  # hlin is I_t itself: no hz, no nested JVP
            return frozenset({"first", "hlin"})
        return self.terms

    def columns(self, ctx: ScoreContext) -> list[str]:
        cols = [self.name]
        for c in ctx.checkpoints:
            cols += [f"{self.name}_first_t{c.step}", f"{self.name}_second_t{c.step}"]
        return cols

    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]:
        out, firsts, seconds = {}, [], []
        first_key, hb_key, hz_key, hv_key = self.keys
        # hlin is diffin's own combined term: with diffin requested too, the worker's terms
        # hold it, and diffin_self must not take it for its own (review)
        own_hlin = "hlin" in self.needed(ctx)
        for c, w in zip(ctx.checkpoints, ctx.weights(self.form(ctx)), strict=True):
            t = terms[c.step]
            hlin = t.get("hlin") if own_hlin else None
            f, s = diffin_components(
                t[first_key], t.get(hb_key), t.get(hz_key), t.get(hv_key), w, hlin
            )
            out[f"{self.name}_first_t{c.step}"], out[f"{self.name}_second_t{c.step}"] = f, s
            firsts.append(f)
            seconds.append(s)
        out[self.name] = assemble_diffin(
            firsts, seconds, bool(ctx.options.get("first_order", True))
        )
        return out


@register
class TracIn(Scorer):
    name = "tracin"
    terms = frozenset({"first"})
    description = "TracIn: first-order trajectory influence on the target loss"
    # second_order: the "method" form weighs the checkpoints eta / (N m)
    depends_on = frozenset({"target", "second_order", "sample_gradient"})

    def columns(self, ctx: ScoreContext) -> list[str]:
        return [self.name] + [f"tracin_t{c.step}" for c in ctx.checkpoints]

    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]:
        out = {
            f"tracin_t{c.step}": w.first * terms[c.step]["first"]
            for c, w in zip(ctx.checkpoints, ctx.weights(), strict=True)
        }
        out[self.name] = np.sum(list(out.values()), axis=0)
        return out


@register
class Loss(Scorer):
    name = "loss"
    last_terms = frozenset({"loss"})
    description = "minus the per-sample loss at the last checkpoint (high loss: prune first)"

    def columns(self, ctx: ScoreContext) -> list[str]:
        return [self.name, "loss_raw"]

    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]:
        raw = terms[ctx.last.step]["loss"]
        return {self.name: -raw, "loss_raw": raw}


@register
class LossMean(Scorer):
    """Minus the per-sample loss averaged over the checkpoints.

    The counterpart, in loss, of dataset cartography's "confidence"
    (Swayamdipta et al., 2020), which averages the probability of the true
    label over epochs; here the loss is the reference-negative loss. A pair
    the proxy learns late or never keeps a high mean loss even after a long
    proxy has memorised it, when its last-checkpoint loss is already low.
    On a short proxy the underfit early checkpoints dilute it instead
    (docs/accuracy.md, section 5).
    """

    name = "loss_mean"
    terms = frozenset({"loss"})
    description = (
        "minus the per-sample loss averaged over the checkpoints (a training-dynamics score)"
    )

    def columns(self, ctx: ScoreContext) -> list[str]:
        return [self.name] + [f"loss_mean_t{c.step}" for c in ctx.checkpoints]

    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]:
        out = {f"loss_mean_t{c.step}": -terms[c.step]["loss"] for c in ctx.checkpoints}
        out[self.name] = np.mean(list(out.values()), axis=0)
        return out


@register
class ClipScore(Scorer):
    name = "clip_score"
    last_terms = frozenset({"cosine"})
    description = "image-text cosine similarity under the last checkpoint (DataComp baseline)"

    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]:
        return {self.name: terms[ctx.last.step]["cosine"]}


@register
class Random(Scorer):
    name = "random"
    description = "seeded uniform scores, a function of the uid alone"
    depends_on = frozenset({"seed"})

    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]:
        vals = [
            int.from_bytes(hashlib.sha256(f"{ctx.seed}:{u}".encode()).digest()[:8], "big") / 2**64
            for u in uids
        ]
        return {self.name: np.asarray(vals, dtype=np.float64)}


@register
class DiffInSelf(DiffIn):
    """Diff-In self-influence sum_t (F_t + I_t)(z, z) (the authors' Eq. 12 data-cleaning form).

    Stored as computed (the estimated change of z's own loss if z were removed)
    and, like every column, pruned from the bottom: the second-order term is
    negative and dominates (|I| ~ 40 F on the demo pool), most of all for pairs
    with high curvature along their own gradient (mismatched captions, junk).
    docs/accuracy.md has the measurement behind this choice; its section 4c
    checks the column against leave-one-out: at the CLI's rate it does not
    follow the measured rise of z's own loss, and at a small rate, where it
    does, mismatched pairs sit at the top.
    Scalable form and its approximations: pipeline/influence/selfinf.py.
    With the target V = {z}, H_V = H_z, so the derived form's hv term
    <g_z, H_V g_B> is self_hz itself: the key is given twice.
    """

    name = "diffin_self"
    keys = ("self_first", "self_hb", "self_hz", "self_hz")
    terms = frozenset(keys)  # no hlin: the self terms come from the self-influence engine
    description = "Diff-In self-influence (F + I)(z, z), for data cleaning; lowest pruned first"
    # its H_B size (rank or sketch) enters the fingerprint as driver.self_size says
    depends_on = frozenset({"first_order", "second_order", "seed", "self_hb"})

    def form(self, ctx: ScoreContext) -> str:
        # The propagated form needs one transported direction per target; with V = {z} that
        # is one per sample, so self-influence keeps the expansion's weights.
        return "derived" if ctx.second_order == "propagated" else ctx.second_order

    def needed(self, ctx: ScoreContext) -> frozenset[str]:
        return self.terms


@register
class TracInSelf(Scorer):
    name = "tracin_self"
    terms = frozenset({"self_first"})
    description = "minus TracIn self-influence sum_t W_first ||g_z||^2 (estimator weights)"
    depends_on = frozenset({"second_order"})

    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]:
        total = sum(
            w.first * terms[c.step]["self_first"]
            for c, w in zip(ctx.checkpoints, ctx.weights(), strict=True)
        )
        return {self.name: -np.asarray(total)}


@register
class GraNd(Scorer):
    name = "grand"
    last_terms = frozenset({"self_first"})
    description = (
        "minus the per-sample gradient norm at the last checkpoint (large norm: prune first)"
    )

    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]:
        return {self.name: -np.sqrt(terms[ctx.last.step]["self_first"])}


@register
class EL2N(Scorer):
    name = "el2n"
    first_terms = frozenset({"el2n"})
    description = "minus the error-vector norm at the first checkpoint (early in training)"

    def score(self, terms: Terms, uids: list[str], ctx: ScoreContext) -> dict[str, np.ndarray]:
        return {self.name: -terms[ctx.checkpoints[0].step]["el2n"]}
