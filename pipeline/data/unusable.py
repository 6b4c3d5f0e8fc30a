"""The rows a stage reads but cannot use, counted by reason, so that it can say so.

The score table keeps every error row; the stages that read shards without
writing a table (the proxy's pool, a ``--target``) record these counts instead.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.sample import Sample

# "undecodable image: ..." -> "undecodable image"; "missing image (expected ...); ..." alike
_KIND = re.compile(r"[^:;(]*")


def reason_kind(error: str | None) -> str:
    """The kind of an error row's reason: its words before any detail."""
    return _KIND.match(error or "").group(0).strip() or "unknown"


@dataclass
class Unusable:
    """Error rows by kind of reason, and the shards that could not be read to their end."""

    reasons: Counter[str] = field(default_factory=Counter)
    damaged: dict[str, str] = field(default_factory=dict)  # shard -> its __shard__ row's error

    def add(self, sample: Sample) -> None:
        if sample.whole_shard:
            self.damaged[sample.shard] = sample.error or ""
        else:
            self.reasons[reason_kind(sample.error)] += 1

    @property
    def rows(self) -> int:
        """Sample rows that could not be used (a damaged shard's own row not counted)."""
        return sum(self.reasons.values())

    def said(self) -> str:
        """``"; N rows unusable (...); M shard(s) not read to the end (...)"``, or ``""``."""
        out = ""
        if self.reasons:
            shown = self.reasons.most_common(3)
            top = ", ".join(f"{n} {why}" for why, n in shown)
            rest = self.rows - sum(n for _, n in shown)
            if rest:  # walkthrough: "31 rows unusable" listed 29, the other kinds unsaid
                top += f", {rest} for {len(self.reasons) - len(shown)} other reason(s)"
            out += f"; {self.rows} rows unusable ({top})"
        if self.damaged:
            url, why = next(iter(self.damaged.items()))
            more = f", and {len(self.damaged) - 1} more" if len(self.damaged) > 1 else ""
            out += f"; {len(self.damaged)} shard(s) not read to the end ({url}: {why}{more})"
        return out

    def record(self, prefix: str = "") -> dict[str, Any]:
        """For a stage's record: rows by reason, and the damaged shards (when there are)."""
        out: dict[str, Any] = {f"{prefix}error_reasons": dict(self.reasons)}
        if self.damaged:
            out[f"{prefix}shards_damaged"] = dict(self.damaged)
        return out
