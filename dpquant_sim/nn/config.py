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
    """

    name: str
    weight: QuantSpec
    activation: QuantSpec
    grad: QuantSpec

    @property
    def dp_safe(self) -> bool:
        """True when no activation or gradient scale mixes examples of a batch (see ``check_dp_safe``)."""
        return self.activation.dp_safe_for_data and self.grad.dp_safe_for_data

    def check_dp_safe(self) -> None:
        """Raise DPSafetyError if an activation or gradient scale would mix examples of a batch."""
        for role in ("activation", "grad"):
            spec: QuantSpec = getattr(self, role)
            if not spec.dp_safe_for_data:
                raise DPSafetyError(
                    f"recipe {self.name!r}: {role} scaling={spec.scaling!r} computes one scale over the whole "
                    "batch, so one example's input changes another example's per-sample gradient before "
                    "clipping and the DP guarantee no longer holds. Use scaling='sample', 'mx' or 'nvfp4' "
                    "for activations and gradients."
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
