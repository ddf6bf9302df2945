"""Typed, frozen per-tensor-role quantization spec (format + scaling + rounding + overflow)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Rounding = Literal["nearest", "stochastic"]
Overflow = Literal["saturate", "ieee"]
# none: values already on the format's grid; tensor: one scale; channel: per output channel (dim 0, weights);
# sample: per example (dim 0, activations/gradients); mx: 32-element E8M0 blocks; nvfp4: 16-element e4m3 blocks.
Scaling = Literal["none", "tensor", "channel", "sample", "mx", "nvfp4"]
# How a group's clipping range is set (tensor / channel / sample scalings): amax (the whole range, no clipping)
# or sawb (Choi et al. 2018: c = 12.1 sqrt(E[x^2]) - 12.2 E|x|, int4 only; signed or unsigned grid per group).
Clip = Literal["amax", "sawb"]

ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
OVERFLOWS: tuple[str, ...] = ("saturate", "ieee")
CLIPS: tuple[str, ...] = ("amax", "sawb")
SCALINGS: tuple[str, ...] = ("none", "tensor", "channel", "sample", "mx", "nvfp4")
# Scalings whose statistics never mix examples of a batch (safe for activations/gradients under DP).
DP_SAFE_DATA_SCALINGS: tuple[str, ...] = ("none", "sample", "mx", "nvfp4")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor role (weight, activation or gradient) is quantized.

    Example:
        >>> spec = QuantSpec("fp8_e4m3", scaling="sample")
        >>> y = spec.apply(torch.randn(4, 8))
        >>> y.shape
        torch.Size([4, 8])
    """

    format: str
    scaling: Scaling = "tensor"
    rounding: Rounding = "nearest"
    overflow: Overflow = "saturate"
    clip: Clip = "amax"

    def __post_init__(self) -> None:
        from dpquant_sim.errors import check_choice
        from dpquant_sim.numerics.formats import get_format

        get_format(self.format)  # raises on unknown names
        check_choice("scaling", self.scaling, SCALINGS)
        check_choice("rounding", self.rounding, ROUNDINGS)
        check_choice("overflow", self.overflow, OVERFLOWS)
        check_choice("clip", self.clip, CLIPS)
        if self.clip == "sawb":
            from dpquant_sim.numerics.scaling import check_sawb

            check_sawb(self.format, self.scaling)

    @property
    def dp_safe_for_data(self) -> bool:
        """True when the scale of an activation/gradient never depends on other examples in the batch."""
        return self.scaling in DP_SAFE_DATA_SCALINGS

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Quantize-dequantize ``x`` (float32 in, float32 out), no autograd semantics."""
        from dpquant_sim.numerics.scaling import quantize_scaled

        return quantize_scaled(
            x, self.format, self.scaling, rounding=self.rounding, overflow=self.overflow, generator=generator,
            clip=self.clip,
        )
