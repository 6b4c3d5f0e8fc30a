"""What training writes while it runs: the m checkpoints, and the state to resume from.

Both are plain tensor containers saved with ``torch.save`` and read back with
``weights_only=True`` (no pickled code runs on load). The resume state holds
theta, the optimiser state, the checkpoints written so far and the loss
curve; it is rewritten atomically at every checkpoint (and every
``resume_every`` steps), so a killed run loses at most the steps since.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model.batches import Inputs
from pipeline.rundir import (
    RunDir,
    exists,
    read_bytes,
    read_json,
    remove,
    sha256,
    write_bytes_atomic,
    write_json,
)
from pipeline.train.config import TrainConfig
from pipeline.train.progress import progress_url

FORMAT = 1
# The training computation's version: part of the fingerprint, so a run interrupted
# under another version starts over instead of finishing with a different update rule.
# v2: the differentiated loss uses exp(logit_scale) unclamped (the clamp is applied to
# the parameter after each step, as open_clip does). v3: the fingerprint also holds the
# training pairs' content and the --pretrained file's sha256 (states saved before are
# refused: they cannot vouch for either).
TRAINING_VERSION = "train-v3"


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """theta (and buffers) as CPU tensors that own their memory."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(run: RunDir, model: nn.Module, step: int, lr: float) -> dict[str, Any]:
    """Write theta_step; returns its trajectory.json entry (step, lr, file name, sha256)."""
    url = run.checkpoint(step)
    write_bytes_atomic(url, _to_bytes(cpu_state(model)))
    return {"step": step, "lr": lr, "path": url.rsplit("/", 1)[-1], "sha256": sha256(url)}


def fingerprint(
    cfg: TrainConfig,
    train_uids: list[str],
    images: Inputs | torch.Tensor,
    tokens: torch.Tensor,
    pretrained: str | None = None,
    with_data: bool = False,
) -> tuple[str, dict[str, Any]]:
    """What the trajectory depends on: its config, the starting weights and the training pairs.

    The pairs are hashed as the model sees them (``images``, ``tokens``), not
    only by uid: a shard rewritten in place keeps its uids. ``pretrained`` is
    :func:`~pipeline.model.factory.pretrained_identity` (a replaced checkpoint
    file under the same path is other starting weights). Returns the hash and
    the same parts one by one, which a refused resume compares to name what
    changed.

    ``--data`` as typed is not hashed: the pairs are, so the same pool spelled otherwise
    (a directory, a glob, a `::` list) or moved is the same training (walkthrough: it was
    trained again). ``with_data``: the hash as runs before that recorded it.
    """
    h, pairs = hashlib.sha256(), hashlib.sha256()
    fields = cfg.trajectory_fields()
    hashed = fields if with_data else {k: v for k, v in fields.items() if k != "data"}
    h.update(TRAINING_VERSION.encode())
    h.update(json.dumps(hashed, sort_keys=True, default=str).encode())
    h.update(json.dumps(pretrained).encode())
    for x in (h, pairs):
        x.update("\n".join(train_uids).encode())
    # Hashed as model inputs, batch by batch: pixels held as uint8 hash as the float
    # inputs they give, so a run keeps its fingerprint however its pool is held.
    chunks = images.batches() if isinstance(images, Inputs) else [images]
    for t in itertools.chain(chunks, [tokens]):  # one batch of float inputs at a time
        buf = t.detach().cpu().contiguous().numpy()  # the buffer itself, not a copy
        h.update(buf)
        pairs.update(buf)
    parts = {
        "version of diffin": TRAINING_VERSION,
        **json.loads(json.dumps(fields, default=str)),
        "pretrained weights": pretrained,
        "training pairs": pairs.hexdigest(),
    }
    return h.hexdigest(), parts


def _parts_url(run: RunDir) -> str:
    return run.path("trajectory", "resume-fingerprint.json")


def save_fingerprint_parts(run: RunDir, parts: dict[str, Any]) -> None:
    """Beside the resume state: what its fingerprint was made of."""
    write_json(_parts_url(run), parts)


def _changed_parts(run: RunDir, parts: dict[str, Any] | None) -> list[str]:
    url = _parts_url(run)
    if parts is None or not exists(url):
        return []
    try:
        saved = read_json(url)
    except ValueError:
        return []
    return sorted(k for k in parts.keys() | saved.keys() if parts.get(k) != saved.get(k))


@dataclass
class ResumeState:
    step: int  # the next step to run; theta is theta_step
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    checkpoints: list[dict[str, Any]]  # trajectory.json entries written so far
    losses: list[tuple[int, float]]
    fingerprint: str
    resumed_at: list[int] = field(default_factory=list)  # steps at which earlier runs resumed


def save_resume(run: RunDir, state: ResumeState) -> None:
    payload = {
        "format": FORMAT,
        "step": state.step,
        "model": state.model,
        "optimizer": state.optimizer,
        "checkpoints": state.checkpoints,
        "losses": [list(x) for x in state.losses],
        "fingerprint": state.fingerprint,
        "resumed_at": state.resumed_at,
    }
    write_bytes_atomic(run.resume_state, _to_bytes(payload))


def resume_fingerprint(run: RunDir) -> str | None:
    """The fingerprint the saved resume state was written under; None when there is none, or
    it cannot be read (load_resume says why)."""
    try:
        raw = torch.load(
            io.BytesIO(read_bytes(run.resume_state)), map_location="cpu", weights_only=True
        )
    except Exception:  # noqa: BLE001 (missing, cut short, not a state)
        return None
    return raw.get("fingerprint") if isinstance(raw, dict) else None


def adopt_fingerprint(run: RunDir, new: str) -> None:
    """Rewrite the saved resume state under ``new`` (the same training, hashed as now)."""
    raw = torch.load(
        io.BytesIO(read_bytes(run.resume_state)), map_location="cpu", weights_only=True
    )
    write_bytes_atomic(run.resume_state, _to_bytes({**raw, "fingerprint": new}))


def load_resume(
    run: RunDir, expect: str, parts: dict[str, Any] | None = None
) -> ResumeState | None:
    """The saved state of an unfinished run, or None; refuses one of another config or pool.

    With ``parts`` (:func:`fingerprint`'s), the refusal names what changed.
    """
    if not exists(run.resume_state):
        return None
    raw = torch.load(
        io.BytesIO(read_bytes(run.resume_state)), map_location="cpu", weights_only=True
    )
    if raw.get("format") != FORMAT:
        raise ConfigError(f"resume: {run.resume_state} has format {raw.get('format')!r}")
    if raw["fingerprint"] != expect:
        changed = _changed_parts(run, parts)
        what = f" (changed: {', '.join(changed)})" if changed else ""
        raise ConfigError(
            f"resume: {run.resume_state} belongs to a training with another config, pool or "
            f"version of diffin (this one: {TRAINING_VERSION}){what}; use the same options, "
            "another --run, or --no-resume to start over"
        )
    for c in raw["checkpoints"]:  # a checkpoint changed since it was written: start over
        url = run.path("trajectory", c["path"])
        if not exists(url) or sha256(url) != c["sha256"]:
            raise ConfigError(
                f"resume: checkpoint {url} is missing or changed; --no-resume starts over"
            )
    return ResumeState(
        step=int(raw["step"]),
        model=raw["model"],
        optimizer=raw["optimizer"],
        checkpoints=list(raw["checkpoints"]),
        losses=[(int(s), float(v)) for s, v in raw["losses"]],
        fingerprint=raw["fingerprint"],
        resumed_at=list(raw["resumed_at"]),
    )


def remove_stale_checkpoints(run: RunDir, checkpoints: list[dict[str, Any]]) -> list[str]:
    """Delete the ``ckpt-*.pt`` files of an earlier training that ``checkpoints`` does not list.

    A run trained again with other steps would otherwise keep the old files beside
    the new ones, with nothing but trajectory.json to tell them apart. Returns
    the names removed.
    """
    import fnmatch

    import fsspec

    keep = {c["path"] for c in checkpoints}
    fs, path = fsspec.core.url_to_fs(run.path("trajectory"))
    fs.invalidate_cache(path)
    # A listing, not a glob: a run path holding "[" or "*" would match other runs' files.
    stale = [
        e["name"]
        for e in fs.ls(path, detail=True)
        if e.get("type") == "file"
        and fnmatch.fnmatchcase(e["name"].rsplit("/", 1)[-1], "ckpt-*.pt")
        and e["name"].rsplit("/", 1)[-1] not in keep
    ]
    if stale:
        fs.rm(stale)
        fs.invalidate_cache(path)
    return [p.rsplit("/", 1)[-1] for p in stale]


def clear_resume(run: RunDir) -> None:
    remove(run.resume_state)
    remove(_parts_url(run))
    remove(progress_url(run))
