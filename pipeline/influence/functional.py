"""The CLIP losses as pure functions of the parameters, ready for torch.func.

Forward-mode differentiation needs three things open_clip does not give by
default (METHOD.md section 5, and one found here):

- the fused ``nn.MultiheadAttention`` fast path and the flash/efficient SDPA
  kernels have no forward-mode derivative: use the math backend;
- ``native_layer_norm``'s forward-over-forward derivative is wrong in torch
  2.14 (7% relative error against double backward in float64, see
  ``tests/influence/test_functional.py``), so LayerNorm is evaluated as its
  composite formula, which nests correctly;
- dropout off, eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.model.loss import batch_clip_loss, per_sample_loss

Params = dict[str, torch.Tensor]


def _composite_layer_norm(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(-len(self.normalized_shape), 0))
    orig = x.dtype
    x = x.to(self.weight.dtype) if self.weight is not None else x
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dims, keepdim=True)
    y = xc * torch.rsqrt(var + self.eps)
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y.to(orig)


def prepare_for_derivatives(model: nn.Module) -> nn.Module:
    """Put ``model`` in the state every derivative in diffin is computed in (in place)."""
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.forward = _composite_layer_norm.__get__(module)  # type: ignore[method-assign]
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


@contextlib.contextmanager
def derivative_mode() -> Iterator[None]:
    """The math SDPA kernel: the only one with forward-mode and double-backward derivatives."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


class ClipFunctions:
    """theta -> losses, for a fixed model architecture and fixed reference negatives R."""

    def __init__(
        self,
        model: nn.Module,
        ref_images: torch.Tensor | None = None,
        ref_tokens: torch.Tensor | None = None,
        removal: bool = False,
    ) -> None:
        """``removal``: the per-sample gradient g_z (``training_losses``) is z's removal
        gradient from R used as a batch, not the gradient of l_z (``per_sample_loss``)."""
        self.model = prepare_for_derivatives(model)
        self.ref_images = ref_images
        self.ref_tokens = ref_tokens
        self.removal = removal

    def embed(
        self, params: Params, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(self.model, params, (images, tokens))
        return out["image_features"], out["text_features"]

    def self_mask(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B, K): which references are the batch's own pairs (the same tokens and the same
        pixels: the pair itself, or an exact duplicate of it); None when there is none.

        Exact equality of the model inputs, so the result does not depend on
        batching, device or the model's arithmetic.
        """
        if self.ref_images is None or self.ref_tokens is None:
            return None
        ref_tokens = self.ref_tokens.to(tokens.device)
        same = (tokens[:, None, :] == ref_tokens[None]).all(-1)
        if not bool(same.any()):
            return None
        # One pair at a time: templated captions can match many references, and
        # gathering every candidate image pair at once would cost gigabytes.
        ref_images = self.ref_images
        for row, ref in same.nonzero().tolist():
            other = ref_images[ref].to(images.device, images.dtype)
            same[row, ref] = torch.equal(images[row], other)
        return same if bool(same.any()) else None

    def training_losses(
        self, params: Params, images: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """The per-sample function whose gradient is g_z, what a training pair z
        contributed: l_z, or z's removal loss when ``removal`` is set."""
        return self.sample_losses(params, images, tokens, self.removal)

    def sample_losses(
        self, params: Params, images: torch.Tensor, tokens: torch.Tensor, removal: bool = False
    ) -> torch.Tensor:
        """The vector (l_z) of METHOD.md section 2 for a batch, against R (the target
        loss and the ``loss`` scorers); ``removal``: see :func:`per_sample_loss`.

        R is embedded in the same forward pass as the batch: derivatives flow
        through R's embeddings as well, as the definition requires.
        """
        if self.ref_images is None or self.ref_tokens is None:
            raise ValueError("sample_losses needs reference negatives")
        n = images.shape[0]
        exclude = self.self_mask(images, tokens)
        img, txt = self.embed(
            params,
            torch.cat([images, self.ref_images.to(images)]),
            torch.cat([tokens, self.ref_tokens.to(tokens.device)]),
        )
        return per_sample_loss(
            img[:n], txt[:n], img[n:], txt[n:], params["logit_scale"], exclude, removal
        )

    def batch_loss(
        self, params: Params, images: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """L(B; theta): the in-batch contrastive loss, exactly as proxy training computes it."""
        img, txt = self.embed(params, images, tokens)
        return batch_clip_loss(img, txt, params["logit_scale"])
