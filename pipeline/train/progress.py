"""How far a training has got: ``RUN/trajectory/progress.json``, for `diffin status`.

The resume state says where a rerun continues, but it is written only at
checkpoints (and every ``--resume-every`` steps) and is too large to read for
a status line. This small record is rewritten by the writer as the training
runs: at its start, at every resume state, and otherwise at most every
``EVERY_S`` seconds (one small write, also on an object store). It goes with
the resume state when the training completes (``clear_resume``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.rundir import RunDir, exists, read_json, remove, write_json
from pipeline.runlock import LOST

log = logging.getLogger(__name__)

EVERY_S = 10.0


def progress_url(run: RunDir) -> str:
    return run.path("trajectory", "progress.json")


def read_progress(run: RunDir) -> dict[str, Any] | None:
    """The record, or None where there is none or it cannot be read (it is advisory)."""
    url = progress_url(run)
    try:
        if not exists(url):
            return None
        raw = read_json(url)
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not all(_count(raw.get(k)) for k in ("step", "steps")):
        return None
    loss, resume = raw.get("loss"), raw.get("resumable_from")
    return {
        **raw,
        "loss": loss if _number(loss) else None,
        "resumable_from": resume if _count(resume) else None,
        "preparing": raw.get("preparing") is True,
    }


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# The runs whose record this process has marked since its training started: an interrupt
# before that finds an earlier training's record (walkthrough: Ctrl-C while the pool was
# read said "stopped at step 941", a step this process never trained).
_marked: set[str] = set()


def forget_mark(run: RunDir) -> None:
    """A training of ``run`` starts in this process: the record is not yet its own."""
    _marked.discard(run.url)


def marked(run: RunDir) -> bool:
    """Whether this process's training of ``run`` has reached :func:`mark_preparing`."""
    return run.url in _marked


def mark_preparing(run: RunDir, steps: int, resume_step: int | None) -> None:
    """A training (re)starting: until its first step the record says it prepares (reads the
    pool, writes the sets: minutes at scale) and where it resumes, not the step an earlier
    training of this run reached (review: status showed that one's step and --steps)."""
    _marked.add(run.url)
    if resume_step is None:
        remove(progress_url(run))
        return
    write_json(
        progress_url(run),
        {
            "step": resume_step,
            "steps": steps,
            "resumable_from": resume_step,
            "loss": None,
            "preparing": True,
            "updated": time.time(),
        },
    )


class ProgressWriter:
    """Writes the record for one training process (the writer rank only)."""

    def __init__(self, run: RunDir, steps: int, start: int, resumable_from: int | None) -> None:
        self.run = run
        self.record: dict[str, Any] = {
            "step": start,  # steps trained so far
            "steps": steps,
            # where a rerun would continue: the step of the last resume state saved
            "resumable_from": resumable_from,
            "loss": None,
        }
        self.last = 0.0
        self.flush()

    def step(self, trained: int, loss: float) -> None:
        self.record.update(step=trained, loss=round(loss, 5))
        if time.monotonic() - self.last >= EVERY_S:
            self.flush()

    def saved(self, step: int) -> None:
        """A resume state for ``step`` was just written."""
        self.record.update(step=step, resumable_from=step)
        self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if LOST.is_set():  # another process took the run over: the record is its now
            return
        try:
            write_json(progress_url(self.run), {**self.record, "updated": time.time()})
        except OSError as exc:  # a status line is not worth stopping a training for
            log.warning("train: could not write %s: %s", progress_url(self.run), exc)


def no_trajectory(run: RunDir) -> Exception:
    """The refusal of a stage that needs the trajectory, where there is none: it is being
    trained now, its training stopped before it finished, or it was never trained
    (walkthrough: a stopped retraining was told "run `diffin train` first")."""
    from pipeline.errors import ConfigError
    from pipeline.runlock import RunBusy, describe_holder, holders

    training = holders(run.url).get("train")
    if training:
        return RunBusy(
            f"run: {run.url} is being trained now by {describe_holder(training)}; run this "
            "again when it has finished"
        )
    if exists(run.resume_state) or exists(run.path("trajectory", "request.json")):
        return ConfigError(
            f"run: {run.url} has no finished training: the last `diffin train` stopped "
            f"before it finished; run it again to resume it (`diffin status --run {run.url}` "
            "prints the command)"
        )
    return ConfigError(f"run: no trajectory in {run.url} (run `diffin train` first)")
