"""Progress a person can follow: a bar (shards, samples, rate, ETA) and a JSON snapshot.

The bar goes to stderr (what ``ray job logs --follow`` shows); when stderr is
not a terminal a plain line is logged every ``log_every`` seconds instead of
carriage-return redraws. The same numbers are written to
``RUN/scores/progress.json`` at most every ``write_every`` seconds, and end up
in ``RUN/run.json`` when the run finishes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

from pipeline.rundir import write_json

log = logging.getLogger(__name__)


class Progress:
    def __init__(
        self,
        total_shards: int,
        resumed_shards: int = 0,
        resumed_samples: int = 0,
        json_url: str | None = None,
        write_every: float = 10.0,
        log_every: float = 30.0,
        clock=time.monotonic,
    ) -> None:
        self.total = total_shards
        self.resumed = resumed_shards
        self.done = resumed_shards
        self.failed = 0
        self.retries = 0
        self.samples_now = 0  # scored by this invocation
        self.samples_total = resumed_samples
        self.errors = 0  # error rows scored by this invocation
        self.actors_replaced = 0
        self.state = "scoring"  # then "merging", and "finished", "interrupted" or "failed"
        self.clock = clock
        self.t0 = clock()
        self.json_url = json_url
        self.write_every = write_every
        self.log_every = log_every
        self._last_write = -1e9
        self._last_log = self.t0
        tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_shards,
            initial=resumed_shards,
            desc="score",
            unit="shard",
            disable=not tty,
            dynamic_ncols=True,
        )

    # -- events ---------------------------------------------------------------
    def shard_done(self, rows: int, errors: int) -> None:
        self.done += 1
        self.samples_now += rows
        self.samples_total += rows
        self.errors += errors
        self.bar.update(1)
        self._refresh()

    def shard_failed(self) -> None:
        self.done += 1
        self.failed += 1
        self.bar.update(1)
        self._refresh()

    def retry(self) -> None:
        self.retries += 1
        self._refresh()

    def actor_replaced(self) -> None:
        # counted apart from retries: an actor dying on a shard's last try is replaced too
        self.actors_replaced += 1
        self._refresh()

    def tick(self) -> None:
        self._refresh()

    # -- numbers --------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        elapsed = max(self.clock() - self.t0, 1e-9)
        scored_now = self.done - self.resumed
        rate = self.samples_now / elapsed
        shard_rate = scored_now / elapsed
        left = self.total - self.done
        eta = left / shard_rate if shard_rate > 0 else None
        return {
            "state": self.state,
            "shards_total": self.total,
            "shards_done": self.done,
            "shards_resumed": self.resumed,
            "shards_failed": self.failed,
            "samples_scored_now": self.samples_now,
            "samples_total": self.samples_total,
            "error_rows_now": self.errors,
            "retries": self.retries,
            "actors_replaced": self.actors_replaced,
            "elapsed_s": round(elapsed, 2),
            "samples_per_second": round(rate, 2),
            "shards_per_second": round(shard_rate, 4),
            "eta_s": None if eta is None else round(eta, 1),
        }

    def _refresh(self, force: bool = False, say: bool = True) -> None:
        now = self.clock()
        snap = None
        if self.bar.disable is False:
            snap = self.snapshot()
            self.bar.set_postfix(
                samples=snap["samples_total"],
                rate=f"{snap['samples_per_second']:.1f}/s",
                failed=snap["shards_failed"],
                retries=snap["retries"],
                refresh=False,
            )
        if say and (force or now - self._last_log >= self.log_every and self.bar.disable):
            snap = snap or self.snapshot()
            log.info(self.line(snap))
            self._last_log = now
        if self.json_url and (force or now - self._last_write >= self.write_every):
            snap = snap or self.snapshot()
            try:
                write_json(self.json_url, snap)
            except Exception as exc:  # progress is advisory; never fail a run on it
                log.debug("could not write %s: %s", self.json_url, exc)
            self._last_write = now

    @staticmethod
    def line(snap: dict[str, Any]) -> str:
        eta = "?" if snap["eta_s"] is None else f"{snap['eta_s']:.0f}s"
        if snap["shards_resumed"] == snap["shards_total"]:
            return (
                f"score: {snap['shards_total']}/{snap['shards_total']} shards, all scored by an "
                f"earlier run, {snap['samples_total']} samples"
            )
        return (
            f"score: {snap['shards_done']}/{snap['shards_total']} shards "
            f"({snap['shards_failed']} failed, {snap['retries']} retries), "
            f"{snap['samples_total']} samples, {snap['samples_per_second']:.1f} samples/s, ETA {eta}"
        )

    def close(self) -> dict[str, Any]:
        """Scoring is over (the parts are merged next): the final numbers."""
        self.state = "merging"
        self._refresh(force=True)
        self.bar.close()
        return self.snapshot()

    def stop(self, state: str) -> None:
        """The run ends (``state``: "finished", "interrupted", "failed"): the snapshot file
        is written once more, with the shards finished until now."""
        self.state = state
        # finished: close() has logged these numbers (walkthrough: the line came twice)
        self._refresh(force=True, say=state != "finished")
        self.bar.close()
