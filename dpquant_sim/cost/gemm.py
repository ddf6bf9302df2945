"""Shape- and precision-aware time of one GEMM kernel: tiles, waves, split-K, pipeline fill, memory.

A GEMM C[M,N] = A[M,K] B[K,N] (``batch`` independent ones for a batched GEMM) is cut into output tiles of
tm x tn elements. Each of the device's ``units`` compute units (SMs, CUs, MXUs, MMEs) works on one tile at a
time, so the tiles run in ``waves = ceil(tiles / units)`` rounds: a GEMM with 132 tiles on 132 SMs takes as
long as one with 1 tile per SM, one with 133 tiles takes twice as long (wave quantization). K is padded to
the instruction depth ``tk`` (tile quantization along K). When one wave is not full, the kernel may split K
over ``s`` units per tile (split-K, at most as many splits as free units and K slices of ``tk``) and pay for
writing and re-reading the fp32 partial sums and a pipeline fill per slice; so more work is never faster.

Per tile and unit the time is 2 * tm * tn * (K/s + k_fill) / (peak * eff / units) * (I_ref / I)^gamma:
``eff`` is the sustained fraction of the datasheet peak a well-tuned kernel reaches on the family's largest
tile (per precision: kernel quality differs, e.g. cuBLAS int8 on Hopper), ``k_fill`` the pipeline
prologue/epilogue of a tile in K elements, and the last factor slows smaller tiles, whose arithmetic
intensity I = tm * tn / (tm + tn) (FLOPs per operand element loaded, halved) is lower than the largest
tile's I_ref, so feeding them from shared memory and L2 limits them (gamma = 0: no penalty).
Compute and memory time t_mem = bytes / (bandwidth x bw_eff) overlap imperfectly; they are combined with a
soft maximum (t_c^p + t_m^p)^(1/p): p -> inf is the classic roofline max, p = 1 no overlap at all. The kernel
takes the best (tile, split) choice, as a tuned library's heuristic would.

All functions are numpy-vectorised over any broadcastable arrays (ops x profiles in the sweep).

>>> fam = TILE_FAMILIES["nvidia-tensor-core"]
>>> t = kernel_seconds(8192, 8192, 8192, 1, 3 * 8192 * 8192 * 2, rate=989e12 * 0.7, units=132, family=fam,
...                    k_fill=0.0, overlap=np.inf, bandwidth=4.8e12, tile_gamma=1.0)
>>> round(float(t) * 1e3, 2)  # 16 waves of 128x256 tiles (2048 tiles on 132 SMs -> 15.5 waves)
1.64
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from dpquant_sim.cost.tiles import TILE_FAMILIES, TileFamily, get_tile_family, register_tile_family  # noqa: F401


def _ceil_div(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    return np.ceil(a / b)


def soft_max(a: np.ndarray, b: np.ndarray, p: np.ndarray | float) -> np.ndarray:
    """(a^p + b^p)^(1/p) for a, b >= 0, computed without overflow; p = inf gives max(a, b)."""
    a, b, p = np.asarray(a, float), np.asarray(b, float), np.asarray(p, float)
    hi = np.maximum(a, b)
    safe = np.where(hi > 0, hi, 1.0)
    finite_p = np.where(np.isinf(p), 1.0, p)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        s = hi * ((a / safe) ** finite_p + (b / safe) ** finite_p) ** (1.0 / finite_p)
    return np.where(np.isinf(p), hi, s)


def kernel_seconds(m, k, n, batch, nbytes, *, rate, units, family: TileFamily | None, k_fill, overlap,
                   bandwidth, tile_gamma=0.0):
    """Seconds of one (batched) GEMM kernel, excluding the launch floor.

    Args (arrays broadcast together):
        m, k, n, batch: GEMM dimensions and the number of independent GEMMs.
        nbytes: DRAM bytes the kernel reads and writes (operands, output, scales).
        rate: sustained FLOP/s of the whole device on full tiles (peak x eff).
        units: compute units working on tiles in parallel; 0 = untiled (classic roofline compute term).
        family: tile family (None with units 0).
        k_fill: pipeline fill per tile, in K elements.
        overlap: soft-maximum exponent combining compute and memory time (inf = max).
        bandwidth: achievable DRAM bytes/s (spec x bw_eff).
        tile_gamma: exponent of the small-tile slow-down (I_ref / I)^gamma.
    """
    m, k, n, batch = (np.asarray(v, float) for v in (m, k, n, batch))
    nbytes, rate, units = np.asarray(nbytes, float), np.asarray(rate, float), np.asarray(units, float)
    k_fill, bandwidth = np.asarray(k_fill, float), np.asarray(bandwidth, float)
    flat = 2.0 * m * k * n * batch / rate
    if family is None:
        return soft_max(flat, nbytes / bandwidth, overlap)
    tiles = np.asarray(family.tiles, float)
    tm = tiles[:, 0].reshape((-1,) + (1,) * np.broadcast(m, k, n, batch, nbytes, rate, units).ndim)
    tn = tiles[:, 1].reshape(tm.shape)
    intensity = tm * tn / (tm + tn)
    slow = (intensity.max() / intensity) ** np.asarray(tile_gamma, float)
    kp = _ceil_div(k, family.tk) * family.tk
    ntiles = _ceil_div(m, tm) * _ceil_div(n, tn) * batch
    safe_units = np.where(units > 0, units, 1.0)
    per_unit = rate / safe_units
    s_max = np.where(ntiles < safe_units,
                     np.maximum(1.0, np.minimum(np.floor(safe_units / ntiles), kp / family.tk)), 1.0)
    best = None
    for s in (np.ones_like(s_max), s_max):
        waves = _ceil_div(ntiles * s, safe_units)
        t_c = waves * 2.0 * tm * tn * (kp / s + k_fill) / per_unit * slow
        partial = np.where(s > 1, 2.0 * s * m * n * batch * 4.0, 0.0)  # fp32 partial sums written + read
        t = soft_max(t_c, (nbytes + partial) / bandwidth, overlap)
        best = t if best is None else np.minimum(best, t)
    tiled = best.min(axis=0)
    return np.where(units > 0, tiled, soft_max(flat, nbytes / bandwidth, overlap))


@dataclass(frozen=True)
class KernelDefaults:
    """Kernel-model constants of a profile without its own fit, and the error band that goes with them."""

    k_fill: float
    overlap: float
    band_low: float
    band_high: float
    source: str


# Fit on the H200 measurements with ONE efficiency shared by all precisions (what an unmeasured profile has:
# efficiency.gemm), cross-validated leave-one-shape-out; the band is the range of its held-out errors. Rerun:
#   python -m dpquant_sim.cost.calibrate benchmarks/results/gpu_gemm_h200.csv --profile h200 --copy-tbps 4.097 \
#       --shared-efficiency
# tests/test_cost_calibrate.py refits and checks these numbers.
GENERIC = KernelDefaults(
    k_fill=0.0, overlap=1.044, band_low=-0.314, band_high=0.287,
    source="fit with one shared efficiency, leave-one-shape-out on benchmarks/results/gpu_gemm_h200.csv")
