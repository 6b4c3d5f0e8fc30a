"""Prune configuration: serialised into the manifest it produces.

A keep rule has two parts:

* the score each ok row is ranked by: one scorer's column (``method``), or a
  weighted ``fusion`` of several scorers, each normalised first (``zscore``:
  (x - mean) / std over the ok rows; ``rank``: the row's rank among the ok
  rows scaled to [0, 1]);
* the rule (``rule``):
  - ``fraction``: the top ``keep`` fraction of the ok rows;
  - ``threshold``: every ok row whose score is >= ``threshold``;
  - ``balanced``: the top ``keep`` fraction within each group, the groups
    being k-means clusters of the proxy model's image embeddings
    (``balance_by="cluster"``, ``clusters`` = k) or the values of a column of
    the score table (``balance_by=COLUMN``). ``balance="proportional"`` keeps
    ``keep`` of every group; ``"equal"`` gives every group the same quota
    (groups smaller than it are kept whole and the rest is shared out).

Ties are broken by uid, so every rule is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import ConfigError, is_int, is_number

RULES = ("fraction", "threshold", "balanced")
NORMS = ("zscore", "rank")
BALANCES = ("proportional", "equal")
# Columns of the score table that are not scores.
NON_SCORE_COLUMNS = ("uid", "key", "shard", "index", "status", "error", "caption")
# Score columns that break "higher = keep first": ranked by, they keep the worst pairs.
NOT_KEEP_FIRST = {"loss_raw": "is the loss itself, higher = worse; rank by `loss`, its negative"}


def check_rank_column(field: str, column: str) -> None:
    """Refuse ranking by a column that is no score, or whose high values are the worst."""
    if column in NON_SCORE_COLUMNS:
        raise ConfigError(f"{field}: {column!r} is not a score column")
    if column in NOT_KEEP_FIRST:
        raise ConfigError(f"{field}: {column!r} {NOT_KEEP_FIRST[column]}")


@dataclass
class PruneConfig:
    run: str
    keep: float = 1.0  # fraction of the scorable (status == ok) rows to keep, in (0, 1]
    method: str = "diffin"  # score column; higher = keep first
    name: str | None = None  # manifest name; default "{method}-keep{keep}" (see manifest_name)
    shard_size: int = 1000  # samples per output tar
    rule: str = "fraction"  # "fraction", "threshold" or "balanced"
    threshold: float | None = None  # rule "threshold": keep ok rows with score >= this
    balance_by: str | None = None  # rule "balanced": "cluster" or a column of the score table
    balance: str = "proportional"  # rule "balanced": "proportional" or "equal" quotas
    clusters: int = 8  # balance_by="cluster": k of k-means
    cluster_seed: int = 0
    fusion: dict[str, float] | None = None  # scorer column -> weight; replaces `method`
    fusion_norm: str = "zscore"  # "zscore" or "rank"
    # other runs scored on the same pool: every score column is then the mean over `run`
    # and these (pipeline/prune/ensemble.py); the manifest is written under `run`
    ensemble: list[str] | None = None

    def validate(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"rule: must be one of {', '.join(RULES)} (got {self.rule!r})")
        if not is_number(self.keep):
            raise ConfigError(f"keep: must be a number in (0, 1] (got {self.keep!r})")
        if not 0 < self.keep <= 1:
            raise ConfigError(f"keep: must be in (0, 1] (got {self.keep!r})")
        if self.fusion is None:
            check_rank_column("method", self.method)
        # Integers, not bools or floats: each fails only after the table is read otherwise
        # (k-means' seed after every ok row is embedded).
        for name, low in (("shard_size", 1), ("clusters", 1), ("cluster_seed", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise ConfigError(f"{name}: must be an integer >= {low} (got {value!r})")
        if self.name is not None and not (isinstance(self.name, str) and _plain(self.name)):
            raise ConfigError(f"name: must be {_PLAIN} (got {self.name!r})")
        if self.rule == "threshold":
            if (
                self.threshold is None
                or not is_number(self.threshold)
                or not math.isfinite(self.threshold)
            ):
                raise ConfigError(
                    f"threshold: rule 'threshold' needs a finite threshold (got {self.threshold!r})"
                )
        elif self.threshold is not None:
            raise ConfigError(f"threshold: only used by rule 'threshold' (rule is {self.rule!r})")
        if self.rule == "balanced":
            if not self.balance_by:
                raise ConfigError(
                    "balance_by: rule 'balanced' needs 'cluster' or a column of the score table"
                )
            if self.balance not in BALANCES:
                raise ConfigError(
                    f"balance: must be one of {', '.join(BALANCES)} (got {self.balance!r})"
                )
        elif self.balance_by is not None:
            raise ConfigError(f"balance_by: only used by rule 'balanced' (rule is {self.rule!r})")
        if self.fusion is not None:
            if not isinstance(self.fusion, dict) or not self.fusion:
                raise ConfigError(
                    f"fusion: must map scorer columns to weights (got {self.fusion!r})"
                )
            for col, w in self.fusion.items():
                if col in NON_SCORE_COLUMNS:
                    raise ConfigError(f"fusion: {col!r} is not a score column")
                if not is_number(w) or not math.isfinite(w) or w == 0:
                    # A zero weight would still leave out the rows its column lacks.
                    raise ConfigError(
                        f"fusion: weight of {col!r} must be a finite, non-zero number "
                        f"(got {w!r}); leave a column out to ignore it"
                    )
                if w > 0:  # the refusals of --method; a negative weight ranks loss_raw right
                    check_rank_column("fusion", col)
            if self.fusion_norm not in NORMS:
                raise ConfigError(
                    f"fusion_norm: must be one of {', '.join(NORMS)} (got {self.fusion_norm!r})"
                )
        if self.ensemble is not None:
            if (
                not isinstance(self.ensemble, list | tuple)
                or not self.ensemble
                or not all(isinstance(u, str) and u for u in self.ensemble)
            ):
                raise ConfigError(
                    f"ensemble: must list the other runs, one or more (got {self.ensemble!r})"
                )
            runs = [_same_place(u) for u in [self.run, *self.ensemble]]
            if len(set(runs)) != len(runs):
                raise ConfigError(
                    "ensemble: a run is named twice (with --run or in --ensemble): each run of "
                    "an ensemble counts once"
                )
        # last: the name is spelled from the fields checked above
        if self.name is None and isinstance(self.method, str) and not _plain(self.manifest_name):
            # spelled from column names, which a score table may hold in any form
            raise ConfigError(
                f"name: the manifest name made from the rule, {self.manifest_name!r}, is not "
                f"{_PLAIN}; give one (--name)"
            )

    @property
    def score_name(self) -> str:
        """What rows are ranked by: the method, or "fusion" for a fused score."""
        return "fusion" if self.fusion else self.method

    @property
    def ranking(self) -> str:
        """The ranking score spelled out: the method, or the fusion with its norm and weights."""
        if not self.fusion:
            return self.method
        parts = "+".join(f"{c}{_num(w)}" for c, w in sorted(self.fusion.items()))
        return f"fusion-{self.fusion_norm}-{parts}"

    @property
    def manifest_name(self) -> str:
        if self.name:
            return self.name
        if self.ensemble:  # apart from the manifest of `run`'s own scores
            return f"{self._rule_name}-ens{1 + len(self.ensemble)}"
        return self._rule_name

    @property
    def _rule_name(self) -> str:
        if self.rule == "fraction" and not self.fusion:
            return f"{self.method}-keep{_num(self.keep)}"  # the original spelling
        base = self.ranking
        if self.rule == "threshold":
            return f"{base}-ge{_num(self.threshold)}"
        if self.rule == "balanced":
            by = self.balance_by
            if by == "cluster":
                by = f"cluster{self.clusters}" + (
                    f"-seed{self.cluster_seed}" if self.cluster_seed else ""
                )
            return f"{base}-keep{_num(self.keep)}-{self.balance}-{by}"
        return f"{base}-keep{_num(self.keep)}"

    def to_dict(self) -> dict[str, Any]:
        """The config as recorded (manifest, run.json): a setting the rule did not use is
        null, not its default, which would read as if it applied (walkthrough)."""
        out = asdict(self)
        if self.fusion:
            out["method"] = None  # ranked by the fusion: a recorded method would mislead
        else:
            out["fusion_norm"] = None
        if self.rule == "threshold":
            out["keep"] = None  # the threshold decides how many: keep was not used
        if self.rule != "balanced":
            out["balance"] = None
        if self.balance_by != "cluster":
            out["clusters"] = out["cluster_seed"] = None
        if self.ensemble is None:
            del out["ensemble"]  # as recorded before ensembles: the same rule reads the same
        else:
            out["ensemble"] = list(self.ensemble)
        return out


# braces, $ and :: for open_clip's --train-data; * ? [ ] for the shards_url given back
# as a shard pattern, where they would glob
_NAME_REFUSED = frozenset("/{}$*?[]")
_PLAIN = "a plain directory name, without '/', braces, '$', '::', glob characters or spaces"


def _plain(name: str) -> bool:
    # open_clip's loader expands braces, splits on '::' and substitutes ${VAR} in
    # --train-data: a name with them would point at other directories.
    return (
        bool(name)
        and not name.startswith(".")
        and not any(c in name for c in _NAME_REFUSED)
        and "::" not in name
        and not any(c.isspace() for c in name)
    )


def _same_place(url: str) -> str:
    """A run's URL spelled one way: a local path made absolute, without a trailing '/'."""
    import os

    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        return url.rstrip("/")
    return os.path.abspath(url)


def _num(x: float) -> str:
    """``x`` in a manifest name: as short as ``:g`` where that is exact, every digit
    otherwise, so two different rules never share a name (and a directory)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))
