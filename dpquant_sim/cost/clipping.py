"""Per-layer cost of DP per-sample clipping, one entry per clipping algorithm (a registry).

What DP-SGD adds to a layer's step depends on how the per-example gradient norms and the clipped sum are
computed. Each algorithm says, for one quantizable layer with B examples:

* ``wgrad``: the weight-gradient GEMM(s) it runs instead of the plain dW = dy^T x;
* ``layer_extras``: its other per-layer work (per-sample bias grads, norms, clip-scale-and-sum);
* ``held_bytes``: the memory it holds until clipping (per-sample gradients, stashed operands);
* ``full_backward_before_clip``: whether the clip factors need every layer's norm first, so nothing of the
  clipped sum (and no gradient all-reduce) can start before the whole backward pass has ended.

Only ``hooks`` is implemented today (the engine's path: Opacus hooks materialise every per-sample gradient).
Ghost clipping, book-keeping and mixed register here under their own names, beside the engine's algorithms of
the same names, so the cost model and the engine cannot disagree on the set.

>>> sorted(CLIP_COST)
['hooks']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from dpquant_sim.errors import ConfigError

if TYPE_CHECKING:  # torch-free at import
    from dpquant_sim.cost.flops import Op
    from dpquant_sim.nn.shapes import LayerShape


@dataclass(frozen=True)
class GemmOperands:
    """Bytes of one layer's GEMM operands for a batch, as ``gemm_layer_ops`` stores them."""

    x: float  # activations (with their scales)
    dy: float  # output gradients (with their scales)
    precision: str  # precision the weight-gradient GEMM runs in
    quantized: bool


@dataclass(frozen=True)
class ClipAlgorithmCost:
    """Cost functions of one clipping algorithm (see the module docstring)."""

    name: str
    wgrad: Callable[["LayerShape", float, GemmOperands], list["Op"]]
    layer_extras: Callable[["LayerShape", float], list["Op"]]
    held_bytes: Callable[["LayerShape", float], float]
    full_backward_before_clip: bool
    note: str = ""


CLIP_COST: dict[str, ClipAlgorithmCost] = {}


def register_clip_cost(c: ClipAlgorithmCost) -> ClipAlgorithmCost:
    CLIP_COST[c.name] = c
    return c


def get_clip_cost(name: str) -> ClipAlgorithmCost:
    if name not in CLIP_COST:
        raise ConfigError("clipping", name, tuple(CLIP_COST))
    return CLIP_COST[name]


def _weight_numel(s: "LayerShape") -> int:
    m, k, n = s.gemm_mnk if s.gemm_mnk else (0, 0, 0)
    return math.prod(s.weight_shape) if s.weight_shape else k * n


# ------------------------------------------------------------------------------------------------ hooks
def _hooks_wgrad(s: "LayerShape", batch: float, ops: GemmOperands) -> list["Op"]:
    from dpquant_sim.cost.flops import Op

    m, k, n = s.gemm_mnk
    w_numel = _weight_numel(s)
    # B independent GEMMs dW_i = dy_i^T x_i of N x M x K (Opacus' einsum over unfolded activations), each
    # written as an fp32 per-sample gradient: B x weight numel x 4 bytes.
    return [Op(s.name, "wgrad", "gemm", ops.precision, 2.0 * batch * m * k * n, ops.dy + ops.x + batch * w_numel * 4.0,
               1, ops.quantized, dims=(float(n), float(m), float(k), float(batch)))]


def _hooks_extras(s: "LayerShape", batch: float) -> list["Op"]:
    from dpquant_sim.cost.flops import Op

    if s.params == 0:
        return []
    bp = float(batch * s.params)
    return [
        Op(s.name, "psg_norm", "vector", "vector", 2 * bp, 4 * bp + 4 * batch),
        Op(s.name, "clip_sum", "vector", "vector", 2 * bp, 4 * bp + 4 * s.params + 4 * batch),
    ]


register_clip_cost(ClipAlgorithmCost(
    "hooks", _hooks_wgrad, _hooks_extras, lambda s, batch: 4.0 * batch * s.params, True,
    note="Opacus hooks: per-sample gradients of every parameter materialised in fp32 (B x P) until clipping"))
