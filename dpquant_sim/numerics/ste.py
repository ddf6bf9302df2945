"""Straight-through estimator: quantize in the forward pass, pass the gradient through unchanged.

``fake_quantize(x, spec)`` is a new-style ``torch.autograd.Function`` (``forward`` + ``setup_context``) so it
composes with ``torch.func.grad``/``vjp``; its explicit ``vmap`` rule treats every vmapped slice as the tensor
the spec would see on its own (per-slice amax, per-slice blocks), by folding the vmapped dim into dim 0:
"tensor" scaling of a slice becomes "sample" scaling of the stacked tensor, and "sample"/"mx"/"nvfp4" of a
slice (statistics per index of the slice's dim 0) become the same scaling over the merged (vmap x dim 0)
dim. Stochastic rounding under vmap draws all slices' random bits in one call (deterministic per
generator, not equal to a loop over slices).

Example:
    >>> import torch
    >>> from dpquant_sim.numerics.spec import QuantSpec
    >>> x = torch.tensor([0.3, -1.7], requires_grad=True)
    >>> y = fake_quantize(x, QuantSpec("fp4_e2m1", scaling="none"))
    >>> y.sum().backward(); y.tolist(), x.grad.tolist()
    ([0.5, -1.5], [1.0, 1.0])
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from dpquant_sim.numerics.scaling import quantize_scaled
from dpquant_sim.numerics.spec import QuantSpec


def _apply(x: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None, channel_dim: int) -> torch.Tensor:
    return quantize_scaled(
        x, spec.format, spec.scaling, rounding=spec.rounding, overflow=spec.overflow, generator=generator,
        channel_dim=channel_dim, clip=spec.clip,
    ).to(x.dtype)


class FakeQuantize(torch.autograd.Function):
    """y = quantize_scaled(x, spec); dy/dx = identity (straight through)."""

    @staticmethod
    def forward(x: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None, channel_dim: int = 0):
        return _apply(x, spec, generator, channel_dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass  # nothing to save: the backward is the identity

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, spec: QuantSpec, generator, channel_dim: int = 0):
        bdim = in_dims[0]
        if bdim is None:
            return FakeQuantize.apply(x, spec, generator, channel_dim), None
        xb = x.movedim(bdim, 0)  # (B, *slice_shape)
        B, slice_shape = xb.shape[0], xb.shape[1:]
        sc = spec.scaling
        per_sample = replace(spec, scaling="sample")
        if sc == "none":
            y = _apply(xb, spec, generator, 0)
        elif sc == "tensor" or (len(slice_shape) == 0 and sc == "channel") or (
            len(slice_shape) <= 1 and sc == "sample"
        ):  # one statistic per slice: per-sample scaling of the stack
            y = _apply(xb.reshape(B, -1), per_sample, generator, 0)
        elif len(slice_shape) <= 1 and sc in ("mx", "nvfp4"):  # a 0-/1-d slice is one sample
            y = _apply(xb.reshape(B, -1), spec, generator, 0)
        elif sc == "channel":  # one statistic per (slice, channel): move the channel next to the vmap dim
            cd = channel_dim % len(slice_shape) + 1
            moved = xb.movedim(cd, 1)
            y = _apply(moved.reshape(B * moved.shape[1], -1), per_sample, generator, 0)
            y = y.reshape(moved.shape).movedim(1, cd)
        else:  # sample / mx / nvfp4 over the slice's dim 0: merge the vmapped dim into it
            y = _apply(xb.reshape(B * slice_shape[0], *slice_shape[1:]), spec, generator, 0)
        return y.reshape(xb.shape), 0


def fake_quantize(
    x: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None, *, channel_dim: int = 0
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``spec`` in the forward pass; identity gradient (STE).

    Args:
        x: floating-point tensor (its dtype is kept on output).
        spec: format, scaling, rounding, overflow.
        generator: required when ``spec.rounding == "stochastic"``.
        channel_dim: channel dim for scaling="channel".
    """
    return FakeQuantize.apply(x, spec, generator, channel_dim)
