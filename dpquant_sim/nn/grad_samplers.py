"""Opacus grad samplers for QLinear and QConv2d (registered on import of ``dpquant_sim.nn``).

Opacus's ``GradSampleModule`` (``grad_sample_mode="hooks"``) calls these with the input it recorded in its
forward hook and the output gradient it recorded in its full backward hook (multiplied by the batch size
after our quantizer ran, if ``loss_reduction="mean"``: the engine therefore sums the loss, so a quantizer
never sees a gradient divided by the realized batch size). A quantized Q layer hands Opacus exactly the quantized tensors (its
forward pre-hook turns x into qx before Opacus's forward hook runs; its backward pre-hook turns dy into qdy
before Opacus's backward hook runs -- see ``dpquant_sim.nn.layers``), so these samplers only do the GEMM and
the result is exact for the quantized computation; in full precision they see the plain tensors.

Opacus looks grad samplers up by exact type, so without this registration a Q layer would silently fall back
to functorch (which re-runs the layer's forward and is wrong for a quantized layer); and Opacus's own conv
sampler tests ``type(layer) is nn.Conv2d`` and would skip the unfold for a subclass. Hence our own.

Supported: hooks mode (the default of ``PrivacyEngine.make_private``), empty batches (Poisson sampling), and
several forward passes before one backward (Opacus accumulates per-sample gradients over them, as for any
layer). Not supported: ``grad_sample_mode`` "ew" (expanded weights), "functorch" (re-runs forward) and
"ghost" (no norm sampler registered).

Example:
    >>> import torch, dpquant_sim.nn as qnn
    >>> from opacus import GradSampleModule
    >>> m = GradSampleModule(qnn.convert_model(torch.nn.Sequential(torch.nn.Linear(4, 2))))
    >>> m(torch.randn(3, 4)).sum().backward()
    >>> m._module[0].weight.grad_sample.shape
    torch.Size([3, 2, 4])
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.utils.tensor_utils import unfold2d

from dpquant_sim.nn.layers import QConv2d, QLinear, row_major


@register_grad_sampler(QLinear)
def compute_qlinear_grad_sample(
    layer: QLinear, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a QLinear: dW_i = qdy_i^T qx_i, db_i = sum over tokens of qdy_i.

    activations[0]: (B, ..., in_features) quantized input; backprops: (B, ..., out_features) quantized dy.
    """
    return compute_linear_grad_sample(layer, list(activations), backprops)


@register_grad_sampler(QConv2d)
def compute_qconv2d_grad_sample(
    layer: QConv2d, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a QConv2d as one grouped GEMM over unfolded (im2col) inputs.

    activations[0]: (B, C_in, H, W) quantized input; backprops: (B, C_out, H_out, W_out) quantized dy.
    Returns dW of shape (B, C_out, C_in/groups, kh, kw) and db of shape (B, C_out); for B = 0 empty tensors
    of those shapes (Opacus's optimizer treats a zero-length grad sample as an empty Poisson batch).
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    ret: dict[torch.nn.Parameter, torch.Tensor] = {}
    want_w = layer.weight.requires_grad
    want_b = layer.bias is not None and layer.bias.requires_grad
    if n == 0:
        if want_w:
            ret[layer.weight] = backprops.new_zeros((0, *layer.weight.shape))
        if want_b:
            ret[layer.bias] = backprops.new_zeros((0, *layer.bias.shape))
        return ret
    padding = layer.padding
    if layer.padding_mode != "zeros":  # reflect/replicate/circular: pad exactly as the forward did
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0, 0)
    # unfold2d builds strides assuming default strides (not merely "contiguous": see layers.row_major)
    cols = unfold2d(row_major(x), kernel_size=layer.kernel_size, padding=padding, stride=layer.stride,
                    dilation=layer.dilation)  # (B, C_in*kh*kw, L), channel-major like the weight
    g = layer.groups
    length = cols.shape[-1]
    dy = backprops.reshape(n, g, layer.out_channels // g, length)
    if want_w:
        gs = torch.einsum("ngol,ngpl->ngop", dy, cols.reshape(n, g, -1, length))
        ret[layer.weight] = gs.reshape(n, *layer.weight.shape)
    if want_b:
        ret[layer.bias] = backprops.reshape(n, layer.out_channels, length).sum(dim=2)
    return ret
