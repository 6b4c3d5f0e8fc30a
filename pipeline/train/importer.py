"""Import an open_clip_train run as the trajectory Diff-In scores with.

An open_clip_train run directory holds ``params.txt`` (one ``name: value``
line per argument) and ``checkpoints/epoch_K.pt`` (``state_dict`` of the
model after K epochs, and the optimizer). Diff-In needs, for each kept
checkpoint, its global step t and the learning rate of the update
theta_t -> theta_{t+1}; neither is stored, so both are recomputed here the way
open_clip_train computes them:

- steps per epoch: ``ceil(ceil(num_samples / global_batch) / workers) * workers``
  batches (open_clip_train.data.get_wds_dataset), divided by ``accum_freq``;
- the rate of step t: open_clip_train.scheduler's cosine / const /
  const-cooldown schedule (linear warm-up over ``warmup`` steps), or the
  base rate with ``skip_scheduler``.

The rate recorded in each epoch checkpoint's optimizer (the last one the
scheduler set, that of step t - 1) is checked against this reconstruction, so
a wrong step count is refused rather than silently mis-weighting the scores.
Checkpoints are read with ``weights_only=True``, rewritten in the project
format and recorded with their sha256, and the sets are drawn from ``--data``
exactly as ``diffin train`` draws them.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from pipeline import runlock
from pipeline.errors import ConfigError, is_int
from pipeline.model import factory
from pipeline.model.batches import encode_pool, pool_transform
from pipeline.provenance import provenance
from pipeline.rundir import RunDir, join, read_bytes, remove, write_json
from pipeline.train.config import TrainConfig
from pipeline.train.schedule import open_clip_lr
from pipeline.train.sets import load_pool, save_sets
from pipeline.train.state import clear_resume, remove_stale_checkpoints, save_checkpoint
from pipeline.train.trajectory import LR_NOTE, optimizer_record

log = logging.getLogger(__name__)

_EPOCH = re.compile(r"epoch_(\d+)\.pt$")


def parse_params(text: str) -> dict[str, Any]:
    """params.txt as a dict: Python literals where a value is one (numbers, None, bools)."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if not sep:
            name, sep, value = line.partition(":")  # "name:" with an empty value
        if not sep or not name.strip():
            continue
        try:
            out[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[name.strip()] = value.strip()
    return out


@dataclass
class OpenClipRun:
    url: str
    params: dict[str, Any]
    checkpoints: dict[int, str]  # epoch -> checkpoint URL

    @property
    def global_batch(self) -> int:
        """Pairs in one loader batch over all processes (``--batch-size`` x world size)."""
        return int(self.params["batch_size"]) * int(self.params.get("world_size") or 1)

    @property
    def step_batch(self) -> int:
        """Pairs in one optimizer step: with ``--accum-freq`` open_clip_train computes the
        contrastive loss over every accumulated micro-batch's features at once."""
        return self.global_batch * int(self.params.get("accum_freq") or 1)

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, as open_clip_train's webdataset loader counts them."""
        p = self.params
        num = p.get("train_num_samples")
        kind = p.get("dataset_type")
        if kind == "auto":  # open_clip_train picks the loader by extension (get_dataset_fn)
            kind = "webdataset" if str(p.get("train_data", "")).endswith(".tar") else "other"
        if kind != "webdataset" or not num:
            raise ConfigError(
                f"import: {self.url}: steps per epoch are only known for webdataset runs with "
                "--train-num-samples; pass --steps-per-epoch"
            )
        batches = math.ceil(int(num) / self.global_batch)
        workers = max(1, int(p.get("workers") or 0))
        batches = math.ceil(batches / workers) * workers
        return batches // int(p.get("accum_freq") or 1)

    def lr(self, step: int, total: int) -> float:
        """The rate open_clip_train's scheduler sets for ``step`` (that of theta_step -> theta_step+1)."""
        try:
            return open_clip_lr(self.params, step, total)
        except ConfigError as e:
            raise ConfigError(f"import: {self.url}/params.txt: {e}") from None


def open_clip_preprocess(oc: OpenClipRun, name: str) -> dict[str, Any]:
    """The image preprocessing open_clip_train used, overridden by its --image-mean/-std/
    -interpolation/-resize-mode: for a ``local-dir:DIR`` model, DIR's
    ``open_clip_config.json`` (open_clip ignores --pretrained there); else the
    pretrained tag's registry entry, so nothing is downloaded."""
    import open_clip

    schema, where = open_clip.factory.parse_model_name(str(oc.params.get("model", "")))
    if schema == "local-dir":
        try:
            raw = json.loads(read_bytes(join(str(where), "open_clip_config.json")).decode())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"import: the run's model folder {where} (local-dir:, params.txt) is not "
                f"readable here ({type(exc).__name__}: {exc}); its open_clip_config.json "
                "records the run's preprocessing: restore the folder at that path"
            ) from None
        cfg = factory.preprocess_fields(raw.get("preprocess_cfg") or {})
    elif schema is None:
        cfg = factory.tag_preprocess(name, oc.params.get("pretrained"))
    else:
        cfg = {}
    for key, arg in factory.PREPROCESS_FIELDS.items():
        value = oc.params.get(arg)
        if value not in (None, "", "None"):
            cfg[key] = value
    return cfg


def read_open_clip_run(url: str) -> OpenClipRun:
    url = url.rstrip("/")
    try:
        params = parse_params(read_bytes(join(url, "params.txt")).decode())
    except (FileNotFoundError, NotADirectoryError):
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isfile(path):
            why = "it is a file; --import takes the folder holding params.txt and checkpoints/"
            if url.endswith(".pt"):
                why += " (a checkpoint file alone is --pretrained)"
        elif not fs.exists(path):
            why = "no such folder"
        else:
            why = "no params.txt in it (an open_clip_train run's folder?)"
        raise ConfigError(f"import: {url}: {why}") from None
    for key in ("lr", "batch_size", "epochs"):
        if key not in params:
            raise ConfigError(f"import: {url}/params.txt has no {key!r}")
    fs, path = fsspec.core.url_to_fs(join(url, "checkpoints"))
    found = {}
    for name in fs.glob(f"{path}/epoch_*.pt"):
        m = _EPOCH.search(name)
        if m:
            found[int(m.group(1))] = join(url, "checkpoints", m.group(0))
    if not found:
        raise ConfigError(f"import: no checkpoints/epoch_K.pt in {url}")
    return OpenClipRun(url, params, dict(sorted(found.items())))


def resolve_model(oc: OpenClipRun, model: str | None) -> str:
    """A model name every scoring node can build: ``model``, or one with the run's architecture."""
    if model is not None:
        factory.model_config(model)
        return model
    name = str(oc.params.get("model", ""))
    if not name.startswith("local-dir:"):
        factory.model_config(name)
        return name
    try:
        want = factory.model_config(name)  # reads DIR/open_clip_config.json
    except ConfigError as exc:
        raise ConfigError(
            f"import: {exc}; the run trained a local-dir: model: restore that folder, and "
            "pass --model NAME for a registered architecture that is the same"
        ) from None
    import open_clip

    for candidate in factory.small_config_names() + open_clip.list_models():
        if factory.model_config(candidate) == want:
            return candidate
    raise ConfigError(
        f"import: the run's model {name!r} matches no registered architecture; pass --model "
        f"{name} (the same directory, readable from every scoring node) or a registered name "
        "with the same architecture"
    )


def _load_epoch(url: str) -> tuple[dict[str, Any], str]:
    raw = read_bytes(url)
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickler refusal names the offending global
        # torch's text goes on to suggest weights_only=False, which diffin never uses: keep
        # the line that names what was refused
        text = str(exc)
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        detail = found.group(1) if found else (text.strip().splitlines() or [""])[0]
        raise ConfigError(
            f"import: {url} does not load with weights_only=True: {type(exc).__name__}: {detail}"
        ) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"import: {url} is not an open_clip_train checkpoint (no state_dict)")
    return ckpt, hashlib.sha256(raw).hexdigest()


def _last_lr(ckpt: dict[str, Any]) -> float | None:
    groups = (ckpt.get("optimizer") or {}).get("param_groups") or []
    return float(groups[0]["lr"]) if groups and "lr" in groups[0] else None


# The TrainConfig fields an import uses: the pool, the run directory, the sets.
SET_FIELDS = (
    "data",
    "run",
    "model",
    "seed",
    "batch_size",
    "target_size",
    "reference_size",
    "grad_batches",
    "max_samples",
    "image_keys",
    "text_keys",
    "max_image_pixels",
)


def import_open_clip_run(
    source: str | OpenClipRun,
    cfg: TrainConfig,
    model: str | None = None,
    steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Write RUN's trajectory (checkpoints, steps, rates, sha256) and sets from an open_clip_train run.

    ``cfg`` supplies the pool (``data``), the run directory and the sets'
    sizes and seed (``SET_FIELDS``; its training fields are not used); its
    ``batch_size`` is the size of the gradient batches. ``model`` overrides
    the run's model name (needed when the run used ``local-dir:`` with an
    architecture no registered name has).
    """
    t0 = time.time()
    oc = source if isinstance(source, OpenClipRun) else read_open_clip_run(source)
    name = resolve_model(oc, model)
    cfg = dataclasses.replace(cfg, model=name)
    cfg.validate()
    if steps_per_epoch is not None and (not is_int(steps_per_epoch) or steps_per_epoch < 1):
        raise ConfigError(f"steps_per_epoch: must be an integer >= 1 (got {steps_per_epoch!r})")
    spe = steps_per_epoch if steps_per_epoch is not None else oc.steps_per_epoch()
    if steps_per_epoch is not None:
        try:
            implied = oc.steps_per_epoch()
        except ConfigError:
            implied = None
        if implied is not None and implied != steps_per_epoch:
            # a warning, not a refusal: --steps-per-epoch is also the way around a count
            # params.txt gets wrong; the saved learning rates check it where they can
            log.warning(
                "import: --steps-per-epoch %d, but params.txt implies %d (train_num_samples, "
                "batch size, workers): every checkpoint is placed at %d x its epoch",
                steps_per_epoch,
                implied,
                steps_per_epoch,
            )
    total = spe * int(oc.params["epochs"])
    run = RunDir(cfg.run)
    if cfg.threads:  # the sets are encoded and the checkpoints checked in this process
        torch.set_num_threads(cfg.threads)
    # an import rewrites the trajectory as a training does (pipeline/runlock.py)
    with runlock.hold(cfg.run, ["train"], "train --import"):
        return _import(oc, cfg, name, spe, total, run, t0)


def _import(
    oc: OpenClipRun, cfg: TrainConfig, name: str, spe: int, total: int, run: RunDir, t0: float
) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    bundle = factory.create(name, preprocess_cfg=open_clip_preprocess(oc, name))
    # The first checkpoint is checked before the pool is read (hours on a large pool): a
    # wrong step count or model is refused at once (review: it was refused after reading).
    first: tuple[int, tuple[str, float | None, bool]] | None = None
    if oc.checkpoints:
        epoch, url = next(iter(oc.checkpoints.items()))
        first = (epoch, _checked_epoch(oc, epoch, url, spe, total, bundle))
    pool = load_pool(cfg, pool_transform(bundle))

    # Checkpoints before the sets are built. An interrupted training's resume state is
    # kept until a checkpoint is written.
    saved, sources, confirmations = [], [], []
    for epoch, url in oc.checkpoints.items():
        if first is not None and epoch == first[0]:
            digest, last, confirmed = first[1]  # loaded into bundle.model above
        else:
            digest, last, confirmed = _checked_epoch(oc, epoch, url, spe, total, bundle)
        confirmations.append(confirmed)
        step = epoch * spe
        if not saved:  # the run is rewritten from here: its old record and state no longer hold
            remove(run.trajectory_json)
            remove(run.path("trajectory", "request.json"))  # a native training's: not this
            clear_resume(run)
        saved.append(save_checkpoint(run, bundle.model, step, oc.lr(step, total)))
        sources.append({"epoch": epoch, "url": url, "sha256": digest, "saved_lr": last})

    if not any(confirmations):
        # the step count is one number: one checkpoint's rate that tells it is enough
        log.warning(
            "import: no checkpoint's saved learning rate confirms %d steps per epoch (%s); "
            "the checkpoints' steps, and with them every score's weights, rest on that "
            "count unchecked",
            spe,
            "no optimizer state saved"
            if all(s["saved_lr"] is None for s in sources)
            else "the schedule's rate is the same at one step more or fewer",
        )
    save_sets(cfg, run, pool, bundle, *encode_pool(pool.train, bundle))

    opt = str(oc.params.get("opt", "adamw"))
    settings = {"weight_decay": oc.params.get("wd")}
    if opt == "adamw":
        settings.update(
            betas=[oc.params.get("beta1"), oc.params.get("beta2")], eps=oc.params.get("eps")
        )
    record = {
        "model": name,
        "model_config": factory.model_config(name),
        "pretrained": oc.params.get("pretrained") or None,
        "preprocess_cfg": bundle.preprocess_cfg,
        "optimizer": optimizer_record(opt, **settings),
        "lr_note": LR_NOTE,
        "spacing": "epochs",
        "n_train": int(oc.params.get("train_num_samples") or spe * oc.step_batch),
        "batch_size": oc.step_batch,
        "steps": total,
        "checkpoints": saved,
        "loss_curve": [],
        "pool": pool.counts(),
        "workers": int(oc.params.get("world_size") or 1),
        "precision": oc.params.get("precision"),
        "resumed_at": [],
        "imported": {
            "from": oc.url,
            "steps_per_epoch": spe,
            "lr_scheduler": oc.params.get("lr_scheduler"),
            "checkpoints": sources,
            "params": {k: v for k, v in oc.params.items() if _jsonable(v)},
        },
        "config": {k: v for k, v in cfg.to_dict().items() if k in SET_FIELDS},
        "seconds": round(time.time() - t0, 2),
        **provenance(),
    }
    write_json(run.trajectory_json, record)
    remove_stale_checkpoints(run, record["checkpoints"])
    run.update_run_json(
        "train",
        {"imported_from": oc.url, "config": record["config"], "seconds": record["seconds"]},
    )
    log.info("imported %d checkpoints (%d steps) from %s", len(saved), total, oc.url)
    return record


def _checked_epoch(
    oc: OpenClipRun, epoch: int, url: str, spe: int, total: int, bundle: factory.ClipBundle
) -> tuple[str, float | None, bool]:
    """Load an epoch's checkpoint into ``bundle.model`` after checking its saved rate against
    the schedule; returns its sha256, that rate, and whether the rate confirms ``spe``.
    Refuses a wrong step count or model."""
    ckpt, digest = _load_epoch(url)
    step = epoch * spe
    last = _last_lr(ckpt)
    want = oc.lr(step - 1, total)
    # With --accum-freq, loader batches left over at the end of an epoch (not a whole
    # optimizer step) set the next step's rate before the checkpoint is saved.
    also = oc.lr(step, total) if int(oc.params.get("accum_freq") or 1) > 1 else want
    confirmed = last is not None and not _rate_blind(oc, epoch, spe, want)
    if last is not None and not any(_same_rate(last, w) for w in (want, also)):
        raise ConfigError(
            f"import: {url} was saved with lr {last:.6g}, but step {step - 1} of the "
            f"reconstructed schedule has {want:.6g}: {spe} steps per epoch is wrong; "
            "pass --steps-per-epoch"
        )
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    problem = factory.state_dict_mismatch(bundle.model, state)
    if problem:
        what = "is not usable" if problem.startswith("NaN") else f"does not fit {bundle.name!r}"
        raise ConfigError(f"import: {url} {what}: {problem}")
    bundle.model.load_state_dict(state, strict=True)
    return digest, last, confirmed


def _same_rate(saved: float, rebuilt: float) -> bool:
    """The rate a checkpoint saved against diffin's reconstruction of open_clip_train's
    schedule: both are the same double-precision arithmetic, equal to about 1e-16, so a
    tight tolerance (no absolute one) still tells a cosine schedule's neighbouring step
    counts apart near its end (review: 1e-6 and 1e-12 absolute could not)."""
    return math.isclose(saved, rebuilt, rel_tol=1e-9, abs_tol=0.0)


def _rate_blind(oc: OpenClipRun, epoch: int, spe: int, want: float) -> bool:
    """Whether the saved rate at ``epoch`` could not tell ``spe`` steps per epoch from one
    more or one fewer (a constant schedule, or a flat stretch of it)."""
    epochs = int(oc.params["epochs"])
    return any(
        other >= 1 and _same_rate(oc.lr(epoch * other - 1, other * epochs), want)
        for other in (spe - 1, spe + 1)
    )


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str | list | dict)
