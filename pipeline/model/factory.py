"""One factory for every model: any open_clip name, plus diffin's small configs.

The small configs (``diffin-tiny``, ``diffin-small``) train on 2 CPU cores in
minutes; they live as JSON beside this file and are registered with open_clip
so that every open_clip code path (including ``open_clip_train.main`` through
``local-dir:``) sees the same architecture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import open_clip
import torch
from safetensors import SafetensorError
from torch import nn

from pipeline.errors import ConfigError
from pipeline.rundir import sha256

CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def register_small_configs() -> None:
    """Make diffin's JSON configs known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def small_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config(name: str) -> dict[str, Any]:
    """The architecture config of an open_clip model name, as a plain dict."""
    register_small_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(
            f"model: unknown open_clip model {name!r}; small configs: {small_config_names()}"
        )
    return cfg


@dataclass
class ClipBundle:
    """A model with the transforms and tokenizer that belong to it."""

    name: str
    model: nn.Module
    preprocess: Any  # PIL image -> float tensor (C, H, W); deterministic (eval transform)
    tokenizer: Any  # list[str] -> LongTensor (B, context_length)
    # what ``preprocess`` does (size, mean, std, interpolation, resize_mode, ...), as
    # open_clip records it; a pretrained tag brings its own, so runs record it
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)


# The preprocessing fields create_model_and_transforms lets a caller set.
PREPROCESS_FIELDS = {
    "mean": "image_mean",
    "std": "image_std",
    "interpolation": "image_interpolation",
    "resize_mode": "image_resize_mode",
}


def _plain(value: Any) -> Any:
    """JSON's view of a preprocess value (tuples become lists)."""
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def create(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    preprocess_cfg: dict[str, Any] | None = None,
) -> ClipBundle:
    """Build an open_clip model, randomly initialised unless ``pretrained`` is given.

    ``pretrained`` is a checkpoint file (loaded by open_clip with
    ``weights_only=True``) or an open_clip pretrained tag (downloaded by
    open_clip, so only where the network allows it). ``preprocess_cfg`` (a
    run's recorded ``ClipBundle.preprocess_cfg``) sets the image transform's
    mean, std, interpolation and resize mode, so a later stage preprocesses
    as the run's training did, whatever tag it was trained from.
    """
    model_config(name)  # refuses unknown names before anything is built
    if pretrained is not None:
        pretrained = _local_path(pretrained)
        if open_clip.factory.parse_model_name(name)[0] is not None:
            # open_clip ignores `pretrained` for these (with a warning we would hide):
            # the weights would silently stay random
            raise ConfigError(
                f"pretrained: {name!r} takes its weights from its own location; "
                "--pretrained is not used with hf-hub: or local-dir: models"
            )
        if not Path(pretrained).is_file() and not open_clip.get_pretrained_cfg(name, pretrained):
            # get_pretrained_cfg normalises tags as open_clip does (case, '-' and '_')
            raise ConfigError(
                f"pretrained: {pretrained!r} is neither a file nor an open_clip tag for {name!r}"
            )
    # open_clip logs every creation step on the root logger, and warns about
    # random initialisation, which is what diffin asks for when no weights are given.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        forced = {
            arg: tuple(v) if isinstance(v, list) else v
            for key, arg in PREPROCESS_FIELDS.items()
            if (v := (preprocess_cfg or {}).get(key)) is not None
        }
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=pretrained,
            device=device,
            output_dict=True,
            weights_only=True,
            **forced,
        )
        tokenizer = open_clip.get_tokenizer(name)
    except (
        AssertionError,
        KeyError,
        RuntimeError,
        ValueError,
        EOFError,  # an empty file
        OSError,  # unreadable
        pickle.UnpicklingError,
        SafetensorError,  # a damaged .safetensors
    ) as exc:
        if pretrained is None:
            raise
        # open_clip reports another architecture's weights with an assert or a
        # state-dict error, and a file that is no checkpoint with a pickle error:
        # name the file, the model and what is expected instead.
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            # torch's own text suggests weights_only=False, which diffin never uses
            detail = (
                "torch.load(weights_only=True) refused it: it is no checkpoint, or it pickles "
                "objects other than tensors"
            )
        expected = (
            ""
            if isinstance(exc, OSError)  # unreadable, or a tag's download: not its content
            else " (expected an open_clip checkpoint, a state dict saved with torch.save, or a "
            ".safetensors file, of this architecture)"
        )
        raise ConfigError(
            f"pretrained: cannot load {pretrained!r} into {name!r}: {detail}{expected}"
        ) from exc
    finally:
        root.setLevel(level)
    model = model.to(dtype=dtype)
    model.eval()
    recorded = {k: _plain(v) for k, v in open_clip.get_model_preprocess_cfg(model).items()}
    return ClipBundle(name, model, preprocess, tokenizer, recorded)


def preprocess_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settable preprocessing fields (``PREPROCESS_FIELDS``) of ``cfg``."""
    return {k: cfg[k] for k in PREPROCESS_FIELDS if k in cfg}


def tag_preprocess(name: str, tag: Any) -> dict[str, Any]:
    """The preprocessing of open_clip's pretrained tag ``tag`` for ``name`` (read from its
    registry, nothing downloaded); empty for a file, no tag or an unknown one."""
    if not isinstance(tag, str) or not tag:
        return {}
    return preprocess_fields(open_clip.get_pretrained_cfg(name, tag))


def recorded_preprocess(record: dict[str, Any]) -> dict[str, Any] | None:
    """The preprocessing a run's ``trajectory.json`` records; for runs recorded before it
    was, that of their pretrained tag, else None (the defaults)."""
    if record.get("preprocess_cfg") is not None:
        return record["preprocess_cfg"]
    tagged = tag_preprocess(str(record.get("model")), record.get("pretrained"))
    return {k: _plain(v) for k, v in tagged.items()} or None


def exact_float32(device: str | torch.device, dtype: torch.dtype) -> None:
    """float32 must mean float32 on a GPU: cuDNN convolutions (the ViT patch embedding)
    and matmuls default to TF32 on Ampere and later, about 1e-3 relative error, which
    the influence terms' differences and the propagation's long products amplify.
    cuDNN is also held to deterministic algorithms (whatever the dtype): a convolution
    whose algorithm varies between runs would move a sample's score between actors."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.deterministic = True
    if dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def pretrained_identity(pretrained: str | None) -> str | None:
    """What a model's starting weights are: the sha256 of a checkpoint file, else the tag.

    A checkpoint file replaced under the same path is other weights; a tag
    names fixed weights wherever open_clip caches them.
    """
    if pretrained is None:
        return None
    path = _local_path(pretrained)
    if not Path(path).is_file():
        return pretrained
    return f"sha256:{sha256(path)}"


def starting_weights(model: str, pretrained: str | None) -> str | None:
    """:func:`pretrained_identity`, and for a ``local-dir:DIR`` model (whose weights open_clip
    loads from DIR, with no ``--pretrained``) the sha256 of DIR's files: weights replaced
    in DIR are other starting weights (review: the name alone was fingerprinted)."""
    if pretrained is not None or not model.startswith("local-dir:"):
        return pretrained_identity(pretrained)
    folder = Path(os.path.expanduser(model.removeprefix("local-dir:")))
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f"{f.name}\0{sha256(str(f))}\n".encode())
    return f"local-dir-sha256:{digest.hexdigest()}"


def _local_path(pretrained: str) -> str:
    """A checkpoint named as the run directory may be (``~``, ``file://``) as the path
    open_clip opens with ``os.path``; a tag stays as it is."""
    if pretrained.startswith("file://"):
        return fsspec.core.url_to_fs(pretrained)[1]
    expanded = os.path.expanduser(pretrained)
    return expanded if Path(expanded).is_file() else pretrained


def param_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: the coordinates of theta in METHOD.md."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_config_dir(name: str, out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` so ``--model local-dir:DIR`` finds the architecture."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_config(name), "preprocess_cfg": {}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    return out
