"""Cost of one DP training step on an accelerator profile (one device or N data-parallel devices), and what a
plan buys over fp32/bf16.

Two estimates, reported side by side (a range, not a point):

* ``theoretical`` (the paper's convention): every op at its peak FLOP rate, nothing else. GEMMs at
  ``peak[precision]`` after fallbacks (A100 fp8 runs at the bf16 rate), non-GEMM layers and DP/optimizer work
  at the vector rate (never the matrix rate: where no vector rate is published they count as memory-bound,
  bytes / spec bandwidth). Quantize/cast overhead, launch floors and communication are left out, so with
  quantized GEMMs 4x faster this reproduces exactly T = T_est + (1 - p + p/4)(T_train - T_other) + T_other
  (DESIGN.md section 1), p being the quantized share of GEMM time.
* ``roofline``: GEMMs through the shape- and precision-aware kernel model (:mod:`dpquant_sim.cost.gemm`:
  tiles, waves, split-K, pipeline fill, per-precision efficiency, memory), vector ops
  max(FLOPs / vector rate, bytes / (bandwidth x bw_eff)), plus launches x floor, plus with N devices the
  exposed gradient all-reduce (:mod:`dpquant_sim.cost.comm`). It comes with an error band: the range of the
  kernel model's cross-validated errors on measured GEMMs (``profile.error_band``).

>>> import torch.nn as tnn
>>> from dpquant_sim.nn.shapes import trace_layers
>>> from dpquant_sim.cost.profiles import get_profile
>>> shapes = trace_layers(tnn.Sequential(tnn.Linear(512, 512), tnn.ReLU(), tnn.Linear(512, 10)), (512,))
>>> est = estimate(shapes, {"0": "fp8"}, get_profile("h100_sxm"), batch=256)
>>> est.speedup_vs_bf16.theoretical > 1.0
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd

from dpquant_sim.cost.comm import allreduce_s, check_devices, exposed_allreduce_s
from dpquant_sim.cost.flops import MemoryFit, Op, memory_bytes, plan_mapping, step_ops
from dpquant_sim.cost.gemm import get_tile_family, kernel_seconds
from dpquant_sim.cost.profiles import HardwareProfile
from dpquant_sim.errors import ConfigError

if TYPE_CHECKING:  # torch-free at import: profiles and help never load torch
    from dpquant_sim.nn.shapes import LayerShape

MODES: tuple[str, ...] = ("theoretical", "roofline")
GRAD_BYTES = 4.0  # clipped gradient sums are all-reduced in fp32


def theo_vector_rate(profile: HardwareProfile) -> float | None:
    """FLOP/s of vector ops in the theoretical estimate (None: unpublished, counted as memory-bound)."""
    return profile.vector_flops


def gemm_kernel_s(op: Op, profile: HardwareProfile) -> float:
    """Kernel seconds of one GEMM op on ``profile`` (no launch floor): the shape-aware kernel model."""
    run = profile.resolve(op.precision)
    rate = profile.peak_flops(run) * profile.gemm_efficiency(run)
    bw = profile.bandwidth * profile.efficiency.bandwidth.value
    if op.dims is None or profile.kernel is None:  # untiled: the classic roofline max
        return float(max(op.flops / rate, op.bytes / bw))
    m, k, n, b = op.dims
    measured = profile.measured_gemm_s(m, k, n, b, run)
    if measured is not None:  # a measured table overrides the model for exactly this GEMM
        return measured
    k_fill, overlap = profile.kernel_constants
    return float(kernel_seconds(m, k, n, b, op.bytes, rate=rate, units=profile.kernel.compute_units.value,
                                family=get_tile_family(profile.kernel.tiles_for(run)), k_fill=k_fill,
                                overlap=overlap, bandwidth=bw))


def op_time(op: Op, profile: HardwareProfile, mode: str) -> float:
    """Seconds for one op under ``mode`` ('theoretical' or 'roofline')."""
    if mode == "theoretical":
        if not op.theo:
            return 0.0
        if op.kind == "gemm":
            return op.flops / profile.peak_flops(op.precision)
        vr = theo_vector_rate(profile)
        return op.flops / vr if vr else op.bytes / profile.bandwidth
    if mode != "roofline":
        raise ConfigError("mode", mode, MODES)
    if op.kind == "gemm":
        return gemm_kernel_s(op, profile) + op.launches * profile.launch_s
    vr = profile.vector_flops
    compute = 0.0 if vr is None else op.flops / vr
    memory = op.bytes / (profile.bandwidth * profile.efficiency.bandwidth.value)
    return max(compute, memory) + op.launches * profile.launch_s


def band_times(t: float, profile: HardwareProfile) -> tuple[float, float]:
    """(low, high) seconds a measured time could take given a prediction ``t`` and the profile's error band
    (errors are predicted / measured - 1 in [low, high], so measured = t / (1 + error))."""
    lo, hi, _ = profile.error_band
    return t / (1.0 + hi), t / (1.0 + lo)


def fallbacks(ops: Sequence[Op], profile: HardwareProfile) -> dict[str, str]:
    """{requested precision: precision that runs} for every GEMM precision without a native path."""
    out = {}
    for o in ops:
        if o.kind == "gemm" and o.precision not in out:
            run = profile.resolve(o.precision)
            if run != o.precision:
                out[o.precision] = run
    return out


def format_fallbacks(fb: dict[str, str]) -> str:
    """'fp4->fp8, fp6->fp8' ('' when everything runs natively)."""
    return ", ".join(f"{k}->{v}" for k, v in sorted(fb.items()))


@dataclass(frozen=True)
class StepCost:
    """One step of one configuration on one profile (seconds per step; batch = examples per step over all
    ``devices``; energy and dollars count every device)."""

    profile: str
    batch: float
    base: str
    theoretical_s: float
    roofline_s: float
    gemm_flops: float
    quantized_flop_share: float  # share of executed GEMM FLOPs that run in a low-precision recipe
    memory: MemoryFit  # per device
    energy_j: float | None  # roofline time x TDP x devices
    dollars: float | None  # roofline time x price x devices
    breakdown: pd.DataFrame = field(repr=False, compare=False)
    devices: int = 1
    allreduce_s: float = 0.0  # exposed (on the critical path)
    allreduce_total_s: float = 0.0
    roofline_low_s: float = 0.0
    roofline_high_s: float = 0.0
    band_basis: str = "generic"
    fallbacks: dict = field(default_factory=dict, compare=False)

    def time_s(self, mode: str) -> float:
        if mode not in MODES:
            raise ConfigError("mode", mode, MODES)
        return self.theoretical_s if mode == "theoretical" else self.roofline_s

    def by(self, *cols: str, mode: str = "roofline") -> pd.Series:
        """Seconds grouped by breakdown columns, e.g. ``by('precision')``, ``by('layer', 'op')``."""
        return self.breakdown.groupby(list(cols), sort=False)[f"{mode}_s"].sum()


@dataclass(frozen=True)
class Speedup:
    """Baseline time / this time (> 1 = faster)."""

    theoretical: float
    roofline: float


@dataclass(frozen=True)
class CostEstimate:
    """A plan's step cost with its fp32 and bf16 baselines (same model, batch, devices, profile, DP setting)."""

    step: StepCost
    fp32: StepCost
    bf16: StepCost

    @property
    def speedup_vs_fp32(self) -> Speedup:
        return Speedup(self.fp32.theoretical_s / self.step.theoretical_s, self.fp32.roofline_s / self.step.roofline_s)

    @property
    def speedup_vs_bf16(self) -> Speedup:
        return Speedup(self.bf16.theoretical_s / self.step.theoretical_s, self.bf16.roofline_s / self.step.roofline_s)

    def summary(self) -> dict[str, Any]:
        """Flat JSON-friendly dict of the headline numbers."""
        s = self.step
        return {
            "hw": s.profile, "devices": s.devices, "batch": s.batch, "base": s.base,
            "theoretical_s": s.theoretical_s, "roofline_s": s.roofline_s,
            "roofline_low_s": s.roofline_low_s, "roofline_high_s": s.roofline_high_s, "band_basis": s.band_basis,
            "allreduce_s": s.allreduce_s,
            "throughput_theoretical": s.batch / s.theoretical_s, "throughput_roofline": s.batch / s.roofline_s,
            "speedup_vs_fp32_theoretical": self.speedup_vs_fp32.theoretical,
            "speedup_vs_fp32_roofline": self.speedup_vs_fp32.roofline,
            "speedup_vs_bf16_theoretical": self.speedup_vs_bf16.theoretical,
            "speedup_vs_bf16_roofline": self.speedup_vs_bf16.roofline,
            "quantized_flop_share": s.quantized_flop_share, "gemm_flops": s.gemm_flops,
            "fallbacks": dict(s.fallbacks),
            "energy_j": s.energy_j, "dollars": s.dollars,
            "memory_gb": s.memory.total / 1e9,
            "capacity_gb": None if s.memory.capacity is None else s.memory.capacity / 1e9,
            "fits": s.memory.fits,
        }


def breakdown_frame(ops: Sequence[Op], profile: HardwareProfile) -> pd.DataFrame:
    """One row per op: layer, op, kind, phase, requested and resolved precision, FLOPs, bytes, both times."""
    rows = []
    for o in ops:
        rows.append({
            "layer": o.layer, "op": o.op, "kind": o.kind, "phase": o.phase, "precision": o.precision,
            "runs_as": profile.resolve(o.precision) if o.kind == "gemm" else "vector",
            "quantized": o.quantized, "flops": o.flops, "bytes": o.bytes,
            "theoretical_s": op_time(o, profile, "theoretical"), "roofline_s": op_time(o, profile, "roofline"),
        })
    return pd.DataFrame(rows)


def step_cost(shapes: Sequence[LayerShape], plan: Any, profile: HardwareProfile, *, batch: float,
              base: str = "bf16", dp: bool = True, optimizer: str = "sgd", overhead_s: float = 0.0,
              devices: int = 1, allreduce: str = "ring", clipping: str = "hooks") -> StepCost:
    """Cost of one step of ``batch`` examples over ``devices`` data-parallel devices (batch / devices each).

    ``overhead_s`` adds a fixed time to both estimates (e.g. an amortized estimator). The theoretical estimate
    has no communication term (peak FLOP rates only); the roofline adds the exposed all-reduce.
    """
    from dpquant_sim.cost.clipping import get_clip_cost

    check_devices(profile, devices)
    ops = step_ops(shapes, plan, batch=batch / devices, base=base, dp=dp, optimizer=optimizer, clipping=clipping)
    df = breakdown_frame(ops, profile)
    theo = math.fsum(df["theoretical_s"]) + overhead_s
    roof = math.fsum(df["roofline_s"]) + overhead_s
    t_ar = allreduce_s(profile, GRAD_BYTES * sum(s.params for s in shapes), devices, allreduce)
    t_bwd = math.fsum(df.loc[df["phase"] == "bwd", "roofline_s"])
    overlap = not (dp and get_clip_cost(clipping).full_backward_before_clip)
    exposed = exposed_allreduce_s(t_ar, t_bwd, overlap_backward=overlap)
    roof += exposed
    gemm = df[df["kind"] == "gemm"]
    gf = float(gemm["flops"].sum()) * devices
    qf = float(gemm.loc[gemm["quantized"], "flops"].sum()) * devices
    mem = memory_bytes(shapes, plan, batch=int(math.ceil(batch / devices)), base=base, dp=dp, optimizer=optimizer,
                       capacity=profile.capacity_bytes, clipping=clipping)
    tdp, price = profile.tdp_w, profile.price_usd_per_s
    lo, hi = band_times(roof, profile)
    return StepCost(profile.name, batch, base, theo, roof, gf, qf / gf if gf else 0.0, mem,
                    None if tdp is None else roof * tdp * devices, None if price is None else roof * price * devices,
                    df, devices, exposed, t_ar, lo, hi, profile.error_band[2], fallbacks(ops, profile))


def estimate(shapes: Sequence[LayerShape], plan: Any, profile: HardwareProfile, *, batch: float,
             base: str = "bf16", dp: bool = True, optimizer: str = "sgd", overhead_s: float = 0.0,
             devices: int = 1, allreduce: str = "ring", clipping: str = "hooks") -> CostEstimate:
    """Step cost of ``plan`` (EpochPlan or {layer: recipe}; others at ``base``) with fp32 and bf16 baselines.

    The baselines run every layer in fp32 (resp. bf16) with the same batch, devices, DP setting and optimizer,
    and the same ``overhead_s`` (so speedups compare like with like).
    """
    plan_mapping(plan, shapes)  # validate layer names once, early
    kw = dict(batch=batch, dp=dp, optimizer=optimizer, overhead_s=overhead_s, devices=devices, allreduce=allreduce,
              clipping=clipping)
    return CostEstimate(
        step=step_cost(shapes, plan, profile, base=base, **kw),
        fp32=step_cost(shapes, None, profile, base="fp32", **kw),
        bf16=step_cost(shapes, None, profile, base="bf16", **kw),
    )


def estimate_all(shapes: Sequence[LayerShape], plan: Any, profiles: Sequence[HardwareProfile], **kw) -> pd.DataFrame:
    """:func:`estimate` on many profiles; one summary row per profile."""
    return pd.DataFrame([estimate(shapes, plan, p, **kw).summary() for p in profiles])


def paper_formula(t_train: float, t_other: float, p: float, t_est: float = 0.0, factor: float = 4.0) -> float:
    """The paper's theoretical time: T_est + (1 - p + p/factor)(T_train - T_other) + T_other."""
    return t_est + (1.0 - p + p / factor) * (t_train - t_other) + t_other


def share_for_speedup(target: float, t_train: float, t_other: float, t_est: float = 0.0, factor: float = 4.0) -> float:
    """Quantized share p of GEMM time at which T_train / T(p) equals ``target`` (inverse of paper_formula).

    >>> round(share_for_speedup(2.21, 1.0, 0.0), 4)
    0.73
    """
    g = t_train - t_other
    # target * (t_est + t_other + g - p g (1 - 1/f)) = t_train
    p = (t_est + t_other + g - t_train / target) / (g * (1.0 - 1.0 / factor))
    return p
