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

log = logging.getLogger(__name__)
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
    try:
        cfg = open_clip.get_model_config(name)
    except (OSError, ValueError) as exc:  # a local-dir: folder that is gone or has no config
        raise ConfigError(f"model: {name!r}: {exc}") from None
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
    folder_weights: bool = False,
) -> ClipBundle:
    """Build an open_clip model, randomly initialised unless ``pretrained`` is given.

    ``pretrained`` is a checkpoint file (:func:`load_weights`: ``weights_only=True``, every
    key, shape and value checked) or an open_clip pretrained tag (downloaded by
    open_clip, so only where the network allows it). A ``local-dir:`` model's weights
    file is loaded as a checkpoint file is, with ``folder_weights`` (training starts from
    it); the stages that load a run's checkpoints into the model build the architecture
    alone (review: a starting file of another shape refused the import of a run whose
    checkpoints fit). ``preprocess_cfg`` (a
    run's recorded ``ClipBundle.preprocess_cfg``) sets the image transform's
    mean, std, interpolation and resize mode, so a later stage preprocesses
    as the run's training did, whatever tag it was trained from.
    """
    model_config(name)  # refuses unknown names before anything is built
    schema, where = open_clip.factory.parse_model_name(name)
    tag = weights = None  # an open_clip tag (open_clip loads it), or a file (loaded here)
    flag = "pretrained"
    if pretrained is not None:
        pretrained = _local_path(pretrained)
        if schema is not None:
            # open_clip ignores `pretrained` for these (with a warning we would hide):
            # the weights would silently stay random
            raise ConfigError(
                f"pretrained: {name!r} takes its weights from its own location; "
                "--pretrained is not used with hf-hub: or local-dir: models"
            )
        if Path(pretrained).is_file():
            weights = pretrained
        elif open_clip.get_pretrained_cfg(name, pretrained):
            tag = pretrained  # get_pretrained_cfg normalises tags as open_clip does
        else:
            raise ConfigError(
                f"pretrained: {pretrained!r} is neither a file nor an open_clip tag for {name!r}"
            )
    folder_file = None
    if schema == "local-dir":
        flag = "model"
        folder_file = open_clip.factory._find_checkpoint_in_dir(Path(where))
        if folder_weights:
            weights = folder_file
            if weights is None:
                log.info("model: %s holds no weights file: randomly initialised", where)
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
            pretrained=tag,
            # a file is loaded below, checked, never reshaped; a folder's only if asked
            load_weights=weights is None and folder_file is None,
            # an HF text tower's own pretrained weights only where open_clip fetched them
            # before: for a model with no CLIP weights of its own (review: they were
            # downloaded for a file that then replaced them)
            pretrained_text=weights is None and folder_file is None,
            device=device,
            output_dict=True,
            weights_only=True,
            **forced,
        )
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:
        if tag is None:
            if schema == "local-dir" and isinstance(exc, OSError | ValueError):
                raise ConfigError(f"model: {name!r}: {exc}") from exc
            raise
        if isinstance(exc, OSError) or "download" in str(exc).lower():
            # a tag's weights are downloaded (Hugging Face Hub or the tag's URL)
            raise ConfigError(
                f"pretrained: cannot get open_clip's {tag!r} weights for {name!r}: "
                f"{_first_line(exc)}; open_clip downloads them: where the network is closed, "
                "download the file elsewhere and pass its path (HF_HUB_OFFLINE=1 makes this "
                "fail at once instead of retrying)"
            ) from exc
        if isinstance(exc, pickle.UnpicklingError | EOFError | SafetensorError):
            raise ConfigError(
                f"pretrained: open_clip's cached file of {tag!r} for {name!r} does not load "
                f"({type(exc).__name__}): delete it from the cache (Hugging Face's or "
                "open_clip's) to download it again"
            ) from exc
        raise
    finally:
        root.setLevel(level)
    if weights is not None:
        load_weights(model, weights, name, flag)
    model = model.to(dtype=dtype)
    model.eval()
    recorded = {k: _plain(v) for k, v in open_clip.get_model_preprocess_cfg(model).items()}
    return ClipBundle(name, model, preprocess, tokenizer, recorded)


def _first_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0][:limit] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint file's parameters by name: an open_clip_train checkpoint (its
    ``state_dict``, DDP's ``module.`` prefix dropped), a state dict saved with torch.save,
    or a ``.safetensors`` file. torch.load runs with ``weights_only=True``: a file that
    pickles anything but tensors and plain containers is refused, never run."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = load_file(path, device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError("it holds no state dict (a non-empty dict of parameter names to tensors)")
    odd = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise ValueError(f"{len(odd)} of its entries are not named tensors, e.g. {odd[0]!r}")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _as_open_clip(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip.load_checkpoint's conversions of other layouts, without its resizing of
    position embeddings (which fits another image size or context length silently)."""
    state = open_clip.factory.convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = open_clip.factory.convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        if "logit_scale" in state:
            state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)
    return state


def _names(keys: Any, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` would not load into ``model`` exactly, in words (keys missing or
    unknown, shapes that differ, NaN or infinite values); None when it fits."""
    own = model.state_dict()
    problems = []
    shapes = sorted(k for k in own.keys() & state.keys() if state[k].shape != own[k].shape)
    if shapes:
        problems.append(
            "shapes differ: "
            + "; ".join(
                f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                for k in shapes[:3]
            )
            + (f" (and {len(shapes) - 3} more)" if len(shapes) > 3 else "")
        )
    # BatchNorm supplies a missing step counter itself (torch's strict load accepts it)
    missing = {k for k in own.keys() - state.keys() if not k.endswith(".num_batches_tracked")}
    if missing:
        problems.append(f"missing: {_names(missing)}")
    if state.keys() - own.keys():
        problems.append(f"not in the model: {_names(state.keys() - own.keys())}")
    if not problems:
        bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            problems.append(f"NaN or infinite values in {_names(bad)}")
    return "; ".join(problems) or None


def load_weights(model: nn.Module, path: str, name: str, flag: str = "pretrained") -> None:
    """Load a checkpoint file into ``model`` exactly: every key, every shape, finite values,
    or a ConfigError that says what differs (``flag``: the option that named the file)."""
    if Path(path).suffix in (".npz", ".npy"):  # big_vision's SigLIP weights: open_clip's own
        try:
            open_clip.factory.load_checkpoint(model, path)
        except Exception as exc:
            raise ConfigError(
                f"{flag}: cannot load {path!r} into {name!r}: {_first_line(exc)} (numpy weights "
                "are big_vision SigLIP checkpoints)"
            ) from exc
        return
    try:
        state = _as_open_clip(model, read_state_dict(path))
    except Exception as exc:  # the file's content: whatever it holds, say so plainly
        detail = _first_line(exc)
        if isinstance(exc, pickle.UnpicklingError):
            # torch's own text suggests weights_only=False, which diffin never uses
            detail = (
                "torch.load(weights_only=True) refused it: it is no checkpoint, or it pickles "
                "objects other than tensors"
            )
        raise ConfigError(
            f"{flag}: cannot load {path!r} into {name!r}: {detail} (expected an open_clip "
            "checkpoint, a state dict saved with torch.save, or a .safetensors file, of this "
            "architecture)"
        ) from exc
    problem = state_dict_mismatch(model, state)
    if problem:
        hint = (
            ""
            if problem.startswith("NaN")  # the only problem: not a question of architecture
            else " (a checkpoint of another architecture, image size or context length? "
            "--model names the one it was trained as)"
        )
        raise ConfigError(f"{flag}: cannot load {path!r} into {name!r}: {problem}{hint}")
    model.load_state_dict(state, strict=True)
    log.info("%s: loaded %s into %s (%d tensors)", flag, path, name, len(state))


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
