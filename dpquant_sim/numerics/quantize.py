"""Bit-exact element quantization of float32 tensors to a low-precision format (fake quantization).

The reference kernel (``_kernel``, what the compiled backend runs) works on the float32 bit pattern (viewed
as int32) with integer ops only, so it is exact and deterministic on any CPU (no dependence on flush-to-zero
modes), and it fuses into one loop under ``torch.compile``:

* normal range of the target (|x| >= min_normal): round the float32 bit pattern at bit ``23 - mbits``
  (round half to even adds ``half - 1 + lsb``; stochastic adds uniform random low bits), carries ripple into
  the exponent exactly as the value does;
* subnormal range (|x| < min_normal): take the 24-bit significand ``M`` and shift it right by its distance to
  the subnormal quantum ``2^(emin - mbits)``, rounding the same way, then rebuild ``k * quantum``;
* overflow: any result above ``max`` becomes ``max`` (saturate), ``inf`` (IEEE formats with inf: fp8_e5m2,
  fp16, bf16) or NaN (fp8_e4m3, which has no inf); fp6/fp4/log4/int always saturate. ``+-inf`` input is an
  overflow like any other. NaN input stays NaN (the same NaN), -0 stays -0.

The eager backend (``_eager``) returns the same bits with far fewer memory passes: 32768-element blocks
that stay in cache, in-place ops, and for nearest rounding the FPU's own round-half-to-even through the
magic-number trick ``(x + C) - C`` (``_nearest_magic``; exact, and independent of flush-to-zero / DAZ modes
because no input that matters, intermediate or result is a float32 subnormal), or for bf16 the same bit
pattern rounding as above without the subnormal branch (``_nearest_bf16``). log4 nearest and all stochastic
rounding run the integer kernel per block.

Integer formats reuse the same kernel: an n-bit symmetric int is a "float" with ``mbits = n - 1`` whose
subnormal grid (quantum 2^0 = 1) is the integers below 2^(n-1), clamped to +-(2^(n-1) - 1).

Stochastic rounding rounds away from zero with probability (|x| - lo) / (hi - lo), exactly up to the
quality of 31 random bits per element (the distance to ``lo`` is compared with 23..30 of them; below 2^-7 of
the smallest subnormal only the top 30 bits of the distance count: bias < 2^-30 of a quantum). The bits
come from a counter-based hash of the element's flat index and two 32-bit seed words drawn from the
caller's ``torch.Generator`` (so: the same generator state gives the same result, the generator advances on
every call, eager and compiled agree bit for bit, and the RNG fuses into the kernel).

Example:
    >>> import torch
    >>> quantize(torch.tensor([0.3, 500.0, -1e-3]), "fp8_e4m3").tolist()
    [0.3125, 448.0, -0.001953125]
    >>> quantize(torch.tensor([500.0]), "fp8_e4m3", overflow="ieee").isnan().item()
    True
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch

from dpquant_sim.errors import ConfigError, check_choice
from dpquant_sim.numerics.formats import FloatFormat, Format, IntFormat, get_format

ROUNDINGS = ("nearest", "stochastic")
OVERFLOWS = ("saturate", "ieee")
BACKENDS = ("auto", "torch", "compiled", "qtorch")
# "auto" compiles a tensor of at least this many elements on CPU (every tensor on a GPU, where the eager path
# is a chain of launches): below it the eager path is as fast and a cold compile (5-17 s per variant) never pays.
AUTO_COMPILE_MIN_NUMEL = int(os.environ.get("DPQUANT_COMPILE_MIN_NUMEL", 1 << 16))

_SIGN = -(1 << 31)  # 0x80000000 as int32
_ABS = 0x7FFFFFFF
_INF = 0x7F800000
_QNAN = 0x7FC00000
_MANT = 0x007FFFFF
_HIDDEN = 0x00800000


def _overflow_code(fmt: Format, overflow: str) -> int:
    """0: saturate to max, 1: overflow to inf, 2: overflow to NaN."""
    if overflow == "saturate" or fmt.saturate_only:
        return 0
    return 1 if fmt.has_inf else 2


def _params(fmt: Format) -> tuple[int, int, int, int]:
    """(mbits, emin_f = emin + 127, max_bits, q_sub_exp = emin - mbits) of a format, as Python ints."""
    mbits = fmt.mbits
    emin = fmt.emin
    return mbits, emin + 127, fmt.max_bits, emin - mbits


_M32 = 0xFFFFFFFF


# The hash's (xor-shift, multiply) steps and final xor-shift, shared by ``_mix32`` and its in-place twin in
# ``_random_bits_into`` so that the two cannot drift apart (eager and compiled must give the same bits).
_MIX_STEPS = ((16, 0x21F0AAAD), (15, 0x735A2D97))
_MIX_FINAL = 15


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer hash (hash-prospector's [16 21f0aaad 15 735a2d97 15], bias ~0.02).

    Computed in int64 with both multipliers < 2^31 so no product can overflow (no UB when compiled).
    """
    for shift, mul in _MIX_STEPS:
        h = ((h ^ (h >> shift)) * mul) & _M32
    return h ^ (h >> _MIX_FINAL)


def _random_bits(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """31 uniform random bits per element (int32 in [0, 2^31)) from the flat index and two 32-bit seed words.

    Counter-based (like Philox): element i gets mix(mix(i + s0) ^ s1), so the bits depend only on the seed and
    the position, and the whole thing fuses into the quantize loop under torch.compile.
    """
    idx = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    h = _mix32(_mix32((idx + seed[0]) & _M32) ^ seed[1])
    return (h >> 1).to(torch.int32)


def _kernel(
    x: torch.Tensor,
    seed: torch.Tensor | None,
    mbits: int,
    emin_f: int,
    max_bits: int,
    qsub_exp: int,
    ovf: int,
) -> torch.Tensor:
    """Quantize float32 ``x`` (any shape) elementwise; ``seed`` (2 int64 words) selects stochastic rounding.

    Pure tensor ops on int32 views (no Python branching on data), so it runs eagerly and under torch.compile
    (the "compiled" backend; the eager backend runs the cheaper blocked equivalents in ``_eager``).
    """
    rnd = None if seed is None else _random_bits(x, seed)
    return _round_bits(x, rnd, mbits, emin_f, max_bits, qsub_exp, ovf)


def _round_bits(
    x: torch.Tensor,
    rnd: torch.Tensor | None,
    mbits: int,
    emin_f: int,
    max_bits: int,
    qsub_exp: int,
    ovf: int,
) -> torch.Tensor:
    """The body of ``_kernel`` given the random bits ``rnd`` (int32 in [0, 2^31), x's shape) or None (nearest)."""
    bits = x.view(torch.int32)
    sign = bits & _SIGN
    a_raw = bits & _ABS
    a = torch.clamp_max(a_raw, _INF)  # NaN payloads -> inf pattern so the adds below cannot overflow int32
    e = a >> 23  # biased float32 exponent, 0..255
    s = 23 - mbits  # bits dropped in the target's normal range
    low = (1 << s) - 1
    keep = -(1 << s)  # ~low (two's complement), spelled so torch.compile traces it

    # normal range of the target: round the whole bit pattern at bit s
    if rnd is None:
        rn = (a + (((1 << s) >> 1) - 1) + ((a >> s) & 1)) & keep
    else:
        rn = (a + (rnd & low)) & keep

    # subnormal range of the target: value = M * 2^(e_eff - 150); quantum = 2^(qsub_exp)
    e_eff = torch.clamp_min(e, 1)
    m_full = torch.where(e > 0, (a & _MANT) | _HIDDEN, a)
    sh = (23 - mbits + emin_f) - e_eff  # >= 24 - mbits where e < emin_f
    if rnd is None:
        sh = torch.clamp(sh, 1, 25)  # beyond 25 the value is < half a quantum: rounds to 0 either way
        k = (m_full + ((1 << sh) >> 1) - 1 + ((m_full >> sh) & 1)) >> sh
    else:
        pre = torch.clamp(sh - 30, 0, 31)  # keep at most 30 fraction bits (documented bias < 2^-30 quantum)
        sh = torch.clamp(sh, 1, 30)
        k = ((m_full >> pre) + (rnd & ((1 << sh) - 1))) >> sh
    if qsub_exp + 127 >= 1:  # quantum is a normal float32: k * quantum is exact
        sub = (k.to(torch.float32) * (2.0**qsub_exp)).view(torch.int32)
    else:  # bf16: k * 2^-133 is a float32 subnormal; float32 bits are linear there (and at 2^-126)
        sub = k << (qsub_exp + 127 + 22)
    r = torch.where(e >= emin_f, rn, sub)

    # overflow (inf input included: its pattern is above max_bits)
    if ovf == 0:
        r = torch.clamp_max(r, max_bits)
    else:
        r = torch.where(r > max_bits, _INF if ovf == 1 else _QNAN, r)
    r = torch.where(a_raw > _INF, a_raw, r)  # NaN stays the same NaN
    return (r | sign).view(torch.float32)


# ---------------------------------------------------------------- eager backend
#
# Eager PyTorch runs one memory pass per op, so ``_kernel`` (~25 ops, each allocating a 4-8 B/element
# temporary) is ~30x slower than a copy on large tensors. ``_eager`` gets the same bits with (a) blocks of
# ``_BLOCK`` elements per thread, so the intermediates of every op stay in L2/L3 cache and only ``x`` and the
# result cross main memory, (b) in-place ops on per-call scratch buffers (no temporaries) and (c) for nearest
# rounding, far fewer ops where the FPU can do the rounding exactly (the magic-number trick, see
# ``_nearest_magic``).

# Elements per block: 128 KiB per float32 buffer, so a block and its scratch stay in L2. Also torch's
# intra-op grain size (32768): each op then runs on one thread, because with several threads every op of
# every block ends in a barrier, and on a loaded machine waiting for a descheduled thread costs far more
# than the op (measured 10-30x slower on 2 busy cores).
_BLOCK = 1 << 15


def _magic_ok(mbits: int, emin_f: int, max_bits: int, qsub_exp: int) -> bool:
    """True if ``_nearest_magic`` is exact for the format (every format here but log4 and bf16).

    Needs 1 <= mbits (mbits = 0, log4: ties between 2^e and 2^(e+1) go to the even exponent code, not to the
    float-even neighbour) and mbits <= 21 (so that x + C stays in C's binade); C = 1.5 * 2^(emax+24-mbits)
    must be finite; and half the smallest subnormal quantum must be a normal float32 (qsub_exp >= -125), so
    float32-subnormal inputs round to +-0 and no intermediate or result is subnormal: the path is then exact
    whatever the flush-to-zero / denormals-are-zero mode (bf16, quantum 2^-133, fails this: it takes
    ``_nearest_bf16``).
    """
    emax = max(max_bits >> 23, emin_f) - 127
    return 1 <= mbits <= 21 and emax + 24 - mbits <= 127 and qsub_exp >= -125


def _nearest_magic(xc: torch.Tensor, oc: torch.Tensor, ci: torch.Tensor, mk: torch.Tensor,
                   mbits: int, emin_f: int, max_bits: int, ovf: int) -> None:
    """Round-half-to-even of the block ``xc`` into ``oc`` with float adds (ci: int32, mk: bool scratch).

    For E = max(exponent of x, emin), C = 1.5 * 2^(E + 23 - mbits) has float32 ulp 2^(E - mbits), the
    target's quantum at x, and |x| < 2^(E+1) <= C/3 keeps x + C in C's binade, so ``(x + C) - C`` is x rounded
    to the target grid half to even (C / quantum = 1.5 * 2^23 is even) by a single FPU rounding, and the
    subtraction is exact. C's bits: clamp(bits(x) & 0x7F800000, emin, emax+1) + (23-mbits, 0x400000).
    9 ops for saturate (x is first clamped to +-max: rounding then cannot exceed max, and +-inf -> +-max),
    11 for ieee (results above max, +-inf included, -> inf or NaN). The sign is copied back from x (-0 and
    values rounding to 0 keep it) and NaN inputs are copied through unchanged (the adds would quiet a
    signalling NaN).
    """
    xi, c_f = xc.view(torch.int32), ci.view(torch.float32)
    emax_f = max(max_bits >> 23, emin_f)  # int formats: max < 2^emin (the grid is all "subnormal")
    k = ((23 - mbits) << 23) | 0x400000
    if ovf == 0:
        mx = _f32(max_bits)
        torch.clamp(xc, -mx, mx, out=oc)
        torch.bitwise_and(oc.view(torch.int32), _INF, out=ci)
        ci.clamp_(emin_f << 23, emax_f << 23).add_(k)
        oc.add_(c_f).sub_(c_f)
    else:  # no clamp: |x| >= 2^(emax+1) (inf included) stays above max through the adds
        torch.bitwise_and(xi, _INF, out=ci)
        ci.clamp_(emin_f << 23, (emax_f + 1) << 23).add_(k)
        torch.add(xc, c_f, out=oc).sub_(c_f).abs_()
        _overflow_to(oc.view(torch.int32), ci, max_bits, _INF if ovf == 1 else _QNAN)
    torch.copysign(oc, xc, out=oc)
    _restore_nan(xc, oc, mk)


def _overflow_to(ri: torch.Tensor, ci: torch.Tensor, max_bits: int, code: int) -> None:
    """ri (non-negative bit patterns, NaN ones included) = code where ri > max_bits, in 4 int ops.

    max(ri, clamp(ri - max_bits, 0, 1) * code): no bool mask (torch's compare / where / masked_fill run
    ~5x slower than int arithmetic on CPU); code (inf or NaN) is above every finite pattern.
    """
    torch.sub(ri, max_bits, out=ci)
    ci.clamp_(0, 1).mul_(code)
    torch.maximum(ri, ci, out=ri)


def _restore_nan(xc: torch.Tensor, oc: torch.Tensor, mk: torch.Tensor) -> None:
    """oc = xc (bit for bit) where xc is NaN. The mask is only built for blocks whose input sums to a
    non-finite value (any NaN makes the sum NaN; inf or huge inputs just take the slow, still exact, way):
    a float sum is cheap, torch's compare and where are not."""
    if math.isfinite(xc.sum().item()):
        return
    torch.ne(xc, xc, out=mk)
    torch.where(mk, xc, oc, out=oc)


def _nearest_bf16(xc: torch.Tensor, oc: torch.Tensor, ci: torch.Tensor, mk: torch.Tensor,
                  mbits: int, max_bits: int, ovf: int) -> None:
    """Round-half-to-even for a format with float32's emin (bf16): round the signed bit pattern at bit s.

    float32 bit patterns are linear in the value across float32's subnormals and up to inf, and the target's
    subnormals are the float32 subnormals with s low bits zero, so ``(bits + 2^(s-1) - 1 + lsb) & ~(2^s - 1)``
    is exact everywhere (carries ripple into the exponent; rounding past max lands on max or inf). Positive
    NaN patterns are first clamped to inf so that the add cannot overflow int32; NaNs are restored at the end.
    """
    s = 23 - mbits
    oi = oc.view(torch.int32)
    torch.clamp(xc.view(torch.int32), max=_INF, out=oi)
    torch.bitwise_right_shift(oi, s, out=ci)
    ci.bitwise_and_(1).add_(((1 << s) >> 1) - 1)
    oi.add_(ci).bitwise_and_(-(1 << s))
    if ovf == 0:  # +-inf input and results that rounded past max -> +-max
        mx = _f32(max_bits)
        oc.clamp_(-mx, mx)
    _restore_nan(xc, oc, mk)


def _flush_denormal_on() -> bool:
    """True under ``torch.set_flush_denormal(True)`` (FTZ/DAZ): ``_nearest_bf16``'s final float clamp would
    then flush bf16-subnormal results to 0, so bf16 saturate takes the integer kernel instead (~10 us check)."""
    return (torch.tensor(2.0**-149) * 1.0).item() == 0.0


def _f32(bits: int) -> float:
    """The float32 value with bit pattern ``bits`` (as a Python float, exact)."""
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()


def _random_bits_into(rnd: torch.Tensor, h: torch.Tensor, t: torch.Tensor, start: int, s0: int, s1: int) -> None:
    """``_random_bits`` for flat indices start .. start+len(rnd)-1, in place (h, t: int64 scratch).

    The same hash op for op (so the same bits), without temporaries; ``(i + s0) & M32`` is folded into the
    arange where the block does not wrap past 2^32.
    """
    n = rnd.numel()
    base = (start + s0) & _M32
    torch.arange(base, base + n, dtype=torch.int64, out=h)
    if base + n > _M32 + 1:
        h.bitwise_and_(_M32)
    for round_ in range(2):
        if round_:
            h.bitwise_xor_(s1)
        for shift, mul in _MIX_STEPS:
            torch.bitwise_right_shift(h, shift, out=t)
            h.bitwise_xor_(t).mul_(mul).bitwise_and_(_M32)
        torch.bitwise_right_shift(h, _MIX_FINAL, out=t)
        h.bitwise_xor_(t)
    h.bitwise_right_shift_(1)
    rnd.copy_(h)


def _eager(
    x: torch.Tensor,
    seed: torch.Tensor | None,
    mbits: int,
    emin_f: int,
    max_bits: int,
    qsub_exp: int,
    ovf: int,
) -> torch.Tensor:
    """``_kernel(x, seed, ...)``, bit for bit, for eager PyTorch: blocked, in place, magic-number nearest.

    ``x`` must be contiguous float32. Stochastic rounding and log4 nearest run ``_round_bits`` per block
    with the random bits made in place.
    """
    # default (row-major) strides, as the kernel and the compiled backend return: empty_like would keep an
    # ambiguous layout such as (64, 1, 8, 1) for a 1-channel batch, and convolutions then take their
    # channels-last path, whose different float rounding changes training results between backends
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    xf, of = x.view(-1), out.view(-1)
    block = min(n, _BLOCK)
    ci = torch.empty(block, dtype=torch.int32, device=x.device)
    mk = torch.empty(block, dtype=torch.bool, device=x.device)
    if seed is None and _magic_ok(mbits, emin_f, max_bits, qsub_exp):
        def step(xc, oc, start, k):
            _nearest_magic(xc, oc, ci[:k], mk[:k], mbits, emin_f, max_bits, ovf)
    elif seed is None and emin_f == 1 and not (ovf == 0 and _flush_denormal_on()):
        def step(xc, oc, start, k):
            _nearest_bf16(xc, oc, ci[:k], mk[:k], mbits, max_bits, ovf)
    elif seed is None:  # log4 nearest (and bf16 saturate under flush-to-zero): the integer kernel per block
        def step(xc, oc, start, k):
            oc.copy_(_round_bits(xc, None, mbits, emin_f, max_bits, qsub_exp, ovf))
    else:
        s0, s1 = (int(v) for v in seed.tolist())
        h = torch.empty(block, dtype=torch.int64, device=x.device)
        t = torch.empty(block, dtype=torch.int64, device=x.device)

        def step(xc, oc, start, k):
            _random_bits_into(ci[:k], h[:k], t[:k], start, s0, s1)
            oc.copy_(_round_bits(xc, ci[:k], mbits, emin_f, max_bits, qsub_exp, ovf))
    for s in range(0, n, block):
        k = min(block, n - s)
        step(xf[s:s + k], of[s:s + k], s, k)
    return out


_compiled: dict[tuple, Callable] = {}
_compile_failed = False


def _get_compiled(key: tuple) -> Callable | None:
    """A torch.compile'd kernel for one (format params, rounding, overflow); None if compiling is unavailable.

    Compiles lazily on first use (a few seconds per variant), never at import.
    """
    global _compile_failed
    if _compile_failed:
        return None
    fn = _compiled.get(key)
    if fn is None:
        mbits, emin_f, max_bits, qsub_exp, ovf, stochastic = key

        # A fresh closure per variant so that each keeps its own compile cache (constants stay constants).
        def variant(x: torch.Tensor, seed: torch.Tensor | None) -> torch.Tensor:
            return _kernel(x, seed, mbits, emin_f, max_bits, qsub_exp, ovf)  # format params stay constants

        variant.__code__ = variant.__code__.replace(co_name=f"quantize_{mbits}_{emin_f}_{ovf}_{int(stochastic)}")
        fn = torch.compile(variant, fullgraph=True)
        _compiled[key] = fn
    return fn


_DEFAULT_BACKEND = os.environ.get("DPQUANT_QUANT_BACKEND", "auto")


def set_default_backend(backend: str) -> None:
    """Backend used when ``quantize(..., backend=None)``: "auto" (the default), "torch" (eager), "compiled" or
    "qtorch".

    The env var ``DPQUANT_QUANT_BACKEND`` sets the initial default. "compiled" gives identical bits, 1.6-3.5x
    faster than eager on large CPU tensors (docs/benchmarks.md) after a one-off compile of a few seconds per
    (format, rounding, overflow), cached on disk by torch's inductor. "auto" uses it for tensors of at least
    ``AUTO_COMPILE_MIN_NUMEL`` elements (env ``DPQUANT_COMPILE_MIN_NUMEL``) and on GPUs, eager elsewhere and
    wherever compiling is unavailable.
    """
    global _DEFAULT_BACKEND
    check_choice("backend", backend, BACKENDS)
    _DEFAULT_BACKEND = backend


def auto_backend(x: torch.Tensor) -> str:
    """What "auto" runs for ``x``: "compiled" for large CPU tensors and any GPU tensor, else "torch"."""
    big = x.device.type != "cpu" or x.numel() >= AUTO_COMPILE_MIN_NUMEL
    return "compiled" if big and not _compile_failed else "torch"


def default_backend() -> str:
    """The backend ``quantize(..., backend=None)`` uses (recorded in each run's run_info.json)."""
    return _DEFAULT_BACKEND


def _check_tensor(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConfigError("x", type(x).__name__, "a floating-point torch.Tensor")
    if not x.is_floating_point():
        raise ConfigError("x", f"tensor of dtype {x.dtype}", "a floating-point tensor (float32, float16, bfloat16, float64)")
    return x


def quantize(
    x: torch.Tensor,
    fmt: "str | Format",
    *,
    rounding: str = "nearest",
    overflow: str = "saturate",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Round every element of ``x`` to the nearest representable value of ``fmt`` (fake quantization).

    Args:
        x: floating-point tensor (any shape; other float dtypes are first converted to float32, so float64
            input is rounded twice). For int formats, values already on the integer grid (scaled so that the
            clipping range maps to +-qmax).
        fmt: a format name from ``FORMATS`` (e.g. "fp8_e4m3") or a format object.
        rounding: "nearest" (round half to even) or "stochastic" (unbiased, drawn from ``generator``).
        overflow: "saturate" (|results| above max, and +-inf, become +-max; the default, as hardware casts with
            satfinite) or "ieee" (fp8_e5m2/fp16/bf16 -> +-inf, fp8_e4m3 -> NaN, as ml_dtypes casts). fp6, fp4,
            log4 and int formats have no inf/NaN codes and always saturate.
        generator: required for stochastic rounding (determinism: same generator state, same result).
        backend: "auto" (compiled for large tensors, eager otherwise: see ``set_default_backend``), "torch"
            (eager: blocked, in-place float / int32 ops), "compiled" (the same kernel under torch.compile; falls
            back to eager with a warning if compilation is unavailable), "qtorch" (the qtorch package, with its
            own conventions; see qtorch_backend.py) or None for the default (``set_default_backend``).

    Returns:
        float32 tensor of ``x``'s shape whose every value is representable in ``fmt`` (or NaN / +-inf as above).

    Raises:
        ConfigError (ValueError) naming the argument for an unknown format/rounding/overflow/backend, a
        non-float ``x``, or stochastic rounding without ``generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = quantize(torch.full((1000,), 1.1), "fp4_e2m1", rounding="stochastic", generator=g)
        >>> sorted(set(y.tolist()))
        [1.0, 1.5]
    """
    x = _check_tensor(x)
    f = get_format(fmt)
    check_choice("rounding", rounding, ROUNDINGS)
    check_choice("overflow", overflow, OVERFLOWS)
    backend = _DEFAULT_BACKEND if backend is None else backend
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = auto_backend(x)
    if rounding == "stochastic" and not isinstance(generator, torch.Generator):
        raise ConfigError(
            "generator", generator, "a torch.Generator when rounding='stochastic' (results must be reproducible)"
        )
    if backend == "qtorch":
        from dpquant_sim.numerics.qtorch_backend import qtorch_quantize

        return qtorch_quantize(x, f, rounding=rounding)

    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    if not x.is_contiguous():
        x = x.contiguous()
    seed = None
    if rounding == "stochastic":  # two 32-bit words from the caller's generator; the bits come from a hash
        seed = torch.randint(0, 1 << 32, (2,), generator=generator, dtype=torch.int64, device=generator.device)
        seed = seed.to(x.device)
    mbits, emin_f, max_bits, qsub_exp = _params(f)
    ovf = _overflow_code(f, overflow)
    if backend == "compiled" and x.numel() > 0:
        fn = _get_compiled((mbits, emin_f, max_bits, qsub_exp, ovf, seed is not None))
        if fn is not None:
            try:
                xf = x.reshape(-1)  # one 1-d kernel for every shape; its length is the only dynamic size
                torch._dynamo.maybe_mark_dynamic(xf, 0)
                return fn(xf, seed).reshape(x.shape)
            except Exception as exc:  # no C++ compiler, unsupported platform...: stay correct, just slower
                global _compile_failed
                _compile_failed = True
                warnings.warn(f"torch.compile fast path unavailable ({type(exc).__name__}: {exc}); using eager")
    if x.device.type != "cpu":  # the blocking is tuned to CPU caches; a GPU wants few, large launches
        return _kernel(x, seed, mbits, emin_f, max_bits, qsub_exp, ovf)
    return _eager(x, seed, mbits, emin_f, max_bits, qsub_exp, ovf)
