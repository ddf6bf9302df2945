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
