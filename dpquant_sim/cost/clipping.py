"""Per-layer cost of DP per-sample clipping, one entry per clipping algorithm (a registry).

Every exact algorithm computes the same clipped sum (``dpquant_sim.clipping_rules``); they differ in what they
run to get the per-example norms and the sum. Each entry describes the engine's implementation
(``dpquant_sim.training.clipping``, ``dpquant_sim.nn.clip_ops``) kernel by kernel, for one layer and B examples:

* ``gemm_backward(shape, B, operands, first)``: everything a Linear/Conv2d layer runs after its forward GEMM:
  input-gradient GEMM(s), norms, weight-gradient or per-sample GEMMs, bias reductions, clip scaling;
* ``param_layer(shape, B, base_bytes)``: the DP work of a non-GEMM layer with parameters (GroupNorm);
* ``held_bytes(shape, B, operands)``: what it holds from the backward pass until clipping (on top of the saved
  activations), summed over layers; ``transient_bytes(shape, B)``: its largest short-lived buffer in one
  layer (im2col, Gram matrices, a block of per-sample gradients), of which only the largest layer's counts;
* ``backward_passes``: how often non-GEMM layers are back-propagated (ghost: twice);
* ``allreduce_overlap``: the phase whose time a data-parallel gradient all-reduce can hide behind (None: it
  starts after the whole clipped sum exists).

Op phases: ``bwd`` (the backward pass that computes norms), ``clip`` (work that needs the clip factors, i.e.
every layer's norm, and produces the clipped sum layer by layer: book-keeping's weighted GEMMs, ghost's second
backward pass), ``step`` (after the sum: noise, optimizer; hooks' clip-and-accumulate over all per-sample
gradients).

============  ==================================================================================================
``hooks``     Opacus hooks: autograd's plain backward (input gradients except the first layer's, the batch
              weight gradient dW = dy^T x, which the DP optimizer then discards), and in each layer's backward
              hook Opacus's grad sampler: conv im2col (``unfold2d``: a padded copy, then the unfolded copy),
              B per-sample GEMMs (a linear layer's T = 1 outer products are a broadcasting multiply), written in
              fp32 and held (B x P); at the optimizer step per-sample norms (reads B x P) and the clipped sum
              (one einsum per parameter, reads B x P).
``bk``        One backward pass w.r.t. the input (so the first layer's input gradient is computed too and no
              parameter gradient): in each layer's hook the ghost norm (conv im2col by ``F.unfold``, the T x T
              Gram matrices of X and dY per example, their dot product; for T = 1 the product of two vector
              norms); after it, per layer: dy scaled by c, ONE weighted weight-gradient GEMM
              sum_i c_i dy_i^T x_i on the kept operands (conv: the layer's own wgrad kernel, no im2col), bias sum.
``mixed``     As ``bk``, with the norm per layer from ``clipping_rules.norm_method``: where 2 T^2 >= p d the
              per-sample gradient is materialised by the conv weight-gradient kernel with the batch folded into
              the groups (no im2col) and normed, in blocks of examples.
``ghost``     Pass 1 as ``bk`` (ghost norms everywhere; only quantized layers keep q(dy)), then a second full
              backward pass of sum_i c_i loss_i through the kept graph: input gradients (all but the first
              layer), the batch weight gradient, non-GEMM layers again; quantized layers replay c_i q(dy_i).
============  ==================================================================================================

Norm-layer parameters (GroupNorm) are materialised per sample by Opacus's grad sampler under every algorithm.
Precisions: a GEMM reading quantized operands runs at the class of its wider operand
(``LayerQuantConfig.gemm_precisions``); the Gram matrices X X^T and dY dY^T at the activation's and the
gradient's class. The weighted GEMM reads c_i q(dy_i) in q(dy)'s format: c_i folds into the per-sample fp32
scale of sample-scaled and NVFP4 gradients; MX's power-of-two block scales cannot absorb it exactly, and the
model charges the recipe's precision there too (a stated approximation).

>>> sorted(CLIP_COST)
['bk', 'ghost', 'hooks', 'mixed']
>>> parse_clipping("all")
('hooks', 'ghost', 'bk', 'mixed')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dpquant_sim.clipping_rules import (
    CLIPPING_ALGORITHMS, DEFAULT_CLIPPING, norm_block_examples, norm_elems_per_example, norm_method,
)
from dpquant_sim.errors import ConfigError

if TYPE_CHECKING:  # torch-free at import
    from dpquant_sim.cost.flops import Op
    from dpquant_sim.nn.shapes import LayerShape

FP32 = 4.0


@dataclass(frozen=True)
class GemmOperands:
    """One GEMM layer's tensors for a batch, as ``flops.layer_operands`` stores them (bytes include scales).

    ``x_elem``: bytes per stored activation element (an im2col copy moves elements of this size).
    """

    x: float  # activations
    dy: float  # output gradients
    w: float  # weight (low-precision copy)
    dx: float  # input gradient written by dgrad (base precision)
    x_elem: float
    fwd_precision: str
    dgrad_precision: str
    wgrad_precision: str
    gram_x_precision: str  # X X^T
    gram_dy_precision: str  # dY dY^T
    quantized: bool


@dataclass(frozen=True)
class ClipAlgorithmCost:
    """Cost functions of one clipping algorithm (see the module docstring)."""

    name: str
    gemm_backward: Callable[["LayerShape", float, GemmOperands, bool], list["Op"]]
    param_layer: Callable[["LayerShape", float, float], list["Op"]]
    held_bytes: Callable[["LayerShape", float, "GemmOperands | None"], float]
    transient_bytes: Callable[["LayerShape", float], float]
    backward_passes: int
    allreduce_overlap: str | None
    note: str = ""


CLIP_COST: dict[str, ClipAlgorithmCost] = {}


def register_clip_cost(c: ClipAlgorithmCost) -> ClipAlgorithmCost:
    """Add an algorithm's cost functions under its engine name."""
    CLIP_COST[c.name] = c
    return c


def get_clip_cost(name: str) -> ClipAlgorithmCost:
    if name not in CLIP_COST:
        raise ConfigError("clipping", name, tuple(CLIP_COST))
    return CLIP_COST[name]


def parse_clipping(value: Any, field: str = "clipping") -> tuple[str, ...]:
    """Clipping algorithm names from 'all', 'hooks,bk', a name or a list of names (order kept, duplicates
    dropped); None gives the engine's default. One ConfigError naming ``field`` for anything else.

    >>> parse_clipping("bk,hooks"), parse_clipping(None)
    (('bk', 'hooks'), ('mixed',))
    """
    if value is None:
        return (DEFAULT_CLIPPING,)
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None:
        raise ConfigError(field, value, ("all", *CLIPPING_ALGORITHMS))
    names: list[str] = []
    for item in items:
        for n in str(item).split(","):
            n = n.strip()
            if not n:
                continue
            if n == "all":
                names += CLIPPING_ALGORITHMS
            elif n not in CLIP_COST:
                raise ConfigError(field, n, ("all", *CLIPPING_ALGORITHMS))
            else:
                names.append(n)
    if not names:
        raise ConfigError(field, value, ("all", *CLIPPING_ALGORITHMS))
    return tuple(dict.fromkeys(names))


def overlap_phase(dp: bool, clipping: str) -> str | None:
    """The op phase a data-parallel gradient all-reduce overlaps with: the backward pass without DP (buckets
    reduced as gradients appear); under DP the clipping algorithm's ``allreduce_overlap`` (book-keeping's
    weighted GEMMs and ghost's second backward pass produce the clipped sum layer by layer; hooks has it only
    after clip-and-accumulate over all per-sample gradients: None, fully exposed)."""
    return get_clip_cost(clipping).allreduce_overlap if dp else "bwd"


# ------------------------------------------------------------------------------------------------ shapes
def layer_dims(s: "LayerShape") -> tuple[int, int, int, int]:
    """(T, d, p, groups) of a GEMM layer's per-example weight-gradient GEMM g_i = dY_i^T X_i per group:
    T rows (tokens or conv output positions), d = K (C_in/groups kh kw or in_features), p = C_out/groups."""
    m, k, n = s.gemm_mnk
    g = max(int(s.groups), 1)
    return int(m), int(k), int(n) // g, g


def _weight_numel(s: "LayerShape") -> int:
    m, k, n = s.gemm_mnk if s.gemm_mnk else (0, 0, 0)
    return math.prod(s.weight_shape) if s.weight_shape else k * n


def _is_conv(s: "LayerShape") -> bool:
    return s.kind == "conv2d"


def _op(s: "LayerShape", op: str, flops: float, nbytes: float, phase: str, *, precision: str = "vector",
        dims=None, quantized: bool = False) -> "Op":
    from dpquant_sim.cost.flops import Op

    kind = "vector" if precision == "vector" else "gemm"
    return Op(s.name, op, kind, precision, float(flops), float(nbytes), 1, quantized,
              dims=None if dims is None else tuple(float(v) for v in dims), phase=phase)


# ------------------------------------------------------------------------------------------------ kernels
def dgrad_op(s, B, o: GemmOperands, *, op: str = "dgrad", phase: str = "bwd") -> "Op":
    """dx[BM, K] = dy[BM, N] W[N, K]."""
    m, k, n = s.gemm_mnk
    return _op(s, op, 2.0 * B * m * k * n, o.dy + o.w + o.dx, phase, precision=o.dgrad_precision,
               dims=(B * m, n, k, 1), quantized=o.quantized)


def wgrad_op(s, B, o: GemmOperands, *, phase: str = "bwd") -> "Op":
    """dW[N, K] = dy^T[N, BM] x[BM, K] over the whole batch (autograd's, or the clipped sum with c in dy)."""
    m, k, n = s.gemm_mnk
    return _op(s, "wgrad", 2.0 * B * m * k * n, o.dy + o.x + _weight_numel(s) * FP32, phase,
               precision=o.wgrad_precision, dims=(n, B * m, k, 1), quantized=o.quantized)


def _bias(s) -> int:
    return s.params - _weight_numel(s)


def bias_sum_op(s, B, o: GemmOperands, op: str, phase: str) -> list["Op"]:
    """A bias gradient: dy reduced over examples and positions."""
    bias = _bias(s)
    if bias <= 0:
        return []
    m, _, n = s.gemm_mnk
    return [_op(s, op, B * m * n, o.dy + bias * FP32, phase)]


def bias_psg_op(s, B, o: GemmOperands, *, with_norm: bool) -> list["Op"]:
    """Per-sample bias gradients (dy reduced over positions, per example), and their squared norms."""
    bias = _bias(s)
    if bias <= 0:
        return []
    m, _, n = s.gemm_mnk
    flops = B * m * n + (2.0 * B * bias if with_norm else 0.0)
    return [_op(s, "psg", flops, o.dy + B * bias * FP32 * (2 if with_norm else 1), "bwd")]


def im2col_op(s, B, o: GemmOperands, *, padded_copy: bool) -> list["Op"]:
    """A conv input unfolded into (C_in kh kw) x T columns per example: reads the input, writes the columns.
    Opacus's ``unfold2d`` first pads a copy of the input (``padded_copy``); ``F.unfold`` pads on the fly."""
    if not _is_conv(s):
        return []
    T, d, _, g = layer_dims(s)
    cols = B * g * d * T * o.x_elem
    inp = B * s.in_numel * o.x_elem
    return [_op(s, "im2col", 0.0, (3 * inp if padded_copy else inp) + cols, "bwd")]


def _x_read(s, B, o: GemmOperands) -> float:
    """Bytes a per-example GEMM reads for X: the im2col columns of a conv, the activations of a linear layer."""
    if _is_conv(s):
        T, d, _, g = layer_dims(s)
        return B * g * d * T * o.x_elem
    return o.x


def per_sample_wgrad_op(s, B, o: GemmOperands, *, x_bytes: float) -> "Op":
    """B per-example weight gradients dW_i = dy_i^T x_i, written in fp32 (B x weight numel x 4 bytes). A linear
    layer with T = 1 has outer products (a broadcasting multiply, a vector op); otherwise B x groups batched
    p x T x d GEMMs."""
    T, d, p, g = layer_dims(s)
    out = B * _weight_numel(s) * FP32
    if T == 1 and not _is_conv(s):
        return _op(s, "psg_wgrad", B * d * p * g, x_bytes + o.dy + out, "bwd")
    return _op(s, "psg_wgrad", 2.0 * B * T * d * p * g, x_bytes + o.dy + out, "bwd", precision=o.wgrad_precision,
               dims=(p, T, d, B * g), quantized=o.quantized)


def psg_norm_op(s, B, numel: float, phase: str) -> "Op":
    """Squared per-sample norms of B x ``numel`` fp32 per-sample gradients (square and add each entry)."""
    return _op(s, "psg_norm", 2.0 * B * numel, FP32 * B * numel + FP32 * B, phase)


def clip_sum_op(s, B, numel: float, phase: str) -> "Op":
    """sum_i c_i g_i over B x ``numel`` fp32 per-sample gradients (an einsum 'i,i...' per parameter)."""
    return _op(s, "clip_sum", 2.0 * B * numel, FP32 * B * numel + FP32 * numel + FP32 * B, phase)


def ghost_norm_ops(s, B, o: GemmOperands) -> list["Op"]:
    """||dY_i^T X_i||^2 without forming it: conv im2col (F.unfold), then the T x T Gram matrices X_i X_i^T and
    dY_i dY_i^T per example and group (fp32 out) and their dot product (a multiply kernel writing the product,
    then a sum); for T = 1 the product of the two squared vector norms."""
    T, d, p, g = layer_dims(s)
    ops = im2col_op(s, B, o, padded_copy=False)
    if T == 1:
        return ops + [_op(s, "ghost_norm", 2.0 * B * g * (d + p) + B * g, _x_read(s, B, o) + o.dy + FP32 * B, "bwd")]
    gram = B * g * T * T
    return ops + [
        _op(s, "gram_x", 2.0 * gram * d, _x_read(s, B, o) + FP32 * gram, "bwd", precision=o.gram_x_precision,
            dims=(T, d, T, B * g), quantized=o.quantized),
        _op(s, "gram_dy", 2.0 * gram * p, o.dy + FP32 * gram, "bwd", precision=o.gram_dy_precision,
            dims=(T, p, T, B * g), quantized=o.quantized),
        _op(s, "ghost_norm", 2.0 * gram, 4 * FP32 * gram + FP32 * B, "bwd"),
    ]


def materialized_norm_ops(s, B, o: GemmOperands) -> list["Op"]:
    """The per-sample gradient formed (conv: the layer's wgrad kernel with the batch folded into its groups,
    reading x itself, no im2col; linear: a batched GEMM) and its squared norm."""
    return [per_sample_wgrad_op(s, B, o, x_bytes=o.x), psg_norm_op(s, B, _weight_numel(s), "bwd")]


def clip_scale_op(s, B, o: GemmOperands) -> "Op":
    """dy_i scaled by c_i (read and write the output gradient)."""
    return _op(s, "clip_scale", B * s.out_numel, 2 * o.dy, "clip")


def norm_transient_bytes(s: "LayerShape", B: float, method: str) -> float:
    """fp32 bytes of one block of the engine's per-layer norm buffers (blocked over examples as
    ``clipping_rules.norm_block_examples`` says)."""
    T, d, p, _ = layer_dims(s)
    per = norm_elems_per_example(T, d, p, method, conv=_is_conv(s))
    budget = int(B * max(s.in_numel, s.out_numel))
    return FP32 * min(B, norm_block_examples(per, budget)) * per


# ------------------------------------------------------------------------------------------------ hooks
def _hooks_gemm(s, B, o, first):
    ops = [] if first else [dgrad_op(s, B, o)]
    ops.append(wgrad_op(s, B, o))  # autograd's batch gradient, replaced by the clipped sum at the step
    ops += bias_sum_op(s, B, o, "bias_grad", "bwd")
    ops += im2col_op(s, B, o, padded_copy=True)
    ops.append(per_sample_wgrad_op(s, B, o, x_bytes=_x_read(s, B, o)))
    ops += bias_psg_op(s, B, o, with_norm=False)
    return ops + [psg_norm_op(s, B, s.params, "step"), clip_sum_op(s, B, s.params, "step")]


def _hooks_param_layer(s, B, fb):
    o = B * s.out_numel
    return [_op(s, "param_grad", 2.0 * o, 2 * o * fb + s.params * FP32, "bwd"),
            _op(s, "psg", 2.0 * o, 2 * o * fb + B * s.params * FP32, "bwd"),
            psg_norm_op(s, B, s.params, "step"), clip_sum_op(s, B, s.params, "step")]


def _hooks_transient(s, B):
    if s.is_gemm and _is_conv(s):
        T, d, _, g = layer_dims(s)
        return FP32 * B * g * d * T  # the unfolded input, alive while the grad sampler runs
    return 0.0


register_clip_cost(ClipAlgorithmCost(
    "hooks", _hooks_gemm, _hooks_param_layer, lambda s, B, o: FP32 * B * s.params, _hooks_transient,
    backward_passes=1, allreduce_overlap=None,
    note="Opacus hooks: per-sample gradients of every parameter materialised in fp32 (B x P) until clipping"))


# ------------------------------------------------------------------------------------------------ book-keeping
def _norm_layer_ops(s, B, fb, *, keep: bool):
    o = B * s.out_numel
    ops = [_op(s, "psg", 2.0 * o, 2 * o * fb + B * s.params * FP32, "bwd"), psg_norm_op(s, B, s.params, "bwd")]
    if keep:  # the kept per-sample gradients, summed with the clip factors after the backward pass
        ops.append(clip_sum_op(s, B, s.params, "clip"))
    return ops


def _bk_like(algorithm: str):
    def gemm(s, B, o, first):
        T, d, p, _ = layer_dims(s)
        method = norm_method(T, d, p, algorithm=algorithm)
        ops = [dgrad_op(s, B, o)]  # every layer: the engine differentiates w.r.t. the model input
        ops += ghost_norm_ops(s, B, o) if method == "ghost" else materialized_norm_ops(s, B, o)
        ops += bias_psg_op(s, B, o, with_norm=True)
        ops += [clip_scale_op(s, B, o), wgrad_op(s, B, o, phase="clip")]
        return ops + bias_sum_op(s, B, o, "bias_sum", "clip")

    def transient(s, B):
        if not s.is_gemm:
            return 0.0
        T, d, p, _ = layer_dims(s)
        return norm_transient_bytes(s, B, norm_method(T, d, p, algorithm=algorithm))

    def held(s, B, o):
        return o.dy if o is not None else FP32 * B * s.params  # kept q(dy); a norm layer's per-sample grads

    return gemm, (lambda s, B, fb: _norm_layer_ops(s, B, fb, keep=True)), held, transient


for _name, _note in (("bk", "book-keeping: one backward pass, ghost norms, one weighted GEMM per layer"),
                     ("mixed", "book-keeping with the per-layer norm method of clipping_rules.norm_method")):
    _g, _p, _h, _t = _bk_like(_name)
    register_clip_cost(ClipAlgorithmCost(_name, _g, _p, _h, _t, backward_passes=1, allreduce_overlap="clip",
                                         note=_note))


# ------------------------------------------------------------------------------------------------ ghost
def _ghost_gemm(s, B, o, first):
    ops = [dgrad_op(s, B, o)]  # pass 1, w.r.t. the model input
    ops += ghost_norm_ops(s, B, o)
    ops += bias_psg_op(s, B, o, with_norm=True)
    if o.quantized:  # c_i q(dy_i) formed for the replay in pass 2: quantization overhead (roofline only)
        ops.append(replace(clip_scale_op(s, B, o), op="replay_scale", theo=False))
    if not first:
        ops.append(dgrad_op(s, B, o, op="dgrad2", phase="clip"))
    ops.append(wgrad_op(s, B, o, phase="clip"))
    return ops + bias_sum_op(s, B, o, "bias_grad", "clip")


def _ghost_param_layer(s, B, fb):
    o = B * s.out_numel
    return _norm_layer_ops(s, B, fb, keep=False) + [
        _op(s, "param_grad", 2.0 * o, 2 * o * fb + s.params * FP32, "clip")]  # pass 2's plain gradient


register_clip_cost(ClipAlgorithmCost(
    "ghost", _ghost_gemm, _ghost_param_layer,
    lambda s, B, o: (o.dy if o.quantized else 0.0) if o is not None else 0.0,
    lambda s, B: norm_transient_bytes(s, B, "ghost") if s.is_gemm else 0.0,
    backward_passes=2, allreduce_overlap="clip",
    note="ghost clipping: ghost norms in pass 1, a second backward pass of sum_i c_i loss_i"))

assert set(CLIP_COST) == set(CLIPPING_ALGORITHMS), "the cost model costs exactly the engine's clipping algorithms"

