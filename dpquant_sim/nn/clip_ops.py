"""Per-layer pieces of exact DP clipping: per-example GEMM operands, per-sample gradient norms (ghost or
materialised) and the clipped sum as one weighted GEMM, keyed by layer type (Opacus's registry pattern).

A layer's per-example weight gradient is  g_i = dY_i^T X_i  (per group), with the operands the layer really
used: for a quantized Q layer the quantized input q(x) and quantized output gradient q(dy) it stashed for the
grad sampler. So every norm and sum here is exact for the quantized computation, and one stochastic-rounding
draw feeds the norm and the sum (nothing is re-quantized).

``layer_ops(module)`` returns the module's :class:`ClipOps`. Q layers (QLinear, QConv2d) have GEMM ops
(ghost norm, materialised norm, weighted-GEMM sum); any other module type with an Opacus grad sampler
(GroupNorm, LayerNorm, ...) gets ops that materialise its (small) per-sample gradients with that sampler.

The Q layers are also registered in Opacus's own norm-sampler registry, so Opacus's ghost clipping on a
converted model gets exact norms in full precision, and a clear ``DPSafetyError`` when a layer is quantized
(Opacus's second backward would re-quantize the output gradient; use ``clipping: ghost`` or ``bk`` here).

Example (a linear layer: the ghost norm of x_i dy_i^T is ||x_i|| ||dy_i||):
    >>> import torch
    >>> from dpquant_sim.nn import QLinear
    >>> layer = QLinear(3, 2, bias=False)
    >>> x, dy = torch.tensor([[3.0, 0.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    >>> ops = layer_ops(layer)
    >>> ops.sq_norms(layer, x, dy, "ghost"), ops.sq_norms(layer, x, dy, "materialize")
    (tensor([25.]), tensor([25.]))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_norm_sampler
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from torch import nn

from dpquant_sim.errors import ConfigError, DPSafetyError
from dpquant_sim.nn.layers import QConv2d, QLinear, row_major

Param = nn.Parameter
Masks = Mapping[Param, torch.Tensor]
BLOCK_ELEMS = 1 << 18  # floor of the transient elements per block of examples (im2col, Gram matrices)


# ------------------------------------------------------------------------------------------------ operands
def gemm_operands(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example GEMM operands of a QLinear / QConv2d: X (B, G, T, d) and dY (B, G, T, p) with
    g_i[group] = dY_i[group]^T X_i[group] of shape (p, d); d in the weight's (channel-major) layout.

    Conv inputs are unfolded (im2col) with the layer's padding mode, stride and dilation; 1x1 maps and any
    stride pattern are read through :func:`row_major` first.
    """
    n = x.shape[0]
    if isinstance(layer, QConv2d):
        xp, padding = _conv_input_and_padding(layer, x.to(dy.dtype))
        # torch's im2col (F.unfold): 1.1-4x faster than Opacus's unfold2d on small maps; channel-major like the
        # weight, (B, C_in*kh*kw, T)
        cols = F.unfold(row_major(xp), layer.kernel_size, dilation=layer.dilation, padding=padding,
                        stride=layer.stride)
        g, length = layer.groups, cols.shape[-1]
        a = cols.reshape(n, g, -1, length).transpose(2, 3)
        d = dy.reshape(n, g, layer.out_channels // g, length).transpose(2, 3)
        return a, d
    a = x.to(dy.dtype).reshape(n, 1, -1, x.shape[-1])
    return a, dy.reshape(n, 1, -1, dy.shape[-1])


def ghost_sq_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """||dY_i^T X_i||_F^2 summed over groups, without forming it: <X_i X_i^T, dY_i dY_i^T> (T x T Gram
    matrices); for T = 1 the product of the two squared vector norms."""
    if a.shape[2] == 1:
        return (a.pow(2).sum(-1) * d.pow(2).sum(-1)).sum((1, 2))
    return ((a @ a.transpose(-1, -2)) * (d @ d.transpose(-1, -2))).sum((1, 2, 3))


def _example_blocks(n: int, per_example: int, budget: int) -> list[slice]:
    """Slices of the batch whose transient buffers (``per_example`` elements per example) stay under
    max(budget, BLOCK_ELEMS) elements: the norm of a layer then never needs more working memory than its own
    operands (an im2col is kh*kw times the input), on top of a small floor that keeps the blocks few."""
    step = max(1, max(budget, BLOCK_ELEMS) // max(per_example, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _conv_input_and_padding(layer: QConv2d, x: torch.Tensor):
    """The conv input padded as the forward did where torch's kernels cannot express it ('same' with odd
    totals, reflect/replicate/circular), and the padding left for the kernel."""
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0, 0)
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return x, (0, 0)
        pads = []
        for k, dil in zip(reversed(layer.kernel_size), reversed(layer.dilation)):  # W first, as F.pad wants
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0, 0)
    return x, layer.padding


def per_sample_weight_grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """(B, *weight.shape) per-sample weight gradients. A conv runs its own weight-gradient kernel once with the
    batch folded into the groups (no im2col in Python: 1.2-2x faster than unfold + einsum on CPU where
    materialising is the cheaper norm); a linear layer is one batched GEMM."""
    n = x.shape[0]
    if isinstance(layer, QConv2d):
        xp, padding = _conv_input_and_padding(layer, x.to(dy.dtype))
        w = layer.weight
        gw = torch.nn.grad.conv2d_weight(
            row_major(xp).reshape(1, n * xp.shape[1], *xp.shape[2:]), (n * w.shape[0], *w.shape[1:]),
            row_major(dy).reshape(1, n * dy.shape[1], *dy.shape[2:]), layer.stride, padding, layer.dilation,
            n * layer.groups)
        return gw.reshape(n, *w.shape)
    a, d = gemm_operands(layer, x, dy)
    return (d.transpose(-1, -2) @ a).reshape(n, *layer.weight.shape)


def _bias_per_sample(layer: nn.Module, dy: torch.Tensor) -> torch.Tensor:
    n = dy.shape[0]
    if isinstance(layer, QConv2d):
        return dy.reshape(n, layer.out_channels, -1).sum(2)
    return dy.reshape(n, -1, dy.shape[-1]).sum(1)


# ------------------------------------------------------------------------------------------------ ops
class ClipOps:
    """What a clipping algorithm needs of one layer type. Subclasses override ``per_sample``, ``record`` and
    ``weighted_sum``.

    ``x``/``dy``: the layer's recorded input and output gradient for a batch of B examples. ``record`` runs in
    the backward hook and returns the squared per-sample norms plus what ``weighted_sum`` will need once every
    layer's norm, hence every clip factor, is known (the operands for a GEMM layer, the small per-sample
    gradients for a norm layer), so nothing is computed twice.
    """

    def per_sample(self, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[Param, torch.Tensor]:
        """Materialised per-sample gradients {param: (B, *param.shape)} of the trainable parameters."""
        raise NotImplementedError

    def record(self, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, method: str,
               masks: Masks | None = None) -> tuple[torch.Tensor, Any]:
        """(squared per-sample gradient norm over the layer's trainable parameters, shape (B,); the state
        ``weighted_sum`` needs). ``method``: 'ghost' or 'materialize' (``clipping_rules.norm_method``).
        ``masks`` (param -> bool, param's shape) apply before the norm (pruning / gradient dropping), which
        needs the materialised gradients of the masked parameters."""
        raise NotImplementedError

    def weighted_sum(self, layer: nn.Module, state: Any, c: torch.Tensor) -> dict[Param, torch.Tensor]:
        """sum_i c_i g_i per trainable parameter (masks are applied by the caller: sum of masked = masked sum)."""
        raise NotImplementedError

    def sq_norms(self, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, method: str,
                 masks: Masks | None = None) -> torch.Tensor:
        """Just the squared per-sample norms of ``record``."""
        return self.record(layer, x, dy, method, masks)[0]


def _trainable(layer: nn.Module) -> list[tuple[str, Param]]:
    return [(n, p) for n, p in layer.named_parameters(recurse=False) if p.requires_grad]


def _flat_sq(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).pow(2).sum(1)


class GemmClipOps(ClipOps):
    """QLinear / QConv2d: ghost norm from the Gram matrices, or the materialised p x d gradient; the clipped sum
    as one weighted GEMM on the kept operands."""

    def per_sample(self, layer, x, dy):
        out: dict[Param, torch.Tensor] = {}
        n = x.shape[0]
        if layer.weight.requires_grad:
            out[layer.weight] = per_sample_weight_grads(layer, x, dy)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = _bias_per_sample(layer, dy)
        return out

    def record(self, layer, x, dy, method, masks=None):
        n = x.shape[0]
        total = dy.new_zeros(n)
        masks = masks or {}
        w, b = layer.weight, layer.bias
        if w.requires_grad:
            if method not in ("ghost", "materialize"):
                raise ConfigError("norm method", method, ("ghost", "materialize"))
            T, d, p = _dims(layer, x, dy)
            ghost = method == "ghost" and w not in masks
            per_example = T * d + 2 * T * T if ghost else p * d * (1 if isinstance(layer, QConv2d) else 2) + T * d
            parts = []
            for sl in _example_blocks(n, per_example, max(x.numel(), dy.numel())):
                if ghost:
                    parts.append(ghost_sq_norms(*gemm_operands(layer, x[sl], dy[sl])))
                else:
                    gw = per_sample_weight_grads(layer, x[sl], dy[sl])
                    if w in masks:
                        gw = gw * masks[w].to(gw.dtype)
                    parts.append(_flat_sq(gw))
            if parts:  # none for an empty batch
                total = total + torch.cat(parts)
        if b is not None and b.requires_grad:
            gb = _bias_per_sample(layer, dy)
            if b in masks:
                gb = gb * masks[b].to(dy.dtype)
            total = total + gb.pow(2).sum(1)
        return total, (x, dy)

    def weighted_sum(self, layer, state, c):
        x, dy = state
        out: dict[Param, torch.Tensor] = {}
        cd = dy * c.to(dy.dtype).reshape(-1, *([1] * (dy.dim() - 1)))
        if layer.weight.requires_grad:
            # one GEMM over (examples x rows): sum_i c_i dY_i^T X_i -- for a conv the layer's own wgrad kernel
            # with the re-weighted output gradient (no im2col)
            if isinstance(layer, QConv2d):
                xp, padding = _conv_input_and_padding(layer, x.to(cd.dtype))
                out[layer.weight] = torch.nn.grad.conv2d_weight(xp, layer.weight.shape, cd, layer.stride, padding,
                                                                layer.dilation, layer.groups)
            else:
                a, d = gemm_operands(layer, x, cd)
                out[layer.weight] = torch.einsum("bgtp,bgtd->gpd", d, a).reshape(layer.weight.shape)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = _bias_per_sample(layer, cd).sum(0)
        return out


class SamplerClipOps(ClipOps):
    """Any module with an Opacus grad sampler (GroupNorm, LayerNorm, ...): its per-sample gradients are small
    (B x params), so they are materialised once, normed, and kept for the weighted sum."""

    def __init__(self, sampler: Callable):
        self.sampler = sampler

    def per_sample(self, layer, x, dy):
        if x.shape[0] == 0:
            return {p: dy.new_zeros((0, *p.shape)) for _, p in _trainable(layer)}
        gs = self.sampler(layer, [x], dy)
        return {p: gs[p] for _, p in _trainable(layer) if p in gs}

    def record(self, layer, x, dy, method, masks=None):
        masks = masks or {}
        gs = self.per_sample(layer, x, dy)
        total = dy.new_zeros(x.shape[0])
        for p, g in gs.items():
            total = total + _flat_sq(g * masks[p].to(g.dtype) if p in masks else g)
        return total, gs

    def weighted_sum(self, layer, state, c):
        return {p: torch.einsum("b,b...->...", c.to(g.dtype), g) for p, g in state.items()}


CLIP_OPS: dict[type[nn.Module], ClipOps] = {QLinear: GemmClipOps(), QConv2d: GemmClipOps()}
"""Exact module type -> ops (as Opacus looks grad samplers up by exact type)."""


def register_clip_ops(*types: type[nn.Module]):
    """Class decorator: register a ClipOps subclass (instantiated once) for these module types."""

    def deco(cls: type[ClipOps]) -> type[ClipOps]:
        for t in types:
            CLIP_OPS[t] = cls()
        return cls

    return deco


def layer_ops(module: nn.Module) -> ClipOps:
    """The ClipOps of ``module``'s exact type: registered ones first, else Opacus's grad sampler."""
    ops = CLIP_OPS.get(type(module))
    if ops is not None:
        return ops
    sampler = GradSampleHooks.GRAD_SAMPLERS.get(type(module))
    if sampler is None:
        raise ConfigError(
            "module", type(module).__name__,
            "a layer with a registered per-sample gradient (QLinear, QConv2d, or any module Opacus has a grad "
            "sampler for, e.g. GroupNorm); convert the model with dpquant_sim.nn.convert_model")
    return SamplerClipOps(sampler)


def _dims(layer, x, dy) -> tuple[int, int, int]:
    return shape_dims(layer, tuple(x.shape), tuple(dy.shape))


def shape_dims(layer: nn.Module, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(T, d, p) of a Q layer's per-example GEMM from its input and output shapes (batch dim first)."""
    if isinstance(layer, QConv2d):
        g = layer.groups
        kh, kw = layer.kernel_size
        return int(y_shape[2] * y_shape[3]), layer.in_channels // g * kh * kw, layer.out_channels // g
    t = 1
    for s in x_shape[1:-1]:
        t *= int(s)
    return t, int(x_shape[-1]), int(y_shape[-1])


# ---------------------------------------------------------------- Opacus's own norm registry (ghost mode)
@register_norm_sampler([QLinear, QConv2d])
def compute_q_norm_sample(layer, activations, backprops) -> dict[Param, torch.Tensor]:
    """Opacus ghost-mode norm sampler: per-parameter per-sample norms of a full-precision Q layer. A quantized
    layer is refused: Opacus's second backward would quantize the re-weighted output gradient again (new
    stochastic-rounding draws; and q(c dy) != c q(dy) for power-of-two scales), so the summed gradient would
    not be the one whose norm was bounded."""
    if layer.qconfig is not None:
        raise DPSafetyError(
            f"{type(layer).__name__} is quantized ({layer.qconfig.name}): Opacus's ghost clipping re-runs the "
            "backward pass, which re-quantizes the output gradient, so the clipped sum would not be the one "
            "whose per-sample norms were bounded and the run would not be DP. Train with dpquant-sim's "
            "clipping: ghost (replays the recorded quantized gradients) or clipping: bk (one backward pass).")
    x, dy = activations[0], backprops
    out: dict[Param, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = ghost_sq_norms(*gemm_operands(layer, x, dy)).clamp_min(0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = _bias_per_sample(layer, dy).norm(2, dim=1)
    return out
