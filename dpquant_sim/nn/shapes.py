"""Layer shapes of a model, traced once with a batch-1 forward pass.

The cost model and the schedules read these; nothing here trains or quantizes.

>>> import torch.nn as tnn
>>> m = tnn.Sequential(tnn.Flatten(), tnn.Linear(64, 10))
>>> [(s.name, s.kind, s.gemm_mnk, s.forward_flops) for s in trace_layers(m, (1, 8, 8)) if s.is_gemm]
[('1', 'linear', (1, 64, 10), 1280)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerShape:
    """One leaf module's shapes for a single example (no batch dimension).

    Attributes:
        name: module name as in ``model.named_modules()``.
        kind: lower-case module class family ('linear', 'conv2d', 'groupnorm', 'relu', 'maxpool2d', ...).
        in_shape / out_shape: per-example input/output shape.
        weight_shape: shape of ``.weight`` or None. has_bias: whether a bias parameter exists.
        params: number of parameters owned directly by the module.
        gemm_mnk: for GEMM layers, (M, K, N) of the forward GEMM per example: M output positions
            (tokens for Linear, H_out*W_out for conv), K reduction length (in_features, or
            C_in/groups*kh*kw), N output features (out_features, or C_out). None otherwise.
        groups: conv groups (1 for Linear).
    """

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None
    has_bias: bool
    params: int
    gemm_mnk: tuple[int, int, int] | None = None
    groups: int = 1

    @property
    def is_gemm(self) -> bool:
        """True for Linear and Conv2d (the quantizable layers)."""
        return self.gemm_mnk is not None

    @property
    def forward_flops(self) -> int:
        """Forward GEMM FLOPs per example (2 x multiply-accumulates); 0 for non-GEMM layers."""
        if self.gemm_mnk is None:
            return 0
        m, k, n = self.gemm_mnk
        return 2 * m * k * n

    @property
    def in_numel(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape)


def _kind(module: nn.Module) -> str:
    for base in (nn.Linear, nn.Conv2d, nn.Conv1d, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d):
        if isinstance(module, base):
            return base.__name__.lower()
    return type(module).__name__.lower()


def trace_layers(model: nn.Module, input_shape: tuple[int, ...], *, dtype=torch.float32) -> list[LayerShape]:
    """Run one batch-1 forward pass and record every leaf module's shapes, in call order.

    Args:
        model: any nn.Module taking a (batch, *input_shape) tensor.
        input_shape: per-example input shape, e.g. (3, 32, 32) or (64,).
    """
    records: list[LayerShape] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def hook(module, inputs, output):
        x = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        w = getattr(module, "weight", None)
        b = getattr(module, "bias", None)
        in_shape, out_shape = tuple(x.shape[1:]), tuple(output.shape[1:])
        mnk, groups = None, 1
        if isinstance(module, nn.Linear):
            mnk = (math.prod(in_shape[:-1]) if len(in_shape) > 1 else 1, module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            groups = module.groups
            kh, kw = module.kernel_size
            mnk = (out_shape[-1] * out_shape[-2], module.in_channels // groups * kh * kw, module.out_channels)
        records.append(
            LayerShape(
                name=names[module],
                kind=_kind(module),
                in_shape=in_shape,
                out_shape=out_shape,
                weight_shape=tuple(w.shape) if isinstance(w, torch.Tensor) else None,
                has_bias=isinstance(b, torch.Tensor),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                gemm_mnk=mnk,
                groups=groups,
            )
        )

    for m in model.modules():
        if len(list(m.children())) == 0:
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters(), None)
            device = p.device if p is not None else "cpu"
            model(torch.zeros((1, *input_shape), dtype=dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return records


def gemm_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerShape]:
    """Only the quantizable (Linear/Conv2d) layers, in call order."""
    return [s for s in trace_layers(model, input_shape) if s.is_gemm]
