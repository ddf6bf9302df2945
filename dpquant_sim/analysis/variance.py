"""Quantization-error moments of a scalar distribution on a format's grid, and the accuracy-drop table.

Part of the variance study (DESIGN.md section 7; the mechanism itself is measured by :mod:`mechanism`,
:mod:`grad_probe` and :mod:`variance_law`, which put quantization where the engine applies it: on weights,
activations and raw per-example output gradients, before clipping and noise).

(a) **Analytic** error of quantizing one scalar: E[(q(x) - x)^2] of x drawn from a distribution (Gaussian,
    Laplace, Student-t, uniform or any frozen ``scipy.stats`` distribution) under a format's representable
    grid, by numerical integration over every representable interval:

    - round-to-nearest: on [lo, hi] with midpoint m, err = x - lo on [lo, m] and hi - x on [m, hi];
    - stochastic rounding: q(x) = hi with probability (x - lo)/(hi - lo), so E[err^2 | x] = (x - lo)(hi - x)
      (the conditional variance; the error is unbiased inside the range);
    - beyond the largest magnitude both saturate: err = x - max.

    Scaling: ``scale`` multiplies the grid (a fixed scale; ``scaling='none'`` is scale 1). For amax scaling
    over ``n`` elements (one scale per tensor, per sample or per block of ``n`` elements) the scale is
    ``amax / fmt_max`` and :func:`amax_scaled_error` integrates over the distribution of the amax: given
    the amax m, the element holding it is exact and the other n - 1 elements are i.i.d. from the
    distribution truncated to |x| <= m.

(b) **Empirical** accuracy/loss drop from quantization with and without DP noise: a sweep
    (``analysis/variance_study.py --only drop`` builds it with :mod:`dpquant_sim.sweep`);
    :func:`quantization_drop` turns its table into the drop per noise multiplier and format.

Units: errors are in the units of x (squared for variances). Example:

>>> import math
>>> r = error_variance(uniform(-100, 100), "int8", rounding="stochastic")
>>> round(r.mse, 4)   # closed form for a unit grid step: 1/6
0.1667
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal, Sequence

import numpy as np
from scipy import stats

from dpquant_sim.errors import ConfigError, check_choice

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(12)

# ml_dtypes names of the element formats whose grid we enumerate from every bit pattern (independent of our
# own numerics code, which tests compare against).
_ML_DTYPES = {
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "fp6_e2m3": "float6_e2m3fn",
    "fp6_e3m2": "float6_e3m2fn",
    "fp4_e2m1": "float4_e2m1fn",
    "bf16": "bfloat16",
}


@lru_cache(maxsize=None)
def representable_values(fmt: str) -> np.ndarray:
    """Sorted finite representable values of an element format (float64), both signs, one zero.

    Float formats are enumerated from every bit pattern with ml_dtypes; int8/int4 are the symmetric integer
    grids [-127, 127] and [-7, 7] (the symmetric range used for scaled integer quantization); log4 is LUQ's
    radix-2 logarithmic grid {0, +-2^-2, ..., +-2^4} and luq_log4 {0, +-2^-3, ..., +-2^4}, written from their
    definitions.
    """
    import ml_dtypes

    if fmt == "int8":
        return np.arange(-127, 128, dtype=np.float64)
    if fmt == "int4":
        return np.arange(-7, 8, dtype=np.float64)
    if fmt == "log4":  # LUQ radix-2 log format by its definition: 0 and +-2^e for e in -2..4 (3 exponent bits)
        p = 2.0 ** np.arange(-2, 5, dtype=np.float64)
        return np.concatenate([-p[::-1], [0.0], p])
    if fmt == "luq_log4":  # LUQ's own grid: 0 and +-2^e for e in -3..4 (8 powers of two plus 0)
        p = 2.0 ** np.arange(-3, 5, dtype=np.float64)
        return np.concatenate([-p[::-1], [0.0], p])
    if fmt == "fp16":
        codes = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    elif fmt in _ML_DTYPES:
        dt = np.dtype(getattr(ml_dtypes, _ML_DTYPES[fmt]))
        nbits = dt.itemsize * 8
        if fmt in ("fp6_e2m3", "fp6_e3m2"):
            nbits = 6
        elif fmt == "fp4_e2m1":
            nbits = 4
        raw = np.arange(1 << nbits, dtype=np.uint16 if dt.itemsize == 2 else np.uint8)
        if nbits < dt.itemsize * 8:  # sub-byte formats: ml_dtypes stores one value per byte, low bits
            codes = raw.astype(np.uint8).view(dt).astype(np.float64)
        else:
            codes = raw.view(dt).astype(np.float64)
    else:
        raise ConfigError("format", fmt, tuple(list(_ML_DTYPES) + ["fp16", "int8", "int4", "log4", "luq_log4"]))
    vals = np.unique(codes[np.isfinite(codes)])
    return vals


def gaussian(scale: float = 1.0, loc: float = 0.0):
    """N(loc, scale^2) as a frozen scipy distribution."""
    return stats.norm(loc=loc, scale=scale)


def laplace(scale: float = 1.0, loc: float = 0.0):
    """Laplace(loc, b=scale) (variance 2 b^2): heavier tails, as gradients often have."""
    return stats.laplace(loc=loc, scale=scale)


def student_t(df: float = 3.0, scale: float = 1.0):
    """Student-t with ``df`` degrees of freedom (heavy tails; variance scale^2 df/(df-2) for df > 2)."""
    return stats.t(df=df, scale=scale)


def uniform(lo: float, hi: float):
    """Uniform on [lo, hi]."""
    return stats.uniform(loc=lo, scale=hi - lo)


DISTRIBUTIONS = {"gaussian": gaussian, "laplace": laplace, "student_t": student_t}


def make_distribution(name: str, scale: float = 1.0):
    """Distribution by name (gaussian, laplace, student_t with df=3) and scale."""
    check_choice("distribution", name, tuple(DISTRIBUTIONS))
    return DISTRIBUTIONS[name](scale=scale)


@dataclass(frozen=True)
class ErrorStats:
    """Quantization error moments of one (distribution, format, rounding, scale).

    Attributes:
        mse: E[(q(x) - x)^2] (units of x squared).
        mean_error: E[q(x) - x] (bias; 0 for symmetric distributions and for stochastic rounding in range).
        variance: mse - mean_error^2.
        signal_power: E[x^2] of the distribution (restricted as integrated).
        relative_mse: mse / signal_power (dimensionless; 1/SQNR).
        saturation_prob: P(|x| > max representable * scale).
    """

    mse: float
    mean_error: float
    variance: float
    signal_power: float
    relative_mse: float
    saturation_prob: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _interval_moments(pdf, a: np.ndarray, b: np.ndarray, f) -> np.ndarray:
    """Gauss-Legendre integral of f(x) * pdf(x) over each [a_i, b_i] (vectorized; 12 nodes)."""
    half = (b - a)[:, None] / 2.0
    mid = (a + b)[:, None] / 2.0
    x = mid + half * _GL_NODES[None, :]
    return (half * (_GL_WEIGHTS[None, :] * f(x) * pdf(x))).sum(axis=1)


def _split(a: np.ndarray, b: np.ndarray, pieces: int) -> tuple[np.ndarray, np.ndarray]:
    """Split each [a_i, b_i] into ``pieces`` equal sub-intervals (more accuracy for wide intervals)."""
    t = np.linspace(0.0, 1.0, pieces + 1)
    edges = a[:, None] + (b - a)[:, None] * t[None, :]
    return edges[:, :-1].ravel(), edges[:, 1:].ravel()


def error_variance(
    dist: Any,
    fmt: str,
    *,
    rounding: Literal["nearest", "stochastic"] = "nearest",
    scale: float = 1.0,
    truncate: float | None = None,
    pieces: int = 4,
) -> ErrorStats:
    """Analytic quantization-error moments of x ~ ``dist`` on the grid ``scale * representable_values(fmt)``.

    Args:
        dist: frozen ``scipy.stats`` continuous distribution (see :func:`gaussian`, :func:`laplace`, ...).
        fmt: element format name (fp8_e4m3, fp8_e5m2, fp6_e2m3, fp6_e3m2, fp4_e2m1, bf16, fp16, int8, int4).
        rounding: "nearest" (round to nearest; ties have probability 0) or "stochastic" (unbiased).
        scale: the quantization scale (x is divided by it before rounding); grid values are ``scale * v``.
        truncate: if given, x is conditioned on |x| <= truncate (used for amax scaling).
        pieces: Gauss-Legendre sub-intervals per half-interval (accuracy knob).

    Returns:
        :class:`ErrorStats`. Saturating overflow is assumed (the project default; fp4/fp6 always saturate).
    """
    check_choice("rounding", rounding, ("nearest", "stochastic"))
    if not scale > 0:
        raise ConfigError("scale", scale, "a positive float")
    grid = representable_values(fmt) * scale
    lo_edge, hi_edge = grid[0], grid[-1]
    if truncate is not None:
        t = float(truncate)
        norm = dist.cdf(t) - dist.cdf(-t)
        base_pdf = dist.pdf
        pdf = lambda x: np.where(np.abs(x) <= t, base_pdf(x), 0.0) / norm  # noqa: E731
        support = (-t, t)
    else:
        pdf = dist.pdf
        support = dist.support()
    a, b = grid[:-1], grid[1:]
    if truncate is not None:  # only the intervals that intersect [-t, t] carry mass
        keep = (b > -t) & (a < t)
        a, b = a[keep], b[keep]
    mse = 0.0
    mean_err = 0.0
    if rounding == "nearest":
        m = (a + b) / 2.0
        # Lower half rounds down to a (err = a - x), upper half rounds up to b (err = b - x).
        la, lb = _split(a, m, pieces)
        ua, ub = _split(m, b, pieces)
        lo_of = np.repeat(a, pieces)
        hi_of = np.repeat(b, pieces)
        if truncate is not None:  # integrate only where the truncated density lives
            la, lb = np.clip(la, -t, t), np.clip(lb, -t, t)
            ua, ub = np.clip(ua, -t, t), np.clip(ub, -t, t)
        mse += _interval_moments(pdf, la, lb, lambda x: (x - lo_of[:, None]) ** 2).sum()
        mse += _interval_moments(pdf, ua, ub, lambda x: (hi_of[:, None] - x) ** 2).sum()
        mean_err += _interval_moments(pdf, la, lb, lambda x: lo_of[:, None] - x).sum()
        mean_err += _interval_moments(pdf, ua, ub, lambda x: hi_of[:, None] - x).sum()
    else:
        sa, sb = _split(a, b, 2 * pieces)
        lo_of = np.repeat(a, 2 * pieces)
        hi_of = np.repeat(b, 2 * pieces)
        if truncate is not None:
            sa, sb = np.clip(sa, -t, t), np.clip(sb, -t, t)
        mse += _interval_moments(pdf, sa, sb, lambda x: (x - lo_of[:, None]) * (hi_of[:, None] - x)).sum()
    # Saturated tails (x beyond the grid): err = edge - x, for both roundings.
    sat = 0.0
    if truncate is not None:
        # Bounded support: Gauss-Legendre on [edge, t] (fast; no adaptive quadrature in the inner loop).
        if t > hi_edge:
            ta, tb = _split(np.array([hi_edge]), np.array([t]), 8 * pieces)
            mse += _interval_moments(pdf, ta, tb, lambda x: (x - hi_edge) ** 2).sum()
            mean_err += _interval_moments(pdf, ta, tb, lambda x: hi_edge - x).sum()
            sat += _interval_moments(pdf, ta, tb, lambda x: np.ones_like(x)).sum()
        if -t < lo_edge:
            ta, tb = _split(np.array([-t]), np.array([lo_edge]), 8 * pieces)
            mse += _interval_moments(pdf, ta, tb, lambda x: (x - lo_edge) ** 2).sum()
            mean_err += _interval_moments(pdf, ta, tb, lambda x: lo_edge - x).sum()
            sat += _interval_moments(pdf, ta, tb, lambda x: np.ones_like(x)).sum()
        pa, pb = _split(np.array([-t]), np.array([t]), 64)
        power = float(_interval_moments(pdf, pa, pb, lambda x: x * x).sum())
    else:
        from scipy.integrate import quad

        if support[1] > hi_edge:
            up = support[1]
            mse += quad(lambda x: (x - hi_edge) ** 2 * pdf(x), hi_edge, up, limit=200)[0]
            mean_err += quad(lambda x: (hi_edge - x) * pdf(x), hi_edge, up, limit=200)[0]
            sat += quad(pdf, hi_edge, up, limit=200)[0]
        if support[0] < lo_edge:
            down = support[0]
            mse += quad(lambda x: (x - lo_edge) ** 2 * pdf(x), down, lo_edge, limit=200)[0]
            mean_err += quad(lambda x: (lo_edge - x) * pdf(x), down, lo_edge, limit=200)[0]
            sat += quad(pdf, down, lo_edge, limit=200)[0]
        power = float(dist.var() + dist.mean() ** 2)
    mse = float(max(mse, 0.0))
    return ErrorStats(
        mse=mse,
        mean_error=float(mean_err),
        variance=float(mse - mean_err**2),
        signal_power=float(power),
        relative_mse=float(mse / power) if power > 0 else math.nan,
        saturation_prob=float(sat),
    )


def amax_quantiles(dist: Any, n: int, k: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E over M = max_i |x_i| (n i.i.d. draws of a distribution symmetric about 0).

    P(M <= m) = (2 F(m) - 1)^n; we take ``k`` mid-quantiles of M (equal weights 1/k).
    """
    if n < 1:
        raise ConfigError("n", n, "an integer >= 1 (elements sharing one scale)")
    u = (np.arange(k) + 0.5) / k
    # (2F(m) - 1)^n = u  ->  F(m) = (1 + u^(1/n)) / 2
    m = dist.ppf((1.0 + u ** (1.0 / n)) / 2.0)
    return m, np.full(k, 1.0 / k)


def _point_sq_error(v: float, grid: np.ndarray, rounding: str) -> float:
    """E[(q(v) - v)^2] for one value on a grid (saturating)."""
    if v >= grid[-1]:
        return float((v - grid[-1]) ** 2)
    if v <= grid[0]:
        return float((v - grid[0]) ** 2)
    i = int(np.searchsorted(grid, v, side="right")) - 1
    lo, hi = grid[i], grid[i + 1]
    if rounding == "stochastic":
        return float((v - lo) * (hi - v))
    return float(min(v - lo, hi - v) ** 2)


def amax_scaled_error(
    dist: Any,
    fmt: str,
    n: int,
    *,
    rounding: Literal["nearest", "stochastic"] = "nearest",
    scale_rule: Literal["amax", "mx"] = "amax",
    k: int = 48,
) -> ErrorStats:
    """Error moments when ``n`` i.i.d. elements share one scale (per tensor, per sample or per block of n).

    ``scale_rule``:
      - ``"amax"`` (tensor/channel/sample scaling in :mod:`dpquant_sim.numerics.scaling`): the grid is
        ``representable_values(fmt) * amax / fmt_max``, so the amax element lands exactly on the largest
        value;
      - ``"mx"`` (OCP MX, E8M0 block scale): grid scale ``2^(floor(log2 amax) - floor(log2 fmt_max))``; the
        amax element itself may round (or saturate).

    NVFP4 blocks are approximated by ``n=16, scale_rule="amax"`` (the e4m3 rounding of the block scale,
    at most 1/16 relative, is ignored).

    Given the amax m, the other n - 1 elements are i.i.d. from ``dist`` truncated to |x| <= m; we average
    over ``k`` quantiles of the amax distribution. ``dist`` must be symmetric about 0.
    """
    check_choice("scale_rule", scale_rule, ("amax", "mx"))
    vals = representable_values(fmt)
    fmax = float(vals[-1])
    ms, ws = amax_quantiles(dist, n, k)
    acc = np.zeros(3)
    for m, w in zip(ms, ws):
        if scale_rule == "amax":
            s = m / fmax
        else:
            s = 2.0 ** (math.floor(math.log2(m)) - math.floor(math.log2(fmax)))
        top = _point_sq_error(m / s, vals, rounding) * s * s  # error of the amax element itself
        if n == 1:
            acc += w * np.array([top, 0.0, m * m])
            continue
        r = error_variance(dist, fmt, rounding=rounding, scale=s, truncate=m)
        frac = (n - 1) / n
        acc += w * np.array([frac * r.mse + top / n, frac * r.mean_error, frac * r.signal_power + m * m / n])
    mse, mean_err, power = acc
    return ErrorStats(
        mse=float(mse),
        mean_error=float(mean_err),
        variance=float(mse - mean_err**2),
        signal_power=float(power),
        relative_mse=float(mse / power) if power > 0 else math.nan,
        saturation_prob=0.0,
    )


def analytic_table(
    formats: Sequence[str],
    distributions: Sequence[str] = ("gaussian", "laplace", "student_t"),
    roundings: Sequence[str] = ("nearest", "stochastic"),
    ns: Sequence[int] = (16, 32, 256, 4096),
    *,
    k: int = 32,
) -> "Any":
    """Tidy DataFrame of amax-scaled relative MSE over formats x distributions x roundings x scale-group
    sizes n (n=1 is per-element scaling; 16/32 are NVFP4/MX blocks; larger n are per-sample/per-tensor).
    Distributions have unit scale (relative MSE is scale-invariant for amax scaling)."""
    import pandas as pd

    rows = []
    for fmt in formats:
        for dname in distributions:
            dist = make_distribution(dname, 1.0)
            for rnd in roundings:
                for n in ns:
                    r = amax_scaled_error(dist, fmt, int(n), rounding=rnd, k=k)
                    rows.append({"format": fmt, "distribution": dname, "rounding": rnd, "n": int(n), **r.to_dict()})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------
# (b) empirical: quantization drop with vs without DP noise, from a sweep table.


def quantization_drop(
    table: "Any",
    *,
    metric: str = "test_acc",
    by: Sequence[str] = ("dataset", "model", "noise_multiplier", "recipe"),
    baseline_kind: str = "fp32",
) -> "Any":
    """Final-epoch ``metric`` drop of each quantized schedule vs the fp32 run of the same configuration.

    ``table`` is a sweep table (one row per run x epoch [x accelerator]) with columns ``point_id``,
    ``schedule_kind``, ``seed``, ``epoch`` and ``metric``. Returns one row per (by..., schedule_kind) with
    the mean/std over seeds of ``drop = metric(fp32) - metric(schedule)`` (paired by seed).
    """
    import pandas as pd

    df = table.drop_duplicates(["point_id", "epoch"])
    last = df.loc[df.groupby("point_id")["epoch"].idxmax()]
    by = [c for c in by if c in last.columns]
    base = last[last["schedule_kind"] == baseline_kind][by + ["seed", metric]]
    # fp32 runs are recipe-agnostic: pair them with every recipe.
    base_keys = [c for c in by if c != "recipe"]
    base = base.drop(columns=[c for c in ("recipe",) if c in base.columns]).rename(columns={metric: "baseline"})
    q = last[last["schedule_kind"] != baseline_kind]
    merged = q.merge(base, on=base_keys + ["seed"], how="inner")
    merged["drop"] = merged["baseline"] - merged[metric]
    g = merged.groupby(by + ["schedule_kind"], dropna=False)["drop"]
    out = pd.DataFrame({"drop_mean": g.mean(), "drop_std": g.std(ddof=1).fillna(0.0), "n_seeds": g.size()})
    return out.reset_index()
