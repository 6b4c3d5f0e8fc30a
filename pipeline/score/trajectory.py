"""Reading a trained trajectory back: checkpoints verified by sha256, loaded without pickle."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.data.keys import IMAGE_KEYS, TEXT_KEYS, key_misuse, valid_keys
from pipeline.data.reader import MAX_IMAGE_PIXELS
from pipeline.errors import ConfigError
from pipeline.influence.estimator import Checkpoint, attach_block_rates
from pipeline.model import factory
from pipeline.rundir import RunDir, exists, read_bytes, read_json
from pipeline.train.progress import no_trajectory
from pipeline.train.schedule import recorded_rate

log = logging.getLogger(__name__)


@dataclass
class Trajectory:
    record: dict[str, Any]
    checkpoints: list[Checkpoint]

    @property
    def model(self) -> str:
        return self.record["model"]

    @property
    def preprocess_cfg(self) -> dict[str, Any] | None:
        """How training preprocessed its sets (``factory.recorded_preprocess``)."""
        return factory.recorded_preprocess(self.record)

    @property
    def n_train(self) -> int:
        return int(self.record["n_train"])


def model_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The architecture the checkpoints belong to, for fingerprints: two architectures can
    share a parameter layout (open_clip's ``X`` and ``X-quickgelu``), so the same
    checkpoint bytes do not say which function they compute."""
    return {
        "model": record.get("model"),
        "model_config": record.get("model_config"),
        "preprocess_cfg": record.get("preprocess_cfg"),
    }


READER_FIELDS = ("image_keys", "text_keys", "max_image_pixels")


def reader_defaults(run: RunDir) -> dict[str, Any]:
    """How `diffin score` reads the pool when not told, field by field: as the run's last
    score read it (a repeated or resumed command keeps its parts, review), else as the
    proxy was trained (its keys first, then the defaults, so that another pool of the usual
    layout still reads), else the defaults."""
    defaults: dict[str, Any] = {
        "image_keys": list(IMAGE_KEYS),
        "text_keys": list(TEXT_KEYS),
        "max_image_pixels": MAX_IMAGE_PIXELS,
    }
    fp_url = run.path("scores", "fingerprint.json")
    earlier = read_json(fp_url) if exists(fp_url) else {}
    traj = read_json(run.trajectory_json) if exists(run.trajectory_json) else {}
    last = earlier.get("reader") or {}
    now = [[c.get("sha256"), c.get("step"), c.get("lr")] for c in traj.get("checkpoints", [])]
    if traj and earlier.get("checkpoints") != now:  # scored on an earlier proxy: its keys
        last = {}  # may be another pool's (walkthrough: a retrain on .image/.caption members)
    recorded = traj.get("config") or {}  # how the proxy read its pool
    trained = {k: recorded[k] for k in READER_FIELDS if k in recorded}
    out = {}
    for key, default in defaults.items():
        if key in last:
            out[key] = last[key]
        elif key in trained and isinstance(default, list):
            out[key] = list(dict.fromkeys([*trained[key], *default]))
        else:
            out[key] = trained.get(key, default)
    if not (valid_keys(out["image_keys"]) and valid_keys(out["text_keys"])) or key_misuse(
        out["image_keys"], out["text_keys"]
    ):
        log.warning(
            "score: the run records keys refused now (image %s, text %s): reading the pool "
            "with the defaults; give --image-key and --text-key",
            out["image_keys"],
            out["text_keys"],
        )
        out.update(image_keys=defaults["image_keys"], text_keys=defaults["text_keys"])
    differ = {k: v for k, v in out.items() if v != defaults[k]}
    if differ:  # walkthrough: nothing said which keys a score without them read with
        log.info(
            "score: unless given, the pool is read with %s (as %s)",
            ", ".join(f"{k}={v}" for k, v in differ.items()),
            "the run's last score read it" if last else "the proxy was trained",
        )
    return out


def load_trajectory(run: RunDir) -> Trajectory:
    if not exists(run.trajectory_json):
        raise no_trajectory(run)
    record = read_json(run.trajectory_json)
    ckpts = [Checkpoint(int(c["step"]), float(c["lr"])) for c in record["checkpoints"]]
    return Trajectory(record, with_block_rates(ckpts, record))


def with_block_rates(ckpts: list[Checkpoint], record: dict[str, Any]) -> list[Checkpoint]:
    """The checkpoints with the rates of the steps each stands for (``BlockRates``), when the
    schedule is on record and agrees with the rates the checkpoints recorded; else as they
    are (the estimator then takes each checkpoint's rate for its whole block)."""
    rate = recorded_rate(record)
    steps = [c.step for c in ckpts]
    if rate is None or not steps or steps != sorted(set(steps)) or steps[0] < 1:
        return ckpts  # the estimator refuses unsorted steps with its own message
    problem = schedule_disagreement(ckpts, rate)
    if problem:
        log.warning("%s; each checkpoint's own rate stands for its block", problem)
        return ckpts
    return attach_block_rates(ckpts, rate)


def schedule_disagreement(ckpts: list[Checkpoint], rate: Callable[[int], float]) -> str | None:
    """Why the schedule ``rate`` does not fit the rates the checkpoints recorded, or None."""
    for c in ckpts:
        if abs(rate(c.step) - c.lr) > 1e-12 * max(1.0, c.lr):
            return (
                f"trajectory: the recorded schedule gives lr {rate(c.step)} at step {c.step}, "
                f"the checkpoint records {c.lr}"
            )
    return None


def load_state_dict(run: RunDir, traj: Trajectory, step: int) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, after checking its sha256 against trajectory.json."""
    import hashlib

    entry = next(c for c in traj.record["checkpoints"] if int(c["step"]) == step)
    raw = read_bytes(run.checkpoint(step))
    digest = hashlib.sha256(raw).hexdigest()
    if digest != entry["sha256"]:
        raise ConfigError(
            f"checkpoint {run.checkpoint(step)}: sha256 {digest[:12]} does not match the "
            f"recorded {entry['sha256'][:12]}; the file changed since training"
        )
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
