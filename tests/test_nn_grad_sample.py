"""Opacus per-sample gradients of QLinear/QConv2d are exact for the quantized computation.

Reference: a batch-size-1 loop (each example alone through the same layers, plain autograd, no Opacus),
or, for stochastic gradient rounding, per-example GEMMs on the quantized tensors the layer recorded.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn

import dpquant_sim.nn as qnn
from dpquant_sim.nn import QConv2d, QLinear
from dpquant_sim.errors import ConfigError
from dpquant_sim.nn.config import RECIPES, LayerQuantConfig
from dpquant_sim.plan import EpochPlan

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore::UserWarning:opacus")
# Per-sample properties hold for the recipes allowed under DP; batch-wide ones (luq_fp4_batch) are refused
# there (tests/test_luq.py, test_neighbouring_sensitivity_is_clip_norm).
DP_RECIPES = [r for r, c in RECIPES.items() if c.dp_safe]
HSET = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def nearest(cfg: LayerQuantConfig) -> LayerQuantConfig:
    """The recipe with nearest-rounded gradients, so a batch-1 loop makes the same rounding decisions."""
    return replace(cfg, name=cfg.name + "-rn", grad=replace(cfg.grad, rounding="nearest"))


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=rel * max(want.abs().max().item(), 1e-30))


def loop_grads(model: nn.Module, xs, loss_fn) -> dict[str, torch.Tensor]:
    """{param name: (B, *shape)} gradients of loss_fn(model(x_i), i) for each example alone."""
    n = xs[0].shape[0]
    per: dict[str, list[torch.Tensor]] = {k: [] for k, _ in model.named_parameters()}
    for i in range(n):
        model.zero_grad()
        loss = sum(loss_fn(model(x[i : i + 1]), i, k) for k, x in enumerate(xs))
        loss.backward()
        for k, p in model.named_parameters():
            per[k].append(p.grad.detach().clone())
    model.zero_grad()
    return {k: torch.stack(v) for k, v in per.items()}


def opacus_grads(gsm: GradSampleModule, xs, loss_fn) -> dict[str, torch.Tensor]:
    """{param name (unprefixed): grad_sample} from Opacus hooks mode, all forwards before one backward."""
    gsm.zero_grad()
    outs = [gsm(x) for x in xs]
    loss = sum(loss_fn(o, slice(None), k) for k, o in enumerate(outs))
    loss.backward()
    return {k.removeprefix("_module."): p.grad_sample.detach().clone() for k, p in gsm.named_parameters()}


def assert_same(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        close(a[k], b[k], rel)


def linear_loss(r: list[torch.Tensor]):
    """loss = sum(y * r): dy = r exactly, so each example's output gradient is known bit for bit."""
    return lambda y, i, k: (y * r[k][i]).sum()


# ---------------------------------------------------------------- single layers, hypothesis shapes


@pytest.mark.parametrize("recipe", DP_RECIPES)
@HSET
@given(data=st.data())
def test_qlinear_per_sample_equals_batch1_loop(recipe, data):
    n = data.draw(st.integers(1, 4), "batch")
    tokens = data.draw(st.sampled_from([None, 1, 3]), "tokens")
    fin, fout = data.draw(st.integers(1, 40), "in"), data.draw(st.integers(1, 6), "out")
    bias = data.draw(st.booleans(), "bias")
    seed = data.draw(st.integers(0, 2**16), "seed")
    torch.manual_seed(seed)
    layer = QLinear(fin, fout, bias=bias, qconfig=nearest(RECIPES[recipe]), generator=torch.Generator())
    shape = (n, fin) if tokens is None else (n, tokens, fin)
    x = torch.randn(shape) * torch.logspace(-2, 2, n).reshape(-1, *([1] * (len(shape) - 1)))
    r = [torch.randn(*shape[:-1], fout)]
    ref = loop_grads(layer, [x], linear_loss(r))
    gsm = GradSampleModule(layer, loss_reduction="sum")
    got = opacus_grads(gsm, [x], linear_loss(r))
    gsm.to_standard_module()
    assert_same(got, ref, 1e-5)


@st.composite
def conv_geometry(draw):
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, 2] + (["same"] if stride == 1 else [])))
    span = dilation * (k - 1) + 1
    pad = 0 if padding == "same" else padding
    h = draw(st.integers(max(span - 2 * pad, 1), 7))
    w = draw(st.integers(max(span - 2 * pad, 1), 7))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect"])) if padding != "same" and pad < min(h, w) else "zeros"
    return dict(cin=cin, cout=cout, k=k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                h=h, w=w, padding_mode=mode, bias=draw(st.booleans()), n=draw(st.integers(1, 3)))


@pytest.mark.parametrize("recipe", DP_RECIPES)
@HSET
@given(g=conv_geometry(), seed=st.integers(0, 2**16))
def test_qconv2d_per_sample_equals_batch1_loop(recipe, g, seed):
    torch.manual_seed(seed)
    layer = QConv2d(g["cin"], g["cout"], g["k"], stride=g["stride"], padding=g["padding"], dilation=g["dilation"],
                    groups=g["groups"], bias=g["bias"], padding_mode=g["padding_mode"],
                    qconfig=nearest(RECIPES[recipe]), generator=torch.Generator())
    x = torch.randn(g["n"], g["cin"], g["h"], g["w"]) * torch.logspace(-2, 2, g["n"]).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        r = [torch.randn_like(layer(x))]
    ref = loop_grads(layer, [x], linear_loss(r))
    gsm = GradSampleModule(layer, loss_reduction="sum")
    got = opacus_grads(gsm, [x], linear_loss(r))
    gsm.to_standard_module()
    assert_same(got, ref, 1e-5)


# ---------------------------------------------------------------- multi-layer models, plan switches


def cnn(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3),
    ).to(dtype)
    return qnn.convert_model(m, seed=0)


def ce(y_all: torch.Tensor):
    return lambda out, i, k: F.cross_entropy(out, y_all[i].reshape(-1), reduction="sum")


def test_plan_switches_mid_run_per_sample_exact():
    """fp32 -> partial -> fp32 -> all quantized -> partial, with SGD steps between; float64 model so that
    the batch-1 loop makes the same rounding decisions as the batch (quantization runs in float32)."""
    model = cnn()
    names = qnn.quantizable_layers(model)
    assert names == ["0", "2", "5", "7"]
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rn = {k: nearest(v) for k, v in RECIPES.items()}
    plans = [
        EpochPlan(epoch=0),
        {"0": rn["fp8"], "5": rn["int4"]},
        EpochPlan(epoch=2),
        dict(zip(names, [rn["mxfp4"], rn["nvfp4"], rn["fp6"], rn["fp4"]])),
        {"2": None, "7": None},
    ]
    g = torch.Generator().manual_seed(1)
    last = None
    for step, plan in enumerate(plans):
        state = qnn.apply_plan(gsm, plan)
        assert sum(v is not None for v in state.values()) == [0, 2, 0, 4, 2][step]
        x = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64) * 3
        y = torch.randint(0, 3, (5,), generator=g)
        got = opacus_grads(gsm, [x], ce(y))
        batch_grads = {k.removeprefix("_module."): p.grad.clone() for k, p in gsm.named_parameters()}
        gsm.disable_hooks()
        ref = loop_grads(model, [x], ce(y))
        gsm.enable_hooks()
        assert_same(got, ref, 1e-9)
        for k in got:  # the non-private gradient is the sum of the per-sample ones (same quantized tensors)
            close(got[k].sum(0), batch_grads[k], 1e-9)
        if last is not None:
            assert not torch.equal(got["5.weight"], last)
        last = got["5.weight"]
        for p in model.parameters():
            p.grad = batch_grads[[k for k, q in model.named_parameters() if q is p][0]]
        opt.step()


def test_several_forwards_before_backward():
    """Opacus pairs recorded activations LIFO and sums the per-sample gradients of both passes."""
    model = cnn()
    qnn.apply_plan(model, {n: nearest(RECIPES["fp8"]) for n in qnn.quantizable_layers(model)})
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randint(0, 3, (4,), generator=g) for _ in range(2)]
    loss = lambda out, i, k: F.cross_entropy(out, ys[k][i].reshape(-1), reduction="sum")
    ref = loop_grads(model, xs, loss)
    gsm = GradSampleModule(model, loss_reduction="sum")
    assert_same(opacus_grads(gsm, xs, loss), ref, 1e-9)


# ---------------------------------------------------------------- stochastic rounding, ordering, privacy


def _recorded_reference(layer) -> torch.Tensor:
    """Per-example weight gradients from the quantized tensors the layer recorded (no Opacus)."""
    qa, qg = layer._q_act, layer._q_grad
    if isinstance(layer, QLinear):
        return torch.einsum("bo,bi->boi", qg, qa)
    return torch.stack([
        torch.nn.grad.conv2d_weight(qa[i : i + 1], layer.weight.shape, qg[i : i + 1], layer.stride,
                                    layer.padding, layer.dilation, layer.groups)
        for i in range(qa.shape[0])
    ])


@pytest.mark.parametrize("recipe", DP_RECIPES)
def test_stochastic_grads_use_the_recorded_quantized_tensors(recipe):
    """With stochastic rounding the per-sample gradients are built from the very q(dy) the backward used --
    also for the first layer, whose input needs no gradient (PyTorch then fires Opacus's backward hook at
    the output gradient, before the layer's own backward: q(dy) must already exist)."""
    model = cnn(torch.float32)
    qnn.apply_plan(model, {n: recipe for n in qnn.quantizable_layers(model)})
    raw: dict[str, torch.Tensor] = {}
    for name in ("0", "2", "5", "7"):
        layer = model.get_submodule(name)
        layer.record_quantized = True
        # prepended, so it sees the output gradient before the layer's own quantizer does
        layer.register_full_backward_pre_hook(lambda m, go, name=name: raw.__setitem__(name, go[0]), prepend=True)
    gsm = GradSampleModule(model, loss_reduction="mean")
    x = torch.randn(6, 1, 8, 8) * torch.logspace(-1, 1, 6).reshape(-1, 1, 1, 1)
    y = torch.randint(0, 3, (6,))
    F.cross_entropy(gsm(x), y).backward()
    for name in ("0", "2", "5", "7"):
        layer = model.get_submodule(name)
        gs = layer.weight.grad_sample
        want = _recorded_reference(layer) * 6  # Opacus rescales a mean-reduced loss by the batch size
        close(gs, want, 1e-5)
        close(gs.mean(0), layer.weight.grad, 1e-5)
        # teeth: the quantization was not a no-op, so per-sample gradients from the raw dy would differ
        assert not torch.equal(raw[name], layer._q_grad)
        layer._q_grad = raw[name]
        assert (gs - _recorded_reference(layer) * 6).abs().max() > 1e-4 * gs.abs().max()


@pytest.mark.parametrize("recipe", DP_RECIPES)
def test_changing_one_example_never_changes_another(recipe):
    """Stochastic rounding as in the recipe; the same generator states for both batches."""
    model = cnn(torch.float32)
    qnn.apply_plan(model, {n: recipe for n in qnn.quantizable_layers(model)})
    states = qnn.generator_states(model)
    gsm = GradSampleModule(model, loss_reduction="sum")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (5,), generator=g)
    x2 = x.clone()
    x2[2] = 1000.0 * torch.randn(1, 8, 8, generator=g)  # a wildly different example 2
    a = opacus_grads(gsm, [x], ce(y))
    qnn.set_generator_states(model, states)
    b = opacus_grads(gsm, [x2], ce(y))
    others = [0, 1, 3, 4]
    for k in a:
        assert torch.equal(a[k][others], b[k][others]), k
        assert not torch.equal(a[k][2], b[k][2]), k


def test_empty_batch_and_dp_optimizer_step():
    model = cnn(torch.float32)
    qnn.apply_plan(model, {"0": "fp8", "5": "nvfp4"})
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    out = gsm(torch.zeros(0, 1, 8, 8))
    F.cross_entropy(out, torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    for p in model.parameters():
        assert p.grad_sample.shape == (0, *p.shape)
    opt.step()  # noise only
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_privacy_engine_poisson_training_with_plan_switches():
    """make_private (hooks mode, Poisson sampling) trains a converted model through plan switches."""
    model = cnn(torch.float32)
    g = torch.Generator().manual_seed(4)
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8, generator=g),
                                          torch.randint(0, 3, (32,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    pe = PrivacyEngine(accountant="rdp")
    gsm, opt, loader = pe.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                       data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                       poisson_sampling=True, grad_sample_mode="hooks")
    assert isinstance(gsm, GradSampleModule)
    for epoch, plan in enumerate([EpochPlan(0, {"0": "fp8", "7": "fp4"}), EpochPlan(1), EpochPlan(2, {"2": "mxfp4"})]):
        qnn.apply_plan(gsm, plan)
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(gsm(xb), yb).backward()
            opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert pe.get_epsilon(1e-5) > 0


@pytest.mark.parametrize("mode", ["functorch", "ew"])
def test_other_grad_sample_modes_are_refused_clearly(mode):
    from opacus.grad_sample import GradSampleModuleExpandedWeights

    model = cnn(torch.float32)
    qnn.apply_plan(model, {"5": "fp8"})
    if mode == "functorch":
        gsm = GradSampleModule(model, force_functorch=True)
    else:
        gsm = GradSampleModuleExpandedWeights(model)
    with pytest.raises(ConfigError, match="hooks"):
        gsm(torch.randn(2, 1, 8, 8)).sum().backward()
