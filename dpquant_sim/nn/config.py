"""Typed per-GEMM layer quantization configs and named recipes (torchao style).

A quantized layer runs three GEMMs per training step; each reads two of three tensor roles:
forward  y  = x  @ W^T   (activation, weight)
dgrad    dx = dy @ W     (grad, weight)
wgrad    dW = dy^T @ x   (grad, activation)   -- also the per-sample gradient GEMM under DP

>>> cfg = get_recipe("fp8")
>>> cfg.gemm_precisions()
('fp8', 'fp8', 'fp8')
"""

from __future__ import annotations

from dataclasses import dataclass

from dpquant_sim.errors import ConfigError, DPSafetyError
from dpquant_sim.numerics.spec import QuantSpec

# Hardware precision class of each element format: what a tensor core would run it as.
FORMAT_HW_CLASS: dict[str, str] = {
    "fp32": "fp32",
    "bf16": "bf16",
    "fp16": "fp16",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "fp6_e2m3": "fp6",
    "fp6_e3m2": "fp6",
    "fp4_e2m1": "fp4",
    "int8": "int8",
    "int4": "int4",
    "log4": "fp4",
    "luq_log4": "fp4",
}
# Bits per element of each hardware class (used to pick the wider operand of a GEMM and to count bytes).
HW_CLASS_BITS: dict[str, int] = {
    "fp32": 32, "tf32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "fp6": 6, "fp4": 4, "int4": 4,
}


def hw_class(fmt: str) -> str:
    """Hardware precision class of an element format name (e.g. 'fp8_e5m2' -> 'fp8')."""
    try:
        return FORMAT_HW_CLASS[fmt]
    except KeyError:
        raise ConfigError("format", fmt, tuple(FORMAT_HW_CLASS)) from None


def _wider(a: str, b: str) -> str:
    """A GEMM whose operands have classes a and b runs at the wider one (ties: fp before int)."""
    ba, bb = HW_CLASS_BITS[a], HW_CLASS_BITS[b]
    if ba != bb:
        return a if ba > bb else b
    return a if not a.startswith("int") else b


@dataclass(frozen=True)
class LayerQuantConfig:
    """Quantization of one layer's three GEMMs, by tensor role.

    Attributes:
        name: recipe name recorded in plans and metrics.
        weight: spec for W (per-channel or per-tensor scaling is fine: weights are not private data).
        activation: spec for the layer input x (must be per sample or per block under DP).
        grad: spec for the output gradient dy (must be per sample or per block under DP).
        private_alternative: for a recipe that is not DP-safe, the DP-safe recipe to use instead (named in the
            refusal).
    """

    name: str
    weight: QuantSpec
    activation: QuantSpec
    grad: QuantSpec
    private_alternative: str | None = None

    @property
    def dp_safe(self) -> bool:
        """True when no activation or gradient scale mixes examples of a batch (see ``check_dp_safe``)."""
        return self.activation.dp_safe_for_data and self.grad.dp_safe_for_data

    def check_dp_safe(self) -> None:
        """Raise DPSafetyError if an activation or gradient scale would mix examples of a batch."""
        bad = [role for role in ("activation", "grad") if not getattr(self, role).dp_safe_for_data]
        if not bad:
            return
        what = " and ".join(f"{role} scaling={getattr(self, role).scaling!r}" for role in bad)
        fix = (f"Use recipe {self.private_alternative!r} (the same quantizer with per-sample scales), or train "
               "non-private (--non-private)." if self.private_alternative else
               "Use scaling='sample', 'mx' or 'nvfp4' for activations and gradients.")
        raise DPSafetyError(
            f"recipe {self.name!r} is refused under DP: its {what} {'compute' if len(bad) > 1 else 'computes'} "
            "one scale over the whole batch, so one example's input changes another example's per-sample "
            "gradient before clipping and the per-example sensitivity bound (||S_D - S_D'|| <= C) no longer "
            "holds. " + fix
        )

    def gemm_precisions(self) -> tuple[str, str, str]:
        """Hardware precision class of the (forward, dgrad, wgrad) GEMMs."""
        w, a, g = (hw_class(s.format) for s in (self.weight, self.activation, self.grad))
        return _wider(a, w), _wider(g, w), _wider(g, a)


def _recipe(name: str, w: str, a: str, g: str, *, w_scale="channel", d_scale="sample") -> LayerQuantConfig:
    return LayerQuantConfig(
        name=name,
        weight=QuantSpec(w, scaling=w_scale, rounding="nearest"),
        activation=QuantSpec(a, scaling=d_scale, rounding="nearest"),
        grad=QuantSpec(g, scaling=d_scale, rounding="stochastic"),
    )


def luq_recipe(
    name: str = "luq_fp4",
    *,
    weight_scaling: str = "channel",
    grad_format: str = "luq_log4",
    batch_scales: bool = False,
) -> LayerQuantConfig:
    """LUQ 4-bit training (Chmiel et al., ICLR 2023): SAWB INT4 forward, radix-2 FP4 output gradients.

    * weights and activations: int4 with SAWB clipping (c = 12.1 sqrt(E[x^2]) - 12.2 E|x|; unsigned 0..15
      for a group that is all >= 0, e.g. after a ReLU, else signed -7..7), round to nearest;
    * output gradients: LUQ's radix-2 grid (``luq_log4``: the group's amax maps to 16, values 0 and
      +-2^e for e in -3..4, i.e. amax * 2^-k, k = 0..7) with stochastic underflow below amax / 2^7 and
      unbiased stochastic rounding between neighbouring powers of two (E[q(g)] = g).

    Args:
        name: the recipe name recorded in plans and metrics.
        weight_scaling: "channel" (SAWB per output channel; the default) or "tensor" (one SAWB clip per
            weight tensor, as LUQ's reference code; the recipe ``luq_fp4_wtensor``).
        grad_format: "luq_log4" (LUQ's 8 powers of two plus 0; the default) or "log4" (7 powers of two and a
            zero code: amax * 2^-k, k = 0..6, underflow below amax / 2^6; every value has a 4-bit code).
        batch_scales: False: activation and gradient statistics per sample (DP-safe). True: over the whole
            batch, as LUQ (refused under DP; for non-private runs), weights then per tensor.

    >>> luq_recipe().gemm_precisions()
    ('int4', 'fp4', 'fp4')
    """
    d_scale = "tensor" if batch_scales else "sample"
    return LayerQuantConfig(
        name=name,
        weight=QuantSpec("int4", scaling="tensor" if batch_scales else weight_scaling, rounding="nearest",
                         clip="sawb"),
        activation=QuantSpec("int4", scaling=d_scale, rounding="nearest", clip="sawb"),
        grad=QuantSpec(grad_format, scaling=d_scale, rounding="stochastic"),
        private_alternative="luq_fp4" if batch_scales else None,
    )


# Named recipes. Gradients use stochastic rounding (unbiased), weights/activations round to nearest.
RECIPES: dict[str, LayerQuantConfig] = {
    "fp8": _recipe("fp8", "fp8_e4m3", "fp8_e4m3", "fp8_e5m2"),
    "fp6": _recipe("fp6", "fp6_e2m3", "fp6_e2m3", "fp6_e3m2"),
    "fp4": _recipe("fp4", "fp4_e2m1", "fp4_e2m1", "fp4_e2m1"),
    "mxfp8": _recipe("mxfp8", "fp8_e4m3", "fp8_e4m3", "fp8_e5m2", w_scale="mx", d_scale="mx"),
    "mxfp6": _recipe("mxfp6", "fp6_e2m3", "fp6_e2m3", "fp6_e3m2", w_scale="mx", d_scale="mx"),
    "mxfp4": _recipe("mxfp4", "fp4_e2m1", "fp4_e2m1", "fp4_e2m1", w_scale="mx", d_scale="mx"),
    "nvfp4": _recipe("nvfp4", "fp4_e2m1", "fp4_e2m1", "fp4_e2m1", w_scale="nvfp4", d_scale="nvfp4"),
    "int8": _recipe("int8", "int8", "int8", "int8"),
    "int4": _recipe("int4", "int4", "int4", "int4"),
    # LUQ (docs/formats.md): per-sample activation/gradient statistics (DP-safe), SAWB weights per channel
    "luq_fp4": luq_recipe("luq_fp4"),
    # the same with one SAWB clip per weight tensor, as LUQ's reference code (weights are not private data)
    "luq_fp4_wtensor": luq_recipe("luq_fp4_wtensor", weight_scaling="tensor"),
    # LUQ's original batch-wide statistics: non-private runs only (refused under DP, see check_dp_safe)
    "luq_fp4_batch": luq_recipe("luq_fp4_batch", batch_scales=True),
}


def get_recipe(name_or_cfg: "str | LayerQuantConfig") -> LayerQuantConfig:
    """Look up a named recipe (or pass a LayerQuantConfig through).

    >>> get_recipe("fp4").grad.rounding
    'stochastic'
    """
    if isinstance(name_or_cfg, LayerQuantConfig):
        return name_or_cfg
    try:
        return RECIPES[name_or_cfg]
    except KeyError:
        raise ConfigError("recipe", name_or_cfg, tuple(RECIPES)) from None
