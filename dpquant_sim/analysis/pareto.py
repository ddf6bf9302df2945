"""Pareto frontiers of (accuracy, throughput)-style objectives, with seed aggregation.

Dominance: point ``a`` dominates ``b`` when ``a`` is at least as good in both objectives and strictly better
in at least one. Consequently **points that are equal in both objectives never dominate each other: all of
them are on the front** (a tie is reported, not broken arbitrarily). Rows with a NaN objective are never on
the front.

Seeds are aggregated *before* the front is computed (mean, std, min, max, count per configuration), so one
lucky seed cannot put a schedule on the frontier; the front is drawn through the means and the spread is shown
as error bars.

>>> import pandas as pd
>>> df = pd.DataFrame({"acc": [0.9, 0.8, 0.9, 0.7], "tput": [1.0, 2.0, 1.0, 1.5]})
>>> pareto_mask(df["acc"], df["tput"]).tolist()   # the two (0.9, 1.0) ties are both kept
[True, True, True, False]
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from dpquant_sim.errors import ConfigError


def pareto_mask(x: Sequence[float], y: Sequence[float], maximize: tuple[bool, bool] = (True, True)) -> np.ndarray:
    """Boolean mask of the non-dominated points of two objectives, O(n log n).

    Args:
        x, y: objective values (same length). NaN rows are never on the front.
        maximize: per objective, True to maximize (e.g. accuracy, throughput), False to minimize (time, $).

    Returns:
        ``np.ndarray[bool]`` with True for points on the front (ties in both objectives all True).
    """
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ConfigError("x/y", f"shapes {xa.shape} and {ya.shape}", "two 1-D sequences of the same length")
    # Work in "larger is better" for both objectives.
    if not maximize[0]:
        xa = -xa
    if not maximize[1]:
        ya = -ya
    mask = np.zeros(xa.shape, dtype=bool)
    valid = np.flatnonzero(~(np.isnan(xa) | np.isnan(ya)))
    if valid.size == 0:
        return mask
    # Sort by x descending, then y descending; sweep groups of equal x.
    order = valid[np.lexsort((-ya[valid], -xa[valid]))]
    best_y = -np.inf  # best y among points with strictly larger x
    i = 0
    n = order.size
    while i < n:
        j = i
        xv = xa[order[i]]
        while j < n and xa[order[j]] == xv:
            j += 1
        group = order[i:j]
        gmax = ya[group[0]]  # group sorted by y descending
        for k in group:
            # Non-dominated iff it is the best y at this x (ties allowed) and beats every larger-x point in y.
            if ya[k] == gmax and ya[k] > best_y:
                mask[k] = True
        best_y = max(best_y, gmax)
        i = j
    return mask


def pareto_front(
    df: pd.DataFrame,
    x: str,
    y: str,
    maximize: tuple[bool, bool] = (True, True),
    *,
    by: str | Sequence[str] | None = None,
    column: str = "on_front",
) -> pd.DataFrame:
    """Return a copy of ``df`` with a boolean column ``column`` marking the Pareto-optimal rows.

    Args:
        df: one row per candidate (e.g. per configuration after :func:`aggregate_seeds`).
        x, y: objective columns.
        maximize: per objective, True to maximize.
        by: optional grouping column(s); a separate front is computed within each group (e.g. "accelerator").
        column: name of the added column.

    Example:
        >>> df = pd.DataFrame({"acc": [0.9, 0.8, 0.5], "time": [3.0, 1.0, 2.0]})
        >>> pareto_front(df, "acc", "time", maximize=(True, False))["on_front"].tolist()
        [True, True, False]
    """
    for c in (x, y):
        if c not in df.columns:
            raise ConfigError("column", c, tuple(df.columns))
    out = df.copy()
    if by is None or len(out) == 0:
        out[column] = pareto_mask(out[x], out[y], maximize) if len(out) else np.zeros(0, dtype=bool)
        return out
    keys = [by] if isinstance(by, str) else list(by)
    flags = np.zeros(len(out), dtype=bool)
    for _, idx in out.groupby(keys, sort=False, dropna=False).indices.items():
        flags[idx] = pareto_mask(out[x].to_numpy()[idx], out[y].to_numpy()[idx], maximize)
    out[column] = flags
    return out


def aggregate_seeds(
    df: pd.DataFrame,
    group: Iterable[str],
    metrics: Iterable[str],
    *,
    seed_col: str = "seed",
) -> pd.DataFrame:
    """Aggregate over seeds: per group, ``<m>_mean``, ``<m>_std`` (ddof=1; 0 for one seed), ``<m>_min``,
    ``<m>_max`` for each metric, plus ``n_seeds``.

    ``group`` should list every configuration column except the seed (schedule, budget, recipe, accelerator...).

    >>> df = pd.DataFrame({"s": ["a", "a", "b"], "seed": [0, 1, 0], "acc": [0.8, 0.9, 0.7]})
    >>> r = aggregate_seeds(df, ["s"], ["acc"])
    >>> [round(v, 3) for v in r["acc_mean"]], r["n_seeds"].tolist()
    ([0.85, 0.7], [2, 1])
    """
    group = [g for g in group if g != seed_col]
    metrics = list(metrics)
    missing = [c for c in group + metrics if c not in df.columns]
    if missing:
        raise ConfigError("column", missing[0], tuple(df.columns))
    g = df.groupby(group, sort=True, dropna=False)
    parts = {}
    for m in metrics:
        parts[f"{m}_mean"] = g[m].mean()
        parts[f"{m}_std"] = g[m].std(ddof=1).fillna(0.0)
        parts[f"{m}_min"] = g[m].min()
        parts[f"{m}_max"] = g[m].max()
    parts["n_seeds"] = g[seed_col].nunique() if seed_col in df.columns else g.size()
    return pd.DataFrame(parts).reset_index()


def seed_frontier(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    group: Iterable[str],
    by: str | Sequence[str] | None = "accelerator",
    maximize: tuple[bool, bool] = (True, True),
    seed_col: str = "seed",
) -> pd.DataFrame:
    """Aggregate ``x`` and ``y`` over seeds, then mark the front of the means within each ``by`` group.

    Returns the aggregated frame with ``on_front`` (columns ``<x>_mean``, ``<x>_std``, ... as in
    :func:`aggregate_seeds`). ``by`` columns are added to ``group`` automatically.
    """
    keys = [] if by is None else ([by] if isinstance(by, str) else list(by))
    group = list(dict.fromkeys(list(group) + keys))
    agg = aggregate_seeds(df, group, [x, y], seed_col=seed_col)
    return pareto_front(agg, f"{x}_mean", f"{y}_mean", maximize, by=keys or None)
