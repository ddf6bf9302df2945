"""QLinear / QConv2d wiring, conversion, plans and generators.

References are independent of the layer code: plain torch layers for full precision, ml_dtypes casts for an
fp8 recipe, and the numerics API applied to the operands directly (the layer's wiring is what is tested here;
numerics is tested against ml_dtypes in its own tests).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpquant_sim.nn as qnn
from dpquant_sim.errors import ConfigError, DPSafetyError
from dpquant_sim.nn import QConv2d, QLinear
from dpquant_sim.nn.config import RECIPES, LayerQuantConfig, get_recipe
from dpquant_sim.numerics.scaling import quantize_scaled
from dpquant_sim.numerics.spec import QuantSpec
from dpquant_sim.plan import EpochPlan

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ref_q(t: torch.Tensor, spec: QuantSpec, g=None, *, conv_blocks: bool = False) -> torch.Tensor:
    """Numerics API on an operand; conv block scalings in channels-last order (the documented layout)."""
    if conv_blocks and spec.scaling in ("mx", "nvfp4"):
        q = quantize_scaled(t.permute(0, 2, 3, 1), spec.format, spec.scaling, rounding=spec.rounding,
                            overflow=spec.overflow, generator=g, clip=spec.clip)
        return q.permute(0, 3, 1, 2)
    return quantize_scaled(t, spec.format, spec.scaling, rounding=spec.rounding, overflow=spec.overflow,
                           generator=g, clip=spec.clip)


def ml_q(x: np.ndarray, dtype, fmt_max: float, axis_keep: int = 0) -> np.ndarray:
    """Independent per-row scaled cast: s = max/amax (float32), ml_dtypes RNE cast of x*s, divided by s."""
    x = x.astype(np.float32)
    axes = tuple(d for d in range(x.ndim) if d != axis_keep)
    amax = np.abs(x).max(axis=axes, keepdims=True).astype(np.float32)
    s = np.where(amax > 0, np.float32(fmt_max) / np.where(amax > 0, amax, 1), 1).astype(np.float32)
    return ((x * s).astype(dtype).astype(np.float32) / s).astype(np.float32)


# ---------------------------------------------------------------- full precision is the float layer


def _assert_same_fwd_bwd(ref: nn.Module, q: nn.Module, x: torch.Tensor) -> None:
    """ref and q give the same outputs and input gradients, bit for bit, for one random cotangent."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), q(x2)
    assert torch.equal(y1, y2)
    r = torch.randn_like(y1)
    (y1 * r).sum().backward()
    (y2 * r).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 7), (7,)])
def test_fp_qlinear_equals_linear_bit_for_bit(shape):
    torch.manual_seed(0)
    ref = nn.Linear(7, 3)
    q = qnn.convert_model(copy.deepcopy(ref))
    assert isinstance(q, QLinear) and q.qconfig is None
    _assert_same_fwd_bwd(ref, q, torch.randn(shape))
    assert torch.equal(ref.weight.grad, q.weight.grad) and torch.equal(ref.bias.grad, q.bias.grad)
    assert len(q._backward_pre_hooks) == 0  # no hook cost in full precision


@pytest.mark.parametrize(
    "kw", [dict(), dict(stride=2, padding=1), dict(padding="same", dilation=2), dict(groups=2, bias=False),
           dict(padding=1, padding_mode="reflect")]
)
def test_fp_qconv_equals_conv_bit_for_bit(kw):
    torch.manual_seed(1)
    ref = nn.Conv2d(4, 6, 3, **kw)
    q = qnn.convert_model(copy.deepcopy(ref))
    assert isinstance(q, QConv2d)
    _assert_same_fwd_bwd(ref, q, torch.randn(2, 4, 9, 9))
    assert torch.equal(ref.weight.grad, q.weight.grad)


# ---------------------------------------------------------------- quantized wiring


def test_fp8_linear_forward_matches_ml_dtypes():
    torch.manual_seed(2)
    layer = QLinear(16, 5, qconfig="fp8", generator=gen())
    layer.record_quantized = True
    x = torch.randn(6, 16) * torch.logspace(-3, 3, 6)[:, None]  # very different per-sample ranges
    y = layer(x)
    qx = torch.from_numpy(ml_q(x.numpy(), ml_dtypes.float8_e4m3fn, 448.0))
    qw = torch.from_numpy(ml_q(layer.weight.detach().numpy(), ml_dtypes.float8_e4m3fn, 448.0))
    # rtol 1e-6: a scale may differ by one float32 ulp (numerics computes 448/amax as 448*(1/amax)); an
    # operand left unquantized, or scaled over the batch, would be off by ~1e-2 relative.
    torch.testing.assert_close(layer._q_act, qx, rtol=1e-6, atol=0)
    torch.testing.assert_close(y, F.linear(qx, qw, layer.bias), rtol=0, atol=1e-6 * y.abs().max().item())
    assert (F.linear(x, layer.weight, layer.bias) - y).abs().max() > 1e-3 * y.abs().max()


def test_fp8_linear_backward_matches_ml_dtypes():
    """dx = q(dy) qW, dW = q(dy)^T qx, db = sum q(dy): fp8 e5m2 with nearest rounding, independent casts."""
    torch.manual_seed(3)
    cfg = get_recipe("fp8")
    cfg = replace(cfg, grad=replace(cfg.grad, rounding="nearest"))
    layer = QLinear(16, 5, qconfig=cfg)
    x = torch.randn(6, 16, requires_grad=True)
    dy = torch.randn(6, 5) * torch.logspace(-4, 2, 6)[:, None]
    layer(x).backward(dy)
    qx = torch.from_numpy(ml_q(x.detach().numpy(), ml_dtypes.float8_e4m3fn, 448.0))
    qw = torch.from_numpy(ml_q(layer.weight.detach().numpy(), ml_dtypes.float8_e4m3fn, 448.0))
    qdy = torch.from_numpy(ml_q(dy.numpy(), ml_dtypes.float8_e5m2, 57344.0))
    assert not torch.equal(qdy, dy)
    for got, want in ((x.grad, qdy @ qw), (layer.weight.grad, qdy.T @ qx), (layer.bias.grad, qdy.sum(0))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float32 summation order: error relative to the tensor's largest entry."""
    torch.testing.assert_close(got, want, rtol=0, atol=rel * max(want.abs().max().item(), 1e-30))


def _check_three_gemms(layer, x, dy, cfg, conv):
    """Run forward/backward through ``layer`` and compare with GEMMs on independently quantized operands."""
    g_ref = torch.Generator().set_state(layer.generator.get_state())
    xr = x.detach().clone().requires_grad_()
    y = layer(xr)
    qx = ref_q(x, cfg.activation, g_ref, conv_blocks=conv)
    qw = ref_q(layer.weight.detach(), cfg.weight, g_ref, conv_blocks=conv)
    b = layer.bias.detach()
    if conv:
        fwd = lambda a, w: F.conv2d(a, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        fwd = lambda a, w: F.linear(a, w, b)
    close(y, fwd(qx, qw))
    y.backward(dy)
    qdy = ref_q(dy, cfg.grad, g_ref, conv_blocks=conv)  # same generator draws, in the same order
    assert torch.equal(layer._q_grad, qdy) and torch.equal(layer._q_act, qx)
    # autograd on the reference quantized operands gives the reference dgrad/wgrad GEMMs
    qx_, qw_ = qx.clone().requires_grad_(), qw.clone().requires_grad_()
    fwd(qx_, qw_).backward(qdy)
    close(xr.grad, qx_.grad)
    close(layer.weight.grad, qw_.grad)
    ch = 1 if conv else qdy.dim() - 1
    close(layer.bias.grad, qdy.sum(dim=[d for d in range(qdy.dim()) if d != ch]))
    # and the quantization mattered: unquantized operands give clearly different gradients
    assert (layer.weight.grad - fwd_grad_w(fwd, x, layer.weight.detach(), dy)).abs().max() > 1e-4 * \
        layer.weight.grad.abs().max()


def fwd_grad_w(fwd, x, w, dy):
    w = w.clone().requires_grad_()
    fwd(x, w).backward(dy)
    return w.grad


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_all_gemms_use_quantized_operands_linear(recipe):
    torch.manual_seed(4)
    layer = QLinear(40, 6, qconfig=recipe, generator=gen(7))
    layer.record_quantized = True
    x = torch.randn(4, 40) * torch.tensor([1e-2, 1.0, 30.0, 1e3])[:, None]
    _check_three_gemms(layer, x, torch.randn(4, 6), layer.qconfig, conv=False)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_all_gemms_use_quantized_operands_conv(recipe):
    torch.manual_seed(5)
    layer = QConv2d(6, 4, 3, stride=2, padding=1, groups=2, qconfig=recipe, generator=gen(8))
    layer.record_quantized = True
    x = torch.randn(3, 6, 7, 7) * torch.tensor([1e-2, 1.0, 1e2])[:, None, None, None]
    _check_three_gemms(layer, x, torch.randn(3, 4, 4, 4), layer.qconfig, conv=True)


def test_quantized_changes_values_and_switch_back_is_exact():
    torch.manual_seed(6)
    ref = nn.Linear(8, 3)
    layer = qnn.convert_model(copy.deepcopy(ref))
    x = torch.randn(4, 8)
    layer.qconfig = "fp4"
    assert not torch.equal(layer(x), ref(x))
    assert len(layer._backward_pre_hooks) == 1
    layer.qconfig = None
    assert torch.equal(layer(x), ref(x)) and len(layer._backward_pre_hooks) == 0


def test_empty_batch_quantized():
    layer = QConv2d(2, 3, 3, qconfig="mxfp4", generator=gen())
    x = torch.zeros(0, 2, 5, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 3, 3)
    y.sum().backward()
    assert layer.weight.grad.abs().sum() == 0


def test_stochastic_without_generator_is_a_clear_error():
    layer = QLinear(4, 2, qconfig="fp8")
    y = layer(torch.randn(3, 4))  # forward: weights/activations round to nearest, fine
    with pytest.raises(ConfigError, match="generator"):
        y.sum().backward()


def test_calling_forward_directly_is_refused():
    layer = QLinear(4, 2)
    layer(torch.randn(1, 4))
    with pytest.raises(RuntimeError, match="call the module"):
        layer.forward(torch.randn(1, 4))


def test_deepcopy_is_independent():
    layer = QLinear(4, 2, qconfig="fp8", generator=gen())
    other = copy.deepcopy(layer)
    other.qconfig = None
    assert layer.qconfig is not None and len(layer._backward_pre_hooks) == 1
    assert len(other._backward_pre_hooks) == 0
    x = torch.randn(2, 4)
    assert not torch.equal(layer(x), other(x))


def test_qconfig_type_checked():
    with pytest.raises(ConfigError, match="recipe"):
        QLinear(2, 2, qconfig="fp7")
    with pytest.raises(ConfigError, match="qconfig"):
        QLinear(2, 2, qconfig=3)


# ---------------------------------------------------------------- convert_model / apply_plan


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU()),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3),
    )


def test_convert_model_shares_parameters_and_output():
    model = small_model()
    ref = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    out = qnn.convert_model(model, seed=3)
    assert out is model and [id(p) for p in model.parameters()] == params
    assert qnn.quantizable_layers(model) == ["0", "2.0", "4", "6"]
    assert all(type(m) in (nn.Linear, nn.Conv2d) for m in ref.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), ref(x))
    assert qnn.quantization_state(model) == {"0": None, "2.0": None, "4": None, "6": None}
    # converting again keeps the layers (idempotent) and reseeds identically
    s1 = qnn.generator_states(model)
    qnn.convert_model(model, seed=3)
    assert all(torch.equal(s1[k], v) for k, v in qnn.generator_states(model).items())


def test_generators_distinct_and_deterministic():
    a = qnn.convert_model(small_model(), seed=1)
    b = qnn.convert_model(small_model(), seed=1)
    c = qnn.convert_model(small_model(), seed=2)
    draws = lambda m: [torch.rand(3, generator=l.generator) for l in (m[0], m[2][0], m[4], m[6])]
    da, db, dc = draws(a), draws(b), draws(c)
    assert all(torch.equal(u, v) for u, v in zip(da, db))
    assert not any(torch.equal(u, v) for u, v in zip(da, dc))
    assert len({tuple(d.tolist()) for d in da}) == 4  # each layer its own stream
    with pytest.raises(ConfigError, match="seed"):
        qnn.convert_model(small_model(), seed=-1)


def test_apply_plan_epochplan_and_mapping():
    model = qnn.convert_model(small_model())
    params = {id(p) for p in model.parameters()}
    mods = [id(m) for m in model.modules()]
    assert qnn.apply_plan(model, {"4": "fp8", "0": get_recipe("int8")}) == {
        "0": "int8", "2.0": None, "4": "fp8", "6": None}
    assert qnn.apply_plan(model, {"6": "nvfp4"})["4"] == "fp8"  # mapping: only named layers change
    # EpochPlan: absent layers go to full precision
    assert qnn.apply_plan(model, EpochPlan(epoch=1, quantized={"2.0": "mxfp4"})) == {
        "0": None, "2.0": "mxfp4", "4": None, "6": None}
    assert qnn.apply_plan(model, {"2.0": None})["2.0"] is None
    assert {id(p) for p in model.parameters()} == params and [id(m) for m in model.modules()] == mods


def test_apply_plan_unknown_layer_names_known_ones_and_changes_nothing():
    model = qnn.convert_model(small_model())
    with pytest.raises(ConfigError) as e:
        qnn.apply_plan(model, {"4": "fp8", "fc9": "fp8"})
    assert "fc9" in str(e.value) and "'2.0'" in str(e.value) and "'6'" in str(e.value)
    assert qnn.quantization_state(model)["4"] is None  # validated before anything changed
    with pytest.raises(ConfigError, match="fc9"):
        qnn.apply_plan(model, EpochPlan(epoch=0, quantized={"fc9": "fp8"}))
    with pytest.raises(ConfigError, match="recipe"):
        qnn.apply_plan(model, {"4": "fp5"})
    with pytest.raises(ConfigError, match="convert_model"):
        qnn.apply_plan(nn.Sequential(nn.Linear(2, 2)), {"0": "fp8"})


def test_apply_plan_refuses_batch_wide_scales_under_dp():
    model = qnn.convert_model(small_model())
    base = get_recipe("fp8")
    bad_act = replace(base, name="fp8-tensor-act", activation=replace(base.activation, scaling="tensor"))
    bad_grad = replace(base, name="fp8-tensor-grad", grad=replace(base.grad, scaling="tensor"))
    for bad, role in ((bad_act, "activation"), (bad_grad, "grad")):
        with pytest.raises(DPSafetyError) as e:
            qnn.apply_plan(model, {"4": "fp8", "6": bad})
        msg = str(e.value)
        assert "'6'" in msg and role in msg and "per-sample gradient" in msg
        assert qnn.quantization_state(model)["4"] is None
    # a per-tensor weight scale is fine (weights are not private data); dp=False allows anything
    ok = replace(base, name="fp8-tensor-w", weight=replace(base.weight, scaling="tensor"))
    assert qnn.apply_plan(model, {"4": ok})["4"] == "fp8-tensor-w"
    assert qnn.apply_plan(model, {"6": bad_act}, dp=False)["6"] == "fp8-tensor-act"


def test_names_through_opacus_wrapper():
    from opacus import GradSampleModule

    model = qnn.convert_model(small_model())
    gsm = GradSampleModule(model)
    assert qnn.quantizable_layers(gsm) == qnn.quantizable_layers(model)
    qnn.apply_plan(gsm, {"4": "fp8"})
    assert model[4].qconfig.name == "fp8"


def test_generator_states_resume_exactly(tmp_path):
    """Stochastic rounding continues identically after restoring generator states (checkpoint/resume)."""
    def run(model, steps, start=0):
        out = []
        for s in range(start, start + steps):
            torch.manual_seed(100 + s)
            x = torch.randn(3, 1, 8, 8)
            model.zero_grad()
            model(x).sum().backward()
            out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        return out

    m1 = qnn.convert_model(small_model(), seed=5)
    qnn.apply_plan(m1, {n: "fp4" for n in qnn.quantizable_layers(m1)})
    m2 = copy.deepcopy(m1)
    full = run(m1, 3)
    run(m2, 1)
    saved = {k: v.clone() for k, v in qnn.generator_states(m2).items()}
    torch.save(saved, tmp_path / "gen.pt")
    loaded = torch.load(tmp_path / "gen.pt", weights_only=True)
    m3 = copy.deepcopy(m2)
    qnn.set_generators(m3, 999)  # scramble, then restore
    qnn.set_generator_states(m3, loaded)
    resumed = run(m3, 2, start=1)
    assert all(torch.equal(a, b) for a, b in zip(full[1:], resumed))
    qnn.set_generators(m3, 999)
    assert not torch.equal(run(m3, 1, start=1)[0], full[1])
    with pytest.raises(ConfigError, match="generator states"):
        qnn.set_generator_states(m3, {"0": loaded["0"]})


def test_unbatched_inputs_are_one_sample():
    lin = QLinear(8, 3, qconfig="fp6", generator=gen())
    conv = QConv2d(2, 3, 3, qconfig="mxfp8", generator=gen())
    x, xc = torch.randn(8), torch.randn(2, 5, 5)
    assert torch.equal(lin(x), lin(x[None])[0])
    assert torch.equal(conv(xc), conv(xc[None])[0])


def test_module_registered_twice_stays_one_module():
    shared = nn.Linear(4, 4)
    model = qnn.convert_model(nn.Sequential(shared, nn.ReLU(), shared))
    assert model[0] is model[2] and isinstance(model[0], QLinear)
    assert qnn.quantizable_layers(model) == ["0"]
