"""Vectorized evaluation of many (plan x accelerator x batch size) points with numpy.

The step time is a sum over ops, and every op belongs either to one quantizable layer in one state
(base precision or a recipe) or to the plan-independent rest. So: build the ops of every (layer, state) once
per batch size, time all of them on all profiles in one broadcast (ops x profiles), sum them per
(layer, state) group, then gather each plan's groups. Results equal :func:`dpquant_sim.cost.model.step_cost`
(same op list, same per-op formula), tested on random points.

>>> import torch.nn as tnn
>>> from dpquant_sim.nn.shapes import trace_layers
>>> from dpquant_sim.cost.profiles import load_profiles
>>> shapes = trace_layers(tnn.Sequential(tnn.Linear(64, 64), tnn.ReLU(), tnn.Linear(64, 10)), (64,))
>>> res = sweep(shapes, [{}, {"0": "fp8"}], list(load_profiles().values()), [32, 256])
>>> res.roofline_s.shape  # plans x profiles x batches
(2, 18, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dpquant_sim.cost.flops import (
    dp_layer_ops, first_param_layer, gemm_layer_ops, global_ops, memory_bytes, plan_mapping, vector_layer_ops,
)
from dpquant_sim.cost.profiles import PRECISIONS, HardwareProfile
from dpquant_sim.nn.shapes import LayerShape

_CLASSES = (*PRECISIONS, "vector")


@dataclass(frozen=True)
class SweepResult:
    """Arrays indexed [plan, profile, batch]; seconds per step unless stated."""

    plans: tuple[dict, ...]
    profiles: tuple[str, ...]
    batches: tuple[float, ...]
    theoretical_s: np.ndarray
    roofline_s: np.ndarray
    memory_bytes: np.ndarray  # [plan, batch]
    fits: np.ndarray  # [plan, profile, batch] bool
    energy_j: np.ndarray = field(repr=False)  # NaN where the TDP is unpublished
    quantized_flop_share: np.ndarray = field(repr=False)  # [plan, batch]

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per (plan index, profile, batch)."""
        P, H, B = self.roofline_s.shape
        pi, hi, bi = np.meshgrid(np.arange(P), np.arange(H), np.arange(B), indexing="ij")
        return pd.DataFrame({
            "plan": pi.ravel(), "hw": np.asarray(self.profiles)[hi.ravel()],
            "batch": np.asarray(self.batches)[bi.ravel()],
            "theoretical_s": self.theoretical_s.ravel(), "roofline_s": self.roofline_s.ravel(),
            "energy_j": self.energy_j.ravel(), "memory_gb": self.memory_bytes[pi, bi].ravel() / 1e9,
            "fits": self.fits.ravel(), "quantized_flop_share": self.quantized_flop_share[pi, bi].ravel(),
        })


def _profile_arrays(profiles: Sequence[HardwareProfile]):
    """Per-profile rates [H, C] (roofline and theoretical), efficiencies, bandwidths, floors."""
    H, C = len(profiles), len(_CLASSES)
    peak = np.empty((H, C))
    theo = np.empty((H, C))
    for h, p in enumerate(profiles):
        for c, prec in enumerate(PRECISIONS):
            peak[h, c] = p.peak_flops(prec) * p.efficiency.gemm.value
            theo[h, c] = p.peak_flops(prec)
        peak[h, -1] = p.vector_flops if p.vector_flops is not None else np.inf
        theo[h, -1] = p.vector_flops or p.peak_flops("fp32")
    bw = np.array([p.bandwidth * p.efficiency.bandwidth.value for p in profiles])
    launch = np.array([p.launch_s for p in profiles])
    tdp = np.array([np.nan if p.tdp_w is None else p.tdp_w for p in profiles])
    cap = np.array([p.capacity_bytes for p in profiles])
    return peak, theo, bw, launch, tdp, cap


def sweep(shapes: Sequence[LayerShape], plans: Sequence[Any], profiles: Sequence[HardwareProfile],
          batches: Sequence[float], *, base: str = "bf16", dp: bool = True, optimizer: str = "sgd") -> SweepResult:
    """Theoretical and roofline step time of every (plan, profile, batch) point.

    ``plans``: EpochPlans or {layer: recipe} mappings (others run at ``base``).
    """
    maps = [plan_mapping(p, shapes) for p in plans]
    gemm = [s for s in shapes if s.is_gemm]
    lidx = {s.name: i for i, s in enumerate(gemm)}
    # states per layer: 0 = base precision, then each recipe that some plan uses for this layer
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

    peak, theo_rate, bw, launch, tdp, cap = _profile_arrays(profiles)
    first = first_param_layer(shapes)
    cls_index = {c: i for i, c in enumerate(_CLASSES)}
    P, H, NB = len(maps), len(profiles), len(batches)
    theo_out = np.empty((P, H, NB))
    roof_out = np.empty((P, H, NB))
    qshare = np.empty((P, NB))
    for bi, batch in enumerate(batches):
        fl, by, cl, la, th, grp, gq = [], [], [], [], [], [], []
        for li, s in enumerate(gemm):
            for si, r in enumerate(states[li]):
                for o in gemm_layer_ops(s, batch, r, base=base, dp=dp, needs_dgrad=s.name != first):
                    fl.append(o.flops); by.append(o.bytes); cl.append(cls_index[o.precision]); la.append(o.launches)
                    th.append(o.theo); grp.append(offsets[li] + si)
                    gq.append(o.flops if (o.kind == "gemm" and o.quantized) else 0.0)
        gemm_total = 0.0
        for s in shapes:
            rest = [] if s.is_gemm else vector_layer_ops(s, batch, base=base, dp=dp)
            if dp:
                rest += dp_layer_ops(s, batch)
            for o in rest:
                fl.append(o.flops); by.append(o.bytes); cl.append(cls_index[o.precision]); la.append(o.launches)
                th.append(o.theo); grp.append(G); gq.append(0.0)
        for o in global_ops(sum(s.params for s in shapes), dp=dp, optimizer=optimizer):
            fl.append(o.flops); by.append(o.bytes); cl.append(cls_index[o.precision]); la.append(o.launches)
            th.append(o.theo); grp.append(G); gq.append(0.0)
        fl_a, by_a, la_a = np.array(fl), np.array(by), np.array(la, dtype=float)
        cl_a, th_a, grp_a = np.array(cl), np.array(th, dtype=bool), np.array(grp)
        # [H, ops]
        t_roof = np.maximum(fl_a[None, :] / peak[:, cl_a], by_a[None, :] / bw[:, None]) + launch[:, None] * la_a
        t_theo = np.where(th_a[None, :], fl_a[None, :] / theo_rate[:, cl_a], 0.0)
        onehot = np.zeros((len(fl), G + 1))
        onehot[np.arange(len(fl)), grp_a] = 1.0
        g_roof, g_theo = t_roof @ onehot, t_theo @ onehot  # [H, G+1]
        roof_out[:, :, bi] = g_roof[:, GI].sum(axis=2).T + g_roof[:, G][None, :]
        theo_out[:, :, bi] = g_theo[:, GI].sum(axis=2).T + g_theo[:, G][None, :]
        # quantized FLOP share: per-group quantized and total GEMM FLOPs
        gemm_fl = np.bincount(grp_a, weights=np.where(cl_a < len(PRECISIONS), fl_a, 0.0), minlength=G + 1)
        q_fl = np.bincount(grp_a, weights=np.array(gq), minlength=G + 1)
        gemm_total = gemm_fl[GI].sum(axis=1)
        qshare[:, bi] = np.divide(q_fl[GI].sum(axis=1), gemm_total, out=np.zeros(P), where=gemm_total > 0)
    # memory is additive over layers and affine in the batch size: base plan + per-(layer, state) deltas
    def _mem(mapping: dict, b: int) -> float:
        return memory_bytes(shapes, mapping, batch=b, base=base, dp=dp, optimizer=optimizer).total

    m0, m1 = _mem({}, 0), _mem({}, 1)
    d0, d1 = np.zeros(G + 1), np.zeros(G + 1)
    for li, s in enumerate(gemm):
        for si, r in enumerate(states[li]):
            if r is not None:
                d0[offsets[li] + si] = _mem({s.name: r}, 0) - m0
                d1[offsets[li] + si] = _mem({s.name: r}, 1) - m1
    a, slope = m0 + d0[GI].sum(axis=1), (m1 - m0) + (d1 - d0)[GI].sum(axis=1)
    bceil = np.ceil(np.asarray(batches, dtype=float))
    mem = a[:, None] + slope[:, None] * bceil[None, :]
    fits = mem[:, None, :] <= cap[None, :, None]
    energy = roof_out * tdp[None, :, None]
    return SweepResult(tuple(maps), tuple(p.name for p in profiles), tuple(batches), theo_out, roof_out, mem, fits,
                       energy, qshare)
