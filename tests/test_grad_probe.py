"""The probe records what the quantizers see (against a batch-size-1 autograd loop), and the analytic variance
of the released update matches Monte Carlo over stochastic-rounding draws (stated tolerance)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpquant_sim.nn as qnn
from dpquant_sim.analysis import grad_probe as gp
from dpquant_sim.errors import ConfigError
from dpquant_sim.nn.config import LayerQuantConfig, get_recipe
from dpquant_sim.numerics.spec import QuantSpec


class _Net(nn.Module):
    def __init__(self, conv: bool):
        super().__init__()
        self.conv = conv
        if conv:
            self.c1 = nn.Conv2d(2, 6, 3, padding=1)
            self.gn = nn.GroupNorm(2, 6)
            self.fc = nn.Linear(6 * 4 * 4, 5)
        else:
            self.fc1 = nn.Linear(7, 9)
            self.fc = nn.Linear(9, 5)

    def forward(self, x):
        if self.conv:
            return self.fc(torch.flatten(F.relu(self.gn(self.c1(x))), 1))
        return self.fc(F.relu(self.fc1(x)))


def _model(conv: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return qnn.convert_model(_Net(conv), seed=seed)


def _data(conv: bool, n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g) if conv else torch.randn(n, 7, generator=g)
    return x, torch.randint(0, 5, (n,), generator=g)


# Deterministic grad rounding (nearest) with per-sample scales: a batch-size-1 loop reproduces it exactly.
_RTN = LayerQuantConfig("rtn8", QuantSpec("fp8_e4m3", "channel"), QuantSpec("fp8_e4m3", "sample"),
                        QuantSpec("fp8_e5m2", "sample", rounding="nearest"))


def _loop_reference(model: nn.Module, x, y, layers):
    """Per example: each layer's input and raw output gradient (retain_grad on its output) and per-layer /
    total per-example gradient norms, from a plain batch-size-1 autograd loop."""
    mods = dict(model.named_modules())
    ref = {"x": {n: [] for n in layers}, "dy": {n: [] for n in layers}, "norm": [], "total": []}
    for i in range(x.shape[0]):
        outs, ins = {}, {}
        hs = []

        def keep_in(m, a, _n):
            ins[_n] = a[0].detach()

        def keep_out(m, a, o, _n):
            o.retain_grad()
            outs[_n] = o

        for n in layers:
            hs.append(mods[n].register_forward_pre_hook(lambda m, a, _n=n: keep_in(m, a, _n), prepend=True))
            hs.append(mods[n].register_forward_hook(lambda m, a, o, _n=n: keep_out(m, a, o, _n)))
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        loss.backward()
        for h in hs:
            h.remove()
        for n in layers:
            ref["x"][n].append(ins[n][0])
            ref["dy"][n].append(outs[n].grad[0].clone())
        ref["norm"].append(torch.stack([torch.cat([p.grad.flatten() for p in mods[n].parameters()]).norm()
                                        for n in layers]))
        ref["total"].append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    model.zero_grad(set_to_none=True)
    return ref


@pytest.mark.parametrize("conv", [False, True])
def test_capture_matches_batch_size_one_loop(conv):
    model = _model(conv)
    layers = qnn.quantizable_layers(model)
    x, y = _data(conv)
    p = gp.capture(model, x, y, chunk=5)
    ref = _loop_reference(model, x, y, layers)
    assert p.layers == layers and p.batch == 12 and p.call_order == layers
    for n in layers:
        torch.testing.assert_close(p.x[n], torch.stack(ref["x"][n]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.dy[n], torch.stack(ref["dy"][n]), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(p.layer_grad_norm.float(), torch.stack(ref["norm"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.total_grad_norm.float(), torch.stack(ref["total"]), rtol=1e-4, atol=1e-6)
    assert p.layer_params == {n: sum(q.numel() for q in dict(model.named_modules())[n].parameters()) for n in layers}
    assert all(q.grad is None for q in model.parameters())  # the model is left without grads or hooks


def test_capture_records_raw_tensors_of_a_quantized_model():
    # Every layer quantized (deterministic RTN so that the reference is exact): the recorded x and dy are those
    # *before* each layer's quantizers, computed by hand: dy_fc = softmax - onehot, dy_fc1 = (q(dy_fc) q(W_fc))
    # masked by the ReLU of fc1's output, x_fc = relu(fc1 output) with fc1 computed from q(x), q(W_fc1).
    model = _model(False)
    layers = qnn.quantizable_layers(model)
    qnn.apply_plan(model, {n: _RTN for n in layers})
    x, y = _data(False)
    p = gp.capture(model, x, y)
    qa, qw, qg = (lambda t: _RTN.activation.apply(t)), (lambda t: _RTN.weight.apply(t)), (lambda t: _RTN.grad.apply(t))
    with torch.no_grad():
        h = F.linear(qa(x), qw(model.fc1.weight), model.fc1.bias)
        a = F.relu(h)
        logits = F.linear(qa(a), qw(model.fc.weight), model.fc.bias)
        dy_fc = torch.softmax(logits, 1) - F.one_hot(y, 5).float()
        dy_fc1 = (qg(dy_fc) @ qw(model.fc.weight)) * (h > 0)
    torch.testing.assert_close(p.x["fc1"], x)
    torch.testing.assert_close(p.x["fc"], a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.dy["fc"], dy_fc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.dy["fc1"], dy_fc1, rtol=1e-5, atol=1e-6)
    assert qnn.quantization_state(model) == {n: "rtn8" for n in layers}


def test_capture_records_dy_before_the_layer_quantizes_it():
    model = _model(False)
    qnn.apply_plan(model, {"fc": "fp4"})
    for m in model.modules():
        if hasattr(m, "record_quantized"):
            m.record_quantized = True
    x, y = _data(False)
    p = gp.capture(model, x, y)
    q = model.fc._q_grad
    assert not torch.equal(p.dy["fc"], q)  # what the quantizer received vs what it produced
    assert p.dy["fc"].abs().amax(1).allclose(q.abs().amax(1))  # per-sample amax is kept exactly by the quantizer


def test_clip_factors_and_norms():
    model = _model(False)
    x, y = _data(False)
    p = gp.capture(model, x, y)
    c = p.clip_factors(0.1)
    torch.testing.assert_close(c, (0.1 / (p.total_grad_norm + 1e-6)).clamp(max=1.0))
    assert torch.equal(p.clip_factors(None), torch.ones_like(p.total_grad_norm))
    linf, l2 = gp.layer_norms(p, "fc")
    d = p.dy["fc"].double()
    assert linf.tolist() == pytest.approx(d.abs().amax(1).tolist())
    assert l2.tolist() == pytest.approx(d.norm(dim=1).tolist())


_GRID = [(c, k, r) for c in (False, True) for k in (None, 0.05) for r in ("fp4", "int8")]
_FAST = [(False, None, "fp4"), (True, 0.05, "int8")]


@pytest.mark.parametrize("conv,clip,recipe", [
    pytest.param(*case, marks=() if case in _FAST else pytest.mark.slow) for case in _GRID])
def test_direct_term_matches_monte_carlo_single_layer(conv, clip, recipe):
    # One layer quantized and nothing downstream of it: its own block's variance is exactly the direct term
    # (independent stochastic-rounding errors, linear in the weight gradient), up to clip-factor fluctuations.
    model = _model(conv, seed=3)
    x, y = _data(conv, n=24, seed=4)
    layers = qnn.quantizable_layers(model)
    last = layers[-1]
    p = gp.capture(model, x, y)
    pred = gp.predicted_update_variance(p, {last: recipe}, clip=clip, batch_size=24)
    mc = gp.update_variance_mc(model, x, y, {last: recipe}, clip=clip, batch_size=24, draws=64, seed=5)
    assert pred[last]["propagated"] == 0.0 and pred[last]["total"] == pred[last]["direct"]
    # 64 draws: the variance estimate of a sum over >= 45 coordinates is within ~25% (chi-square, 63 dof,
    # plus correlation between coordinates); the clipped case also moves with the quantized norms.
    assert pred[last]["direct"] == pytest.approx(mc[last]["var"], rel=0.3)
    for n in layers[:-1]:  # upstream layers: only propagated errors, predicted by the isotropic rule
        assert pred[n]["direct"] == 0.0 and pred[n]["propagated"] > 0 and mc[n]["var"] > 0
        assert 0.2 < pred[n]["propagated"] / mc[n]["var"] < 5


def test_update_variance_mc_restores_the_model_and_is_seeded():
    model = _model(True)
    layers = qnn.quantizable_layers(model)
    qnn.apply_plan(model, {layers[0]: "fp8"})
    before = qnn.generator_states(model)
    x, y = _data(True)
    a = gp.update_variance_mc(model, x, y, {n: "fp4" for n in layers}, clip=1.0, batch_size=12, draws=3, seed=9)
    b = gp.update_variance_mc(model, x, y, {n: "fp4" for n in layers}, clip=1.0, batch_size=12, draws=3, seed=9)
    assert a == b
    assert qnn.quantization_state(model) == {layers[0]: "fp8", layers[1]: None}
    after = qnn.generator_states(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fp = gp.update_variance_mc(model, x, y, {}, clip=1.0, batch_size=12, draws=2)
    assert all(v["var"] == 0.0 for v in fp.values())  # nothing quantized: no rounding draws, no variance


def test_noise_variance_closed_form():
    model = _model(False)
    p = gp.capture(model, *_data(False))
    nv = gp.noise_variance(p, noise_multiplier=1.5, clip=2.0, batch_size=10)
    assert nv["fc1"] == pytest.approx((1.5 * 2.0) ** 2 * (7 * 9 + 9) / 100)


def test_law_model_and_bad_inputs():
    model = _model(False)
    x, y = _data(False)
    p = gp.capture(model, x, y)
    exact = gp.predicted_update_variance(p, "int8", clip=None, batch_size=12, propagate=False)
    # int8 follows Proposition 1 with the closed-form constant 1/(6 127^2) (exponent 1)
    law = gp.predicted_update_variance(p, "int8", clip=None, batch_size=12, propagate=False, model="law",
                                       laws={"int8": (1.0, 1 / (6 * 127**2))})
    for n in p.layers:
        assert 0.3 < law[n]["total"] / exact[n]["total"] < 3
    with pytest.raises(ConfigError, match="law"):
        gp.predicted_update_variance(p, "int8", clip=None, batch_size=12, model="law")
    with pytest.raises(ConfigError, match="model"):
        gp.predicted_update_variance(p, "int8", clip=None, batch_size=12, model="guess")
    with pytest.raises(ConfigError, match="plan layer"):
        gp.predicted_update_variance(p, {"nope": "fp8"}, clip=None, batch_size=12)
    with pytest.raises(ConfigError, match="draws"):
        gp.update_variance_mc(model, x, y, {"fc": "fp8"}, clip=1.0, batch_size=12, draws=1)
    with pytest.raises(ConfigError, match="probe size"):
        gp.probe_indices(10, 11)
    with pytest.raises(ConfigError, match="probe batch"):
        gp.capture(model, x, y[:3])
    with pytest.raises(ConfigError, match="model"):
        gp.capture(nn.Sequential(nn.ReLU()), x, y)
    assert torch.equal(gp.probe_indices(100, 10, 2), gp.probe_indices(100, 10, 2))


def test_quantization_error_matches_reference():
    from dpquant_sim.analysis.variance_law import expected_sq_error

    model = _model(True)
    x, y = _data(True)
    p = gp.capture(model, x, y)
    q = gp.quantization_error(p, "c1", "int8", draws=16, generator=torch.Generator().manual_seed(0))
    ex = expected_sq_error(p.dy["c1"], get_recipe("int8").grad, conv=True).reshape(12, -1).sum(1)
    assert q["grad_sq"].sum() == pytest.approx(ex.sum(), rel=0.1)
    assert q["grad_elems"] == 6 * 4 * 4
    assert 0 < q["weight_rel"] < 1e-3 and 0 < q["act_rel"] < 1e-3
    dm = copy.deepcopy(model)  # the probe did not touch the model's weights
    assert all(torch.equal(a, b) for a, b in zip(dm.parameters(), model.parameters()))
