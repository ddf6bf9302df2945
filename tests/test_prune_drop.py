"""Pre-pruning and gradient dropping: exact sparsity, criteria vs hand references, masked DP step, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dpquant_sim.errors import ConfigError
from dpquant_sim.schedules.base import LayerInfo
from dpquant_sim.schedules.configs import DropConfig, PruneConfig
from dpquant_sim.schedules.prune_drop import GradDropper, apply_pruning, synflow_scores


def mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12, bias=bias), nn.ReLU(), nn.Linear(12, 8, bias=bias), nn.ReLU(),
                         nn.Linear(8, 3, bias=bias))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(), nn.Conv2d(6, 8, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


@pytest.mark.parametrize("method", ["random", "magnitude", "snip-free"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_unstructured_sparsity_is_exact_per_layer(method, sparsity):
    model = cnn()
    st = apply_pruning(model, PruneConfig(method=method, structure="unstructured", sparsity=sparsity), seed=1,
                       input_shape=(1, 8, 8))
    for name in ("0", "3", "6"):
        w = model.get_submodule(name).weight
        expected_zeros = math.floor(sparsity * w.numel() + 0.5)
        assert int((w == 0).sum()) == expected_zeros
        assert int((~st.masks[f"{name}.weight"]).sum()) == expected_zeros
        assert st.kept_channel_fraction[name] == 1.0
    assert st.kept_flop_share([LayerInfo("0", 100), LayerInfo("3", 50)]) == 1.0  # zeros in dense GEMMs: no saving


@pytest.mark.parametrize("method", ["random", "magnitude", "snip-free"])
def test_channel_pruning_removes_whole_output_channels(method):
    model = cnn()
    st = apply_pruning(model, PruneConfig(method=method, structure="channel", sparsity=0.5), seed=0,
                       input_shape=(1, 8, 8))
    for name, c_out in (("0", 6), ("3", 8)):
        m = model.get_submodule(name)
        dead = (m.weight.reshape(c_out, -1) == 0).all(dim=1)
        assert int(dead.sum()) == c_out // 2
        assert torch.all(m.bias[dead] == 0)
        assert st.kept_channel_fraction[name] == 0.5
    assert st.kept_channel_fraction["6"] == 1.0  # the classifier keeps every class
    layers = [LayerInfo("_module.0", 2 * 64 * 9 * 6), LayerInfo("3", 2 * 36 * 54 * 8), LayerInfo("6", 2 * 288 * 4)]
    f = np.array([layer.flops for layer in layers], float)
    assert st.kept_flop_share(layers) == pytest.approx((0.5 * f[0] + 0.5 * f[1] + f[2]) / f.sum())


def test_magnitude_prunes_the_smallest_weights():
    model = mlp()
    w0 = model[2].weight.detach().clone()
    apply_pruning(model, PruneConfig(method="magnitude", sparsity=0.4), seed=0)
    kept = model[2].weight != 0
    assert w0.abs()[kept].min() >= w0.abs()[~kept].max()


def test_snip_free_matches_hand_synflow_on_a_linear_net():
    """Bias-free 3-layer net, ones input, |W|: R = 1^T |W3||W2||W1| 1, so the saliency of W2[j, i] is
    |W2[j, i]| * (1^T |W3|)_j * (|W1| 1)_i. Computed by hand, compared with synflow_scores and the pruning."""
    model = mlp(bias=False)
    a1, a2, a3 = (model[i].weight.detach().double().abs() for i in (0, 2, 4))
    ref2 = a2 * torch.outer(a3.sum(0), a1.sum(1))
    ref1 = a1 * (a3 @ a2).sum(0)[:, None]
    scores = synflow_scores(model, (10,))
    torch.testing.assert_close(scores["2"].double(), ref2, rtol=1e-5, atol=0)
    torch.testing.assert_close(scores["0"].double(), ref1, rtol=1e-5, atol=0)
    apply_pruning(model, PruneConfig(method="snip-free", sparsity=0.5), seed=0, input_shape=(10,))
    kept = model[2].weight != 0
    assert ref2[kept].min() >= ref2[~kept].max()
    with pytest.raises(ConfigError, match="input_shape"):
        apply_pruning(mlp(), PruneConfig(method="snip-free"), seed=0)


def test_random_pruning_is_seeded_and_reapply_rezeroes():
    a, b, c = mlp(), mlp(), mlp()
    cfg = PruneConfig(method="random", sparsity=0.5)
    sa, sb, sc = apply_pruning(a, cfg, 3), apply_pruning(b, cfg, 3), apply_pruning(c, cfg, 4)
    assert all(torch.equal(sa.masks[k], sb.masks[k]) for k in sa.masks)
    assert any(not torch.equal(sa.masks[k], sc.masks[k]) for k in sa.masks)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    sa.reapply(a)
    assert int((a[0].weight == 0).sum()) == 60
    import json

    from dpquant_sim.schedules.prune_drop import PruneState

    state = json.loads(json.dumps({k: (v if k != "masks" else {n: m.tolist() for n, m in v.items()})
                                   for k, v in sa.state_dict().items()}))
    back = PruneState.from_state_dict(state)
    assert all(torch.equal(back.masks[k], sa.masks[k]) for k in sa.masks) and back.cfg == sa.cfg


def test_grad_dropper_counts_determinism_and_magnitude():
    model = mlp()
    rnd = GradDropper(DropConfig(method="random", keep=0.3), seed=5)
    m1, m2, m3 = rnd.masks(model, 7), GradDropper(DropConfig(method="random", keep=0.3), 5).masks(model, 7), \
        rnd.masks(model, 8)
    for p in model.parameters():
        assert m1[p].shape == p.shape and m1[p].dtype == torch.bool
        assert int(m1[p].sum()) == max(1, math.floor(0.3 * p.numel() + 0.5))
        assert torch.equal(m1[p], m2[p])
    assert any(not torch.equal(m1[p], m3[p]) for p in model.parameters())
    mag = GradDropper(DropConfig(method="magnitude", keep=0.25), seed=0).masks(model, 0)
    w = model[0].weight.detach().abs()
    assert w[mag[model[0].weight]].min() >= w[~mag[model[0].weight]].max()
    # with pruning masks as the base, only unpruned coordinates are eligible and keep is a share of them
    st = apply_pruning(model, PruneConfig(method="magnitude", sparsity=0.5), seed=0)
    base = st.param_masks(model)
    mb = rnd.masks(model, 1, base=base)
    p = model[0].weight
    assert not (mb[p] & ~base[p]).any() and int(mb[p].sum()) == math.floor(0.3 * 60 + 0.5)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_masked_coordinates_get_no_noise_and_no_update():
    """Real DP step (Opacus GradSampleModule + the project's MaskedDPOptimizer) with large noise: pruned and
    dropped coordinates are bit-identical after the step, every kept coordinate moved."""
    optim = pytest.importorskip("dpquant_sim.training.optim")
    from opacus import GradSampleModule

    model = mlp()
    st = apply_pruning(model, PruneConfig(method="random", sparsity=0.5), seed=0)
    drop = GradDropper(DropConfig(method="random", keep=0.5), seed=0).masks(model, 0, base=st.param_masks(model))
    gsm = GradSampleModule(model)
    opt = optim.MaskedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=10.0,
                                  max_grad_norm=1.0, expected_batch_size=16)
    opt.set_masks(drop)
    before = {p: p.detach().clone() for p in model.parameters()}
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(gsm(x), y).backward()
    opt.step()
    st.reapply(model)
    for p in model.parameters():
        m = drop[p]
        assert torch.equal(p.detach()[~m], before[p][~m])  # no noise, no update
        assert (p.detach()[m] != before[p][m]).all()  # kept: noise std 10 * 1 / 16 moves every one


def test_selection_without_private_data_adds_nothing_to_the_ledger():
    """Pruning and dropping never see data or a ledger; a run with them reports the same epsilon as plain
    DP-SGD with the same sigma, q, steps (checked through the engine when it is available)."""
    acc = pytest.importorskip("dpquant_sim.training.accounting")
    led = acc.PrivacyLedger("rdp", 1e-5)
    model = mlp()
    apply_pruning(model, PruneConfig(method="magnitude", structure="channel", sparsity=0.5), seed=0)
    dropper = GradDropper(DropConfig(method="magnitude", keep=0.5), seed=0)
    for step in range(5):
        dropper.masks(model, step)
        led.step(1.0, 0.1, 1)
    assert [m.name for m in led.entries] == ["dpsgd"] and led.steps_of() == 5
    ref = acc.PrivacyLedger("rdp", 1e-5)
    ref.step(1.0, 0.1, 5)
    assert led.epsilon() == ref.epsilon()


@pytest.mark.slow
def test_engine_epsilon_with_prune_drop_equals_plain_dpsgd(tmp_path):
    engine = pytest.importorskip("dpquant_sim.training.engine")
    config = pytest.importorskip("dpquant_sim.training.config")
    base = dict(dataset="digits", model="mlp", epochs=1, batch_size=256, noise_multiplier=1.0, seed=0)
    plain = engine.train(config.TrainConfig.parse(base), tmp_path / "plain", progress=False)
    pd = engine.train(config.TrainConfig.parse({**base, "prune": {"method": "magnitude", "sparsity": 0.5},
                                                "drop": {"method": "random", "keep": 0.5}}),
                      tmp_path / "pd", progress=False)
    import pandas as pd_

    a = pd_.read_csv(tmp_path / "plain" / "metrics.csv")
    b = pd_.read_csv(tmp_path / "pd" / "metrics.csv")
    assert a["epsilon"].tolist() == b["epsilon"].tolist()
    assert a["steps"].tolist() == b["steps"].tolist()
    assert plain is not None and pd is not None
