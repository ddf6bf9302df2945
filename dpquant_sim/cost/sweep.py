"""Vectorized evaluation of many (plan x accelerator x batch size x device count) points with numpy.

The step time is a sum over ops, and every op belongs either to one quantizable layer in one state
(base precision or a recipe) or to the plan-independent rest. So: build the ops of every (layer, state) once
per per-device batch size, time all of them on all profiles at once (GEMMs through the kernel model, one numpy
call per profile and tile family; vector ops in one broadcast), sum them per (layer, state) group, then gather
each plan's groups and add the exposed gradient all-reduce of each device count. Results equal
:func:`dpquant_sim.cost.model.step_cost` (same op list, same per-op formula), tested on random points.

>>> import torch.nn as tnn
>>> from dpquant_sim.nn.shapes import trace_layers
>>> from dpquant_sim.cost.profiles import load_profiles
>>> shapes = trace_layers(tnn.Sequential(tnn.Linear(64, 64), tnn.ReLU(), tnn.Linear(64, 10)), (64,))
>>> res = sweep(shapes, [{}, {"0": "fp8"}], list(load_profiles().values()), [32, 256], devices=[1, 8])
>>> res.roofline_s.shape  # plans x profiles x batches x device counts
(2, 18, 2, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from dpquant_sim.cost.comm import allreduce_s
from dpquant_sim.cost.flops import (
    dp_layer_ops, first_param_layer, gemm_layer_ops, global_ops, memory_bytes, plan_mapping, vector_layer_ops,
)
from dpquant_sim.cost.profiles import PRECISIONS, HardwareProfile
from dpquant_sim.errors import ConfigError

if TYPE_CHECKING:  # torch-, numpy- and pandas-free at import (the package imports this module eagerly)
    import numpy as np
    import pandas as pd

    from dpquant_sim.nn.shapes import LayerShape

_CLASSES = (*PRECISIONS, "vector")
GRAD_BYTES = 4.0


@dataclass(frozen=True)
class SweepResult:
    """Arrays indexed [plan, profile, batch, devices]; seconds per step unless stated. ``batch`` is the global
    number of examples per step, split evenly over the devices. Infeasible device counts (more than the
    profile's interconnect reaches) are NaN in every time array and False in ``feasible``."""

    plans: tuple[dict, ...]
    profiles: tuple[str, ...]
    batches: tuple[float, ...]
    devices: tuple[int, ...]
    theoretical_s: np.ndarray
    roofline_s: np.ndarray
    roofline_low_s: np.ndarray
    roofline_high_s: np.ndarray
    allreduce_s: np.ndarray  # exposed all-reduce seconds
    memory_bytes: np.ndarray  # [plan, batch, devices], per device
    fits: np.ndarray  # [plan, profile, batch, devices] bool
    feasible: np.ndarray  # [profile, devices] bool
    energy_j: np.ndarray = field(repr=False)  # all devices; NaN where the TDP is unpublished
    dollars: np.ndarray = field(repr=False)  # all devices; NaN where no price is recorded
    quantized_flop_share: np.ndarray = field(repr=False)  # [plan, batch]

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per (plan index, profile, batch, devices)."""
        import numpy as np
        import pandas as pd

        P, H, B, D = self.roofline_s.shape
        pi, hi, bi, di = np.meshgrid(np.arange(P), np.arange(H), np.arange(B), np.arange(D), indexing="ij")
        return pd.DataFrame({
            "plan": pi.ravel(), "hw": np.asarray(self.profiles)[hi.ravel()],
            "batch": np.asarray(self.batches)[bi.ravel()], "devices": np.asarray(self.devices)[di.ravel()],
            "theoretical_s": self.theoretical_s.ravel(), "roofline_s": self.roofline_s.ravel(),
            "roofline_low_s": self.roofline_low_s.ravel(), "roofline_high_s": self.roofline_high_s.ravel(),
            "allreduce_s": self.allreduce_s.ravel(), "energy_j": self.energy_j.ravel(),
            "dollars": self.dollars.ravel(), "memory_gb": self.memory_bytes[pi, bi, di].ravel() / 1e9,
            "fits": self.fits.ravel(), "quantized_flop_share": self.quantized_flop_share[pi, bi].ravel(),
        })


@dataclass(frozen=True)
class _Ops:
    """Struct of arrays for one per-device batch size."""

    flops: np.ndarray
    nbytes: np.ndarray
    cls: np.ndarray
    launches: np.ndarray
    theo: np.ndarray
    group: np.ndarray
    qflops: np.ndarray
    bwd: np.ndarray
    dims: np.ndarray  # [ops, 4]; NaN rows for vector ops


def _collect(shapes, gemm, states, offsets, G, batch, base, dp, optimizer, clipping) -> _Ops:
    import numpy as np

    cls_index = {c: i for i, c in enumerate(_CLASSES)}
    rows: list = []
    first = first_param_layer(shapes)

    def add(o, g):
        rows.append((o.flops, o.bytes, cls_index[o.precision], o.launches, o.theo, g,
                     o.flops if (o.kind == "gemm" and o.quantized) else 0.0, o.phase == "bwd",
                     o.dims if o.dims is not None else (np.nan,) * 4))

    for li, s in enumerate(gemm):
        for si, r in enumerate(states[li]):
            for o in gemm_layer_ops(s, batch, r, base=base, dp=dp, needs_dgrad=s.name != first, clipping=clipping):
                add(o, offsets[li] + si)
    for s in shapes:
        rest = [] if s.is_gemm else vector_layer_ops(s, batch, base=base, dp=dp)
        if dp:
            rest += dp_layer_ops(s, batch, clipping)
        for o in rest:
            add(o, G)
    for o in global_ops(sum(s.params for s in shapes), dp=dp, optimizer=optimizer):
        add(o, G)
    cols = list(zip(*rows))
    return _Ops(np.array(cols[0], float), np.array(cols[1], float), np.array(cols[2]), np.array(cols[3], float),
                np.array(cols[4], bool), np.array(cols[5]), np.array(cols[6], float), np.array(cols[7], bool),
                np.array(cols[8], float))


def _op_times(ops: _Ops, profiles: Sequence[HardwareProfile]) -> tuple[np.ndarray, np.ndarray]:
    """(roofline, theoretical) seconds [H, ops], the same per-op formulas as model.op_time."""
    import numpy as np

    from dpquant_sim.cost.gemm import get_tile_family, kernel_seconds

    H, n = len(profiles), len(ops.flops)
    roof = np.empty((H, n))
    theo = np.empty((H, n))
    is_gemm = ops.cls < len(PRECISIONS)
    vec = ~is_gemm
    for h, p in enumerate(profiles):
        bw = p.bandwidth * p.efficiency.bandwidth.value
        vr = p.vector_flops
        # vector ops
        comp = np.zeros(n) if vr is None else ops.flops / vr
        roof[h] = np.where(vec, np.maximum(comp, ops.nbytes / bw), 0.0)
        theo[h] = np.where(vec, ops.flops / vr if vr else ops.nbytes / p.bandwidth, 0.0)
        # GEMMs: resolved precision per class -> rate and tile family
        run = [p.resolve(c) for c in PRECISIONS]
        peak = np.array([p.peak_flops(c) for c in PRECISIONS])
        rate = np.array([p.peak_flops(r) * p.gemm_efficiency(r) for r in run])
        gi = np.nonzero(is_gemm)[0]
        theo[h, gi] = ops.flops[gi] / peak[ops.cls[gi]]
        if p.kernel is None:
            roof[h, gi] = np.maximum(ops.flops[gi] / rate[ops.cls[gi]], ops.nbytes[gi] / bw)
        else:
            k_fill, overlap = p.kernel_constants
            fam_of = [p.kernel.tiles_for(r) for r in run]
            for fam in set(fam_of):
                sel = gi[np.isin(ops.cls[gi], [c for c, f in enumerate(fam_of) if f == fam])]
                if len(sel) == 0:
                    continue
                d = ops.dims[sel]
                roof[h, sel] = kernel_seconds(d[:, 0], d[:, 1], d[:, 2], d[:, 3], ops.nbytes[sel],
                                              rate=rate[ops.cls[sel]], units=p.kernel.compute_units.value,
                                              family=get_tile_family(fam), k_fill=k_fill, overlap=overlap,
                                              bandwidth=bw)
            if p.kernel.measured is not None:  # measured tables override the model for exactly those GEMMs
                for i in gi:
                    t = p.measured_gemm_s(*ops.dims[i], PRECISIONS[ops.cls[i]])
                    if t is not None:
                        roof[h, i] = t
        roof[h] += p.launch_s * ops.launches
        theo[h] = np.where(ops.theo, theo[h], 0.0)
    return roof, theo


def sweep(shapes: Sequence[LayerShape], plans: Sequence[Any], profiles: Sequence[HardwareProfile],
          batches: Sequence[float], *, base: str = "bf16", dp: bool = True, optimizer: str = "sgd",
          devices: Sequence[int] = (1,), allreduce: str = "ring", clipping: str = "hooks") -> SweepResult:
    """Theoretical and roofline step time of every (plan, profile, batch, devices) point.

    ``plans``: EpochPlans or {layer: recipe} mappings (others run at ``base``). ``batches``: global examples per
    step; with N devices each runs batch / N. ``devices``: data-parallel device counts.
    """
    import numpy as np

    from dpquant_sim.cost.clipping import get_clip_cost

    devices = tuple(devices)
    for d in devices:
        if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 1:
            raise ConfigError("devices", d, "positive whole numbers of devices")
    maps = [plan_mapping(p, shapes) for p in plans]
    gemm = [s for s in shapes if s.is_gemm]
    lidx = {s.name: i for i, s in enumerate(gemm)}
    states: list[list[Any]] = [[None] for _ in gemm]
    Q = np.zeros((len(maps), len(gemm)), dtype=np.int64)
    for pi, m in enumerate(maps):
        for layer, r in m.items():
            st = states[lidx[layer]]
            if r not in st:
                st.append(r)
            Q[pi, lidx[layer]] = st.index(r)
    offsets = np.cumsum([0] + [len(st) for st in states])
    G = int(offsets[-1])  # number of (layer, state) groups; group G is the plan-independent rest
    GI = offsets[:-1][None, :] + Q  # [P, L] group index per plan and layer

    P, H, NB, ND = len(maps), len(profiles), len(batches), len(devices)
    shape4 = (P, H, NB, ND)
    theo_out, roof_out, ar_out = np.empty(shape4), np.empty(shape4), np.empty(shape4)
    qshare = np.empty((P, NB))
    n_params = sum(s.params for s in shapes)
    overlap = not (dp and get_clip_cost(clipping).full_backward_before_clip)
    feasible = np.array([[d <= p.max_devices for d in devices] for p in profiles])
    t_ar = np.array([[allreduce_s(p, GRAD_BYTES * n_params, d, allreduce) if ok else np.nan
                      for d, ok in zip(devices, row)] for p, row in zip(profiles, feasible)])  # [H, D]
    cache: dict[float, tuple] = {}
    for bi, batch in enumerate(batches):
        for di, ndev in enumerate(devices):
            b = batch / ndev
            if b not in cache:
                ops = _collect(shapes, gemm, states, offsets, G, b, base, dp, optimizer, clipping)
                t_roof, t_theo = _op_times(ops, profiles)
                onehot = np.zeros((len(ops.flops), G + 1))
                onehot[np.arange(len(ops.flops)), ops.group] = 1.0
                g_roof, g_theo = t_roof @ onehot, t_theo @ onehot  # [H, G+1]
                g_bwd = (t_roof * ops.bwd[None, :]) @ onehot
                roof = g_roof[:, GI].sum(axis=2).T + g_roof[:, G][None, :]  # [P, H]
                theo = g_theo[:, GI].sum(axis=2).T + g_theo[:, G][None, :]
                bwd = g_bwd[:, GI].sum(axis=2).T + g_bwd[:, G][None, :]
                gemm_fl = np.bincount(ops.group, weights=np.where(ops.cls < len(PRECISIONS), ops.flops, 0.0),
                                      minlength=G + 1)
                q_fl = np.bincount(ops.group, weights=ops.qflops, minlength=G + 1)
                tot = gemm_fl[GI].sum(axis=1)
                qs = np.divide(q_fl[GI].sum(axis=1), tot, out=np.zeros(P), where=tot > 0)
                cache[b] = (roof, theo, bwd, qs)
            roof, theo, bwd, qs = cache[b]
            tar = t_ar[:, di][None, :]  # [1, H]
            exposed = np.maximum(0.0, tar - bwd) if overlap else np.broadcast_to(tar, roof.shape)
            ok = feasible[:, di][None, :]
            roof_out[:, :, bi, di] = np.where(ok, roof + exposed, np.nan)
            theo_out[:, :, bi, di] = np.where(ok, theo, np.nan)
            ar_out[:, :, bi, di] = np.where(ok, exposed, np.nan)
            qshare[:, bi] = qs

    # memory is additive over layers and affine in the per-device batch: base plan + per-(layer, state) deltas
    def _mem(mapping: dict, b: int) -> float:
        return memory_bytes(shapes, mapping, batch=b, base=base, dp=dp, optimizer=optimizer, clipping=clipping).total

    m0, m1 = _mem({}, 0), _mem({}, 1)
    d0, d1 = np.zeros(G + 1), np.zeros(G + 1)
    for li, s in enumerate(gemm):
        for si, r in enumerate(states[li]):
            if r is not None:
                d0[offsets[li] + si] = _mem({s.name: r}, 0) - m0
                d1[offsets[li] + si] = _mem({s.name: r}, 1) - m1
    a, slope = m0 + d0[GI].sum(axis=1), (m1 - m0) + (d1 - d0)[GI].sum(axis=1)
    per_dev = np.ceil(np.asarray(batches, float)[:, None] / np.asarray(devices, float)[None, :])  # [B, D]
    mem = a[:, None, None] + slope[:, None, None] * per_dev[None, :, :]
    cap = np.array([p.capacity_bytes for p in profiles])
    fits = mem[:, None, :, :] <= cap[None, :, None, None]
    tdp = np.array([np.nan if p.tdp_w is None else p.tdp_w for p in profiles])
    price = np.array([np.nan if p.price_usd_per_s is None else p.price_usd_per_s for p in profiles])
    ndev = np.asarray(devices, float)[None, None, None, :]
    energy = roof_out * tdp[None, :, None, None] * ndev
    dollars = roof_out * price[None, :, None, None] * ndev
    lo = np.array([p.error_band[0] for p in profiles])[None, :, None, None]
    hi = np.array([p.error_band[1] for p in profiles])[None, :, None, None]
    return SweepResult(tuple(maps), tuple(p.name for p in profiles), tuple(batches), devices, theo_out, roof_out,
                       roof_out / (1.0 + hi), roof_out / (1.0 + lo), ar_out, mem, fits, feasible, energy, dollars,
                       qshare)


def device_frontier(df: pd.DataFrame, *, time: str = "roofline_s", cost: str = "dollars") -> pd.DataFrame:
    """Mark the Pareto-optimal rows of (time per step, cost per step) over every (hw, devices) option, per plan
    and batch: no other option is both faster and cheaper. Adds a boolean ``pareto`` column.

    >>> import pandas as pd
    >>> d = pd.DataFrame({"plan": 0, "batch": 256, "hw": ["a", "a", "b"], "devices": [1, 8, 1],
    ...                   "roofline_s": [8.0, 1.2, 4.0], "dollars": [1.0, 1.5, 2.0]})
    >>> device_frontier(d)["pareto"].tolist()
    [True, True, False]
    """
    out = df.copy()
    out["pareto"] = False
    keys = [k for k in ("plan", "batch") if k in out.columns]
    groups = out.groupby(keys, sort=False).groups.values() if keys else [out.index]
    for idx in groups:
        g = out.loc[idx].dropna(subset=[time, cost])
        g = g.sort_values([time, cost], kind="stable")
        best = math.inf
        for i, row in g.iterrows():
            if row[cost] < best:
                out.at[i, "pareto"] = True
                best = row[cost]
    return out
