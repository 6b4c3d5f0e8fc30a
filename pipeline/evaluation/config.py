"""Configuration of ``diffin evaluate``: serialised beside its results."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import ConfigError


@dataclass
class EvaluateConfig:
    run: str
    keeps: list[float] = field(default_factory=lambda: [0.5, 0.7])
    # None: every scorer the table was scored with (`diffin score --methods`)
    methods: list[str] | None = None
    full: bool = True  # also train on every ok pair (the "no pruning" row)
    data: str | None = None  # the scored pool; default: the pattern `diffin score` recorded
    eval_data: str | None = None  # held-out shards; default: the generated pool's eval/ split
    eval_labels: str | None = None  # parquet (uid, label) for zero-shot; default: beside eval
    classes: str | None = None  # json {"classnames", "templates"}; default: beside eval
    truth: str | None = None  # parquet (uid, defect); default: the generated pool's truth
    steps: int | None = None  # training budget; default: the proxy's
    batch_size: int | None = None  # default: the proxy's
    # The retraining recipe need not be the proxy's: Diff-In assumes SGD for the
    # proxy, but SGD at the proxy's settings leaves the contrastive plateau or
    # not depending on the seed (docs/results.md), which would rank subsets by
    # luck. AdamW (as open_clip trains) learns reliably at this budget.
    optimizer: str = "adamw"  # "sgd" or "adamw"
    lr: float = 1e-3
    # One retraining per (subset, seed); the summary gives mean and sd over seeds.
    # Small CLIPs are seed-sensitive (a run may or may not leave the contrastive
    # plateau), so one seed can rank the subsets by luck: docs/results.md.
    seeds: list[int] = field(default_factory=lambda: [0])
    weight_decay: float = 0.1
    threads: int = 0  # torch threads; 0: torch's default

    def validate(self) -> None:
        if not self.keeps:
            raise ConfigError("keeps: give at least one keep fraction")
        for k in self.keeps:
            if isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k <= 1:
                raise ConfigError(f"keeps: every fraction must be in (0, 1] (got {k!r})")
        if self.methods is not None and not self.methods:
            raise ConfigError("methods: give at least one scorer column")
        if self.methods is not None and len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods: duplicates in {self.methods}")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0 (got {self.threads!r})")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps: must be >= 1 (got {self.steps!r})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: give distinct seeds (got {self.seeds!r})")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0 (got {self.weight_decay!r})")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer: must be 'sgd' or 'adamw' (got {self.optimizer!r})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be > 0 (got {self.lr!r})")
        if self.batch_size is not None and self.batch_size < 2:
            raise ConfigError(f"batch_size: must be >= 2 (got {self.batch_size!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
