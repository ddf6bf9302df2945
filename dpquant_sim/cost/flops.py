"""FLOPs and bytes of one DP training step, op by op, from layer shapes and a per-layer recipe.

Each quantizable layer (Linear/Conv2d, conv as implicit GEMM) runs three GEMMs per step:
``fwd`` y = x W^T, ``dgrad`` dx = dy W, ``wgrad`` dW = dy^T x (per sample under DP). Each costs
2 * B * M * K * N FLOPs with (M, K, N) the per-example forward GEMM of :class:`LayerShape` (for a grouped
conv K = C_in/groups * kh * kw and N = C_out, so 2*M*K*N already sums over the groups). The first
parametric layer skips ``dgrad`` (nothing upstream needs the input gradient; autograd and Opacus skip it too).

Bytes moved per GEMM: its two operands in their storage precision (quantized operands in their format,
others in the base precision), its output (base precision; fp32 per-sample gradients for ``wgrad`` under DP),
plus scale factors (per-sample / per-channel / per-tensor fp32 scales, MX: 1 byte per 32 elements,
NVFP4: 1 byte per 16 + one fp32 per sample or tensor). A conv's input is read once (implicit GEMM, no im2col).

Other ops are elementwise/reductions ("vector" ops, memory-bound in practice): quantize/cast passes
(amax pass + cast pass for per-sample/channel/tensor scales, one fused pass for block scales; weights are
cast from their fp32 master copy), non-GEMM layers (norms, activations, pooling; forward and backward),
and the DP extras: per-sample gradients of norm layers and biases, per-sample norm reduction (reads B x P
fp32), clip-scale-and-sum (reads B x P, writes P), noise generation and the optimizer update over all
parameters (fp32). Residual additions are functional (not modules) and are not counted.

Each op says whether it belongs to the paper's "theoretical" convention (``theo``): GEMMs, non-GEMM layers
and DP/optimizer work are counted at peak rates there; quantize/cast overhead is roofline-only.

>>> import torch.nn as tnn
>>> from dpquant_sim.nn.shapes import trace_layers
>>> shapes = trace_layers(tnn.Sequential(tnn.Linear(64, 32), tnn.ReLU(), tnn.Linear(32, 10)), (64,))
>>> ops = step_ops(shapes, {"2": "fp8"}, batch=8)
>>> [(o.layer, o.op, o.precision, o.flops) for o in ops if o.kind == "gemm"]  # layer 0 skips dgrad
[('0', 'fwd', 'bf16', 32768.0), ('0', 'wgrad', 'bf16', 32768.0), ('2', 'fwd', 'fp8', 5120.0), ('2', 'dgrad', 'fp8', 5120.0), ('2', 'wgrad', 'fp8', 5120.0)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from dpquant_sim.errors import ConfigError
if TYPE_CHECKING:  # torch-free at import: profiles and help never load torch
    from dpquant_sim.nn.shapes import LayerShape

BASES: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")
OPTIMIZERS: dict[str, tuple[int, int]] = {
    # name -> (fp32 tensors of size P read+written per update, FLOPs per parameter)
    "sgd": (3, 2),  # read p, g; write p
    "momentum": (5, 4),  # read p, g, m; write p, m
    "adam": (7, 12),  # read p, g, m, v; write p, m, v
}
BLOCK_SIZE = {"mx": 32, "nvfp4": 16}
# Elementwise FLOPs per element (rough; these ops are bandwidth-bound, FLOPs only matter in "theoretical").
QUANT_FLOPS = 4  # abs, scale, round, clamp
STOCHASTIC_EXTRA_FLOPS = 4  # draw + add a uniform
NORM_FWD_FLOPS, NORM_BWD_FLOPS = 8, 12
ACT_FLOPS = 1
NOISE_FLOPS = 10  # Gaussian draw + scale + add
FREE_KINDS = frozenset({"flatten", "identity", "unflatten"})
NORM_KINDS = frozenset({"groupnorm", "layernorm", "batchnorm2d", "instancenorm2d"})


def _bytes_per(prec: str) -> float:
    from dpquant_sim.nn.config import HW_CLASS_BITS

    return {"tf32": 4.0}.get(prec, HW_CLASS_BITS[prec] / 8.0)


@dataclass(frozen=True)
class Op:
    """One kernel-level operation of a training step.

    Attributes:
        layer: module name, or '<dp>' / '<optimizer>' for whole-model work.
        op: 'fwd' | 'dgrad' | 'wgrad' (GEMMs), 'quant_w' | 'quant_x' | 'quant_dy' | 'cast_w', 'fwd_vec' |
            'bwd_vec' (non-GEMM layers), 'psg' (per-sample grads of non-GEMM params/biases), 'psg_norm',
            'clip_sum', 'noise', 'optimizer'.
        kind: 'gemm' or 'vector'.
        precision: requested hardware class of a GEMM ('fp8', 'bf16', ...); 'vector' otherwise.
        flops: FLOPs (2 per multiply-accumulate). bytes: DRAM bytes read + written.
        launches: kernels launched. quantized: runs in a low-precision recipe.
        theo: counted in the "theoretical" (peak FLOP rates only) estimate.
        dims: (M, K, N, batch) of a GEMM kernel (``batch`` independent M x K x N products), for the
            shape-aware kernel model (:mod:`dpquant_sim.cost.gemm`); None for vector ops.
        phase: 'fwd', 'bwd' or 'step' (after the backward pass: clipping sums, noise, optimizer); what a
            gradient all-reduce could overlap with.
    """

    layer: str
    op: str
    kind: str
    precision: str
    flops: float
    bytes: float
    launches: int = 1
    quantized: bool = False
    theo: bool = True
    dims: tuple[float, float, float, float] | None = None
    phase: str = "bwd"


def scale_bytes(scaling: str, numel_per_sample: int, samples: int, channels: int = 1) -> float:
    """Bytes of scale factors for a tensor of ``samples`` x ``numel_per_sample`` elements.

    >>> scale_bytes("mx", 64, 2), scale_bytes("nvfp4", 64, 2), scale_bytes("sample", 64, 2)
    (4.0, 16.0, 8.0)
    """
    if scaling == "none":
        return 0.0
    if scaling == "tensor":
        return 4.0
    if scaling == "channel":
        return 4.0 * channels
    if scaling == "sample":
        return 4.0 * samples
    if scaling == "mx":
        return float(math.ceil(numel_per_sample / 32) * samples)
    if scaling == "nvfp4":
        return float(math.ceil(numel_per_sample / 16) * samples + 4 * samples)
    raise ConfigError("scaling", scaling, ("none", "tensor", "channel", "sample", "mx", "nvfp4"))


def _recipe(r: Any):
    if r is None:
        return None
    from dpquant_sim.nn.config import get_recipe

    return get_recipe(r)


def _quant_op(layer: str, op: str, spec, numel_per_sample: int, samples: int, src_bytes: float,
              channels: int = 1, phase: str = "bwd") -> Op:
    from dpquant_sim.nn.config import hw_class

    numel = numel_per_sample * samples
    passes = 2 if spec.scaling in ("tensor", "channel", "sample") else 1  # amax pass + cast pass
    dst = _bytes_per(hw_class(spec.format))
    flops = numel * (QUANT_FLOPS + (STOCHASTIC_EXTRA_FLOPS if spec.rounding == "stochastic" else 0))
    nbytes = passes * numel * src_bytes + numel * dst + scale_bytes(spec.scaling, numel_per_sample, samples, channels)
    return Op(layer, op, "vector", "vector", float(flops), float(nbytes), passes, True, theo=False, phase=phase)


def gemm_layer_ops(s: LayerShape, batch: int, recipe: Any = None, *, base: str = "bf16", dp: bool = True,
                   needs_dgrad: bool = True, clipping: str = "hooks") -> list[Op]:
    """The three GEMMs of one Linear/Conv2d layer plus its quantize/cast passes and per-sample bias grads.

    ``recipe``: None (base precision) or a recipe name / LayerQuantConfig from ``dpquant_sim.nn.config``.
    ``clipping``: under DP, the clipping algorithm whose weight-gradient GEMM runs (:mod:`.clipping`).
    """
    from dpquant_sim.cost.clipping import GemmOperands, get_clip_cost

    if s.gemm_mnk is None:
        raise ConfigError("layer", s.name, "a Linear/Conv2d layer (LayerShape.gemm_mnk set)")
    m, k, n = s.gemm_mnk
    B = batch
    flops = 2.0 * B * m * k * n
    w_numel = math.prod(s.weight_shape) if s.weight_shape else k * n
    bias = s.params - w_numel
    fb = _bytes_per(base)
    cfg = _recipe(recipe)
    ops: list[Op] = []
    if cfg is None:
        pf = pd_ = pw = base
        bw = bx = bdy = fb
        sw = sx = sdy = 0.0
        q = False
        if base != "fp32":  # cast the fp32 master weights once per step
            ops.append(Op(s.name, "cast_w", "vector", "vector", float(w_numel), w_numel * (4.0 + fb), 1, False, False,
                          phase="fwd"))
    else:
        from dpquant_sim.nn.config import hw_class

        pf, pd_, pw = cfg.gemm_precisions()
        bw, bx, bdy = (_bytes_per(hw_class(sp.format)) for sp in (cfg.weight, cfg.activation, cfg.grad))
        sw = scale_bytes(cfg.weight.scaling, w_numel, 1, n)
        sx = scale_bytes(cfg.activation.scaling, s.in_numel, B)
        sdy = scale_bytes(cfg.grad.scaling, s.out_numel, B)
        q = True
        ops.append(_quant_op(s.name, "quant_w", cfg.weight, w_numel, 1, 4.0, channels=n, phase="fwd"))
        ops.append(_quant_op(s.name, "quant_x", cfg.activation, s.in_numel, B, fb, phase="fwd"))
        ops.append(_quant_op(s.name, "quant_dy", cfg.grad, s.out_numel, B, fb))
    x_b = B * s.in_numel * bx + sx
    w_b = w_numel * bw + sw
    dy_b = B * s.out_numel * bdy + sdy
    ops.append(Op(s.name, "fwd", "gemm", pf, flops, x_b + w_b + B * s.out_numel * fb, 1, q,
                  dims=(float(B * m), float(k), float(n), 1.0), phase="fwd"))
    if needs_dgrad:  # dx[BM, K] = dy[BM, N] W[N, K]
        ops.append(Op(s.name, "dgrad", "gemm", pd_, flops, dy_b + w_b + B * s.in_numel * fb, 1, q,
                      dims=(float(B * m), float(n), float(k), 1.0)))
    if dp:  # the clipping algorithm's weight-gradient GEMM(s), per sample under hooks
        ops += get_clip_cost(clipping).wgrad(s, B, GemmOperands(x_b, dy_b, pw, q))
    else:  # dW[N, K] = dy^T[N, BM] x[BM, K]
        ops.append(Op(s.name, "wgrad", "gemm", pw, flops, dy_b + x_b + w_numel * 4.0, 1, q,
                      dims=(float(n), float(B * m), float(k), 1.0)))
    if bias > 0:  # bias grad: a reduction of dy over the M output positions (per sample under DP)
        ops.append(Op(s.name, "psg" if dp else "bias_grad", "vector", "vector", float(B * m * n),
                      B * s.out_numel * fb + (B if dp else 1) * bias * 4.0, 1, False))
    return ops


def vector_layer_ops(s: LayerShape, batch: int, *, base: str = "bf16", dp: bool = True) -> list[Op]:
    """Forward and backward of a non-GEMM layer (norm, activation, pooling) as memory-bound passes."""
    if s.kind in FREE_KINDS or s.is_gemm:
        return []
    B, fb = batch, _bytes_per(base)
    i, o = B * s.in_numel, B * s.out_numel
    if s.kind in NORM_KINDS:
        ff, bf = NORM_FWD_FLOPS * i, NORM_BWD_FLOPS * i
    elif "pool" in s.kind:
        ff, bf = float(i), float(i)
    else:
        ff, bf = ACT_FLOPS * i, ACT_FLOPS * i
    ops = [
        Op(s.name, "fwd_vec", "vector", "vector", float(ff), (i + o) * fb, phase="fwd"),
        Op(s.name, "bwd_vec", "vector", "vector", float(bf), (2 * o + i) * fb if "pool" not in s.kind
           else (o + i) * fb),
    ]
    if s.params > 0:  # affine params of a norm: per-sample grads need x_hat * dy reduced per sample
        ops.append(Op(s.name, "psg" if dp else "param_grad", "vector", "vector", 2.0 * o,
                      2 * o * fb + (B if dp else 1) * s.params * 4.0))
    return ops


def dp_layer_ops(s: LayerShape, batch: int, clipping: str = "hooks") -> list[Op]:
    """The clipping algorithm's per-layer extras (hooks: per-sample norm and clip-scale-and-sum over B x P)."""
    from dpquant_sim.cost.clipping import get_clip_cost

    return [Op(o.layer, o.op, o.kind, o.precision, o.flops, o.bytes, o.launches, o.quantized, o.theo, o.dims, "step")
            for o in get_clip_cost(clipping).layer_extras(s, batch)]


def global_ops(total_params: int, *, dp: bool = True, optimizer: str = "sgd") -> list[Op]:
    """Noise generation (DP) and the optimizer update over all parameters, in fp32."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError("optimizer", optimizer, tuple(OPTIMIZERS))
    P = float(total_params)
    ops = []
    if dp:  # once per step, after the gradient reduction (every replica draws the same noise from a shared seed)
        ops.append(Op("<dp>", "noise", "vector", "vector", NOISE_FLOPS * P, 12 * P, phase="step"))
    tensors, fl = OPTIMIZERS[optimizer]
    ops.append(Op("<optimizer>", "optimizer", "vector", "vector", fl * P, tensors * 4 * P, phase="step"))
    return ops


def first_param_layer(shapes: Sequence[LayerShape]) -> str | None:
    """Name of the first layer (in call order) that owns parameters; it needs no input gradient."""
    for s in shapes:
        if s.params > 0:
            return s.name
    return None


def plan_mapping(plan: Any, shapes: Sequence[LayerShape]) -> dict[str, Any]:
    """Normalize an EpochPlan / {layer: recipe} / None to {layer: recipe}, checking the layer names."""
    if plan is None:
        return {}
    quantized = getattr(plan, "quantized", plan)
    if not isinstance(quantized, Mapping):
        raise ConfigError("plan", type(plan).__name__, "an EpochPlan, a {layer: recipe} mapping or None")
    gemm = {s.name for s in shapes if s.is_gemm}
    out = {}
    for layer, r in quantized.items():
        if layer not in gemm:
            raise ConfigError("plan layer", layer, sorted(gemm))
        if r is not None:
            out[layer] = r
    return out


def step_ops(shapes: Sequence[LayerShape], plan: Any = None, *, batch: int, base: str = "bf16", dp: bool = True,
             optimizer: str = "sgd", clipping: str = "hooks") -> list[Op]:
    """Every op of one training step with ``batch`` examples (expected batch under Poisson sampling) on one
    device (with N data-parallel devices, pass the per-device batch).

    ``shapes``: all leaf layers from :func:`dpquant_sim.nn.shapes.trace_layers`. ``plan``: EpochPlan or
    {layer: recipe}; layers not in it run in ``base`` precision. ``clipping``: DP clipping algorithm.
    """
    if base not in BASES:
        raise ConfigError("base", base, BASES)
    if not isinstance(batch, (int, float)) or batch <= 0:
        raise ConfigError("batch", batch, "a positive number of examples")
    mapping = plan_mapping(plan, shapes)
    first = first_param_layer(shapes)
    ops: list[Op] = []
    for s in shapes:
        if s.is_gemm:
            ops += gemm_layer_ops(s, batch, mapping.get(s.name), base=base, dp=dp, needs_dgrad=s.name != first,
                                  clipping=clipping)
        else:
            ops += vector_layer_ops(s, batch, base=base, dp=dp)
        if dp:
            ops += dp_layer_ops(s, batch, clipping)
    ops += global_ops(sum(s.params for s in shapes), dp=dp, optimizer=optimizer)
    return ops


@dataclass(frozen=True)
class MemoryFit:
    """Device memory needed by one step (bytes) and whether it fits the usable capacity."""

    weights: float
    grads: float
    optimizer_state: float
    activations: float
    per_sample_grads: float
    total: float
    capacity: float | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity


def memory_bytes(shapes: Sequence[LayerShape], plan: Any = None, *, batch: int, base: str = "bf16", dp: bool = True,
                 optimizer: str = "sgd", capacity: float | None = None, clipping: str = "hooks") -> MemoryFit:
    """Weights (fp32 master + low-precision copies), grads, optimizer state, saved activations and, under DP,
    what the clipping algorithm holds until clipping (hooks: all per-sample gradients, B x P fp32)."""
    from dpquant_sim.cost.clipping import get_clip_cost
    from dpquant_sim.nn.config import hw_class

    mapping = plan_mapping(plan, shapes)
    fb = _bytes_per(base)
    P = sum(s.params for s in shapes)
    weights = 4.0 * P
    acts = 0.0
    for s in shapes:
        if s.is_gemm:
            cfg = _recipe(mapping.get(s.name))
            w_numel = math.prod(s.weight_shape) if s.weight_shape else 0
            if cfg is None:
                bx, bw = fb, (fb if base != "fp32" else 0.0)
            else:
                bx, bw = _bytes_per(hw_class(cfg.activation.format)), _bytes_per(hw_class(cfg.weight.format))
            acts += batch * s.in_numel * bx
            weights += w_numel * bw
        elif s.kind not in FREE_KINDS:
            acts += batch * (s.out_numel if "relu" in s.kind or "pool" in s.kind else s.in_numel) * fb
    opt = {"sgd": 0, "momentum": 1, "adam": 2}[optimizer] * 4.0 * P
    held = get_clip_cost(clipping).held_bytes
    psg = sum(held(s, batch) for s in shapes) if dp else 0.0
    total = weights + 4.0 * P + opt + acts + psg
    return MemoryFit(weights, 4.0 * P, opt, acts, psg, total, capacity)
