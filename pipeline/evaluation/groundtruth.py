"""Trajectory-specific leave-one-out ground truth for the scorers (METHOD.md section 7.2).

A small CLIP is trained on a few hundred generated pairs with a fixed seed and
data order (``pipeline.train.loop.train_loop``); each retraining starts from
the same initial weights, follows the same batch order and only drops the
removed samples from the batches they would have been in. The real effect of
removing a set S is

    delta(S) = L_V(theta'_T) - L_V(theta_T)

with L_V the mean reference-negative per-sample loss over a held-out target V
(``ClipFunctions.sample_losses``). The scorers are computed at checkpoints of
the full run exactly as the scoring engine computes them (direction vectors by
``compute_directions``, per-sample terms by ``fast_terms``, columns by the
scorer registry), so the comparison validates the production code path.

Sign convention: a score estimates delta({z}); positive = z helps.
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.data.reader import iter_shard
from pipeline.data.shards import resolve_shards
from pipeline.data.synth import SynthConfig, make_pool
from pipeline.influence.directions import (
    batch_gradient_and_hvp,
    compute_directions,
    curvature_operator,
    target_gradient,
)
from pipeline.influence.estimator import (
    Checkpoint,
    attach_block_rates,
    block_rates,
    checkpoint_weights,
)
from pipeline.influence.fast import fast_terms
from pipeline.influence.functional import ClipFunctions, Params, derivative_mode
from pipeline.influence.propagate import propagated_directions
from pipeline.influence.selfinf import SelfConfig, SelfInfluenceEngine
from pipeline.influence.vectors import dot, norm
from pipeline.model import factory
from pipeline.model.batches import encode
from pipeline.scorers import ScoreContext, get_scorers
from pipeline.train.config import TrainConfig
from pipeline.train.loop import batch_order, train_loop
from pipeline.train.schedule import checkpoint_steps, lr_at

DTYPES = {"float32": torch.float32, "float64": torch.float64}
REGISTRY_SCORERS = ("diffin", "tracin", "loss", "clip_score", "random")
SELF_SCORERS = ("diffin_self", "tracin_self", "grand")


@dataclass
class LOOSetting:
    """Everything that determines a ground-truth experiment."""

    model: str = "diffin-tiny"
    samples: int = 360  # generated pairs: training set + held-out target V
    target_size: int = 60
    reference_size: int = 63  # K reference negatives, drawn from the training set
    noise: float = 0.2  # rate of mismatched captions in the generated pool
    # V drawn from the clean pairs only (a curated target) instead of from the noisy pool
    clean_target: bool = False
    batch_size: int = 32
    steps: int = 300
    checkpoints: int = 5
    spacing: str = "even"
    grad_batches: int = 4
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "constant"
    dtype: str = "float64"
    seed: int = 0
    data_dir: str | None = None  # where the pool is generated; default: a temporary directory
    # Optional warm start: train this many steps on the full training set (own seeded order,
    # rate pre_lr) before the studied segment; LOO then covers only the segment that follows.
    pre_steps: int = 0
    pre_lr: float = 1.0
    pre_momentum: float = 0.0
    pre_warmup: int = 0

    def rate(self, step: int) -> float:
        """The learning rate of training step ``step`` of the studied segment."""
        return lr_at(step, self.lr, self.warmup, self.steps, self.schedule)

    def train_config(self) -> TrainConfig:
        cfg = TrainConfig(
            data="",
            run="",
            model=self.model,
            steps=self.steps,
            checkpoints=self.checkpoints,
            spacing=self.spacing,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            warmup=self.warmup,
            schedule=self.schedule,
            seed=self.seed,
            target_size=self.target_size,
            reference_size=self.reference_size,
            grad_batches=self.grad_batches,
        )
        cfg.validate()
        return cfg


@dataclass
class TrainResult:
    final: Params
    checkpoints: list[tuple[Checkpoint, Params]]
    loss_curve: list[tuple[int, float]]
    seconds: float


@dataclass
class LOOResult:
    setting: dict[str, Any]
    n_train: int
    removed: list[int]  # training indices removed one at a time
    actual: np.ndarray  # delta L_V per removed index
    scores: dict[str, np.ndarray]  # scorer -> score per training sample
    defects: list[str]  # per training sample
    base_target_loss: float
    noise_floor: dict[str, float]
    subsets: np.ndarray | None = None  # bool (n_subsets, n_train)
    subset_actual: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[dict[str, float]] = field(default_factory=list)
    radius: list[dict[str, float]] = field(default_factory=list)  # GroundTruth.expansion_radius
    # delta of the checkpoint-mean objective (1/m) sum_j L_V(theta_{t_j}) per removed index
    actual_cmean: np.ndarray | None = None


def _clone(params: Params) -> Params:
    return {k: v.detach().clone() for k, v in params.items()}


class GroundTruth:
    """Data, initial weights and data order fixed once; ``train(removed)`` retrains."""

    def __init__(self, setting: LOOSetting) -> None:
        self.setting = setting
        self.cfg = setting.train_config()
        self.dtype = DTYPES[setting.dtype]
        self._load_data()
        torch.manual_seed(setting.seed)
        bundle = factory.create(setting.model, dtype=self.dtype)
        self.init_model = bundle.model
        self.init_model.train()
        self.names = [n for n, p in self.init_model.named_parameters() if p.requires_grad]
        if setting.pre_steps:
            pre = copy.deepcopy(self.cfg)
            pre.steps, pre.lr = setting.pre_steps, setting.pre_lr
            pre.warmup, pre.momentum = setting.pre_warmup, setting.pre_momentum
            pre_order = batch_order(
                self.images.shape[0], setting.batch_size, setting.pre_steps, setting.seed + 3
            )
            train_loop(self.init_model, self.images, self.tokens, pre, pre_order, progress=False)
            self.init_model.train()
        self.fns = ClipFunctions(copy.deepcopy(self.init_model), self.ref_images, self.ref_tokens)
        # the same functions with g_z as z's removal gradient (ScoreConfig.sample_gradient)
        self.fns_removal = ClipFunctions(
            self.fns.model, self.ref_images, self.ref_tokens, removal=True
        )
        n = self.images.shape[0]
        self.n_train = n
        self.order = batch_order(n, setting.batch_size, setting.steps, setting.seed)
        self.ckpt_steps = checkpoint_steps(
            setting.steps, setting.checkpoints, setting.spacing, setting.seed
        )
        gen = torch.Generator().manual_seed(setting.seed + 1)  # as pipeline.train.trajectory
        self.grad_idx = [
            torch.randperm(n, generator=gen)[: setting.batch_size]
            for _ in range(setting.grad_batches)
        ]

    # -- data ----------------------------------------------------------------
    def _load_data(self) -> None:
        s = self.setting
        tmp = None
        out = s.data_dir
        if out is None:
            tmp = tempfile.TemporaryDirectory(prefix="diffin-loo-")
            out = tmp.name
        try:
            summary = make_pool(
                out,
                SynthConfig(
                    samples=s.samples,
                    shard_size=max(s.samples, 1),
                    noise=s.noise,
                    eval_samples=0,
                    seed=s.seed,
                ),
                overwrite=True,
            )
            samples = [x for url in resolve_shards(summary["train_data"]) for x in iter_shard(url)]
            import pyarrow.parquet as pq

            truth = pq.read_table(f"{out.rstrip('/')}/truth.parquet", columns=["uid", "defect"])
            defect = dict(zip(truth["uid"].to_pylist(), truth["defect"].to_pylist(), strict=True))
        finally:
            if tmp is not None:
                tmp.cleanup()
        samples = [x for x in samples if x.ok]
        if len(samples) < s.target_size + s.batch_size:
            raise ValueError(f"only {len(samples)} decodable pairs")
        rng = random.Random(s.seed)
        order = list(range(len(samples)))
        rng.shuffle(order)
        eligible = [i for i in order if not s.clean_target or defect.get(samples[i].uid) == "clean"]
        chosen = set(eligible[: s.target_size])
        if len(chosen) < s.target_size:
            raise ValueError(f"only {len(chosen)} pairs can be target pairs")
        target = [samples[i] for i in sorted(chosen)]
        train = [samples[i] for i in range(len(samples)) if i not in chosen]
        bundle = factory.create(s.model, dtype=self.dtype)
        images, tokens = encode(train, bundle)
        self.images, self.tokens = images.to(self.dtype), tokens
        t_images, self.target_tokens = encode(target, bundle)
        self.target_images = t_images.to(self.dtype)
        ref_idx = sorted(rng.sample(range(len(train)), min(s.reference_size, len(train))))
        self.ref_images = self.images[ref_idx]
        self.ref_tokens = self.tokens[ref_idx]
        self.uids = [x.uid for x in train]
        self.defects = [defect.get(x.uid, "unknown") for x in train]

    # -- training ------------------------------------------------------------
    def train(
        self, removed: torch.Tensor | None = None, keep_checkpoints: bool = False
    ) -> TrainResult:
        model = copy.deepcopy(self.init_model)
        model.train()
        saved: list[tuple[Checkpoint, Params]] = []

        def keep(step: int, lr: float, m: torch.nn.Module) -> None:
            saved.append((Checkpoint(step, lr), _clone(dict(m.named_parameters()))))

        t0 = time.perf_counter()
        curve = train_loop(
            model,
            self.images,
            self.tokens,
            self.cfg,
            self.order,
            self.ckpt_steps if keep_checkpoints else None,
            keep if keep_checkpoints else None,
            removed=removed,
            progress=False,
        )
        final = _clone({k: v for k, v in model.named_parameters() if k in self.names})
        saved = [(c, {k: p[k] for k in self.names}) for c, p in saved]
        return TrainResult(final, saved, curve, time.perf_counter() - t0)

    def target_loss(self, params: Params) -> float:
        with torch.no_grad(), derivative_mode():
            return float(
                self.fns.sample_losses(params, self.target_images, self.target_tokens)
                .double()
                .mean()
            )

    def sample_losses(self, params: Params, rows: Sequence[int]) -> np.ndarray:
        """The training pairs' own losses l_z (the loss L_V averages), for self-influence."""
        idx = torch.as_tensor(list(rows))
        with torch.no_grad(), derivative_mode():
            losses = self.fns.sample_losses(params, self.images[idx], self.tokens[idx])
        return losses.double().numpy()

    def perturbed_init_run(self, rel: float = 1e-10, seed: int = 5) -> TrainResult:
        """Retrain from initial weights perturbed by ``rel`` (relative): the chaos floor."""
        saved = self.init_model
        model = copy.deepcopy(saved)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                p.add_(rel * p.abs().max() * noise)
        self.init_model = model
        try:
            return self.train()
        finally:
            self.init_model = saved

    def mask(self, removed: Sequence[int]) -> torch.Tensor:
        m = torch.zeros(self.n_train, dtype=torch.bool)
        m[list(removed)] = True
        return m

    # -- scores --------------------------------------------------------------
    def terms(
        self,
        checkpoints: list[tuple[Checkpoint, Params]],
        chunk: int = 64,
        rows: Sequence[int] | None = None,
        self_influence: bool = False,
    ):
        """Per-checkpoint fast-form terms of every training sample (or of ``rows``), as the
        engine computes them.

        ``prop_ggn`` / ``prop_hessian`` are <r_t, g_z> of the propagated form
        (``pipeline.influence.propagate``) with the Gauss-Newton or the exact H_B;
        ``prop_ggn_cmean_removal`` that of the checkpoint-mean objective (Gauss-Newton,
        removal gradient: the pipeline's defaults with ``--objective checkpoint-mean``).
        With ``self_influence``, also the self terms of the scalable form at its defaults
        (``SelfInfluenceEngine``, as the scoring workers build it).
        """
        grad_batches = [(self.images[i], self.tokens[i]) for i in self.grad_idx]
        target = (self.target_images, self.target_tokens)
        dirs = [
            compute_directions(self.fns, params, grad_batches, target).ordered(self.names)
            for _, params in checkpoints
        ]
        props = {
            f"prop_{curvature}": self.propagated(checkpoints, dirs[-1].g_V, curvature)
            for curvature in ("ggn", "hessian")
        }
        m = len(dirs)  # (1/m) sum_j L_V(theta_{t_j}), as score.directions builds it
        cmean = self.propagated(
            checkpoints,
            {k: v / m for k, v in dirs[-1].g_V.items()},
            "ggn",
            earlier={
                c.step: {k: v / m for k, v in d.g_V.items()}
                for (c, _), d in zip(checkpoints[:-1], dirs[:-1], strict=True)
            },
        )
        idx = torch.arange(self.n_train) if rows is None else torch.as_tensor(list(rows))
        out: dict[int, dict[str, np.ndarray]] = {}
        for i, ((ckpt, params), d) in enumerate(zip(checkpoints, dirs, strict=True)):
            parts: dict[str, list[np.ndarray]] = {}
            engine = (
                SelfInfluenceEngine(
                    self.fns, params, d.g_B, grad_batches, SelfConfig(seed=self.setting.seed)
                )
                if self_influence
                else None
            )
            for start in range(0, len(idx), chunk):
                images = self.images[idx[start : start + chunk]]
                tokens = self.tokens[idx[start : start + chunk]]
                t = fast_terms(
                    self.fns,
                    params,
                    d,
                    images,
                    tokens,
                    {"loss", "first", "hb", "hz", "hv", "cosine"},
                )
                for key, r in props.items():
                    t[key] = fast_terms(self.fns, params, d, images, tokens, {"hlin"}, lin=r[i])[
                        "hlin"
                    ]
                # g_z as z's removal gradient: TracIn's term and the propagated <r_t, g_z>
                t["first_removal"] = fast_terms(
                    self.fns_removal, params, d, images, tokens, {"first"}
                )["first"]
                t["prop_ggn_removal"] = fast_terms(
                    self.fns_removal, params, d, images, tokens, {"hlin"}, lin=props["prop_ggn"][i]
                )["hlin"]
                t["prop_ggn_cmean_removal"] = fast_terms(
                    self.fns_removal, params, d, images, tokens, {"hlin"}, lin=cmean[i]
                )["hlin"]
                if engine is not None:
                    t.update(engine.terms(images, tokens))
                for k, v in t.items():
                    parts.setdefault(k, []).append(v.double().numpy())
            out[ckpt.step] = {k: np.concatenate(v) for k, v in parts.items()}
        return out

    def propagated(
        self,
        checkpoints: list[tuple[Checkpoint, Params]],
        g_V: Params,
        curvature: str,
        earlier: dict[int, Params] | None = None,
    ) -> list[Params]:
        """The propagated form's r_t per checkpoint, as ``pipeline.score.directions`` computes
        them (curvature averaged over the k gradient batches); ``earlier`` as in
        :func:`propagated_directions` (the checkpoint-mean objective)."""
        grad_batches = [(self.images[i], self.tokens[i]) for i in self.grad_idx]
        s = self.setting

        ops: dict[int, Callable[[Params], Params]] = {}

        def hvp(i: int, step: int, v: Params) -> Params:
            if i not in ops:
                ops[i] = curvature_operator(self.fns, checkpoints[i][1], grad_batches, curvature)
            return ops[i](v)

        return propagated_directions(
            hvp,
            [c.step for c, _ in checkpoints],
            s.rate,
            g_V,
            self.n_train,
            s.momentum,
            s.weight_decay,
            earlier=earlier,
        )

    def scores(
        self,
        terms: dict[int, dict[str, np.ndarray]],
        checkpoints: list[Checkpoint],
        rows: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Registry scorers (default options: the propagated form with the Gauss-Newton
        curvature, first order in) plus extra columns: ``diffin_second`` (its second-order
        part), ``diffin_propagated_hessian`` (the exact H_B instead), ``diffin_derived`` /
        ``diffin_derived_second`` (the derived expansion), its parts ``diffin_hb``,
        ``diffin_hz``, ``diffin_hv``, ``diffin_method`` / ``diffin_method_second`` (the
        METHOD.md form of the weights), ``tracin_last`` (last checkpoint only), and
        ``tracin_removal`` / ``diffin_removal`` (g_z as z's removal gradient). With self
        terms (``terms(self_influence=True)``): the self-influence scorers, and
        ``diffin_self_second`` (their second-order part)."""
        s = self.setting
        seed, n = s.seed, self.n_train
        uids = self.uids if rows is None else [self.uids[i] for i in rows]
        checkpoints = attach_block_rates(checkpoints, s.rate)
        ctx = ScoreContext(checkpoints, n, seed, {"first_order": True})
        weights = checkpoint_weights(checkpoints, n)  # derived (their W_first is TracIn's)

        def propagated(key: str) -> dict[int, dict[str, np.ndarray]]:
            """The terms as the engine has them for the propagated form: hlin = I_t =
            <r_t, g_z> - W_first <g_V, g_z>."""
            return {
                c.step: {
                    **terms[c.step],
                    "hlin": terms[c.step][key] - w.first * terms[c.step]["first"],
                }
                for c, w in zip(checkpoints, weights, strict=True)
            }

        default_terms = propagated("prop_ggn")
        out: dict[str, np.ndarray] = {}
        for scorer in get_scorers(list(REGISTRY_SCORERS)):
            out[scorer.name] = scorer.score(default_terms, uids, ctx)[scorer.name]
        diffin = get_scorers(["diffin"])[0]
        out["diffin_second"] = diffin.score(
            default_terms, uids, ScoreContext(checkpoints, n, seed, {"first_order": False})
        )["diffin"]
        out["diffin_propagated_hessian"] = diffin.score(propagated("prop_hessian"), uids, ctx)[
            "diffin"
        ]
        for name, options in (
            ("diffin_derived", {"second_order": "derived"}),
            ("diffin_derived_second", {"second_order": "derived", "first_order": False}),
            ("diffin_method", {"second_order": "method"}),
            ("diffin_method_second", {"second_order": "method", "first_order": False}),
        ):
            c2 = ScoreContext(checkpoints, n, seed, options)
            out[name] = diffin.score(terms, uids, c2)["diffin"]
        for key in ("hb", "hz", "hv"):
            out[f"diffin_{key}"] = sum(
                getattr(w, key) * terms[c.step][key]
                for c, w in zip(checkpoints, weights, strict=True)
            )
        out["tracin_last"] = weights[-1].first * terms[checkpoints[-1].step]["first"]
        # --sample-gradient removal: the same scores with z's removal gradient
        out["tracin_removal"] = sum(
            w.first * terms[c.step]["first_removal"]
            for c, w in zip(checkpoints, weights, strict=True)
        )
        out["diffin_removal"] = sum(terms[c.step]["prop_ggn_removal"] for c in checkpoints)
        out["diffin_cmean"] = sum(terms[c.step]["prop_ggn_cmean_removal"] for c in checkpoints)
        if "self_first" in terms[checkpoints[-1].step]:
            for scorer in get_scorers(list(SELF_SCORERS)):
                out[scorer.name] = scorer.score(terms, uids, ctx)[scorer.name]
            out["diffin_self_second"] = get_scorers(["diffin_self"])[0].score(
                terms, uids, ScoreContext(checkpoints, n, seed, {"first_order": False})
            )["diffin_self"]
        return out

    def expansion_radius(
        self, checkpoints: list[tuple[Checkpoint, Params]], iters: int = 12
    ) -> list[dict[str, float]]:
        """Per checkpoint: the top |eigenvalue| of H_B (power iteration), its Rayleigh quotient
        along g_V, and E * lambda with E the learning-rate sum elapsed at the checkpoint. The
        second-order expansion is only accurate where E * lambda << 1 on the directions
        that matter."""
        grad_batches = [(self.images[i], self.tokens[i]) for i in self.grad_idx]
        gen = torch.Generator().manual_seed(self.setting.seed + 4)
        blocks = block_rates([c.step for c, _ in checkpoints], self.setting.rate)
        out = []
        for (ckpt, params), block in zip(checkpoints, blocks, strict=True):
            elapsed = block.start + block.total
            g_V = target_gradient(self.fns, params, self.target_images, self.target_tokens)
            _, w = batch_gradient_and_hvp(self.fns, params, grad_batches, g_V)
            assert w is not None
            v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
            lam = 0.0
            for _ in range(iters):
                nv = float(norm(v))
                v = {k: x / nv for k, x in v.items()}
                _, hv = batch_gradient_and_hvp(self.fns, params, grad_batches, v)
                assert hv is not None
                lam = float(dot(v, hv))
                v = hv
            rq = float(dot(g_V, w) / dot(g_V, g_V))
            out.append(
                {
                    "step": ckpt.step,
                    "elapsed_lr_sum": elapsed,
                    "lambda_max_H_B": lam,
                    "rayleigh_H_B_g_V": rq,
                    "elapsed_x_lambda_max": elapsed * abs(lam),
                    "elapsed_x_rayleigh_g_V": elapsed * rq,
                }
            )
        return out


def run_groundtruth(
    setting: LOOSetting,
    n_removed: int = 48,
    n_subsets: int = 0,
    subset_fraction: float = 0.5,
    log=print,
    radius_iters: int = 0,
) -> LOOResult:
    """Full run + scores, noise floor, leave-one-out for ``n_removed`` samples, optional LDS subsets."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    gt = GroundTruth(setting)
    timings["data_and_model"] = time.perf_counter() - t

    full = gt.train(keep_checkpoints=True)
    timings["train_full"] = full.seconds
    base = gt.target_loss(full.final)
    log(
        f"full run: {full.seconds:.1f}s, L_V(theta_T) = {base:.6f}, curve {full.loss_curve[:1]}..{full.loss_curve[-1:]}"
    )

    t = time.perf_counter()
    terms = gt.terms(full.checkpoints)
    ckpts = [c for c, _ in full.checkpoints]
    scores = gt.scores(terms, ckpts)
    timings["scores"] = time.perf_counter() - t
    radius: list[dict[str, float]] = []
    if radius_iters:
        t = time.perf_counter()
        radius = gt.expansion_radius(full.checkpoints, radius_iters)
        timings["radius"] = time.perf_counter() - t
        log(f"expansion radius: {radius}")

    # noise floor: the same run twice, and with an all-false removed mask
    again = gt.train()
    empty = gt.train(removed=torch.zeros(gt.n_train, dtype=torch.bool))
    diffs = [
        max(float((a.final[k] - full.final[k]).abs().max()) for k in gt.names)
        for a in (again, empty)
    ]
    noise = {
        "repeat_max_abs_param_diff": diffs[0],
        "empty_mask_max_abs_param_diff": diffs[1],
        "repeat_target_loss_diff": gt.target_loss(again.final) - base,
        "empty_mask_target_loss_diff": gt.target_loss(empty.final) - base,
        "init_perturbed_1e-10_target_loss_diff": gt.target_loss(gt.perturbed_init_run().final)
        - base,
    }
    log(f"noise floor: {noise}")

    rng = np.random.default_rng(setting.seed + 2)
    removed = sorted(
        rng.choice(gt.n_train, size=min(n_removed, gt.n_train), replace=False).tolist()
    )

    def cmean(run: TrainResult) -> float:  # the checkpoint-mean objective
        return float(np.mean([gt.target_loss(p) for _, p in run.checkpoints]))

    base_cmean = cmean(full)
    t = time.perf_counter()
    actual, actual_cmean = [], []
    for i, z in enumerate(removed):
        r = gt.train(removed=gt.mask([z]), keep_checkpoints=True)
        actual.append(gt.target_loss(r.final) - base)
        actual_cmean.append(cmean(r) - base_cmean)
        if (i + 1) % 10 == 0:
            log(f"  LOO {i + 1}/{len(removed)} ({time.perf_counter() - t:.0f}s)")
    timings["loo"] = time.perf_counter() - t

    subsets = subset_actual = None
    if n_subsets:
        t = time.perf_counter()
        k = int(round(subset_fraction * gt.n_train))
        subsets = np.zeros((n_subsets, gt.n_train), dtype=bool)
        subset_actual = np.zeros(n_subsets)
        for j in range(n_subsets):
            idx = rng.choice(gt.n_train, size=k, replace=False)
            subsets[j, idx] = True
            r = gt.train(removed=torch.from_numpy(subsets[j]))
            subset_actual[j] = gt.target_loss(r.final) - base
        timings["subsets"] = time.perf_counter() - t
        log(f"  subsets {n_subsets} ({timings['subsets']:.0f}s)")

    return LOOResult(
        setting=asdict(setting),
        n_train=gt.n_train,
        removed=removed,
        actual=np.asarray(actual),
        scores=scores,
        defects=gt.defects,
        base_target_loss=base,
        noise_floor=noise,
        subsets=subsets,
        subset_actual=subset_actual,
        timings=timings,
        loss_curve=full.loss_curve,
        checkpoints=[{"step": c.step, "lr": c.lr} for c in ckpts],
        radius=radius,
        actual_cmean=np.asarray(actual_cmean),
    )
