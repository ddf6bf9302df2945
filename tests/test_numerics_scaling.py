"""Scaled quantization: hand-worked MX/NVFP4 examples, independent numpy/ml_dtypes loop references, and
batch independence (no statistic crosses dim 0)."""

import math

import numpy as np
import pytest
import torch

from dpquant_sim.errors import ConfigError
from dpquant_sim.numerics import QuantSpec, quantize_scaled

from oracle import ORACLE, SMALL

ML = {name: ORACLE[name] for name in SMALL}
MAXV = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp6_e2m3": 7.5, "fp6_e3m2": 28.0, "fp4_e2m1": 6.0}
EMAX = {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e2m3": 2, "fp6_e3m2": 4, "fp4_e2m1": 2}  # OCP MX spec table


def sat_cast(v: np.ndarray, name: str) -> np.ndarray:
    """Saturating RNE cast with ml_dtypes: clip to +-max first (ml_dtypes itself overflows to inf/NaN)."""
    m = np.float32(MAXV[name])
    return np.clip(v.astype(np.float32), -m, m).astype(ML[name]).astype(np.float32)


# ------------------------------------------------------------------ hand-worked examples


def test_mx_hand_worked_fp4():
    x = torch.zeros(2, 40)
    x[0, :5] = torch.tensor([10.0, 3.0, 0.7, 7.0, -2.6])
    # block 0 of sample 0: amax 10 -> floor(log2 10) = 3, emax(e2m1) = 2 -> X = 2^1 = 2
    #   10/2 = 5 (tie 4|6 -> 4, even) -> 8;  3/2 = 1.5 -> 3;  0.7/2 = 0.35 -> 0.5 -> 1;  7/2 = 3.5 (tie 3|4 -> 4) -> 8
    #   -2.6/2 = -1.3 -> -1.5 -> -3
    x[0, 33] = 0.01
    # block 1 of sample 0 (elements 32..39 + 24 zero pads): amax 0.01 -> floor(log2) = -7 -> X = 2^-9;
    #   0.01 * 512 = 5.12 -> 6 -> 6 * 2^-9 = 0.01171875
    x[1, 0] = 1.0
    # sample 1, block 0: amax 1 -> X = 2^-2: 1 * 4 = 4 -> 4 -> 1.0 (unchanged by sample 0)
    y = quantize_scaled(x, "fp4_e2m1", "mx")
    assert y[0, :5].tolist() == [8.0, 3.0, 1.0, 8.0, -3.0]
    assert y[0, 33].item() == 0.01171875
    assert y[1, 0].item() == 1.0
    assert y.shape == (2, 40) and (y[0, 5:33] == 0).all()


def test_mx_hand_worked_e4m3_saturates():
    # amax 500: floor(log2 500) = 8 = emax(e4m3) -> X = 1; 500 > 448 saturates (the MX clamp), 100 is a tie
    x = torch.tensor([[500.0, 100.0, -470.0, 0.001]])
    y = quantize_scaled(x, "fp8_e4m3", "mx")
    assert y.tolist()[0][:3] == [448.0, 96.0, -448.0]  # 100 -> 96 (e4m3 step 8 in [64, 128): 96|104 -> 96)
    assert y[0, 3].item() == 2.0**-9  # 0.001 = 0.512 * 2^-9 (smallest subnormal) -> rounds up to 2^-9


def test_nvfp4_hand_worked():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 12.0, 5.0  # block 0
    x[0, 16], x[0, 17] = 1.0, 0.3  # block 1
    # per-sample S = 448*6/12 = 224.
    # block 0: amax/6*S = 2*224 = 448 -> e4m3 448; enc = 224/448 = 0.5: 12 -> 6 -> 6*2 = 12; 5 -> 2.5 (tie 2|3 -> 2) -> 4
    # block 1: 1/6*224 = 37.33 -> e4m3 36; enc = 224/36 = 6.222: 1 -> 6.22 -> 6 -> 6*36/224 = 0.9642857;
    #          0.3 -> 1.867 -> 2 -> 2*36/224 = 0.3214286
    y = quantize_scaled(x, "fp4_e2m1", "nvfp4")
    assert y[0, 0].item() == 12.0 and y[0, 1].item() == 4.0
    assert y[0, 16].item() == pytest.approx(6 * 36 / 224, rel=1e-6)
    assert y[0, 17].item() == pytest.approx(2 * 36 / 224, rel=1e-6)


# ------------------------------------------------------------------ independent loop references


def ref_mx(x: np.ndarray, name: str, block=32) -> np.ndarray:
    out = np.zeros_like(x)
    for s in range(x.shape[0]):
        for r in np.ndindex(*x.shape[1:-1]):
            row = x[(s, *r)]
            for b0 in range(0, row.shape[0], block):
                blk = row[b0:b0 + block]
                amax = float(np.max(np.abs(blk)))
                e = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - EMAX[name]))
                X = math.ldexp(1.0, e)
                q = sat_cast((blk.astype(np.float64) / X).astype(np.float32), name)
                out[(s, *r)][b0:b0 + block] = (q.astype(np.float64) * X).astype(np.float32)
    return out


def ref_nvfp4(x: np.ndarray, name="fp4_e2m1", block=16) -> np.ndarray:
    f32 = np.float32
    out = np.zeros_like(x)
    for s in range(x.shape[0]):
        amax = f32(np.max(np.abs(x[s])))
        S = f32(448.0 * 6.0) / amax if amax > 0 else f32(1.0)
        for r in np.ndindex(*x.shape[1:-1]):
            row = x[(s, *r)]
            for b0 in range(0, row.shape[0], block):
                blk = row[b0:b0 + block]
                d = f32(np.max(np.abs(blk))) / f32(6.0) * S
                sb = sat_cast(np.array([d], np.float32), "fp8_e4m3")[0]
                enc = S / sb if sb > 0 else f32(0.0)
                q = sat_cast(blk * enc, name)
                out[(s, *r)][b0:b0 + block] = q * (sb / S)
    return out


def data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed, per-sample different magnitudes, some exact zeros and an all-zero row
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape[0], *[1] * (len(shape) - 1), generator=g))
    x[..., 3] = 0.0
    x[0, ...] = x[0] * (torch.rand(x[0].shape, generator=g) > 0.3)
    if shape[0] > 2:
        x[2] = 0.0
    return x


@pytest.mark.parametrize("name", list(ML))
@pytest.mark.parametrize("shape", [(3, 64), (4, 2, 50), (2, 7)])
def test_mx_matches_reference(name, shape):
    x = data(shape)
    y = quantize_scaled(x, name, "mx").numpy()
    # the reference pads explicitly: zeros up to a multiple of 32 within each row
    pad = (-shape[-1]) % 32
    xp = np.concatenate([x.numpy(), np.zeros((*shape[:-1], pad), np.float32)], axis=-1)
    ref = ref_mx(xp, name)[..., : shape[-1]]
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp6_e2m3", "fp8_e4m3"])
@pytest.mark.parametrize("shape", [(3, 64), (4, 2, 40), (2, 5)])
def test_nvfp4_matches_reference(name, shape):
    x = data(shape, seed=1)
    y = quantize_scaled(x, name, "nvfp4").numpy()
    pad = (-shape[-1]) % 16
    xp = np.concatenate([x.numpy(), np.zeros((*shape[:-1], pad), np.float32)], axis=-1)
    np.testing.assert_array_equal(y, ref_nvfp4(xp, name)[..., : shape[-1]])


def test_block_size_override_matches_reference():
    x = data((2, 48), seed=2)
    y = quantize_scaled(x, "fp8_e4m3", "mx", block_size=16).numpy()
    np.testing.assert_array_equal(y, ref_mx(x.numpy(), "fp8_e4m3", block=16))


@pytest.mark.parametrize("name", list(ML) + ["int8", "int4"])
@pytest.mark.parametrize("scaling", ["tensor", "channel", "sample"])
def test_amax_scalings_match_reference(name, scaling):
    x = data((4, 3, 5), seed=3).numpy()
    axes = {"tensor": None, "sample": (1, 2), "channel": (0, 2)}[scaling]
    amax = np.max(np.abs(x), axis=axes, keepdims=True) if axes else np.max(np.abs(x))
    qmax = {"int8": 127.0, "int4": 7.0}.get(name, MAXV.get(name))
    s = np.where(amax > 0, np.float32(qmax) / np.where(amax > 0, amax, 1), 1).astype(np.float32)
    v = x * s
    if name.startswith("int"):
        q = np.clip(np.round(v), -qmax, qmax)  # half to even
    else:
        q = sat_cast(v, name)
    ref = (q / s).astype(np.float32)
    cd = 1 if scaling == "channel" else 0
    y = quantize_scaled(torch.from_numpy(x), name, scaling, channel_dim=cd).numpy()
    np.testing.assert_array_equal(y, ref)


def test_none_scaling_is_plain_quantize():
    x = torch.tensor([[0.3, 9.0]])
    assert quantize_scaled(x, "fp4_e2m1", "none").tolist() == [[0.5, 6.0]]


# ------------------------------------------------------------------ batch independence (DP safety)


@pytest.mark.parametrize("scaling", ["sample", "mx", "nvfp4"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_samples_never_influence_each_other(scaling, rounding):
    x = data((3, 2, 40), seed=4)
    x2 = x.clone()
    x2[0] = x2[0] * 1000.0 + 5.0  # a wildly different example 0
    kw = dict(rounding=rounding)
    y = quantize_scaled(x, "fp4_e2m1", scaling, generator=torch.Generator().manual_seed(0), **kw)
    y2 = quantize_scaled(x2, "fp4_e2m1", scaling, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(y[1:], y2[1:])
    assert not torch.equal(y[0], y2[0])
    # and each sample alone gives the same result as in the batch (nearest: no RNG position effects)
    if rounding == "nearest":
        for i in range(3):
            assert torch.equal(quantize_scaled(x[i : i + 1], "fp4_e2m1", scaling), y[i : i + 1])


def test_tensor_scaling_does_cross_samples():
    """The control: per-tensor scaling is NOT batch independent (why DP mode refuses it)."""
    x = data((3, 8), seed=5)
    x2 = x.clone()
    x2[0] *= 1000
    assert not torch.equal(quantize_scaled(x, "fp4_e2m1", "tensor")[1:], quantize_scaled(x2, "fp4_e2m1", "tensor")[1:])


def test_spec_apply_uses_scaling():
    x = data((2, 32), seed=6)
    spec = QuantSpec("fp8_e4m3", scaling="mx")
    assert torch.equal(spec.apply(x), quantize_scaled(x, "fp8_e4m3", "mx"))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(scaling="block"), "scaling"),
        (dict(scaling="mx", block_size=0), "block_size"),
        (dict(scaling="mx", block_size=-4), "block_size"),
        (dict(scaling="mx", block_size=2.5), "block_size"),
        (dict(scaling="mx", block_size=True), "block_size"),
        (dict(scaling="mx", pad=False), "block_size"),
        (dict(scaling="channel", channel_dim=5), "channel_dim"),
        (dict(scaling="sample", rounding="half_up"), "rounding"),
        (dict(scaling="sample", overflow="nan"), "overflow"),
    ],
)
def test_errors(kwargs, field):
    with pytest.raises(ValueError) as e:
        quantize_scaled(torch.ones(2, 40), "fp8_e4m3", **kwargs)
    assert isinstance(e.value, ConfigError)
    msg = str(e.value)
    assert field in msg and "expected" in msg
    val = kwargs.get(field, 32)
    assert repr(val) in msg


def test_pad_false_accepts_divisible():
    x = data((2, 64), seed=7)
    assert torch.equal(quantize_scaled(x, "fp8_e4m3", "mx", pad=False), quantize_scaled(x, "fp8_e4m3", "mx"))
