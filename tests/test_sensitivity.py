"""Per-example loss deltas (training.sensitivity) and DPQuant's ranking on a model with a known fragile layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dpquant_sim.errors import ConfigError, DPSafetyError
from dpquant_sim.schedules import build_schedule
from dpquant_sim.schedules.base import LayerInfo, ScheduleContext
from dpquant_sim.training.sensitivity import make_loss_delta_fn

qnn = pytest.importorskip("dpquant_sim.nn")


def fragile_mlp(x: torch.Tensor, y: torch.Tensor):
    """A 3-layer MLP trained on (x, y) whose middle layer '2' is fragile under fp4 by construction.

    Hidden unit 0 of layer '0' is dead (zero weights, bias -1: ReLU always 0, so it gets no gradient and stays
    dead); layer '2' has weight 1000 on that input in every row. In full precision the huge column multiplies
    0 and changes nothing; with per-output-channel fp4 scaling (amax 1000 -> step 1000/12 for the smallest
    normal fp4 value 0.5 of 6) every ordinary weight (|w| < 1) rounds to 0, so layer 2 outputs its bias alone
    and the classifier collapses. Layers '0' and '4' lose only rounding accuracy. (Also used by
    tests/test_sensitivity_training.py.)
    """
    torch.manual_seed(0)
    d, k = x.shape[1], int(y.max()) + 1
    model = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, k))
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        model[2].weight[:, 0] = 1000.0
    return qnn.convert_model(model, seed=0)


@pytest.fixture(scope="module")
def fragile():
    g = torch.Generator().manual_seed(0)
    n, d, k = 96, 8, 4
    centers = torch.randn(k, d, generator=g) * 2.0
    y = torch.randint(0, k, (n,), generator=g)
    x = centers[y] + 0.5 * torch.randn(n, d, generator=g)
    return fragile_mlp(x, y), TensorDataset(x, y)


def reference_deltas(model, data, names, recipe="fp4"):
    """Independent loop: one example at a time, whole dataset, layers switched with apply_plan."""
    x, y = data.tensors
    model.eval()
    out = np.zeros((len(x), len(names)))
    with torch.no_grad():
        for i in range(len(x)):
            qnn.apply_plan(model, {n: None for n in names})
            base = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).item()
            for j, name in enumerate(names):
                qnn.apply_plan(model, {**{n: None for n in names}, name: recipe})
                out[i, j] = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).item() - base
    qnn.apply_plan(model, {n: None for n in names})
    model.train()
    return out


@pytest.fixture(scope="module")
def ref(fragile):
    model, data = fragile
    return reference_deltas(model, data, ["0", "2", "4"])


def test_full_sample_matches_batch1_reference_and_batching_does_not_matter(fragile, ref):
    model, data = fragile
    names = ["0", "2", "4"]
    for bs in (256, 7):  # per-example results must not depend on which examples share a batch
        d, n_exp = make_loss_delta_fn(model, data, recipe="fp4", batch_size=bs)(names, 1.0, torch.Generator())
        assert n_exp == len(data) and d.shape == (len(data), 3)
        np.testing.assert_allclose(d.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert ref[:, 1].mean() > 5 * max(ref[:, 0].mean(), ref[:, 2].mean(), 1e-3)  # the construction worked


def test_poisson_sample_is_the_rate_q_bernoulli_draw(fragile, ref):
    model, data = fragile
    fn = make_loss_delta_fn(model, data, recipe="fp4")
    d, n_exp = fn(["4", "0"], 0.3, torch.Generator().manual_seed(11))
    keep = torch.rand(len(data), generator=torch.Generator().manual_seed(11)) < 0.3
    assert n_exp == pytest.approx(0.3 * len(data))
    np.testing.assert_allclose(d.numpy(), ref[keep.numpy()][:, [2, 0]], rtol=1e-4, atol=1e-5)


def test_restores_plan_and_mode_and_unwraps_opacus(fragile):
    from opacus import GradSampleModule

    model, data = fragile
    qnn.apply_plan(model, {"0": "fp8", "2": None, "4": "fp6"})
    model.train()
    before = qnn.quantization_state(model)
    wrapped = GradSampleModule(model)
    fn_w = make_loss_delta_fn(wrapped, data, recipe="fp4")
    d_w, _ = fn_w(["_module.0", "_module.2"], 0.5, torch.Generator().manual_seed(1))
    assert qnn.quantization_state(model) == before and model.training
    d, _ = make_loss_delta_fn(model, data, recipe="fp4")(["0", "2"], 0.5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(d, d_w)
    qnn.apply_plan(model, {"0": None, "4": None})


def test_bad_inputs(fragile):
    model, data = fragile
    with pytest.raises(ConfigError, match="nope"):
        make_loss_delta_fn(model, data)(["nope"], 0.5, torch.Generator())
    mean_loss = make_loss_delta_fn(model, data, loss_fn=lambda logits, y: F.cross_entropy(logits, y))
    with pytest.raises(DPSafetyError, match="per example"):
        mean_loss(["0"], 0.5, torch.Generator())
    assert qnn.quantization_state(model) == {"0": None, "2": None, "4": None}  # restored on error too
    d, n_exp = make_loss_delta_fn(model, data)(["0"], 1e-9, torch.Generator())  # empty Poisson draw
    assert d.shape == (0, 1) and n_exp > 0


def test_dpquant_ranks_layers_in_true_order_without_noise(fragile, ref):
    model, data = fragile
    layers = [LayerInfo(n, 100) for n in ("0", "2", "4")]
    sched = build_schedule({"kind": "dpquant", "budget": 2 / 3, "budget_unit": "layers", "sample_rate": 1.0,
                            "clip": 1e6, "ema": 0.0})
    fn = make_loss_delta_fn(model, data, recipe="fp4")
    plan = sched.plan(ScheduleContext(0, 4, layers, "fp4", np.random.default_rng(0), private=False, loss_deltas=fn))
    means = dict(zip(("0", "2", "4"), ref.mean(0)))
    assert plan.scores == pytest.approx(means, rel=1e-4, abs=1e-6)  # exact estimator with q=1, no clip, no noise
    true_order = sorted(means, key=means.get)
    assert sorted(plan.scores, key=plan.scores.get) == true_order
    assert sorted(plan.probs, key=lambda n: -plan.probs[n]) == true_order
    assert true_order[-1] == "2" and plan.probs["2"] < 0.5


def test_dpquant_private_default_noise_still_finds_the_fragile_layer(fragile):
    """At the default estimator settings (q .05 would be 12 examples here, so q=.5) with noise sigma=1 the
    fragile layer's probability is still the lowest."""
    model, data = fragile

    class Ledger:
        delta = 1e-5
        calls = []

        def add_mechanism(self, *a, **k):
            self.calls.append(a)

        def epsilon(self):
            return 0.0

        def breakdown(self):
            return {"dpquant-estimator": 0.1}

    layers = [LayerInfo(n, 100) for n in ("0", "2", "4")]
    sched = build_schedule({"kind": "dpquant", "budget": 2 / 3, "budget_unit": "layers", "sample_rate": 0.5})
    fn = make_loss_delta_fn(model, data, recipe="fp4")
    plan = sched.plan(ScheduleContext(0, 4, layers, "fp4", np.random.default_rng(0), ledger=Ledger(), loss_deltas=fn))
    assert min(plan.probs, key=plan.probs.get) == "2"
