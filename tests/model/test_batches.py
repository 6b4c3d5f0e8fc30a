"""Samples to model inputs: a pool held as uint8 pixels gives the float inputs bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.data.sample import Sample
from pipeline.model import factory
from pipeline.model.batches import (
    Inputs,
    encode,
    encode_pool,
    input_bytes,
    pixel_steps,
    pool_transform,
)


def _images(seed: int = 0) -> list[Image.Image]:
    """Photos of every shape and mode a pool has: wide, tall, tiny, grey, RGBA, palette."""
    rng = np.random.default_rng(seed)
    rgb = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(300, 500, 3), (97, 41, 3), (7, 9, 3)]]
    out = [Image.fromarray(a) for a in rgb]
    out.append(Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8)))  # L
    out.append(Image.fromarray(rng.integers(0, 256, (64, 48, 4), dtype=np.uint8)))  # RGBA
    out.append(out[0].convert("P"))
    return out


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_the_pixels_finish_to_the_eval_transform_bit_for_bit(resize_mode):
    preprocess = open_clip.image_transform(224, is_train=False, resize_mode=resize_mode)
    split = pixel_steps(preprocess)
    assert split is not None
    to_pixels, finish = split
    pixels = []
    for img in _images():
        px = to_pixels(img)
        assert px.dtype == torch.uint8 and px.shape == (3, 224, 224)
        assert torch.equal(finish(px), preprocess(img)), (resize_mode, img.mode, img.size)
        pixels.append(px)
    batch = torch.stack(pixels)  # finished a batch at a time, as training does
    assert torch.equal(finish(batch), torch.stack([preprocess(i) for i in _images()]))


def test_a_transform_it_cannot_split_is_held_as_float_inputs():
    norm = T.Normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    rgb = open_clip.transform.MaybeConvertMode("RGB")
    assert pixel_steps(T.Compose([T.Resize(8), rgb, T.ToTensor(), norm])) is not None
    assert pixel_steps(T.Compose([T.Resize(8), T.ToTensor(), norm])) is None  # no RGB step
    assert pixel_steps(T.Compose([rgb, T.ToTensor(), norm, T.Lambda(lambda x: x * 2)])) is None
    assert pixel_steps(T.Compose([rgb, norm])) is None  # no ToTensor
    assert pixel_steps(lambda img: img) is None  # not a Compose
    bundle = factory.create("diffin-tiny")
    assert input_bytes(bundle) == 1
    custom = dataclasses.replace(
        bundle, preprocess=T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    )
    assert input_bytes(custom) == 4 and pool_transform(custom) is custom.preprocess
    rgb = [img.convert("RGB") for img in _images()]  # as the reader gives them
    samples = [Sample(f"{i:032x}", str(i), "s", i, img, f"c{i}") for i, img in enumerate(rgb)]
    held, _ = encode_pool(samples, custom)
    assert held.finish is None and held.data.dtype == torch.float32
    assert torch.equal(
        held[[0, 2]], torch.stack([custom.preprocess(samples[i].image) for i in (0, 2)])
    )


def test_a_pool_held_as_pixels_trains_and_fingerprints_as_float_inputs():
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import batch_order, train_loop
    from pipeline.train.state import fingerprint

    bundle = factory.create("diffin-tiny")
    images = _images(1) * 4  # 24 pairs
    pil = [Sample(f"{i:032x}", str(i), "s", i, img, f"pair {i}") for i, img in enumerate(images)]
    read = [dataclasses.replace(s, image=pool_transform(bundle)(s.image)) for s in pil]
    floats, tokens = encode(pil, bundle)
    held, held_tokens = encode_pool(read, bundle)
    assert isinstance(held, Inputs) and held.data.dtype == torch.uint8
    assert held.data.nbytes * 4 == floats.nbytes  # a quarter of the float inputs
    assert torch.equal(held_tokens, tokens) and len(held) == 24 and held.shape[0] == 24
    idx = torch.tensor([5, 0, 17])
    assert torch.equal(held[idx], floats[idx])
    assert torch.equal(held.subset(idx)[1:], floats[idx][1:])
    assert torch.equal(torch.cat(list(held.batches(size=7))), floats)
    assert torch.equal(encode(read, bundle)[0], floats)  # the sets, finished from the pixels

    cfg = TrainConfig(data="x", run="r", steps=6, warmup=1, batch_size=8, lr=0.05)
    uids = [s.uid for s in pil]
    # the same fingerprint: a run trained before pools were held as pixels resumes
    assert fingerprint(cfg, uids, held, tokens) == fingerprint(cfg, uids, floats, tokens)
    order = batch_order(24, cfg.batch_size, cfg.steps, cfg.seed)
    models = []
    for inputs in (floats, held):
        torch.manual_seed(0)
        model = factory.create("diffin-tiny").model
        losses = train_loop(model, inputs, tokens, cfg, order, progress=False)
        models.append((losses, model.state_dict()))
    (la, a), (lb, b) = models
    assert la == lb
    assert all(torch.equal(a[k], b[k]) for k in a)
