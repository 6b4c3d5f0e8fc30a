"""Data-parallel proxy training on Ray Train: N workers compute the single-process trajectory.

Every worker holds the same initial theta and the same global batch order;
worker r takes the r-th contiguous slice of each global batch. The CLIP loss
couples all pairs of a batch (each image is contrasted with every caption),
so a per-worker loss on its slice would be a different objective. Instead
each worker gathers every worker's features (:class:`GatherRows`) and
computes the loss of the whole global batch, as the single process does.

Gradient scale: every worker computes the same global loss L. GatherRows'
backward sums, over workers, the gradient each worker's copy of L sends to
a worker's rows, so worker r's parameter gradient is N times its rows'
share of dL/dtheta; logit_scale, used directly by every copy, gets dL/ds
once per worker. DistributedDataParallel averages over the N workers, which
gives exactly dL/dtheta for both. The remaining difference to one process is
the order of floating-point sums (measured in tests/train/test_distributed.py).

Rank 0 writes the checkpoints and the resume state into the run directory
(storage all nodes see, for a multi-node cluster); a restarted worker group
(``max_failures``) or a rerun resumes from it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import tempfile
import threading
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model import factory
from pipeline.model.batches import Inputs
from pipeline.model.loss import batch_clip_loss
from pipeline.raylocal import connect, embedded
from pipeline.rundir import RunDir
from pipeline.train.config import TrainConfig
from pipeline.train.loop import batch_order, core
from pipeline.train.runner import run_resumable
from pipeline.train.state import ResumeState, load_resume

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "amp": torch.float32, "fp64": torch.float64}


class GatherRows(torch.autograd.Function):
    """All workers' rows, in rank order; the backward sums the workers' gradients for ours.

    (What ``torch.distributed.nn.all_gather`` does, with an all-reduce for the
    reduce-scatter so that gloo runs it too.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gathered_clip_loss(
    model: nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """The global batch's CLIP loss from this worker's rows (see the module docstring)."""
    out = model(images, tokens)
    scale = core(model).logit_scale
    img = GatherRows.apply(out["image_features"]).to(scale.dtype)
    txt = GatherRows.apply(out["text_features"]).to(scale.dtype)
    with torch.autocast(device_type=img.device.type, enabled=False):  # the loss in full precision
        return batch_clip_loss(img, txt, scale)


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the global batches' slice of this rank, hooks in lockstep."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    cfg = TrainConfig(**config["cfg"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    factory.exact_float32(device, DTYPES[cfg.precision])  # as the scoring actors do
    images, tokens = ray.get(config["images"]), ray.get(config["tokens"])
    torch.manual_seed(cfg.seed)
    model = factory.create(cfg.model, dtype=DTYPES[cfg.precision]).model
    model.load_state_dict(ray.get(config["initial"]))  # the driver's theta_0, bit for bit
    model.to(device)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    per = cfg.batch_size // world

    def rows(idx: torch.Tensor) -> torch.Tensor:
        return idx[rank * per : (rank + 1) * per]

    order = batch_order(images.shape[0], cfg.batch_size, cfg.steps, cfg.seed)
    run_resumable(
        ddp,
        images,
        tokens,
        cfg,
        order,
        config["ckpt_steps"],
        RunDir(cfg.run),
        config["fingerprint"],
        writer=rank == 0,
        rows=rows,
        batch_loss=gathered_clip_loss,
        device=device,
        progress=False,
    )


def _reraise(exc: Exception) -> None:
    """A worker's configuration or divergence error reaches the user as itself."""
    failures = getattr(exc, "worker_failures", {}) or {}
    for rank in sorted(failures):
        err = failures[rank]
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, ConfigError | FloatingPointError):
            raise cause from exc
    raise exc


def check_placeable(cfg: TrainConfig) -> None:
    """Refuse a worker group the embedded Ray could never place.

    Ray Train starts every worker at once and retries a group that cannot
    start without end; with GPUs each worker takes one. Only for the Ray this
    process starts: an existing cluster may add nodes.
    """
    if not cfg.workers or not embedded(cfg.address):
        return
    have = torch.cuda.device_count()
    if 0 < have < cfg.workers:
        raise ConfigError(
            f"workers: {cfg.workers} Ray Train workers take one GPU each, but this machine "
            f"has {have}; use --workers {have}, or train on CPUs with CUDA_VISIBLE_DEVICES= "
        )


def _abort_on_interrupt(trainer: Any) -> list[bool]:
    """Ctrl-C during Ray Train's fit: stop its workers, then take the interrupt path.

    Ray Train's own SIGINT handler aborts the run and then calls ``sys.exit(0)`` or lets
    fit return, and the command exited 1 without a word (walkthrough). This one (set in
    its place, on Ray 2.60's hook) aborts the same way and records the interrupt, which
    the caller turns into a KeyboardInterrupt; a second Ctrl-C stops waiting for the abort.
    """
    interrupted: list[bool] = []

    def register(controller: Any) -> None:  # called by fit on the main thread only
        def on_sigint(signum: int, frame: object) -> None:
            if interrupted:
                raise KeyboardInterrupt
            interrupted.append(True)
            log.info("interrupted: stopping the Ray Train workers (Ctrl-C again: stop waiting)")
            try:
                ray.get(controller.abort.remote())
            except ray.exceptions.RayActorError:
                pass  # the controller is gone already

        signal.signal(signal.SIGINT, on_sigint)

    trainer._register_sigint_handler = register
    return interrupted


OWNER = ".diffin-owner.lock"  # held (flock) by the training that made the folder


def _storage_dir() -> tuple[str, int]:
    """A new folder for Ray Train's bookkeeping, and the descriptor of the lock its owner
    holds until it removes it. Folders whose owner is gone are removed first: a training
    killed with SIGKILL never removes its own (walkthrough: one left in /tmp per kill). The
    owner is known by its lock, not its PID (review: a PID of another namespace sharing
    /tmp would read as dead)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if name.startswith("diffin-train-"):
            _remove_if_abandoned(os.path.join(tmp, name))
    storage = tempfile.mkdtemp(prefix=f"diffin-train-{os.getpid()}-")
    fd = os.open(os.path.join(storage, OWNER), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return storage, fd


def _remove_if_abandoned(path: str) -> None:
    try:
        if not os.path.isdir(path) or os.stat(path).st_uid != os.getuid():
            return
        fd = os.open(os.path.join(path, OWNER), os.O_RDWR)
    except OSError:  # no lock (made a moment ago, or by an older diffin), or gone
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # its owner holds it: a training under way
        os.close(fd)
        return
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


def train_distributed(
    cfg: TrainConfig,
    images: Inputs,
    tokens: torch.Tensor,
    initial: dict[str, torch.Tensor],
    ckpt_steps: list[int],
    fingerprint: str,
) -> ResumeState:
    """Run ``cfg.workers`` Ray Train workers to the last step; returns rank 0's final state."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    threads = max(1, cfg.threads)
    started = connect(cfg.address, cfg.workers * threads, quiet_train_cleaner=True)
    storage, owner = _storage_dir()  # Ray Train's own bookkeeping only
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        if cfg.precision == "amp" and not use_gpu:
            log.warning("precision amp needs CUDA workers; this cluster has none: training in fp32")
        resources = {"CPU": threads, **({"GPU": 1} if use_gpu else {})}
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "images": ray.put(images),
                "tokens": ray.put(tokens),
                "initial": ray.put(initial),
                "ckpt_steps": ckpt_steps,
                "fingerprint": fingerprint,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name="diffin-train",
                storage_path=storage,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
            ),
        )
        log.info("training on %d Ray Train workers (%s)", cfg.workers, "GPU" if use_gpu else "CPU")
        interrupted = _abort_on_interrupt(trainer)
        # restored after fit where Ray would have set its handler: the main thread only
        main = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGINT) if main else None
        try:
            trainer.fit()
        except (ray.train.TrainingFailedError, ray.exceptions.RayActorError) as exc:
            if interrupted:  # the aborted controller exits: its run call fails
                raise KeyboardInterrupt from None
            if isinstance(exc, ray.train.TrainingFailedError):
                _reraise(exc)
            raise
        finally:
            if main:
                signal.signal(signal.SIGINT, before or signal.default_int_handler)
        if interrupted:
            raise KeyboardInterrupt  # the interrupt path: one line, exit 130, resumable
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        os.close(owner)
        if started:
            ray.shutdown()
    state = load_resume(RunDir(cfg.run), fingerprint)
    if state is None or state.step != cfg.steps:
        raise RuntimeError(f"Ray Train finished without the final state in {cfg.run}")
    return state
