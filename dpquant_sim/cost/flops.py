"""FLOPs and bytes of one DP training step, op by op, from layer shapes and a per-layer recipe.

Each quantizable layer (Linear/Conv2d, conv as implicit GEMM) runs ``fwd`` y = x W^T, and in the backward pass
``dgrad`` dx = dy W and ``wgrad`` dW = dy^T x. Each costs 2 * B * M * K * N FLOPs with (M, K, N) the per-example
forward GEMM of :class:`LayerShape` (for a grouped conv K = C_in/groups * kh * kw and N = C_out, so 2*M*K*N
already sums over the groups). Without DP the first parametric layer skips ``dgrad`` (nothing upstream needs
the input gradient; autograd skips it). Under DP the clipping algorithm decides what the backward pass runs
(:mod:`dpquant_sim.cost.clipping`): per-sample GEMMs and norms (hooks), ghost norms and one weighted GEMM per
layer (book-keeping, mixed), or ghost norms and a second backward pass (ghost).

Bytes moved per GEMM: its two operands in their storage precision (quantized operands in their format,
others in the base precision), its output (base precision; fp32 weight gradients), plus scale factors
(per-sample / per-channel / per-tensor fp32 scales, MX: 1 byte per 32 elements, NVFP4: 1 byte per 16 + one
fp32 per sample or tensor). A conv's forward reads its input once (implicit GEMM, no im2col); the per-sample
paths that unfold it (im2col) are charged for the copy.

Other ops are elementwise/reductions ("vector" ops, memory-bound in practice): quantize/cast passes
(amax pass + cast pass for per-sample/channel/tensor scales, one fused pass for block scales; weights are
cast from their fp32 master copy), non-GEMM layers (norms, activations, pooling; forward and backward),
the clipping algorithm's vector work (norms, clip scaling and sums, bias and norm-layer per-sample
gradients), noise generation and the optimizer update over all parameters (fp32). Residual additions are
functional (not modules) and are not counted.

Each op says whether it belongs to the paper's "theoretical" convention (``theo``): GEMMs, non-GEMM layers
and DP/optimizer work are counted at peak rates there; quantize/cast overhead is roofline-only.

>>> import torch.nn as tnn
>>> from dpquant_sim.nn.shapes import trace_layers
>>> shapes = trace_layers(tnn.Sequential(tnn.Linear(64, 32), tnn.ReLU(), tnn.Linear(32, 10)), (64,))
>>> ops = step_ops(shapes, {"2": "fp8"}, batch=8, dp=False)
>>> [(o.layer, o.op, o.precision, o.flops) for o in ops if o.kind == "gemm"]  # layer 0 skips dgrad
[('0', 'fwd', 'bf16', 32768.0), ('0', 'wgrad', 'bf16', 32768.0), ('2', 'fwd', 'fp8', 5120.0), ('2', 'dgrad', 'fp8', 5120.0), ('2', 'wgrad', 'fp8', 5120.0)]
>>> [o.op for o in step_ops(shapes, None, batch=8, clipping="bk") if o.layer == "2" and o.kind == "gemm"]
['fwd', 'dgrad', 'wgrad']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from dpquant_sim.clipping_rules import DEFAULT_CLIPPING
from dpquant_sim.errors import ConfigError

if TYPE_CHECKING:  # torch-free at import: profiles and help never load torch
    from dpquant_sim.cost.clipping import GemmOperands
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


def layer_operands(s: LayerShape, batch: float, recipe: Any = None, *, base: str = "bf16") -> "GemmOperands":
    """Bytes and GEMM precisions of one Linear/Conv2d layer's tensors for ``batch`` examples under ``recipe``
    (None: every tensor in ``base``): activations, output gradients and the weight copy in their storage
    format with their scale factors, the input gradient in ``base``."""
    from dpquant_sim.cost.clipping import GemmOperands

    n = s.gemm_mnk[2]
    w_numel = math.prod(s.weight_shape) if s.weight_shape else s.gemm_mnk[1] * n
    fb = _bytes_per(base)
    cfg = _recipe(recipe)
    if cfg is None:
        return GemmOperands(batch * s.in_numel * fb, batch * s.out_numel * fb, w_numel * fb, batch * s.in_numel * fb,
                            fb, base, base, base, base, base, False)
    from dpquant_sim.nn.config import hw_class

    pf, pd_, pw = cfg.gemm_precisions()
    cw, cx, cdy = (hw_class(sp.format) for sp in (cfg.weight, cfg.activation, cfg.grad))
    bw, bx, bdy = (_bytes_per(c) for c in (cw, cx, cdy))
    sw = scale_bytes(cfg.weight.scaling, w_numel, 1, n)
    sx = scale_bytes(cfg.activation.scaling, s.in_numel, batch)
    sdy = scale_bytes(cfg.grad.scaling, s.out_numel, batch)
    return GemmOperands(batch * s.in_numel * bx + sx, batch * s.out_numel * bdy + sdy, w_numel * bw + sw,
                        batch * s.in_numel * fb, bx, pf, pd_, pw, cx, cdy, True)


def gemm_layer_ops(s: LayerShape, batch: float, recipe: Any = None, *, base: str = "bf16", dp: bool = True,
                   needs_dgrad: bool = True, clipping: str = DEFAULT_CLIPPING) -> list[Op]:
    """The GEMMs of one Linear/Conv2d layer plus its quantize/cast passes and, under DP, what ``clipping``
    runs for it (:mod:`dpquant_sim.cost.clipping`: input gradients, norms, per-sample or weighted GEMMs).

    ``recipe``: None (base precision) or a recipe name / LayerQuantConfig from ``dpquant_sim.nn.config``.
    ``needs_dgrad``: False for the first parametric layer (autograd computes no input gradient there; the
    algorithms that differentiate w.r.t. the model input compute it anyway).
    """
    from dpquant_sim.cost.clipping import bias_sum_op, dgrad_op, get_clip_cost, wgrad_op

    if s.gemm_mnk is None:
        raise ConfigError("layer", s.name, "a Linear/Conv2d layer (LayerShape.gemm_mnk set)")
    m, k, n = s.gemm_mnk
    B = batch
    w_numel = math.prod(s.weight_shape) if s.weight_shape else k * n
    fb = _bytes_per(base)
    cfg = _recipe(recipe)
    o = layer_operands(s, B, cfg, base=base)
    ops: list[Op] = []
    if cfg is None:
        if base != "fp32":  # cast the fp32 master weights once per step
            ops.append(Op(s.name, "cast_w", "vector", "vector", float(w_numel), w_numel * (4.0 + fb), 1, False, False,
                          phase="fwd"))
    else:
        ops.append(_quant_op(s.name, "quant_w", cfg.weight, w_numel, 1, 4.0, channels=n, phase="fwd"))
        ops.append(_quant_op(s.name, "quant_x", cfg.activation, s.in_numel, B, fb, phase="fwd"))
        ops.append(_quant_op(s.name, "quant_dy", cfg.grad, s.out_numel, B, fb))
    ops.append(Op(s.name, "fwd", "gemm", o.fwd_precision, 2.0 * B * m * k * n, o.x + o.w + B * s.out_numel * fb, 1,
                  o.quantized, dims=(float(B * m), float(k), float(n), 1.0), phase="fwd"))
    if dp:
        return ops + get_clip_cost(clipping).gemm_backward(s, B, o, not needs_dgrad)
    if needs_dgrad:
        ops.append(dgrad_op(s, B, o))
    ops.append(wgrad_op(s, B, o))
    return ops + bias_sum_op(s, B, o, "bias_grad", "bwd")


def vector_layer_ops(s: LayerShape, batch: float, *, base: str = "bf16", dp: bool = True,
                     clipping: str = DEFAULT_CLIPPING) -> list[Op]:
    """Forward and backward of a non-GEMM layer (norm, activation, pooling) as memory-bound passes; under DP
    the clipping algorithm's work for its parameters and, for ghost clipping, its second backward pass."""
    if s.kind in FREE_KINDS or s.is_gemm:
        return []
    from dpquant_sim.cost.clipping import get_clip_cost

    B, fb = batch, _bytes_per(base)
    i, o = B * s.in_numel, B * s.out_numel
    if s.kind in NORM_KINDS:
        ff, bf = NORM_FWD_FLOPS * i, NORM_BWD_FLOPS * i
    elif "pool" in s.kind:
        ff, bf = float(i), float(i)
    else:
        ff, bf = ACT_FLOPS * i, ACT_FLOPS * i
    bwd_bytes = (2 * o + i) * fb if "pool" not in s.kind else (o + i) * fb
    ops = [Op(s.name, "fwd_vec", "vector", "vector", float(ff), (i + o) * fb, phase="fwd"),
           Op(s.name, "bwd_vec", "vector", "vector", float(bf), bwd_bytes)]
    if not dp:
        if s.params > 0:  # affine params of a norm: x_hat * dy reduced over the batch
            ops.append(Op(s.name, "param_grad", "vector", "vector", 2.0 * o, 2 * o * fb + s.params * 4.0))
        return ops
    algo = get_clip_cost(clipping)
    for _ in range(algo.backward_passes - 1):  # ghost clipping back-propagates every layer a second time
        ops.append(Op(s.name, "bwd_vec2", "vector", "vector", float(bf), bwd_bytes, phase="clip"))
    if s.params > 0:
        ops += algo.param_layer(s, B, fb)
    return ops


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


def step_ops(shapes: Sequence[LayerShape], plan: Any = None, *, batch: float, base: str = "bf16", dp: bool = True,
             optimizer: str = "sgd", clipping: str = DEFAULT_CLIPPING) -> list[Op]:
    """Every op of one training step with ``batch`` examples (expected batch under Poisson sampling) on one
    device (with N data-parallel devices, pass the per-device batch).

    ``shapes``: all leaf layers from :func:`dpquant_sim.nn.shapes.trace_layers`. ``plan``: EpochPlan or
    {layer: recipe}; layers not in it run in ``base`` precision. ``clipping``: the DP clipping algorithm
    (``dpquant_sim.clipping_rules.CLIPPING_ALGORITHMS``; default the engine's).
    """
    from dpquant_sim.cost.clipping import get_clip_cost

    if base not in BASES:
        raise ConfigError("base", base, BASES)
    if not isinstance(batch, (int, float)) or batch <= 0:
        raise ConfigError("batch", batch, "a positive number of examples")
    mapping = plan_mapping(plan, shapes)
    first = first_param_layer(shapes)
    ops: list[Op] = []
    if dp:
        get_clip_cost(clipping)  # one error naming the algorithm, before any op is built
    for s in shapes:
        if s.is_gemm:
            ops += gemm_layer_ops(s, batch, mapping.get(s.name), base=base, dp=dp, needs_dgrad=s.name != first,
                                  clipping=clipping)
        else:
            ops += vector_layer_ops(s, batch, base=base, dp=dp, clipping=clipping)
    ops += global_ops(sum(s.params for s in shapes), dp=dp, optimizer=optimizer)
    return ops


@dataclass(frozen=True)
class MemoryFit:
    """Device memory needed by one step (bytes) and whether it fits the usable capacity.

    ``clip_held``: what the clipping algorithm holds from the backward pass until clipping, on top of the saved
    activations (hooks: every per-sample gradient, B x P fp32; book-keeping: every layer's output gradient;
    ghost: quantized layers' output gradients). ``clip_transient``: the largest short-lived buffer of one
    layer's norm or per-sample computation (im2col, Gram matrices, a block of per-sample gradients).
    """

    weights: float
    grads: float
    optimizer_state: float
    activations: float
    clip_held: float
    clip_transient: float
    total: float
    capacity: float | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity


def clip_transient_bytes(shapes: Sequence[LayerShape], batch: float, clipping: str = DEFAULT_CLIPPING) -> float:
    """The largest per-layer transient buffer of ``clipping`` for ``batch`` examples (fp32; plan-independent)."""
    from dpquant_sim.cost.clipping import get_clip_cost

    t = get_clip_cost(clipping).transient_bytes
    return max((t(s, batch) for s in shapes if s.params > 0), default=0.0)


def memory_bytes(shapes: Sequence[LayerShape], plan: Any = None, *, batch: float, base: str = "bf16",
                 dp: bool = True, optimizer: str = "sgd", capacity: float | None = None,
                 clipping: str = DEFAULT_CLIPPING) -> MemoryFit:
    """Weights (fp32 master + low-precision copies), grads, optimizer state, saved activations and, under DP,
    what the clipping algorithm holds until clipping plus its largest transient buffer."""
    from dpquant_sim.cost.clipping import get_clip_cost
    from dpquant_sim.nn.config import hw_class

    mapping = plan_mapping(plan, shapes)
    fb = _bytes_per(base)
    P = sum(s.params for s in shapes)
    weights = 4.0 * P
    acts = held = 0.0
    algo = get_clip_cost(clipping) if dp else None
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
            if algo is not None:
                held += algo.held_bytes(s, batch, layer_operands(s, batch, cfg, base=base))
        else:
            if s.kind not in FREE_KINDS:
                acts += batch * (s.out_numel if "relu" in s.kind or "pool" in s.kind else s.in_numel) * fb
            if algo is not None and s.params > 0:
                held += algo.held_bytes(s, batch, None)
    opt = {"sgd": 0, "momentum": 1, "adam": 2}[optimizer] * 4.0 * P
    transient = clip_transient_bytes(shapes, batch, clipping) if dp else 0.0
    total = weights + 4.0 * P + opt + acts + held + transient
    return MemoryFit(weights, 4.0 * P, opt, acts, held, transient, total, capacity)
