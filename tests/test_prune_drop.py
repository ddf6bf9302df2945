"""Pre-pruning and gradient dropping: exact sparsity, criteria vs hand references, masked DP step, accounting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dpquant_sim.errors import ConfigError
from dpquant_sim.schedules.base import LayerInfo
from dpquant_sim.schedules.configs import DropConfig, PruneConfig
from dpquant_sim.schedules.prune_drop import GradDropper, apply_pruning, synflow_scores


_g = torch.Generator().manual_seed(123)
PUBLIC_IMG = (torch.randn(20, 1, 8, 8, generator=_g), torch.randint(0, 4, (20,), generator=_g))


def mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12, bias=bias), nn.ReLU(), nn.Linear(12, 8, bias=bias), nn.ReLU(),
                         nn.Linear(8, 3, bias=bias))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(), nn.Conv2d(6, 8, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


@pytest.mark.parametrize("method", ["random", "magnitude", "synflow", "snip-public"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_unstructured_sparsity_is_exact_per_layer(method, sparsity):
    model = cnn()
    st = apply_pruning(model, PruneConfig(method=method, structure="unstructured", sparsity=sparsity), seed=1,
                       input_shape=(1, 8, 8), public=PUBLIC_IMG)
    for name in ("0", "3", "6"):
        w = model.get_submodule(name).weight
        expected_zeros = math.floor(sparsity * w.numel() + 0.5)
        assert int((w == 0).sum()) == expected_zeros
        assert int((~st.masks[f"{name}.weight"]).sum()) == expected_zeros
        assert st.kept_channel_fraction[name] == 1.0
    assert st.kept_flop_share([LayerInfo("0", 100), LayerInfo("3", 50)]) == 1.0  # zeros in dense GEMMs: no saving


@pytest.mark.parametrize("method", ["random", "magnitude", "synflow", "snip-public"])
def test_channel_pruning_removes_whole_output_channels(method):
    model = cnn()
    st = apply_pruning(model, PruneConfig(method=method, structure="channel", sparsity=0.5), seed=0,
                       input_shape=(1, 8, 8), public=PUBLIC_IMG)
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


def test_synflow_matches_hand_formula_on_a_linear_net():
    """Bias-free 3-layer net, ones input, |W|: R = 1^T |W3||W2||W1| 1, so the saliency of W2[j, i] is
    |W2[j, i]| * (1^T |W3|)_j * (|W1| 1)_i. Computed by hand, compared with synflow_scores and the pruning."""
    model = mlp(bias=False)
    a1, a2, a3 = (model[i].weight.detach().double().abs() for i in (0, 2, 4))
    ref2 = a2 * torch.outer(a3.sum(0), a1.sum(1))
    ref1 = a1 * (a3 @ a2).sum(0)[:, None]
    scores = synflow_scores(model, (10,))
    torch.testing.assert_close(scores["2"].double(), ref2, rtol=1e-5, atol=0)
    torch.testing.assert_close(scores["0"].double(), ref1, rtol=1e-5, atol=0)
    apply_pruning(model, PruneConfig(method="synflow", sparsity=0.5), seed=0, input_shape=(10,))
    kept = model[2].weight != 0
    assert ref2[kept].min() >= ref2[~kept].max()
    with pytest.raises(ConfigError, match="input_shape"):
        apply_pruning(mlp(), PruneConfig(method="synflow"), seed=0)


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


# ------------------------------------------------------------------ synflow name, deprecated alias
def test_snip_free_is_a_deprecated_alias_of_synflow_warning_once(monkeypatch):
    import warnings

    from dpquant_sim.schedules import configs

    monkeypatch.setattr(configs, "_warned_deprecated", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = PruneConfig(method="snip-free")
        b = PruneConfig.model_validate({"method": "snip-free", "sparsity": 0.3})
    assert a.method == b.method == "synflow"
    msgs = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(msgs) == 1 and "synflow" in str(msgs[0].message) and "snip-free" in str(msgs[0].message)
    # the alias prunes exactly what synflow prunes
    m1, m2 = mlp(), mlp()
    s1 = apply_pruning(m1, a, seed=0, input_shape=(10,))
    s2 = apply_pruning(m2, PruneConfig(method="synflow"), seed=0, input_shape=(10,))
    assert all(torch.equal(s1.masks[k], s2.masks[k]) for k in s1.masks)
    with pytest.raises(Exception, match="method"):
        PruneConfig(method="snip")


def test_cli_help_names_synflow_not_the_alias(capsys, monkeypatch):
    from dpquant_sim.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # no line wrapping inside the names

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "synflow" in out and "snip-public" in out and "--public-fraction" in out
    assert "snip-free" not in out


# ------------------------------------------------------------------ SNIP on a public split
def test_snip_public_matches_hand_gradient_of_a_linear_softmax_model():
    """One bias-free Linear layer, summed cross-entropy: dL/dW = sum_i (softmax(W x_i) - e_{y_i}) x_i^T
    (closed form, float64, batch-of-1 sum); the score is |W * dL/dW|. Chunked accumulation must not matter."""
    from dpquant_sim.schedules.prune_drop import snip_scores

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 6, generator=g), torch.randint(0, 4, (13,), generator=g)
    w = model[0].weight.detach().double()
    grad = torch.zeros_like(w)
    for xi, yi in zip(x.double(), y):
        p = torch.softmax(w @ xi, 0)
        p[yi] -= 1.0
        grad += torch.outer(p, xi)
    ref = (w * grad).abs()
    got = snip_scores(model, x, y, batch_size=5)
    torch.testing.assert_close(got["0"].double(), ref, rtol=1e-5, atol=1e-7)
    assert model[0].weight.grad is None  # the model's gradients are left as they were
    apply_pruning(model, PruneConfig(method="snip-public", sparsity=0.5), seed=0, public=(x, y))
    kept = model[0].weight != 0
    assert int(kept.sum()) == 12 and ref[kept].min() >= ref[~kept].max()


def test_data_dependent_pruning_without_public_data_is_refused():
    with pytest.raises(ConfigError, match="public"):
        apply_pruning(mlp(), PruneConfig(method="snip-public"), seed=0)
    from dpquant_sim.training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"public_fraction=0\.0 is not allowed.*snip-public.*private data"):
        TrainConfig.parse({"prune": {"method": "snip-public"}})
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="public_fraction"):
            TrainConfig.parse({"public_fraction": bad})
    TrainConfig.parse({"prune": {"method": "snip-public"}, "public_fraction": 0.1})  # accepted


def _run(cfg):
    from dpquant_sim.training.config import TrainConfig
    from dpquant_sim.training.engine import _Run

    return _Run(TrainConfig.parse(cfg), None)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_public_split_is_held_out_of_dp_sgd_and_accounted_on_the_private_size():
    from dpquant_sim.training.data import load_dataset

    cfg = dict(dataset="digits", model="mlp", n_train=200, n_test=50, batch_size=20, epochs=1, seed=3,
               noise_multiplier=1.0, public_fraction=0.25, prune={"method": "snip-public", "sparsity": 0.5})
    run = _run(cfg)
    full = load_dataset("digits", seed=0, n_train=200, n_test=50).train.tensors[0]
    info = run.run_info()["public_split"]
    pub = torch.tensor(info["indices"])
    assert info["n_public"] == 50 == len(pub) and info["n_private"] == 150 == run.data.n_train
    assert run.q == 20 / 150 and run.spe == round(150 / 20)  # sample rate from the PRIVATE size
    assert run.run_info()["n_train"] == 150 and "snip-public" in info["used_by"]
    priv = torch.tensor(sorted(set(range(200)) - set(pub.tolist())))
    assert torch.equal(run.x_train, full[priv])  # DP-SGD's (and the estimator's) data: the private rows only
    assert torch.equal(run.public[0], full[pub])
    # deterministic from the seed; another seed holds out other examples
    assert _run(cfg).run_info()["public_split"]["indices"] == info["indices"]
    assert _run({**cfg, "seed": 4}).run_info()["public_split"]["indices"] != info["indices"]
    # the pruning masks are SNIP's on exactly the public rows (reference: a fresh model, scored by hand input)
    from dpquant_sim.training.engine import build_run_model

    ref_model = build_run_model(run.cfg, run.data)
    ref = apply_pruning(ref_model, run.cfg.prune, run.cfg.seed, public=(full[pub], run.public[1]))
    assert all(torch.equal(ref.masks[k], run.prune_state.masks[k]) for k in ref.masks)
    assert run.run_info()["prune"]["kept_gemm_flop_share"] == 1.0  # unstructured: no FLOP saved
    # without a public fraction nothing is held out and run_info says so
    plain = _run({**cfg, "public_fraction": 0.0, "prune": None})
    assert plain.data.n_train == 200 and plain.run_info()["public_split"] is None


# ------------------------------------------------------------------ dropped coordinates do not move
def _dp_steps(opt_name, masks_per_step, *, momentum=0.9, weight_decay=0.01, sigma=5.0):
    """Real DP steps (GradSampleModule + MaskedDPOptimizer); returns the weights and optimizer state after each."""
    from opacus import GradSampleModule

    from dpquant_sim.training import optim

    model = mlp()
    gsm = GradSampleModule(model)
    base = optim.make_base_optimizer(opt_name, model.parameters(), lr=0.1, momentum=momentum,
                                     weight_decay=weight_decay)
    opt = optim.MaskedDPOptimizer(base, noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=16,
                                  generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    snaps = []
    for make in masks_per_step:
        opt.set_masks(make(model) if make else None)
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        snaps.append(({p: p.detach().clone() for p in model.parameters()},
                      {p: {k: v.clone() for k, v in base.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
                       for p in model.parameters()}))
    return model, snaps


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_dropped_coordinates_do_not_move_through_momentum_or_adam_state(opt_name):
    """Two unmasked steps fill the momentum buffer / Adam's m and v (so an unfrozen dropped coordinate WOULD
    move: checked), then a step with a random drop mask: every dropped coordinate's weight and optimizer state
    are bit-identical before/after; kept coordinates moved."""
    drop = GradDropper(DropConfig(method="random", keep=0.5), seed=0)
    model, snaps = _dp_steps(opt_name, [None, None, lambda m: drop.masks(m, 2)])
    (w1, s1), (w2, s2) = snaps[1], snaps[2]
    masks = drop.masks(model, 2)
    for p in model.parameters():
        m = masks[p]
        assert torch.equal(w2[p][~m], w1[p][~m])
        for k in s1[p]:
            assert torch.equal(s2[p][k][~m], s1[p][k][~m]), k
            assert (s1[p][k][~m] != 0).any()  # there was state that would have moved them
        assert (w2[p][m] != w1[p][m]).all()


def test_freeze_masked_is_needed_the_plain_step_would_move_dropped_coordinates():
    """The reference behaviour that freeze_masked corrects: torch's SGD-momentum and Adam move a coordinate
    whose gradient is exactly zero once their state is nonzero."""
    from dpquant_sim.training.optim import freeze_masked

    for make in (lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9), lambda p: torch.optim.Adam([p], lr=0.1)):
        p = nn.Parameter(torch.ones(2))
        opt = make(p)
        p.grad = torch.tensor([1.0, 1.0])
        opt.step()
        p.grad = torch.tensor([1.0, 0.0])
        before = p.detach().clone()
        opt.step()
        assert p[1] != before[1]  # moved with a zero gradient
        p.grad = torch.tensor([1.0, 0.0])
        before = p.detach().clone()
        state = {k: v.clone() for k, v in opt.state[p].items() if v.shape == p.shape}
        with freeze_masked(opt, {p: torch.tensor([True, False])}):
            opt.step()
        assert p[1] == before[1] and p[0] != before[0]
        assert all(opt.state[p][k][1] == v[1] for k, v in state.items())


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_pruned_weights_stay_exactly_zero_without_reapply(opt_name):
    """Pruning masks (and a drop mask on top) passed to the DP optimizer every step, weight decay, momentum /
    Adam and noise 5: the pruned weights are exactly zero after 6 steps, although reapply() is never called."""
    model0 = mlp()
    st = apply_pruning(model0, PruneConfig(method="random", sparsity=0.5), seed=0)
    drop = GradDropper(DropConfig(method="random", keep=0.7), seed=1)
    step = iter(range(100))

    def masks(m):
        base = st.param_masks(m)
        return drop.masks(m, next(step), base=base)

    def pruned_first(m):
        apply_pruning(m, PruneConfig(method="random", sparsity=0.5), seed=0)
        return masks(m)

    model, snaps = _dp_steps(opt_name, [pruned_first] + [masks] * 5)
    for p_name, mask in st.masks.items():
        p = model.get_parameter(p_name)
        assert (p.detach()[~mask] == 0).all() and (p.detach()[mask] != 0).all()


def test_non_private_step_also_freezes_dropped_coordinates():
    from dpquant_sim.training.clipping import build_clipping

    model = mlp()
    base = torch.optim.Adam(model.parameters(), lr=0.1)
    clip = build_clipping("none", model, base)
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    clip.step([(x, y)], None)
    masks = GradDropper(DropConfig(keep=0.5), seed=0).masks(model, 1)
    before = {p: p.detach().clone() for p in model.parameters()}
    clip.step([(x, y)], masks)
    for p in model.parameters():
        assert torch.equal(p.detach()[~masks[p]], before[p][~masks[p]])
        assert (p.detach()[masks[p]] != before[p][masks[p]]).any()


def test_cost_model_shapes_of_a_channel_pruned_run_by_hand():
    """cnn on 1x8x8: conv1 is a (M, K, N) = (64, 9, 16) GEMM with bias; keeping half its output channels makes
    it (64, 9, 8), 8*9 + 8 = 80 parameters, half the forward FLOPs; other layers unchanged (conservative)."""
    from dpquant_sim.cost.run import build_shapes, pruned_shapes

    shapes = build_shapes("cnn", (1, 8, 8), 10)
    got = {s.name: s for s in pruned_shapes(shapes, {"conv1": 0.5, "fc2": 1.0})}
    c1 = got["conv1"]
    assert c1.gemm_mnk == (64, 9, 8) and c1.params == 80 and c1.out_shape == (8, 8, 8)
    assert c1.weight_shape == (8, 1, 3, 3) and c1.forward_flops == 2 * 64 * 9 * 8
    for s in shapes:
        if s.name != "conv1":
            assert got[s.name] == s


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("opt", [dict(optimizer="adam", lr=0.01, weight_decay=0.01),
                                 dict(optimizer="sgd", momentum=0.9, lr=0.2, clipping="hooks")])
def test_engine_pruned_weights_exactly_zero_with_adam_and_momentum(tmp_path, opt):
    """Through the engine (DP-Adam with weight decay under the default clipping; SGD momentum under hooks),
    channel pruning + snip-public on a public split + random dropping: every pruned weight and bias is exactly
    zero in the final checkpoint, and every kept one is not."""
    from dpquant_sim.training.engine import load_checkpoint, train

    cfg = dict(dataset="digits", model="mlp", n_train=200, n_test=50, batch_size=50, epochs=2, seed=1,
               noise_multiplier=1.0, public_fraction=0.2, prune={"method": "snip-public", "structure": "channel",
                                                                 "sparsity": 0.5},
               drop={"method": "random", "keep": 0.5}, **opt)
    train(cfg, tmp_path / "r", progress=False)
    ck = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    for name, mask in ck["prune"]["masks"].items():
        w = ck["model"][name]
        assert (w[~mask] == 0).all() and (w[mask] != 0).all(), name
    info = json.loads((tmp_path / "r" / "run_info.json").read_text())
    assert info["n_train"] == 160 and info["public_split"]["n_public"] == 40
    assert info["prune"]["kept_gemm_flop_share"] < 1.0
