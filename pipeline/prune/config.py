"""Prune configuration: serialised into the manifest it produces."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import ConfigError


@dataclass
class PruneConfig:
    run: str
    keep: float  # fraction of the scorable (status == ok) rows to keep, in (0, 1]
    method: str = "diffin"  # score column; higher = keep first
    name: str | None = None  # manifest name; default "{method}-keep{keep}"
    shard_size: int = 1000  # samples per output tar

    def validate(self) -> None:
        if not 0 < self.keep <= 1:
            raise ConfigError(f"keep: must be in (0, 1] (got {self.keep!r})")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1 (got {self.shard_size!r})")
        if self.name is not None and (
            not self.name or "/" in self.name or self.name.startswith(".")
        ):
            raise ConfigError(f"name: must be a plain directory name (got {self.name!r})")

    @property
    def manifest_name(self) -> str:
        return self.name or f"{self.method}-keep{self.keep:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
