"""The GEMM kernel model (cost/gemm.py) against hand-computed cases: waves, tile and K padding, split-K,
batched GEMMs, the soft maximum, the memory-bound region, and every registered tile family."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpquant_sim.cost.gemm import TILE_FAMILIES, TileFamily, kernel_seconds, soft_max

# One family with a single 128 x 256 tile makes hand computation exact.
ONE = TileFamily("one-tile", ((128, 256),), tk=64, source="test")
RATE = 132e12  # FLOP/s for the whole device -> 1e12 per unit with 132 units
BW = 1e15  # memory practically free unless a test says otherwise


def _t(m, k, n, batch=1, nbytes=0.0, *, units=132, family=ONE, k_fill=0.0, overlap=np.inf, bw=BW, rate=RATE):
    return float(kernel_seconds(m, k, n, batch, nbytes, rate=rate, units=units, family=family, k_fill=k_fill,
                                overlap=overlap, bandwidth=bw))


def _tile_s(k, k_fill=0.0):
    """One 128 x 256 tile with K = k on one unit (1e12 FLOP/s)."""
    return 2 * 128 * 256 * (k + k_fill) / 1e12


def test_one_full_wave_and_wave_quantization():
    # 132 tiles (12 x 11 of 128 x 256) on 132 units: one wave; 133 tiles: two waves, twice the time
    assert _t(128 * 12, 4096, 256 * 11) == pytest.approx(_tile_s(4096))
    assert _t(128 * 12 + 1, 4096, 256 * 11) == pytest.approx(2 * _tile_s(4096))  # 13 x 11 = 143 tiles
    # a full wave runs at exactly the device rate
    m, k, n = 128 * 12, 4096, 256 * 11
    assert 2 * m * k * n / _t(m, k, n) == pytest.approx(RATE)


def test_k_padding_to_the_instruction_depth():
    assert _t(128 * 12, 65, 256 * 11) == pytest.approx(_tile_s(128))  # K = 65 runs as 128 (tk = 64)


def test_pipeline_fill_per_tile():
    assert _t(128 * 12, 4096, 256 * 11, k_fill=100) == pytest.approx(_tile_s(4096, 100))


def test_split_k_when_a_wave_is_not_full():
    # one tile: split K over min(132 free units, 8192 / 64 = 128 slices of tk) = 128 units; fp32 partial sums
    # 2 * 128 * M * N * 4 bytes are written and read back; each slice pays its own pipeline fill
    m, k, n = 128, 8192, 256
    t = _t(m, k, n, bw=1e12, k_fill=10)
    compute = _tile_s(k / 128, 10)  # 128 slices in one wave
    memory = 2 * 128 * m * n * 4 / 1e12
    unsplit = _tile_s(k, 10)
    assert t == pytest.approx(min(max(compute, memory), unsplit))
    assert t < unsplit / 10  # split-K pays here


def test_batched_gemm_adds_tiles():
    # 132 independent 128 x 256 GEMMs fill one wave; 264 take two
    assert _t(128, 1024, 256, batch=132) == pytest.approx(_tile_s(1024))
    assert _t(128, 1024, 256, batch=264) == pytest.approx(2 * _tile_s(1024))


def test_memory_bound_region_and_soft_maximum():
    m, k, n = 128 * 12, 4096, 256 * 11
    c = _tile_s(4096)
    nbytes = 3 * c * 1e12  # memory time = 3 x compute time at 1 TB/s
    assert _t(m, k, n, nbytes=nbytes, bw=1e12) == pytest.approx(3 * c)  # max
    assert _t(m, k, n, nbytes=nbytes, bw=1e12, overlap=1.0) == pytest.approx(4 * c)  # no overlap: sum
    assert _t(m, k, n, nbytes=nbytes, bw=1e12, overlap=2.0) == pytest.approx(math.sqrt(10) * c)


@pytest.mark.parametrize("a,b,p,want", [(3.0, 4.0, 2.0, 5.0), (3.0, 4.0, 1.0, 7.0), (3.0, 4.0, np.inf, 4.0),
                                        (0.0, 0.0, 2.0, 0.0), (1e-300, 2e-300, 30.0, 2e-300)])
def test_soft_max_by_hand(a, b, p, want):
    assert float(soft_max(a, b, p)) == pytest.approx(want, rel=1e-9, abs=1e-320)


def test_untiled_is_the_classic_roofline():
    m, k, n = 1000, 1000, 1000
    assert _t(m, k, n, units=0, family=None) == pytest.approx(2e9 / RATE)
    assert _t(m, k, n, nbytes=1e12, units=0, family=None, bw=1e12) == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(TILE_FAMILIES))
def test_every_family_reaches_the_rate_on_full_waves(name):
    """A GEMM of exactly `units` largest tiles per wave, K a multiple of tk, runs at the device rate."""
    fam = TILE_FAMILIES[name]
    tm, tn = max(fam.tiles, key=lambda t: t[0] * t[1] / (t[0] + t[1]))
    units = 8
    m, n, k = tm * 4, tn * 2 * 3, fam.tk * 64  # 24 tiles = 3 waves of 8
    t = _t(m, k, n, units=units, family=fam)
    assert 2 * m * k * n / t == pytest.approx(RATE, rel=1e-12)
    # and one tile more than full waves costs a whole extra wave of the smallest tile that covers it
    assert _t(m + 1, k, n, units=units, family=fam) > t


def test_more_work_never_faster():
    rng = np.random.default_rng(0)
    for fam in TILE_FAMILIES.values():
        for _ in range(50):
            m, k, n = (int(v) for v in rng.integers(1, 5000, 3))
            base = _t(m, k, n, family=fam, k_fill=30, overlap=1.2, bw=3e12, nbytes=2.0 * (m * k + k * n + m * n))
            bigger = _t(m, k + 64, n, family=fam, k_fill=30, overlap=1.2, bw=3e12,
                        nbytes=2.0 * (m * (k + 64) + (k + 64) * n + m * n))
            assert bigger >= base * (1 - 1e-12)
