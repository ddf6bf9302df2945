"""Proposition 1, checked per recipe: how a quantizer's error variance scales with the inf-norm of its input.

DPQuant's argument (DESIGN.md sections 1 and 7) rests on Proposition 1: for an unbiased max-scaled quantizer,
Var(q(x)) = Theta(||x||_inf^2). This module measures that law on the project's own quantizers, per recipe and
tensor role (per-sample, per-channel, MX and NVFP4 block scales included), over inputs of varying *spread*.

Every scaling here is (up to the rounding of the scale itself) scale invariant, so the law is a statement about
the *shape* of x. For one sample of n elements write

    rms^2  = ||x||_2^2 / n                        (mean square element)
    spread = ||x||_inf^2 / rms^2                  (1 for a flat vector ... n for a one-hot one)
    v      = mean_j E[(q(x)_j - x_j)^2] / rms^2   (quantization error per element, relative)

Proposition 1 says v = c * spread (at fixed ||x||_2 the variance grows as ||x||_inf^2). We fit
``log v = log c + b log spread`` over inputs of varying spread: ``b`` near 1 follows the proposition; ``b`` near 0
means the error tracks ||x||_2^2 instead (a floating-point grid with enough dynamic range: relative error per
element); in between, small elements underflow onto the scaled grid's lowest step (error ~ |x| * step, i.e.
``b`` ~ 1/2). For block scalings (``mx``, ``nvfp4``) we also fit against the mean squared *block* amax, the
statistic their scales actually use.

Two measurements per input, which tests compare against each other:

- :func:`expected_sq_error`: the exact E[(q(x) - x)^2] per element, from the format's grid (enumerated with
  ml_dtypes, independent of the project's quantizer) and the scale rule written out again in numpy: stochastic
  rounding between neighbours lo <= x <= hi has E = (x - lo)(hi - x); round-to-nearest min(x - lo, hi - x)^2;
  beyond the largest value the error is (|x| - max)^2 (saturation).
- :func:`realized_sq_error`: the mean over ``draws`` of (q(x) - x)^2 with the project's layer quantizers
  (``nn.layers.quantize_data`` / ``quantize_weight``, the code the engine runs, layouts included).

Example:
    >>> import torch
    >>> from dpquant_sim.nn.config import get_recipe
    >>> x = torch.tensor([[0.5, -1.0, 2.0, 4.0]])
    >>> float(expected_sq_error(x, get_recipe("int8").grad).sum()) > 0
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from dpquant_sim.analysis.variance import representable_values
from dpquant_sim.errors import ConfigError, check_choice
from dpquant_sim.numerics.spec import QuantSpec

_BLOCKS = {"mx": 32, "nvfp4": 16}
_E4M3_MAX, _FP4_MAX = 448.0, 6.0
ROLES = ("weight", "activation", "grad")
FAMILIES = ("outlier", "student_t", "contaminated")
# |b - 1| above this names a recipe as violating Var = Theta(||x||_inf^2) (documented in docs/results.md).
DEFAULT_TOLERANCE = 0.25


# ------------------------------------------------------------------------------------------------ exact error
def _grid_sq_error(t: np.ndarray, pos: np.ndarray, rounding: str) -> np.ndarray:
    """E[(q(t) - t)^2] on the non-negative grid ``pos`` (ascending, starts at 0) for |t| (saturating)."""
    t = np.abs(t)
    top = pos[-1]
    inside = np.minimum(t, top)
    i = np.clip(np.searchsorted(pos, inside, side="right") - 1, 0, len(pos) - 2)
    lo, hi = pos[i], pos[i + 1]
    if rounding == "stochastic":
        e = (inside - lo) * (hi - inside)
    else:
        e = np.minimum(inside - lo, hi - inside) ** 2
    return np.where(t > top, (t - top) ** 2, e)


def _e4m3_rne(v: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return np.minimum(v, _E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def expected_sq_error(x: "torch.Tensor | np.ndarray", spec: QuantSpec, *, conv: bool = False,
                      weight: bool = False) -> np.ndarray:
    """Exact E[(q(x) - x)^2] per element (float64, x's shape) for ``spec`` (no sampling).

    Args:
        x: the tensor as the layer quantizer sees it: dim 0 = examples (data) or output channels (weight).
        spec: format, scaling, rounding. Scalings none, tensor, channel, sample, mx, nvfp4.
        conv: a conv operand (4-d): block scalings run along channels (NHWC for data; input channels for
            weights), as ``nn.layers`` does.
        weight: ``x`` is a weight (only matters for the conv layout, which is the same for both here).

    Raises:
        ConfigError: a scaling or clip (SAWB) this reference does not know (use :func:`realized_sq_error` then).
    """
    a = np.asarray(x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    shape = a.shape
    sc = spec.scaling
    check_choice("scaling", sc, ("none", "tensor", "channel", "sample", "mx", "nvfp4"))
    check_choice("clip", spec.clip, ("amax",))  # SAWB clipping (LUQ's forward) has no closed form here
    vals = representable_values(spec.format)
    pos = vals[vals >= 0]
    fmax = float(pos[-1])
    permuted = conv and sc in _BLOCKS and a.ndim == 4
    if permuted:
        a = a.transpose(0, 2, 3, 1)
    if sc in ("none", "tensor", "channel", "sample"):
        if sc == "none":
            m = np.ones_like(a)
        elif sc == "tensor" or a.ndim <= 1:
            m = np.full_like(a, np.abs(a).max(initial=0.0) / fmax)
        else:  # channel (dim 0 of a weight) and sample (dim 0 of data) reduce the same way
            am = np.abs(a).reshape(a.shape[0], -1).max(axis=1, initial=0.0) / fmax
            m = np.broadcast_to(am.reshape(-1, *([1] * (a.ndim - 1))), a.shape)
        m = np.where(m > 0, m, 1.0)
        err = _grid_sq_error(a / m, pos, spec.rounding) * m * m
    else:
        block = _BLOCKS[sc]
        s = a.reshape(1, -1) if a.ndim <= 1 else a
        n = s.shape[-1]
        pad = (-n) % block
        if pad:
            s = np.concatenate([s, np.zeros((*s.shape[:-1], pad))], axis=-1)
        b = s.reshape(*s.shape[:-1], s.shape[-1] // block, block)
        bamax = np.abs(b).max(axis=-1, keepdims=True)
        if sc == "mx":
            with np.errstate(divide="ignore"):
                e = np.where(bamax > 0, np.floor(np.log2(np.where(bamax > 0, bamax, 1.0))), -127.0)
            m = 2.0 ** (np.clip(e - math.floor(math.log2(fmax)), -127, 127))
        else:  # nvfp4: per-sample fp32 scale S, e4m3 block scale (round to nearest even)
            amax_s = np.abs(s).reshape(s.shape[0], -1).max(axis=1)
            S = np.where(amax_s > 0, _E4M3_MAX * _FP4_MAX / np.where(amax_s > 0, amax_s, 1.0), 1.0)
            S = S.reshape(-1, *([1] * (b.ndim - 1)))
            sb = _e4m3_rne(bamax / _FP4_MAX * S)
            m = sb / S
        safe = np.where(m > 0, m, 1.0)
        err = np.where(m > 0, _grid_sq_error(b / safe, pos, spec.rounding) * safe * safe, b * b)
        err = err.reshape(*s.shape)[..., :n]
        err = err.reshape(a.shape)
    if permuted:
        err = err.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(err).reshape(shape)


def realized_sq_error(x: torch.Tensor, spec: QuantSpec, *, conv: bool = False, weight: bool = False,
                      draws: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over ``draws`` of (q(x) - x)^2 per element (float64, x's shape), with the engine's layer quantizers.

    Deterministic specs (round to nearest) need one draw. ``generator`` drives stochastic rounding (one is
    made from seed 0 if None).
    """
    from dpquant_sim.nn.layers import quantize_data, quantize_weight

    if draws < 1:
        raise ConfigError("draws", draws, "an integer >= 1")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    fn = quantize_weight if weight else quantize_data
    xf = x.detach().float()
    k = draws if spec.rounding == "stochastic" else 1
    acc = torch.zeros(xf.shape, dtype=torch.float64)
    for _ in range(k):
        acc += (fn(xf, spec, gen, conv=conv).double() - xf.double()) ** 2
    return acc / k


# ------------------------------------------------------------------------------------------------ inputs
def spread_inputs(family: str, *, n: int = 1024, points: int = 16, reps: int = 2, seed: int = 0) -> torch.Tensor:
    """Rows of ``n`` elements whose spread ||x||_inf^2 / rms^2 varies over the rows (float32, (points*reps, n)).

    Families (each keeps the largest elements from owning most of ||x||_2, so that ||x||_inf and ||x||_2 move
    apart): ``outlier`` (standard Gaussian bulk, one element set to +-M, M from 2 to sqrt(n)), ``student_t``
    (i.i.d. Student-t, degrees of freedom 60 down to 2: heavier tails, larger spread), ``contaminated``
    (standard Gaussian with 2% of the elements drawn with std M, M from 1 to sqrt(n)/2).
    """
    check_choice("family", family, FAMILIES)
    if n < 2 or points < 2 or reps < 1:
        raise ConfigError("n/points/reps", (n, points, reps), "n >= 2, points >= 2, reps >= 1")
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(points):
        t = p / (points - 1)
        for _ in range(reps):
            z = rng.standard_normal(n)
            if family == "outlier":
                z[rng.integers(n)] = 2.0 * ((math.sqrt(n) / 2.0) ** t) * rng.choice((-1.0, 1.0))
            elif family == "student_t":
                z = rng.standard_t(60.0 * ((2.0 / 60.0) ** t), n)
            else:
                z = np.where(rng.random(n) < 0.02, z * (math.sqrt(n) / 2.0) ** t, z)
            rows.append(z)
    return torch.from_numpy(np.stack(rows)).float()


# ------------------------------------------------------------------------------------------------ the law
@dataclass(frozen=True)
class LawFit:
    """Least-squares fit of ``log v = log c + b log spread`` for one (recipe, role).

    Attributes:
        exponent: b (1 = Proposition 1; 0 = error tracks ||x||_2^2); exponent_se its standard error.
        constant: c = exp(intercept), i.e. v / spread at spread 1.
        ratio_min, ratio_max: range of Var / ||x||_inf^2 = v / spread over the inputs (Theta needs it bounded).
        block_exponent: b against the mean squared block amax (block scalings; = exponent otherwise).
        follows: |exponent - 1| <= tolerance.
    """

    recipe: str
    role: str
    format: str
    scaling: str
    rounding: str
    exponent: float
    exponent_se: float
    constant: float
    ratio_min: float
    ratio_max: float
    block_exponent: float
    n_inputs: int
    follows: bool


def fit_power_law(spread: np.ndarray, v: np.ndarray) -> tuple[float, float, float]:
    """(b, se(b), c) of ``log v = log c + b log spread`` by ordinary least squares (inputs with v > 0).

    >>> s = np.array([1.0, 10.0, 100.0]); fit_power_law(s, 3 * s)[0]
    1.0
    """
    s, v = np.asarray(spread, float), np.asarray(v, float)
    ok = (s > 0) & (v > 0) & np.isfinite(s) & np.isfinite(v)
    if ok.sum() < 3:
        return math.nan, math.nan, math.nan
    X, Y = np.log(s[ok]), np.log(v[ok])
    A = np.stack([np.ones_like(X), X], 1)
    coef, *_ = np.linalg.lstsq(A, Y, rcond=None)
    resid = Y - A @ coef
    dof = max(1, len(X) - 2)
    cov = (resid @ resid / dof) * np.linalg.inv(A.T @ A)
    return round(float(coef[1]), 12), float(math.sqrt(max(cov[1, 1], 0.0))), float(math.exp(coef[0]))


def _block_spread(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Mean squared block amax / rms^2 per row (rows of a 2-d array; non-block scalings: the spread)."""
    rms2 = (x * x).mean(axis=1)
    block = _BLOCKS.get(spec.scaling)
    if block is None:
        return np.abs(x).max(axis=1) ** 2 / rms2
    n = x.shape[1]
    pad = (-n) % block
    b = np.concatenate([x, np.zeros((x.shape[0], pad))], 1).reshape(x.shape[0], -1, block)
    return (np.abs(b).max(axis=2) ** 2).mean(axis=1) / rms2


def law_points(recipes: Iterable[str], *, roles: Sequence[str] = ("grad",), families: Sequence[str] = FAMILIES,
               n: int = 1024, points: int = 16, reps: int = 2, draws: int = 4, seed: int = 0):
    """Per input row: spread, relative error v (realized with the engine's quantizer, and exact where the scale
    rule is known), for every (recipe, role). Tidy DataFrame."""
    import pandas as pd

    from dpquant_sim.nn.config import get_recipe

    for role in roles:
        check_choice("role", role, ROLES)
    rows = []
    gen = torch.Generator().manual_seed(seed + 1)
    for fam in families:
        x = spread_inputs(fam, n=n, points=points, reps=reps, seed=seed)
        xd = x.double().numpy()
        rms2 = (xd * xd).mean(axis=1)
        spread = np.abs(xd).max(axis=1) ** 2 / rms2
        for name in recipes:
            cfg = get_recipe(name)
            for role in roles:
                spec: QuantSpec = getattr(cfg, role)
                real = realized_sq_error(x, spec, weight=role == "weight", draws=draws, generator=gen)
                v_real = real.mean(dim=1).numpy() / rms2
                try:
                    v_exact = expected_sq_error(x, spec, weight=role == "weight").mean(axis=1) / rms2
                except ConfigError:
                    v_exact = np.full(len(xd), np.nan)
                bspread = _block_spread(xd, spec)
                for i in range(len(xd)):
                    rows.append({"recipe": name, "role": role, "format": spec.format, "scaling": spec.scaling,
                                 "rounding": spec.rounding, "family": fam, "n": n, "spread": float(spread[i]),
                                 "block_spread": float(bspread[i]), "v": float(v_real[i]),
                                 "v_exact": float(v_exact[i]), "ratio": float(v_real[i] / spread[i])})
    return pd.DataFrame(rows)


def fit_law(points_df, *, tolerance: float = DEFAULT_TOLERANCE):
    """One :class:`LawFit` row per (recipe, role) of :func:`law_points`' table (pooled over families)."""
    import pandas as pd

    out = []
    for (recipe, role), g in points_df.groupby(["recipe", "role"], sort=False):
        b, se, c = fit_power_law(g["spread"].to_numpy(), g["v"].to_numpy())
        bb, _, _ = fit_power_law(g["block_spread"].to_numpy(), g["v"].to_numpy())
        r = g["ratio"][g["v"] > 0]
        out.append(LawFit(recipe=recipe, role=role, format=g["format"].iloc[0], scaling=g["scaling"].iloc[0],
                          rounding=g["rounding"].iloc[0], exponent=b, exponent_se=se, constant=c,
                          ratio_min=float(r.min()) if len(r) else math.nan,
                          ratio_max=float(r.max()) if len(r) else math.nan, block_exponent=bb,
                          n_inputs=int(len(g)), follows=bool(abs(b - 1.0) <= tolerance)).__dict__)
    return pd.DataFrame(out)


__all__ = ["expected_sq_error", "realized_sq_error", "spread_inputs", "fit_power_law", "law_points", "fit_law",
           "LawFit", "FAMILIES", "ROLES", "DEFAULT_TOLERANCE"]
