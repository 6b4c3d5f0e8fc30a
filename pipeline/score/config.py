"""Scoring configuration: serialised into run.json and the score table's metadata."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.data.keys import (
    IMAGE_KEYS,
    KEYS_RULE,
    PIXEL_CAP_RULE,
    TEXT_KEYS,
    key_misuse,
    pixel_cap_ok,
    reader_options,
    valid_keys,
)
from pipeline.data.reader import MAX_IMAGE_PIXELS
from pipeline.errors import ConfigError, is_int, is_number
from pipeline.influence.directions import GGN_KEPT_PAIRS, PAIRS_PER_PASS
from pipeline.influence.estimator import CURVATURES, FORMS
from pipeline.influence.selfinf import SELF_TERMS, SelfConfig

AUTO_FORM = "auto"
AUTO_OBJECTIVE = "auto"


SAMPLE_GRADIENTS = ("reference", "removal")
# What diffin estimates the removal effect on: the target loss at the last checkpoint, or
# its mean over the checkpoints (propagated form only; docs/accuracy.md section 2e).
# "auto" resolves per trajectory (resolve_objective).
OBJECTIVES = ("final", "checkpoint-mean")
DTYPE_CHOICES = ("float32", "float64", "amp_bf16")


# The ScoreConfig fields that count something: integers, never bools or floats.
INT_FIELDS = (
    "workers",
    "threads",
    "batch_size",
    "target_max",
    "max_attempts",
    "seed",
    "self_rank",
    "self_dim",
    "memory_mb",
    "directions_chunk",
    "ggn_kept_pairs",
    "prefetch_batches",
    "max_image_pixels",
)


def _ray_gpus(gpus: float) -> bool:
    """Whether Ray accepts ``num_gpus=gpus`` (it refuses the others only when an actor is
    made, after the per-run work, which can take hours) and an actor uses what it holds:
    a scoring actor computes on one device, so a second GPU would sit idle."""
    return gpus == 0 or 1e-4 <= gpus <= 1  # Ray counts shares in units of 1e-4 of a GPU


@dataclass
class ScoreConfig:
    data: str  # shard pattern of the pool to score
    run: str  # run directory holding the trajectory
    methods: list[str] = field(default_factory=lambda: ["diffin", "tracin", "random"])
    target: str | None = None  # shard pattern of a curated target set; default: held-out sample
    target_max: int = 1024  # at most this many target pairs (the first ones, in shard order)
    address: str | None = None  # Ray address; None starts an embedded local Ray
    workers: int = 2  # scoring actors
    threads: int = 1  # torch threads (and Ray CPUs) per actor
    batch_size: int = 128
    first_order: bool = True  # diffin = sum of first- and second-order terms
    # diffin's form (pipeline.influence.estimator): "propagated", "derived", "method", or
    # "auto": propagated for an SGD trajectory, derived otherwise (score.directions.resolve_form)
    second_order: str = AUTO_FORM
    # curvature the propagated form damps with: "ggn" (Gauss-Newton, PSD) or "hessian" (exact H_B)
    propagate_curvature: str = "ggn"
    # the target loss diffin's removal effect is on: "final" (at theta_T, METHOD.md),
    # "checkpoint-mean" (its mean over the checkpoints; propagated form only), or "auto":
    # checkpoint-mean wherever it applies, final elsewhere (resolve_objective)
    objective: str = AUTO_OBJECTIVE
    # g_z of the target-directed scores (diffin, tracin): "removal", z's removal gradient
    # from R used as a batch (z's own terms and its role as a negative of its batch mates;
    # chosen from docs/accuracy.md section 1g), or "reference", the gradient of the
    # reference-negative loss l_z (METHOD.md section 2; the default before 2026-11-29).
    # Self-influence and the loss scorers use l_z either way.
    sample_gradient: str = "removal"
    max_attempts: int = 3  # tries per shard before it is recorded as failed
    seed: int = 0  # for the random scorer and the self-influence sketch
    self_hb: str = "lanczos"  # diffin_self's g_z' H_B g_z: "lanczos" (top eigenpairs) or "fisher"
    self_rank: int = 16  # eigenpairs of H_B per checkpoint (self_hb="lanczos")
    self_dim: int = 2048  # count-sketch dimension for diffin_self (self_hb="fisher")
    memory_mb: int = 1024  # per-actor budget for per-sample gradients in flight (diffin_self)
    # Pairs per differentiated pass of the directions stage: its memory grows with this, not
    # with K or the proxy's batch size (0.2 to 0.25 GiB a pair for ViT-B-32 on the host).
    directions_chunk: int = PAIRS_PER_PASS
    # Pairs of gradient batches whose graphs the propagated form's Gauss-Newton operator keeps
    # (faster products); the batches beyond are recomputed a chunk at a time (0: none kept).
    ggn_kept_pairs: int = GGN_KEPT_PAIRS
    # "float32", "float64", or "amp_bf16": float32 weights and direction vectors, the
    # per-sample work under bfloat16 autocast (as open_clip's --precision amp_bf16), for
    # GPUs; scores agree with float32 to Spearman 0.98-0.9999 (docs/accuracy.md, 6)
    dtype: str = "float32"
    image_keys: list[str] = field(default_factory=lambda: list(IMAGE_KEYS))
    text_keys: list[str] = field(default_factory=lambda: list(TEXT_KEYS))
    # an image whose header declares more pixels is an error row, never decoded
    max_image_pixels: int = MAX_IMAGE_PIXELS
    prefetch_batches: int = 2  # decoded batches an actor reads ahead (0: no prefetch thread hint)
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0

    def validate(self) -> None:
        from pipeline.scorers import get_scorers

        get_scorers(self.methods)
        # Types first: a float batch size never equals a batch's length (one batch per
        # shard), first_order="no" is truthy, and an infinite GPU count fails in Ray.
        for name in INT_FIELDS:
            value = getattr(self, name)
            if not is_int(value):
                raise ConfigError(f"{name}: must be an integer (got {value!r})")
        if not isinstance(self.first_order, bool):
            raise ConfigError(f"first_order: must be true or false (got {self.first_order!r})")
        gpus = self.gpus_per_worker
        if gpus is not None and (not is_number(gpus) or not math.isfinite(gpus)):
            raise ConfigError(f"gpus_per_worker: must be a finite number (got {gpus!r})")
        checks = [
            # the random scorer and the self-influence sketch seed numpy: [0, 2**63)
            ("seed", 0 <= self.seed < 2**63, "must be in [0, 2**63)"),
            ("workers", self.workers >= 1, "must be >= 1"),
            ("threads", self.threads >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("target_max", self.target_max >= 1, "must be >= 1"),
            ("max_attempts", self.max_attempts >= 1, "must be >= 1"),
            ("self_dim", self.self_dim >= 16, "must be >= 16"),
            ("self_hb", self.self_hb in ("lanczos", "fisher"), "must be 'lanczos' or 'fisher'"),
            ("self_rank", self.self_rank >= 1, "must be >= 1"),
            ("memory_mb", self.memory_mb >= 16, "must be >= 16"),
            ("directions_chunk", self.directions_chunk >= 1, "must be >= 1"),
            ("ggn_kept_pairs", self.ggn_kept_pairs >= 0, "must be >= 0"),
            ("prefetch_batches", self.prefetch_batches >= 0, "must be >= 0"),
            (
                "gpus_per_worker",
                self.gpus_per_worker is None or _ray_gpus(self.gpus_per_worker),
                "must be 0 or a share of one GPU from 0.0001 (Ray's unit) to 1: an actor "
                "scores on one GPU, so use more --workers for more GPUs",
            ),
            ("image_keys", valid_keys(self.image_keys), KEYS_RULE),
            ("text_keys", valid_keys(self.text_keys), KEYS_RULE),
            ("max_image_pixels", pixel_cap_ok(self.max_image_pixels), PIXEL_CAP_RULE),
            ("dtype", self.dtype in DTYPE_CHOICES, f"must be one of {DTYPE_CHOICES}"),
            (
                "second_order",
                self.second_order in (AUTO_FORM, *FORMS),
                f"must be one of {(AUTO_FORM, *FORMS)}",
            ),
            (
                "propagate_curvature",
                self.propagate_curvature in CURVATURES,
                f"must be one of {CURVATURES}",
            ),
            (
                "objective",
                self.objective in (AUTO_OBJECTIVE, *OBJECTIVES),
                f"must be one of {(AUTO_OBJECTIVE, *OBJECTIVES)}",
            ),
            (
                "objective",
                self.objective in (AUTO_OBJECTIVE, "final")
                or "diffin" not in self.methods
                or self.second_order in (AUTO_FORM, "propagated"),
                "checkpoint-mean needs the propagated form (--second-order auto or propagated)",
            ),
            (
                # sum_t I_t is the final loss's second-order part; under the mean objective
                # r_t - W_first g_V(theta_t) still holds first-order parts of the later
                # endpoints, so that sum would be no second-order part of anything
                "objective",
                self.objective in (AUTO_OBJECTIVE, "final")
                or "diffin" not in self.methods
                or self.first_order,
                "checkpoint-mean scores diffin with its first-order term (not with "
                "--no-first-order)",
            ),
            (
                "sample_gradient",
                self.sample_gradient in SAMPLE_GRADIENTS,
                f"must be one of {SAMPLE_GRADIENTS}",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{name}: {why} (got {getattr(self, name)!r})")
        misuse = key_misuse(self.image_keys, self.text_keys)
        if misuse is not None:
            raise ConfigError(f"{misuse[0]}: {misuse[1]} (got {getattr(self, misuse[0])!r})")
        if self.dtype == "amp_bf16":
            per_sample = [
                s.name
                for s in get_scorers(self.methods)
                if (s.terms | s.first_terms | s.last_terms) & SELF_TERMS
            ]
            if per_sample:
                # per-sample gradients under autocast were never measured against float32
                raise ConfigError(
                    f"dtype: amp_bf16 is for the scorers of one forward-mode pass; "
                    f"{per_sample} take per-sample gradients: score them in float32"
                )

    @property
    def storage_dtype(self) -> str:
        """The dtype of the weights and of the stored direction vectors."""
        return "float32" if self.dtype == "amp_bf16" else self.dtype

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The context the per-sample terms are computed in: bfloat16 autocast for amp_bf16."""
        if self.dtype == "amp_bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def score_options(self) -> dict[str, Any]:
        """The ``ScoreContext`` options: how the scorers assemble the terms."""
        return {"first_order": self.first_order, "second_order": self.second_order}

    def self_config(self, hb: str | None = None) -> SelfConfig:
        """diffin_self's settings; ``hb="none"`` when no scorer needs g_z' H_B g_z."""
        return SelfConfig(
            hb=hb or self.self_hb,
            rank=self.self_rank,
            dim=self.self_dim,
            memory_mb=self.memory_mb,
            seed=self.seed,
        )

    def reader_options(self) -> dict[str, Any]:
        return reader_options(self.image_keys, self.text_keys, self.max_image_pixels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
