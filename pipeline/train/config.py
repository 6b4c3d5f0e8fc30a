"""Proxy-training configuration: serialised into RUN/run.json and trajectory.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

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

PRECISIONS = ("fp32", "amp", "fp64")

# Fields that change how training runs, not the trajectory it computes: a run
# may resume under different values of these (another worker count included).
RUN_ONLY_FIELDS = frozenset(
    {"run", "threads", "workers", "address", "resume", "resume_every", "max_failures"}
)


# The TrainConfig fields that count something: integers, never bools or floats.
INT_FIELDS = (
    "steps",
    "checkpoints",
    "batch_size",
    "warmup",
    "seed",
    "target_size",
    "reference_size",
    "grad_batches",
    "max_samples",
    "threads",
    "workers",
    "resume_every",
    "max_failures",
    "max_image_pixels",
)


@dataclass
class TrainConfig:
    data: str  # shard pattern of the pool
    run: str  # run directory
    model: str = "diffin-small"
    pretrained: str | None = None  # checkpoint file or open_clip tag
    steps: int = 400
    # m in METHOD.md. 25 and the rate below are the proxy on which one Diff-In run meets
    # issue 3's noise AUROC (docs/accuracy.md 2e); scoring costs grow with m.
    checkpoints: int = 25
    spacing: str = "even"  # "even" (the reference implementation) or "random"
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd" (the method's assumption) or "adamw"
    lr: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup: int = 40
    schedule: str = "constant"  # "constant" or "cosine" after warm-up
    seed: int = 0
    target_size: int = 128  # |V|, held out of training; score's target when it has no --target
    reference_size: int = 255  # K reference negatives (METHOD.md section 2)
    grad_batches: int = 4  # k batches averaged into g_B and H_B
    max_samples: int = 100_000  # the proxy trains in memory on at most this many pairs
    threads: int = 0  # torch threads (per Ray Train worker with --workers); 0: torch's default
    workers: int = 0  # Ray Train data-parallel workers; 0: train in this process
    address: str | None = None  # Ray cluster for --workers; default: the job's, else embedded
    precision: str = "fp32"  # "fp32", "amp" (bf16 autocast on CUDA workers), "fp64"
    resume: bool = True  # continue from RUN/trajectory/resume.pt when a partial run is there
    resume_every: int = 0  # also save the resume state every this many steps; 0: at checkpoints
    max_failures: int = 0  # Ray Train restarts of a failed worker group (each resumes)
    image_keys: list[str] = field(default_factory=lambda: list(IMAGE_KEYS))
    text_keys: list[str] = field(default_factory=lambda: list(TEXT_KEYS))
    # an image whose header declares more pixels is an error row, never decoded
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def validate(self) -> None:
        # Types and finiteness first: a float count or an infinite rate passed the range
        # checks and failed only after the pool was read and the run's old record removed.
        for name in INT_FIELDS:
            value = getattr(self, name)
            if not is_int(value):
                raise ConfigError(f"{name}: must be an integer (got {value!r})")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not is_number(value):
                raise ConfigError(f"{name}: must be a number (got {value!r})")
            if not math.isfinite(value):
                raise ConfigError(f"{name}: must be finite (got {value!r})")
        checks = [
            ("steps", self.steps >= 1, "must be >= 1"),
            # random.Random takes |seed| (-7 drew the sets of 7), torch at most 2**64 - 1
            ("seed", 0 <= self.seed < 2**63, "must be in [0, 2**63)"),
            (
                "max_samples",
                self.max_samples >= self.target_size + self.batch_size,
                f"must be >= target_size + batch_size = {self.target_size + self.batch_size}",
            ),
            ("checkpoints", 1 <= self.checkpoints <= self.steps, "must be in [1, steps]"),
            ("spacing", self.spacing in ("even", "random"), "must be 'even' or 'random'"),
            ("batch_size", self.batch_size >= 2, "must be >= 2 (the loss is contrastive)"),
            ("optimizer", self.optimizer in ("sgd", "adamw"), "must be 'sgd' or 'adamw'"),
            ("lr", self.lr > 0, "must be > 0"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup", 0 <= self.warmup < self.steps, "must be in [0, steps)"),
            ("schedule", self.schedule in ("constant", "cosine"), "must be 'constant' or 'cosine'"),
            ("target_size", self.target_size >= 1, "must be >= 1"),
            ("reference_size", self.reference_size >= 1, "must be >= 1"),
            ("image_keys", valid_keys(self.image_keys), KEYS_RULE),
            ("text_keys", valid_keys(self.text_keys), KEYS_RULE),
            ("max_image_pixels", pixel_cap_ok(self.max_image_pixels), PIXEL_CAP_RULE),
            ("grad_batches", self.grad_batches >= 1, "must be >= 1"),
            ("workers", self.workers >= 0, "must be >= 0"),
            ("threads", self.threads >= 0, "must be >= 0 (0: torch's default)"),
            (
                "batch_size",
                self.workers == 0 or self.batch_size % self.workers == 0,
                f"must be a multiple of --workers {self.workers} (equal slices per worker)",
            ),
            ("precision", self.precision in PRECISIONS, f"must be one of {PRECISIONS}"),
            ("resume_every", self.resume_every >= 0, "must be >= 0"),
            ("max_failures", self.max_failures >= 0, "must be >= 0"),
            (
                "address",
                self.address is None or self.workers > 0,
                "is the Ray cluster of --workers N (Ray Train); without --workers training "
                "runs in this process and would ignore it",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{name}: {why} (got {getattr(self, name)!r})")
        misuse = key_misuse(self.image_keys, self.text_keys)
        if misuse is not None:
            raise ConfigError(f"{misuse[0]}: {misuse[1]} (got {getattr(self, misuse[0])!r})")

    def reader_options(self) -> dict[str, Any]:
        return reader_options(self.image_keys, self.text_keys, self.max_image_pixels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trajectory_fields(self) -> dict[str, Any]:
        """What the checkpoints depend on (the resume state must match these)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY_FIELDS}
