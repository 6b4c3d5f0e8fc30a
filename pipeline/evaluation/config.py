"""Configuration of ``diffin evaluate``: serialised beside its results."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import ConfigError, is_int, is_number
from pipeline.prune.config import NORMS, PruneConfig, check_rank_column


@dataclass
class EvaluateConfig:
    run: str
    keeps: list[float] = field(default_factory=lambda: [0.5, 0.7])
    # None: every scorer the table was scored with (`diffin score --methods`)
    methods: list[str] | None = None
    # Fused rankings to compare too, each as `diffin prune --fuse` keeps it
    # (scorer column -> weight), all normalised by ``fusion_norm``.
    fusions: list[dict[str, float]] = field(default_factory=list)
    fusion_norm: str = "zscore"  # "zscore" or "rank"
    # Other runs of the same pool (`diffin prune --ensemble`): each of ``methods`` is also
    # compared ranked by its mean over this run and these (subsets named METHOD-ensN@KEEP)
    ensemble: list[str] | None = None
    full: bool = True  # also train on every ok pair (the "no pruning" row)
    # A pool too large to retrain on in memory: every subset is cut to the same fraction,
    # max_pairs / ok pairs, by a seeded draw on the uids (the full pool to max_pairs pairs)
    max_pairs: int | None = None
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
            if not is_number(k) or not 0 < k <= 1:
                raise ConfigError(f"keeps: every fraction must be in (0, 1] (got {k!r})")
        names = [f"{k:g}" for k in self.keeps]  # subsets are named method@{keep:g}
        if len(set(names)) != len(names):
            # a repeated fraction trained twice and counted each seed twice in the sd
            raise ConfigError(f"keeps: duplicates in {self.keeps}")
        if self.methods is not None and not self.methods:
            raise ConfigError("methods: give at least one scorer column")
        if self.methods is not None and len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods: duplicates in {self.methods}")
        for method in self.methods or []:
            check_rank_column("methods", method)
        if self.fusion_norm not in NORMS:
            raise ConfigError(
                f"fusion_norm: must be one of {', '.join(NORMS)} (got {self.fusion_norm!r})"
            )
        rules = [self.prune_config(fusion, 1.0) for fusion in self.fusions]
        for rule in rules:
            rule.validate()
        if self.ensemble is not None:
            PruneConfig(run=self.run, ensemble=self.ensemble).validate()
        spelled = [rule.ranking for rule in rules]
        if len(set(spelled)) != len(spelled):
            raise ConfigError(f"fusions: duplicates in {spelled}")
        if self.max_pairs is not None and (not is_int(self.max_pairs) or self.max_pairs < 2):
            raise ConfigError(f"max_pairs: must be an integer >= 2 (got {self.max_pairs!r})")
        for name, low in (("threads", 0), ("steps", 1), ("batch_size", 2)):
            value = getattr(self, name)
            if value is None and name != "threads":
                continue  # the proxy's own
            if not is_int(value) or value < low:
                raise ConfigError(f"{name}: must be an integer >= {low} (got {value!r})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: give distinct seeds (got {self.seeds!r})")
        for seed in self.seeds:
            # torch.manual_seed takes [0, 2**64) but the batch order's generator int64 only;
            # out of range failed after the first seed's retrainings, losing them all
            if not is_int(seed) or not 0 <= seed < 2**63:
                raise ConfigError(
                    f"seeds: every seed must be an integer in [0, 2**63) (got {seed!r})"
                )
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay: must be finite and >= 0 (got {self.weight_decay!r})")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer: must be 'sgd' or 'adamw' (got {self.optimizer!r})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be > 0 (got {self.lr!r})")

    def prune_config(self, fusion: dict[str, float], keep: float) -> PruneConfig:
        """The prune rule whose kept rows a fused subset trains on."""
        return PruneConfig(run=self.run, keep=keep, fusion=fusion, fusion_norm=self.fusion_norm)

    def ensemble_config(self, method: str, keep: float) -> PruneConfig:
        """The prune rule whose kept rows an ensemble subset trains on."""
        return PruneConfig(run=self.run, keep=keep, method=method, ensemble=self.ensemble)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.ensemble is None:
            del out["ensemble"]  # as recorded before ensembles (resume keys, status)
        return out
