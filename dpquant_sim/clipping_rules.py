"""The DP clipping algorithms and which per-sample norm method each uses for a layer (no torch: the engine and
the cost model both import this, so they cannot disagree).

Every algorithm computes the same clipped sum  S = sum_i c_i g_i,  c_i = min(1, C / (||g_i|| + 1e-6)), where g_i
is example i's gradient of the quantized computation; they differ in how ||g_i|| and S are obtained:

=========  ===================================================================================================
hooks      Opacus hooks mode: every layer's per-sample gradients g_i are materialised (B x params), normed,
           clipped and summed.
ghost      Two backward passes (Goodfellow 2015; Li et al. 2022; Opacus ``grad_sample_mode="ghost"``): pass 1
           computes ||g_i|| by the ghost-norm identity from each layer's input and output gradient; pass 2
           back-propagates sum_i c_i loss_i. Quantized layers *replay* c_i q(dy_i) recorded in pass 1 (a new
           quantization would re-draw stochastic rounding, and q(c dy) != c q(dy) for power-of-two scales).
bk         Book-keeping (Bu et al. 2023): one backward pass; ghost norms from the kept (quantized) input and
           output gradient, then S per layer as one weighted GEMM  sum_i c_i q(dy_i)^T q(x_i).
mixed      Book-keeping with a per-layer choice of norm method (Bu et al. 2022, mixed ghost clipping): the
           ghost norm where it is cheaper in space, per-sample instantiation elsewhere (``norm_method``).
=========  ===================================================================================================

A layer's per-example GEMM is  g_i = dY_i^T X_i  with X_i: T x d (T = tokens or conv output positions,
d = in_features or C_in/groups * kh * kw) and dY_i: T x p (p = out_features or C_out/groups).

>>> norm_method(T=1, d=512, p=10)            # a linear layer: the ghost norm is a product of two norms
'ghost'
>>> norm_method(T=32 * 32, d=27, p=64)       # a first conv on CIFAR: T^2 >> d p
'materialize'
>>> [norm_method(T, d, p, algorithm="bk") for (T, d, p) in [(1024, 27, 64)]]
['ghost']
"""

from __future__ import annotations

from typing import Literal

NormMethod = Literal["ghost", "materialize"]
ClippingName = Literal["hooks", "ghost", "bk", "mixed"]

CLIPPING_ALGORITHMS: tuple[str, ...] = ("hooks", "ghost", "bk", "mixed")
"""Every exact clipping algorithm, in the order tables list them."""

DEFAULT_CLIPPING: str = "mixed"
"""The default: the fastest exact algorithm measured on CPU (docs/benchmarks.md), and the only one whose cost
stays bounded on large feature maps (pure ghost norms need T^2 per example)."""


def norm_method(T: int, d: int, p: int, *, algorithm: str = "mixed") -> NormMethod:
    """How ``algorithm`` computes one layer's per-sample gradient norm.

    Args:
        T: rows of the per-example GEMM (1 for a plain linear layer; H_out * W_out for a conv).
        d: input width of the per-example GEMM (in_features, or C_in/groups * kh * kw).
        p: output width (out_features, or C_out/groups).
        algorithm: one of CLIPPING_ALGORITHMS.

    Returns:
        'ghost' (norm from the T x T Gram matrices of the input and output gradient: space ~ 2 T^2, time
        ~ T^2 (d + p)) or 'materialize' (the p x d per-sample gradient: space ~ p d, time ~ T d p).
        ``mixed`` picks ghost when 2 T^2 < p d, the space criterion of Bu et al. 2022 (for T = 1 ghost always
        wins: it is the product of two vector norms).
    """
    if algorithm == "hooks":
        return "materialize"
    if algorithm in ("ghost", "bk"):
        return "ghost"
    if algorithm == "mixed":
        return "ghost" if 2 * T * T < p * d or T == 1 else "materialize"
    from dpquant_sim.errors import ConfigError

    raise ConfigError("clipping", algorithm, CLIPPING_ALGORITHMS)
