"""Scaled quantization of real-magnitude tensors: per tensor, channel, sample, MX blocks and NVFP4 blocks.

``quantize_scaled`` returns what the hardware would compute after dequantization: ``q(x * s) / s`` (float32),
where ``q`` is :func:`~dpquant_sim.numerics.quantize.quantize` and ``s`` the scale of the element's group.

Scales (all computed in float32):

* ``none``: ``s = 1`` (``x`` is already in the format's range).
* ``tensor`` / ``channel`` / ``sample``: ``s = fmt.max / amax`` over the whole tensor / every index of
  ``channel_dim`` (weights) / every index of dim 0 (activations and gradients; DP-safe). ``amax == 0``
  (or non-finite) leaves the group unscaled. For int formats ``fmt.max`` is qmax (127 for int8), so the
  group maps onto the integer grid.
* ``mx`` (OCP Microscaling spec v1.0): blocks of 32 consecutive elements along the last dim, inside each
  index of dim 0. Shared scale ``X = 2^(floor(log2(block_amax)) - emax_elem)`` stored as E8M0 (exponent
  clamped to [-127, 127]; an all-zero block uses 2^-127), ``emax_elem = floor(log2(fmt.max))`` (8 for
  e4m3, 15 for e5m2, 2 for e2m3 and e2m1, 4 for e3m2, 6 for int8 as MXINT8); elements ``x / X`` are cast
  to ``fmt`` with saturation (the spec's clamp to max normal), result ``q * X``.
* ``nvfp4`` (NVIDIA NVFP4): blocks of 16 along the last dim. A second-level fp32 scale
  ``S = (448 * 6) / amax`` (the e4m3 max times the fp4 max) is computed **per sample (index of dim 0)**
  here, not per tensor, so that no statistic crosses the batch dimension (NVIDIA computes it per tensor;
  per sample is finer and DP-safe). Block scale ``s_b = e4m3(block_amax / 6 * S)`` (RNE, saturating);
  elements ``q = fmt(x * (S / s_b))`` with saturation; result ``q * (s_b / S)``. Any element format can
  be used; NVFP4 proper is ``fp4_e2m1``.

SAWB clipping (``clip="sawb"``, with ``tensor`` / ``channel`` / ``sample`` scaling of ``int4``; the forward
quantizer of LUQ, Chmiel et al. ICLR 2023, after Choi et al. 2018): each group's clipping value is
``c = 12.1 * sqrt(E[x^2]) - 12.2 * E|x|`` (means over the group's elements, accumulated in float64, c rounded
to float32). A group whose elements are all >= 0 (e.g. after a ReLU) is quantized unsigned, to the integers
0..15 times ``c / 15``; any other group signed, to -7..7 times ``c / 7`` (symmetric: the int4 code -8 is not
used, so that q(-x) = -q(x) and a zero-mean group is not biased, as for the amax-scaled int4 here). Elements
beyond the clip saturate; round half to even (``rounding="nearest"``). A group whose c is not positive (its
elements all have the same magnitude, e.g. a single element: then sqrt(E[x^2]) = E|x| and c = -0.1 |x|) falls
back to c = amax; amax 0 or non-finite leaves the group unscaled, as above.

Blocks and per-sample statistics never cross dim 0 ("the batch"); a 0-d or 1-d tensor counts as one
sample. A last dim that is not a multiple of the block is padded with zeros inside the sample (zeros
never change a block's amax) and the padding is stripped from the result (``pad=False`` makes it an
error instead).

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [0.01, 0.02, 0.03, 0.04]])
    >>> [round(v, 5) for v in quantize_scaled(x, "fp8_e4m3", "sample")[1].tolist()]  # row 1's own scale
    [0.01, 0.02, 0.02857, 0.04]
"""

from __future__ import annotations

import torch

from dpquant_sim.errors import ConfigError, check_choice
from dpquant_sim.numerics.formats import Format, IntFormat, get_format
from dpquant_sim.numerics.quantize import OVERFLOWS, ROUNDINGS, _check_tensor, quantize
from dpquant_sim.numerics.spec import CLIPS

SCALINGS = ("none", "tensor", "channel", "sample", "mx", "nvfp4")
MX_BLOCK = 32
NVFP4_BLOCK = 16
_E4M3_MAX = 448.0
_FP4_MAX = 6.0
# SAWB coefficients (c1, c2) per integer bit width: c = c1 * sqrt(E[x^2]) - c2 * E|x|. 4 bits: the values LUQ's
# reference implementation uses (Chmiel et al. 2023; fitted by Choi et al. 2018).
SAWB_COEFFS: dict[int, tuple[float, float]] = {4: (12.1, 12.2)}
SAWB_SCALINGS = ("tensor", "channel", "sample")


def check_sawb(fmt: "str | Format", scaling: str) -> None:
    """Raise ConfigError unless SAWB clipping is defined for ``fmt`` and ``scaling`` (int4; tensor/channel/sample)."""
    f = get_format(fmt)
    if not isinstance(f, IntFormat) or f.nbits not in SAWB_COEFFS:
        raise ConfigError("format", f.name, f"an integer format with SAWB coefficients when clip='sawb': "
                          f"{', '.join(f'int{b}' for b in SAWB_COEFFS)}")
    check_choice("scaling", scaling, SAWB_SCALINGS)


def _group_mean(t: torch.Tensor, keep_dim: int | None) -> torch.Tensor:
    """Mean over all dims (keep_dim None) or over all dims but ``keep_dim`` (keepdim, broadcastable)."""
    if keep_dim is None or t.dim() == 0:
        return t.mean()
    dims = [d for d in range(t.dim()) if d != keep_dim]
    return t.mean(dim=dims, keepdim=True) if dims else t


def sawb_clip(x: torch.Tensor, keep_dim: int | None, bits: int = 4) -> torch.Tensor:
    """SAWB's clipping value ``c1 * sqrt(E[x^2]) - c2 * E|x|`` per group (float32; may be <= 0, see above).

    Groups as in :func:`quantize_scaled`: the whole tensor (``keep_dim`` None) or every index of ``keep_dim``.
    The means are accumulated in float64 so that a group's c does not depend on how the reduction is split
    (a batch of one and its row in a batch give the same float32 c).

    >>> x = torch.tensor([[1.0, -1.0, 3.0, -3.0]])
    >>> round(sawb_clip(x, 0).item(), 4)   # sqrt(E[x^2]) = sqrt(5), E|x| = 2
    2.6564
    """
    c1, c2 = SAWB_COEFFS[bits]
    xd = x.to(torch.float64)
    m2, m1 = _group_mean(xd * xd, keep_dim), _group_mean(xd.abs(), keep_dim)
    return (c1 * m2.sqrt() - c2 * m1).to(torch.float32)


def _apply_sawb(x: torch.Tensor, f: IntFormat, keep_dim: int | None, q) -> torch.Tensor:
    """SAWB-clipped integer quantization per group (see the module docstring); ``q(t, fmt)`` rounds."""
    c = sawb_clip(x, keep_dim, f.nbits)
    amax = _group_amax(x, keep_dim)
    c = torch.where((c > 0) & torch.isfinite(c), c, amax)
    if keep_dim is None or x.dim() == 0:
        unsigned = x.amin() >= 0 if x.numel() else torch.ones((), dtype=torch.bool)
    else:
        dims = [d for d in range(x.dim()) if d != keep_dim]
        unsigned = x.amin(dim=dims, keepdim=True) >= 0 if dims else x >= 0
    qmax_s = float((1 << (f.nbits - 1)) - 1)  # 7
    qmax_u = float((1 << f.nbits) - 1)  # 15
    top = torch.where(unsigned, qmax_u, qmax_s).to(torch.float32)
    ok = (c > 0) & torch.isfinite(c)
    scale = torch.where(ok, top / torch.where(ok, c, 1.0), 1.0)
    y = torch.minimum(torch.maximum(x * scale, -top), top)  # -top only reached by signed groups
    return q(y, _UINT_GRID[f.nbits]) / scale


# The rounding grid of SAWB groups after the clamp above: the integers in [-(2^n - 1), 2^n - 1] (an n+1-bit
# symmetric int), so that unsigned groups reach 0..2^n - 1 and signed ones, already clamped, -qmax..qmax.
_UINT_GRID: dict[int, IntFormat] = {b: IntFormat(f"int{b + 1}", b + 1) for b in SAWB_COEFFS}


def mx_emax(fmt: "str | Format") -> int:
    """Exponent of the largest power of two <= fmt.max (the MX spec's emax_elem)."""
    import math

    return math.floor(math.log2(get_format(fmt).max))


def _group_amax(x: torch.Tensor, keep_dim: int | None) -> torch.Tensor:
    """amax over all dims (keep_dim None) or over all dims but ``keep_dim`` (keepdim, broadcastable)."""
    ax = x.abs()
    if keep_dim is None or x.dim() == 0:
        return ax.amax() if x.numel() else torch.zeros((), dtype=x.dtype)
    dims = [d for d in range(x.dim()) if d != keep_dim]
    return ax.amax(dim=dims, keepdim=True) if dims else ax


def _apply_scale(x, f, amax, q):
    """q(x * s) / s with s = fmt.max / amax; groups with amax 0 or non-finite are left unscaled."""
    ok = (amax > 0) & torch.isfinite(amax)
    # full_like: `scalar / tensor` in torch is reciprocal(tensor) * scalar, which is not correctly rounded
    scale = torch.where(ok, torch.full_like(amax, f.max) / torch.where(ok, amax, 1.0), 1.0)
    return q(x * scale) / scale


def _blocks(x: torch.Tensor, block: int, pad: bool) -> tuple[torch.Tensor, int]:
    """View x as (samples, rows..., nblocks, block) along the last dim, zero-padded inside each sample."""
    n = x.shape[-1]
    rem = n % block
    if rem:
        if not pad:
            raise ConfigError(
                "block_size", block, f"a divisor of the last dim ({n}) when pad=False (or pass pad=True)"
            )
        x = torch.nn.functional.pad(x, (0, block - rem))
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block), n


def _as_samples(x: torch.Tensor) -> torch.Tensor:
    """0-d/1-d tensors are one sample: add a leading dim of size 1."""
    return x.reshape(1, -1) if x.dim() <= 1 else x


def quantize_scaled(
    x: torch.Tensor,
    fmt: "str | Format",
    scaling: str = "tensor",
    *,
    rounding: str = "nearest",
    overflow: str = "saturate",
    generator: torch.Generator | None = None,
    channel_dim: int = 0,
    block_size: int | None = None,
    pad: bool = True,
    backend: str | None = None,
    clip: str = "amax",
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``fmt`` under ``scaling``; returns float32 of ``x``'s shape.

    Args:
        x: floating-point tensor; dim 0 is the batch (sample) dim for "sample", "mx" and "nvfp4".
        fmt: element format name or object.
        scaling: "none", "tensor", "channel", "sample", "mx" or "nvfp4" (see the module docstring).
        rounding, overflow, generator, backend: as in :func:`quantize` (block elements always saturate).
        channel_dim: the channel dim for scaling="channel" (0 = output channels of a weight).
        block_size: override the MX (32) / NVFP4 (16) block length; a positive int.
        pad: zero-pad a last dim that is not a multiple of the block (inside each sample); False -> error.
        clip: "amax" (the group's amax maps to the format's max) or "sawb" (SAWB clipping, int4 with tensor,
            channel or sample scaling; see the module docstring).

    Example:
        >>> x = torch.arange(64, dtype=torch.float32).reshape(2, 32)
        >>> quantize_scaled(x, "fp4_e2m1", "mx")[1, -1].item()   # block amax 63 -> X = 2^(5-2) = 8; 63/8 -> 6
        48.0
    """
    x = _check_tensor(x)
    f = get_format(fmt)
    check_choice("scaling", scaling, SCALINGS)
    check_choice("rounding", rounding, ROUNDINGS)
    check_choice("overflow", overflow, OVERFLOWS)
    check_choice("clip", clip, CLIPS)
    if clip == "sawb":
        check_sawb(f, scaling)
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool) or not (
        -max(x.dim(), 1) <= channel_dim < max(x.dim(), 1)
    ):
        raise ConfigError("channel_dim", channel_dim, f"an int dim index of a {x.dim()}-d tensor")
    if block_size is not None and (
        not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0
    ):
        raise ConfigError("block_size", block_size, "a positive integer (or None for the spec's 32 / 16)")
    if x.dtype != torch.float32:
        x = x.to(torch.float32)

    def q(t: torch.Tensor, ovf: str = overflow) -> torch.Tensor:
        return quantize(t, f, rounding=rounding, overflow=ovf, generator=generator, backend=backend)

    if x.numel() == 0 or scaling == "none":
        return q(x)
    if clip == "sawb":
        def qg(t: torch.Tensor, grid: Format) -> torch.Tensor:
            return quantize(t, grid, rounding=rounding, overflow=overflow, generator=generator, backend=backend)

        if scaling == "tensor" or x.dim() == 0 or (scaling == "sample" and x.dim() <= 1):
            keep = None
        else:
            keep = channel_dim % x.dim() if scaling == "channel" else 0
        return _apply_sawb(x, f, keep, qg)
    if scaling == "tensor":
        return _apply_scale(x, f, _group_amax(x, None), q)
    if scaling == "channel":
        if x.dim() == 0:
            return _apply_scale(x, f, _group_amax(x, None), q)
        return _apply_scale(x, f, _group_amax(x, channel_dim % x.dim()), q)
    if scaling == "sample":
        if x.dim() <= 1:  # a single sample
            return _apply_scale(x, f, _group_amax(x, None), q)
        return _apply_scale(x, f, _group_amax(x, 0), q)

    shape = x.shape
    xs = _as_samples(x)
    if scaling == "mx":
        xb, n = _blocks(xs, block_size or MX_BLOCK, pad)
        amax = xb.abs().amax(dim=-1, keepdim=True)
        # floor(log2(amax)) from the float32 exponent field (exact; float32-subnormal amax handled by frexp)
        _, ex = torch.frexp(amax)  # amax = m * 2^ex, m in [0.5, 1)
        e = torch.where(amax > 0, ex - 1 - mx_emax(f), torch.full_like(ex, -127)).clamp(-127, 127)
        X = torch.ldexp(torch.ones_like(amax), e)  # exact powers of two (2^-127 is a float32 subnormal)
        yb = q(xb / X, "saturate") * X
    else:  # nvfp4
        xb, n = _blocks(xs, block_size or NVFP4_BLOCK, pad)
        amax_s = xs.abs().reshape(xs.shape[0], -1).amax(dim=1)
        ok = (amax_s > 0) & torch.isfinite(amax_s)
        S = torch.where(ok, torch.full_like(amax_s, _E4M3_MAX * _FP4_MAX) / torch.where(ok, amax_s, 1.0), 1.0)
        S = S.reshape(-1, *([1] * (xb.dim() - 1)))
        bamax = xb.abs().amax(dim=-1, keepdim=True)
        # true division (torch turns division by a Python scalar into multiplication by its rounded reciprocal)
        d = bamax / torch.full_like(bamax, _FP4_MAX) * S
        sb = quantize(d, "fp8_e4m3", rounding="nearest", overflow="saturate")
        enc = torch.where(sb > 0, S / torch.where(sb > 0, sb, 1.0), 0.0)
        dec = sb / S
        yb = q(xb * enc, "saturate") * dec
    y = yb.reshape(*yb.shape[:-2], -1)[..., :n]
    return y.reshape(shape)
