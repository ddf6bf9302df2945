"""Shared budget semantics: every schedule with budget ``b`` quantizes the same EXPECTED share of compute.

Notation: layers l = 1..L with sizes w_l (forward GEMM FLOPs per example for ``unit='flops'``, 1 for
``unit='layers'``), W = sum_l w_l, and non-negative sampling weights a_l (a schedule's preference, e.g.
dpquant's probabilities p_l; uniform for ``random``).

Inclusion probabilities (capped-proportional rule)::

    pi_l = min(1, c * a_l)        with c >= 0 the unique level such that   sum_l pi_l * w_l = b * W.

``f(c) = sum_l min(1, c a_l) w_l`` is continuous, piecewise linear and non-decreasing, so ``c`` is found
exactly by water-filling: sort layers by a_l (largest first); cap the top k at 1 and give the rest
``c_k = (b W - sum_{capped} w_l) / sum_{uncapped} a_l w_l``; k is the smallest count for which the largest
uncapped layer has ``c_k a_l <= 1``. Layers with equal a_l get equal pi_l. If the layers with a_l > 0 cannot
carry the budget alone (all capped at 1 and still short), the remainder is spread as one common probability
over the zero-weight layers (the limit a_l -> 0+ with equal a_l). With uniform a_l this gives pi_l = b for
every layer, in either unit.

Drawing the epoch's set (``draw_subset``): layers with pi_l = 1 are always in, pi_l = 0 never; the others
by randomized systematic (Madow) sampling: shuffle them, lay the pi_l end to end on [0, sum pi), draw one
uniform start U in [0, 1) and take the layers whose segment contains one of U, U+1, U+2, ... Each layer is
then included with probability exactly pi_l, so the EXPECTED quantized share is exactly b; the number of
quantized layers is floor or ceil of sum pi_l (less spread than independent draws, ``method='poisson'``).

Static subsets (``greedy_subset``) cannot meet an expectation; they take the prefix of the layers in the
given order (first / last / largest FLOPs first) whose share is NEAREST to b (ties go to the larger prefix;
at least one layer), so a static baseline quantizes as close to the budget as its layer sizes allow. The
realized share is recorded in every plan.

>>> import numpy as np
>>> pi = inclusion_probabilities([0.7, 0.2, 0.1], [1, 1, 2], budget=0.75)
>>> [round(float(v), 4) for v in pi], round(expected_share(pi, [1, 1, 2]), 12)
([1.0, 1.0, 0.5], 0.75)
>>> greedy_subset(["a", "b", "c"], [10, 30, 60], 0.3, order="first")
['a', 'b']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from dpquant_sim.errors import ConfigError, check_choice

if TYPE_CHECKING:  # pragma: no cover
    from dpquant_sim.plan import EpochPlan
    from dpquant_sim.schedules.base import ScheduleContext

BudgetUnit = Literal["flops", "layers"]
DrawMethod = Literal["systematic", "poisson"]
GreedyOrder = Literal["first", "last", "largest"]
BUDGET_UNITS: tuple[str, ...] = ("flops", "layers")
DRAW_METHODS: tuple[str, ...] = ("systematic", "poisson")
GREEDY_ORDERS: tuple[str, ...] = ("first", "last", "largest")

# Relative tolerance on "share reaches the budget" and on the water-filling identity (float64 round-off).
_TOL = 1e-12


def _check_budget(budget: float) -> float:
    b = float(budget)
    if not (0.0 < b <= 1.0) or not np.isfinite(b):
        raise ConfigError("budget", budget, "a share in (0, 1]")
    return b


def layer_sizes(flops: Sequence[float], unit: str) -> np.ndarray:
    """Sizes w_l that the budget counts: the FLOPs themselves (``'flops'``) or 1 per layer (``'layers'``).

    >>> layer_sizes([10, 30], "layers").tolist()
    [1.0, 1.0]
    """
    check_choice("budget_unit", unit, BUDGET_UNITS)
    f = np.asarray(flops, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ConfigError("layers", f.shape, "at least one quantizable layer")
    if unit == "layers":
        return np.ones_like(f)
    if np.any(f < 0) or not np.all(np.isfinite(f)) or f.sum() <= 0:
        raise ConfigError("flops", f.tolist(), "finite non-negative FLOPs with a positive total")
    return f


def inclusion_probabilities(weights: Sequence[float], sizes: Sequence[float], budget: float) -> np.ndarray:
    """Capped-proportional inclusion probabilities pi_l = min(1, c a_l) with sum pi_l w_l = b W exactly.

    Args:
        weights: sampling weights a_l >= 0 (need not sum to 1; only ratios matter).
        sizes: layer sizes w_l >= 0 in the budget's unit (FLOPs or 1), W = sum w_l > 0.
        budget: b in (0, 1], the expected share of W to quantize.

    Returns:
        float64 array pi in [0, 1]^L.

    >>> inclusion_probabilities([1, 1, 1, 1], [1, 2, 3, 4], 0.25).tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    b = _check_budget(budget)
    a = np.asarray(weights, dtype=np.float64)
    w = np.asarray(sizes, dtype=np.float64)
    if a.shape != w.shape or a.ndim != 1 or a.size == 0:
        raise ConfigError("weights", a.shape, f"one weight per layer (shape {w.shape})")
    if np.any(a < 0) or not np.all(np.isfinite(a)):
        raise ConfigError("weights", a.tolist(), "finite non-negative sampling weights")
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ConfigError("sizes", w.tolist(), "finite non-negative sizes with a positive total")
    target = b * w.sum()
    pi = np.zeros_like(a)
    if b >= 1.0:
        pi[:] = 1.0
        return pi
    pos = np.flatnonzero(a > 0)
    order = pos[np.argsort(-a[pos], kind="stable")]  # largest weight first; ties keep layer order
    remaining = target
    denom = float(np.sum(a[order] * w[order]))
    k = 0
    while k < order.size:
        if denom <= 0:  # only zero-size layers left: capping them costs nothing
            pi[order[k:]] = 1.0
            k = order.size
            remaining = max(remaining, 0.0)
            break
        c = remaining / denom
        top = order[k]
        if c * a[top] <= 1.0:
            pi[order[k:]] = np.minimum(1.0, c * a[order[k:]])
            remaining = 0.0
            break
        pi[top] = 1.0
        remaining -= w[top]
        denom -= a[top] * w[top]
        k += 1
    if k == order.size and remaining > _TOL * target:
        # Every positive-weight layer is capped and the budget is still not met: spread the rest evenly over
        # the zero-weight layers (the a_l -> 0+ limit with equal weights).
        zero = np.flatnonzero(a == 0)
        wz = w[zero].sum()
        if wz <= 0:  # pragma: no cover - impossible: b < 1 and all capped means some size is left
            raise ConfigError("budget", budget, "a share the layers can carry")
        pi[zero] = min(1.0, remaining / wz)
    return np.clip(pi, 0.0, 1.0)


def expected_share(pi: Sequence[float], sizes: Sequence[float]) -> float:
    """Closed-form expected quantized share sum_l pi_l w_l / W."""
    p = np.asarray(pi, dtype=np.float64)
    w = np.asarray(sizes, dtype=np.float64)
    return float(np.dot(p, w) / w.sum())


def draw_subset(pi: Sequence[float], rng: np.random.Generator, method: str = "systematic") -> np.ndarray:
    """Draw a boolean mask with P(mask[l]) = pi[l] exactly (see the module docstring).

    >>> m = draw_subset([1.0, 0.0, 0.5, 0.5], np.random.default_rng(0))
    >>> bool(m[0]), bool(m[1]), int(m.sum())
    (True, False, 2)
    """
    check_choice("method", method, DRAW_METHODS)
    p = np.asarray(pi, dtype=np.float64)
    if p.ndim != 1 or np.any(p < 0) or np.any(p > 1) or not np.all(np.isfinite(p)):
        raise ConfigError("pi", p.tolist(), "inclusion probabilities in [0, 1]")
    if method == "poisson":
        return rng.random(p.size) < p
    mask = p >= 1.0
    free = np.flatnonzero((p > 0.0) & (p < 1.0))
    if free.size:
        perm = free[rng.permutation(free.size)]
        cum = np.concatenate([[0.0], np.cumsum(p[perm])])
        u = rng.random()
        # a point u + j lies in [cum[i], cum[i+1]) iff the number of points below the right edge grows there
        hits = np.floor(cum[1:] - u) > np.floor(cum[:-1] - u)
        mask[perm[hits]] = True
    return mask


def realized_share(mask: Sequence[bool], sizes: Sequence[float]) -> float:
    """Share of W covered by the drawn mask."""
    m = np.asarray(mask, dtype=bool)
    w = np.asarray(sizes, dtype=np.float64)
    return float(w[m].sum() / w.sum())


def greedy_subset(names: Sequence[str], sizes: Sequence[float], budget: float, order: str = "first") -> list[str]:
    """Deterministic static subset: the prefix of the layers in ``order`` whose share is nearest ``budget``.

    Ties between two prefixes go to the larger one; the prefix has at least one layer. ``'largest'`` sorts
    by size, descending, ties in layer order. The result keeps the model's layer order.

    >>> greedy_subset(["a", "b", "c", "d"], [1, 1, 1, 1], 0.5, order="last")
    ['c', 'd']
    >>> greedy_subset(["a", "b", "c"], [10, 30, 60], 0.5, order="largest")
    ['c']
    """
    b = _check_budget(budget)
    check_choice("select", order, GREEDY_ORDERS)
    w = np.asarray(sizes, dtype=np.float64)
    if len(names) != w.size or w.size == 0:
        raise ConfigError("sizes", w.tolist(), f"one size per layer ({len(names)} layers)")
    idx = list(range(w.size))
    if order == "last":
        idx.reverse()
    elif order == "largest":
        idx.sort(key=lambda i: (-w[i], i))
    shares = np.cumsum(w[idx]) / w.sum()
    gaps = np.abs(shares - b)
    # nearest prefix; among (numerically) equal gaps the last, i.e. the larger prefix
    k = int(np.flatnonzero(gaps <= gaps.min() + _TOL)[-1]) + 1
    return [names[i] for i in sorted(idx[:k])]


def flop_share(flops: Sequence[float], mask: Sequence[bool]) -> float:
    """Share of GEMM FLOPs that the mask quantizes (what every plan records, whatever the budget unit)."""
    f = np.asarray(flops, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    tot = f.sum()
    return float(f[m].sum() / tot) if tot > 0 else float(m.mean())


def build_plan(
    ctx: "ScheduleContext",
    mask: Sequence[bool],
    *,
    scores: "dict[str, float] | None" = None,
    probs: "dict[str, float] | None" = None,
    info: "dict | None" = None,
) -> "EpochPlan":
    """The EpochPlan for ``ctx`` quantizing the masked layers with ``ctx.recipe``; records the FLOP share."""
    from dpquant_sim.plan import EpochPlan

    m = np.asarray(mask, dtype=bool)
    layers = list(ctx.layers)
    if m.size != len(layers):
        raise ConfigError("mask", m.size, f"one entry per layer ({len(layers)})")
    quantized = {layer.name: ctx.recipe for layer, keep in zip(layers, m) if keep}
    share = flop_share([layer.flops for layer in layers], m) if layers else 0.0
    return EpochPlan(
        epoch=ctx.epoch, quantized=quantized, scores=scores, probs=probs, quantized_flop_share=share,
        info=dict(info or {}),
    )


# --- k layers without replacement, each draw proportional to the remaining weights (the DPQuant paper) -------
def layer_count(budget: float, n_layers: int) -> int:
    """k = round(budget x n) layers, rounding halves up, at least 1 (budget > 0) and at most n.

    >>> layer_count(0.5, 7), layer_count(0.75, 4), layer_count(0.9, 21), layer_count(0.01, 5)
    (4, 3, 19, 1)
    """
    b = _check_budget(budget)
    n = int(n_layers)
    if n < 1:
        raise ConfigError("layers", n, "at least one quantizable layer")
    return int(min(n, max(1, np.floor(b * n + 0.5))))


def softmax_weights(logits: Sequence[float]) -> np.ndarray:
    """softmax(logits) in float64, computed stably (max subtracted).

    >>> [round(float(v), 6) for v in softmax_weights([0.0, np.log(3.0)])]
    [0.25, 0.75]
    """
    a = np.asarray(logits, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
        raise ConfigError("logits", a.tolist(), "a non-empty vector of finite numbers")
    e = np.exp(a - a.max())
    return e / e.sum()


def successive_draw(logits: Sequence[float], k: int, rng: np.random.Generator) -> np.ndarray:
    """Draw k distinct indices one at a time, each with probability proportional to exp(logit) among the
    indices not drawn yet (successive sampling, the Plackett-Luce top k). Returns the indices in draw order.

    Weights are handled in log space (each step's softmax over the remaining logits), so weights that would
    underflow as probabilities still rank correctly and the draw never divides by zero.

    >>> successive_draw([0.0, 0.0, -1e6], 2, np.random.default_rng(0)).tolist() in ([0, 1], [1, 0])
    True
    """
    a = np.asarray(logits, dtype=np.float64)
    n = a.size
    if not 1 <= int(k) <= n:
        raise ConfigError("k", k, f"a layer count in 1..{n}")
    remaining = list(range(n))
    out = []
    for _ in range(int(k)):
        p = softmax_weights(a[remaining])
        u = rng.random()
        j = int(min(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"), len(remaining) - 1))
        out.append(remaining.pop(j))
    return np.asarray(out, dtype=np.int64)


# Quadrature for successive_inclusion_probabilities: composite 12-point Gauss-Legendre on panels of width 1
# over g in [-4, 38] of a standard Gumbel variable (mass outside: exp(-e^4) < 1e-23 below, e^-38 < 4e-17 above).
def _gumbel_quadrature(lo: float = -4.0, hi: float = 38.0, width: float = 1.0, order: int = 12):
    x, w = np.polynomial.legendre.leggauss(order)
    mids = np.arange(lo + width / 2, hi, width)
    g = (mids[:, None] + x[None, :] * width / 2).ravel()
    wt = np.tile(w * width / 2, mids.size)
    return g, wt * np.exp(-g - np.exp(-g))  # nodes and weights x Gumbel density


_GUMBEL_NODES, _GUMBEL_WEIGHTS = _gumbel_quadrature()


def successive_inclusion_probabilities(logits: Sequence[float], k: int) -> np.ndarray:
    """P(layer l is among the k drawn by ``successive_draw``), for every l (float64; sums to k).

    Successive sampling is the top k of the keys a_l + G_l with G_l i.i.d. standard Gumbel (the Gumbel-top-k
    identity), so, with q_j(x) = P(a_j + G_j > x) = 1 - exp(-e^(a_j - x)),

        P(l drawn) = E_G[ P(#{j != l : a_j + G_j > a_l + G} <= k - 1) ],

    a one-dimensional integral over the Gumbel variable G whose integrand is a Poisson-binomial CDF (dynamic
    programming over j, truncated at k states, or at n - k by counting the layers below instead). The integral
    is computed by composite Gauss-Legendre quadrature (504 nodes); the integrand is smooth, and against
    exhaustive enumeration of all orderings the error is below 1e-12 (tests/test_schedules_dpquant_paper.py).
    Cost: O(nodes x n^2 x min(k, n - k)): 40 ms for n = 21, about 4 s for n = 120 at k = 60 (2 loaded CPU cores).

    Inclusion probabilities are NOT proportional to softmax(a): drawing without replacement flattens them
    (a layer with half of the weight cannot be drawn twice).

    >>> [round(float(v), 6) for v in successive_inclusion_probabilities([np.log(2.0), 0.0, 0.0], 1)]
    [0.5, 0.25, 0.25]
    """
    a = np.asarray(logits, dtype=np.float64)
    n = a.size
    if a.ndim != 1 or n == 0 or not np.all(np.isfinite(a)):
        raise ConfigError("logits", a.tolist(), "a non-empty vector of finite numbers")
    k = int(k)
    if not 1 <= k <= n:
        raise ConfigError("k", k, f"a layer count in 1..{n}")
    if k == n:
        return np.ones(n)
    a = a - a.max()
    g, wt = _GUMBEL_NODES, _GUMBEL_WEIGHTS
    count_above = k - 1 < n - k  # track #{above} (k states) or #{below} (n - k states), whichever is fewer
    width = k if count_above else n - k
    out = np.empty(n)
    for lyr in range(n):
        x = a[lyr] + g  # [m] the threshold: layer l's key
        others = np.delete(a, lyr)
        q = -np.expm1(-np.exp(np.minimum(others[None, :] - x[:, None], 700.0)))  # [m, n-1] P(key_j > x)
        p = q if count_above else 1.0 - q  # probability that j is counted
        dist = np.zeros((g.size, width))
        dist[:, 0] = 1.0
        for j in range(n - 1):
            pj = p[:, j:j + 1]
            shifted = dist[:, :-1] * pj
            dist *= 1.0 - pj
            dist[:, 1:] += shifted  # mass beyond width - 1 is dropped: it cannot change the answer
        below = dist.sum(axis=1)  # P(count <= width - 1)
        ok = below if count_above else 1.0 - below  # P(#above <= k - 1) = P(#below >= n - k)
        out[lyr] = float(np.dot(wt, ok))
    return np.clip(out, 0.0, 1.0)
