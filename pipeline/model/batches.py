"""Samples to model inputs: the model's own eval transform and tokenizer, nothing else.

A pool that trains from memory is held as uint8 pixels (:class:`Inputs`), a
quarter of the float32 model inputs, and made model inputs one batch at a
time: open_clip's eval transform is PIL steps, ``ToTensor`` (uint8 / 255) and
``Normalize``, so stopping before ``ToTensor`` and finishing per batch gives
the same inputs bit for bit (:func:`pixel_steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

from pipeline.data.sample import Sample
from pipeline.model.factory import ClipBundle


class _ToPixels:
    """A PIL RGB image -> uint8 tensor (C, H, W): ``ToTensor`` without its division."""

    def __call__(self, pic: Any) -> torch.Tensor:
        if getattr(pic, "mode", None) != "RGB":
            # ToTensor scales other modes differently ('I' is int32, '1' is 0/1)
            raise ValueError(f"expected an RGB image before the pixels, got {pic!r}")
        return F.pil_to_tensor(pic)


@dataclass(frozen=True)
class _Finish:
    """uint8 pixels (..., C, H, W) -> float model inputs: what ToTensor and the steps after it do."""

    steps: tuple[Callable[[torch.Tensor], torch.Tensor], ...]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.get_default_dtype()).div(255)  # ToTensor's own arithmetic
        for step in self.steps:
            x = step(x)
        return x


def _converts_to_rgb(step: Any) -> bool:
    # open_clip's MaybeConvertMode("RGB"), or its older _convert_to_rgb function
    return (
        getattr(step, "mode", None) == "RGB" or getattr(step, "__name__", "") == "_convert_to_rgb"
    )


def pixel_steps(preprocess: Any) -> tuple[Callable[[Any], torch.Tensor], _Finish] | None:
    """Split an eval transform into (PIL image -> uint8 pixels, pixels -> model inputs).

    Only the shape this module knows to be exact: a ``Compose`` whose steps
    convert to RGB, then ``ToTensor`` once, then only ``Normalize``. Anything
    else (a custom transform) gives None and is held as float inputs.
    """
    steps = list(getattr(preprocess, "transforms", None) or [])
    at = [i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)]
    if len(at) != 1:
        return None
    before, after = steps[: at[0]], steps[at[0] + 1 :]
    if not any(_converts_to_rgb(s) for s in before):
        return None
    if not all(type(s) is T.Normalize for s in after):
        return None
    return T.Compose([*before, _ToPixels()]), _Finish(tuple(after))


def pool_transform(bundle: ClipBundle) -> Callable[[Any], torch.Tensor]:
    """What a pool held in memory is read with: the pixels when they can be, else the inputs."""
    split = pixel_steps(bundle.preprocess)
    return split[0] if split else bundle.preprocess


def _finish(bundle: ClipBundle) -> _Finish | None:
    split = pixel_steps(bundle.preprocess)
    return split[1] if split else None


@dataclass(frozen=True)
class Inputs:
    """A pool's images as held: ``data`` is uint8 pixels (``finish`` set) or float inputs.

    ``inputs[idx]`` is the model inputs of those rows, as ``encode`` would give
    them; ``subset(idx)`` keeps the rows as they are held.
    """

    data: torch.Tensor
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __getitem__(self, idx: Any) -> torch.Tensor:
        x = self.data[idx]
        return x if self.finish is None else self.finish(x)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def subset(self, idx: Any) -> Inputs:
        return Inputs(self.data[idx], self.finish)

    def batches(self, size: int = 256) -> Iterator[torch.Tensor]:
        """The model inputs in row order, ``size`` rows at a time."""
        for i in range(0, len(self), size):
            yield self[i : i + size]


def _as_input(image: Any, bundle: ClipBundle, finish: _Finish | None) -> torch.Tensor:
    """One sample's model input; ``finish`` is ``_finish(bundle)``, found once per call of
    :func:`encode`, not once per sample."""
    if not torch.is_tensor(image):
        return bundle.preprocess(image)
    if image.dtype == torch.uint8:  # read with pool_transform
        if finish is None:
            raise ValueError("uint8 pixels, but the model's preprocess cannot finish them")
        return finish(image)
    return image


def encode(samples: Sequence[Sample], bundle: ClipBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) for ok samples, in order. Deterministic: no augmentation.

    An image the reader already transformed (``iter_shard(transform=bundle.preprocess)``
    or ``pool_transform(bundle)``) is taken as it is, or finished.
    """
    if not samples:
        raise ValueError("encode needs at least one sample")
    finish = _finish(bundle)
    images = torch.stack([_as_input(s.image, bundle, finish) for s in samples])
    tokens = bundle.tokenizer([s.caption for s in samples])
    return images, tokens


def encode_pool(samples: Sequence[Sample], bundle: ClipBundle) -> tuple[Inputs, torch.Tensor]:
    """:func:`encode` for a pool held in memory: the images stay pixels where they are."""
    if not samples:
        raise ValueError("encode needs at least one sample")
    first = samples[0].image
    if torch.is_tensor(first) and first.dtype == torch.uint8:
        data = torch.stack([s.image for s in samples])
        inputs = Inputs(data, _finish(bundle))
    else:
        inputs = Inputs(torch.stack([_as_input(s.image, bundle, _finish(bundle)) for s in samples]))
    return inputs, bundle.tokenizer([s.caption for s in samples])


def input_bytes(bundle: ClipBundle) -> int:
    """Bytes per value of a pool held in memory: 1 as pixels, else 4 (float32 inputs)."""
    return 1 if pixel_steps(bundle.preprocess) else 4
