"""Exact clipping algorithms: every one gives hooks mode's clipped noisy update, for every recipe, rounding,
model, with physical batching, masks, DP-Adam and resume; the norm rule and the cost model agree.

References: Opacus hooks mode (per-sample gradients materialised by the registered grad samplers, clipped
and summed by Opacus's optimizer) for the update; a batch-of-1 loop for the per-sample norms.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import dpquant_sim.nn as qnn
from dpquant_sim.clipping_rules import CLIPPING_ALGORITHMS, DEFAULT_CLIPPING, norm_method
from dpquant_sim.errors import ConfigError, DPSafetyError
from dpquant_sim.nn.clip_ops import layer_ops
from dpquant_sim.nn.config import RECIPES
from dpquant_sim.training.clipping import build_clipping
from dpquant_sim.training.engine import load_checkpoint, train
from dpquant_sim.training.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore::UserWarning:opacus")
OTHERS = [a for a in CLIPPING_ALGORITHMS if a != "hooks"]


def _nearest(recipe: str):
    cfg = RECIPES[recipe]
    return replace(cfg, name=cfg.name + "-rn", grad=replace(cfg.grad, rounding="nearest"))


def _model(name: str, recipe, dtype=torch.float32):
    torch.manual_seed(0)
    m = build_model(name, in_channels=1, num_classes=5, image_size=8).to(dtype)
    m = qnn.convert_model(m, seed=0)
    if recipe is not None:
        qnn.apply_plan(m, {n: recipe for n in qnn.quantizable_layers(m)})
    return m


def one_update(algorithm: str, model_name: str, recipe, chunks, *, masks=None, optimizer="sgd", sigma=0.7,
               C=0.5, steps=1):
    """The parameter change of ``steps`` DP steps of ``algorithm`` from the same start, same noise seed."""
    model = _model(model_name, recipe)
    before = copy.deepcopy(model.state_dict())
    base = (torch.optim.SGD(model.parameters(), lr=1.0) if optimizer == "sgd"
            else torch.optim.Adam(model.parameters(), lr=1e-2))
    named = dict(model.named_parameters())
    pm = {named[k]: v for k, v in (masks or {}).items()}
    clip = build_clipping(algorithm, model, base, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=6,
                          generator=torch.Generator().manual_seed(11))
    for _ in range(steps):
        clip.step(chunks, pm or None)
    clip.close()
    after = model.state_dict()
    return {k: (after[k] - before[k]).double() for k in before if before[k].is_floating_point()}


def assert_same_update(a, b, rel=2e-5):
    scale = max(float(v.abs().max()) for v in a.values())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=rel * scale, msg=lambda m: f"{k}: {m}")


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) * torch.logspace(-1, 1, n).reshape(-1, 1, 1, 1)
    return x, torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("algorithm", OTHERS)
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("recipe", list(RECIPES) + [None])
def test_update_equals_hooks_cnn(algorithm, rounding, recipe):
    if recipe is not None and not RECIPES[recipe].dp_safe:
        pytest.skip("refused under DP (tested in test_privacy_properties)")
    r = None if recipe is None else (RECIPES[recipe] if rounding == "stochastic" else _nearest(recipe))
    x, y = _batch()
    assert_same_update(one_update("hooks", "cnn", r, [(x, y)]), one_update(algorithm, "cnn", r, [(x, y)]))


@pytest.mark.parametrize("algorithm", OTHERS)
@pytest.mark.parametrize("recipe", ["fp8", "mxfp4", "nvfp4", "int4"])
def test_update_equals_hooks_resnet18_w16_on_1x1_maps(algorithm, recipe):
    x, y = _batch()
    assert_same_update(one_update("hooks", "resnet18-w16", RECIPES[recipe], [(x, y)]),
                       one_update(algorithm, "resnet18-w16", RECIPES[recipe], [(x, y)]))


@pytest.mark.parametrize("algorithm", OTHERS)
def test_physical_batching_masks_and_adam_equal_hooks(algorithm):
    x, y = _batch()
    chunks = [(x[:2], y[:2]), (x[2:5], y[2:5]), (x[5:], y[5:])]
    g = torch.Generator().manual_seed(3)
    m = _model("cnn", None)
    masks = {k: torch.rand(p.shape, generator=g) < 0.6 for k, p in m.named_parameters()}
    masks["conv1.weight"][:] = True  # one unmasked layer: ghost/materialised norm, the rest masked
    ref = one_update("hooks", "cnn", RECIPES["mxfp8"], chunks, masks=masks, optimizer="adam", steps=2)
    got = one_update(algorithm, "cnn", RECIPES["mxfp8"], chunks, masks=masks, optimizer="adam", steps=2)
    assert_same_update(ref, got)
    flat = {k: v for k, v in ref.items() if k in masks}
    assert all((flat[k][~masks[k]] == 0).all() for k in flat)  # masked coordinates never move
    # the chunked update equals the unchunked one (per-example clipping never looks across examples); nearest
    # rounding, since chunks draw stochastic rounding in another order
    rn = _nearest("mxfp8")
    assert_same_update(one_update(algorithm, "cnn", rn, chunks, masks=masks, optimizer="adam", steps=2),
                       one_update(algorithm, "cnn", rn, [(x, y)], masks=masks, optimizer="adam", steps=2))


@pytest.mark.parametrize("algorithm", CLIPPING_ALGORITHMS)
def test_empty_batch_is_pure_noise(algorithm):
    ref = one_update("hooks", "mlp", None, [])
    got = one_update(algorithm, "mlp", None, [])
    assert_same_update(ref, got, rel=1e-7)
    gen = torch.Generator().manual_seed(11)
    m = _model("mlp", None)
    for (k, p), d in zip(m.named_parameters(), got.values()):
        want = -torch.normal(0, 0.7 * 0.5, p.shape, generator=gen) / 6
        torch.testing.assert_close(d.float(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("recipe", ["fp8", "mxfp6", None])
def test_norms_equal_a_batch_of_one_loop(recipe):
    """Per-example gradient norms from the recorded operands (ghost and materialised) equal the norms of a
    batch-of-1 loop's gradients (nearest rounding, float64, so both make the same rounding decisions)."""
    from dpquant_sim.training.clipping import _Recorder

    model = _model("cnn", _nearest(recipe) if recipe else None, torch.float64)
    x, y = _batch()
    x = x.double()
    rec = _Recorder(model, "mixed")
    rec.start(None, keep=lambda m: True)
    xr = x.clone().requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    rec.active = False
    ref = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        ref.append(sum(float((p.grad ** 2).sum()) for p in model.parameters()))
    want = torch.tensor(ref, dtype=torch.float64)
    torch.testing.assert_close(rec.sq, want, rtol=1e-9, atol=0)  # as recorded during the backward pass
    for method in ("ghost", "materialize"):
        got = 0
        for m in rec.layers:
            kept = rec.kept[m]
            if isinstance(kept, tuple):  # a GEMM layer keeps its operands (x, dy)
                got = got + rec.ops[m].sq_norms(m, kept[0], kept[1], method)
            else:  # a norm layer keeps its per-sample gradients
                got = got + sum(g.reshape(len(g), -1).pow(2).sum(1) for g in kept.values())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    rec.close()


# ---------------------------------------------------------------- through train(): the engine's use
TINY = dict(dataset="digits", model="cnn", n_train=96, n_test=32, batch_size=32, epochs=2, lr=0.5,
            noise_multiplier=1.0, recipe="fp4", schedule={"kind": "random", "budget": 0.5})


def _weights(d):
    return load_checkpoint(d / "checkpoint.pt")["model"]


@pytest.mark.parametrize("algorithm", OTHERS)
def test_train_matches_hooks_and_resumes(tmp_path, algorithm):
    ref = train(dict(TINY, clipping="hooks", epochs=1, physical_batch_size=16), tmp_path / "h", progress=False)
    got = train(dict(TINY, clipping=algorithm, epochs=1, physical_batch_size=16), tmp_path / "a", progress=False)
    wr, wg = _weights(tmp_path / "h"), _weights(tmp_path / "a")
    # three DP steps: float-level differences may flip a nearest-rounded weight in a later step; the first
    # steps' updates dominate, so compare to a tolerance well below one step's noise (sigma C lr / B ~ 0.016)
    for k in wr:
        if wr[k].is_floating_point():
            torch.testing.assert_close(wg[k], wr[k], rtol=0, atol=2e-3, msg=lambda m: f"{k}: {m}")
    assert ref.metrics["epsilon"].tolist() == got.metrics["epsilon"].tolist()
    # resume mid-run gives the uninterrupted run bit for bit
    full = train(dict(TINY, clipping=algorithm), tmp_path / "full", progress=False)
    train(dict(TINY, clipping=algorithm), tmp_path / "part", progress=False, stop_after=1)
    resumed = train(dict(TINY, clipping=algorithm), tmp_path / "part", progress=False)
    pd.testing.assert_frame_equal(full.metrics.drop(columns="wall_s"), resumed.metrics.drop(columns="wall_s"))
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clipping_field_and_registry():
    from dpquant_sim.training.config import TrainConfig

    assert TrainConfig.parse({}).clipping == DEFAULT_CLIPPING
    with pytest.raises(ConfigError, match="clipping"):
        TrainConfig.parse({"clipping": "fast"})
    with pytest.raises(ConfigError, match="clipping"):
        build_clipping("fast", torch.nn.Linear(2, 2), None)
    with pytest.raises(ConfigError, match="clipping"):
        norm_method(1, 2, 3, algorithm="fast")


def test_norm_rule_by_hand():
    # mixed: ghost iff 2 T^2 < d p (Bu et al. 2022), and always for T = 1
    assert norm_method(1, 1, 1) == "ghost"
    assert norm_method(4, 3, 11) == "ghost" and norm_method(4, 4, 8) == "materialize"  # 32 < 33; 32 = 32
    assert {norm_method(9, 9, 9, algorithm=a) for a in ("bk", "ghost")} == {"ghost"}
    assert norm_method(1, 9, 9, algorithm="hooks") == "materialize"


def test_opacus_ghost_mode_on_a_quantized_layer_is_refused():
    """Opacus's own ghost clipping re-quantizes in its second backward: refused with the reason."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = _model("mlp", RECIPES["fp8"])
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True,
                                               loss_reduction="sum")
    x, y = _batch()
    with pytest.raises(DPSafetyError, match="re-quantizes"):
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
    gsm._close()
    # in full precision Opacus's ghost norms are ours, and exact
    model = _model("mlp", None)
    layer = model.get_submodule(qnn.quantizable_layers(model)[0])
    xs, dys = torch.randn(3, 64), torch.randn(3, layer.out_features)
    want = torch.stack([torch.outer(dys[i], xs[i]).norm() for i in range(3)])
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping

    got = GradSampleHooksFastGradientClipping.NORM_SAMPLERS[type(layer)](layer, [xs], dys)[layer.weight]
    torch.testing.assert_close(got, want)
    assert layer_ops(layer) is not None


# ---------------------------------------------------------------- layer ops on every conv geometry
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_nn_grad_sample import conv_geometry  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(g=conv_geometry(), seed=st.integers(0, 2**16))
def test_conv_ops_match_per_sample_gradients_every_geometry(g, seed):
    """Ghost and materialised norms and the weighted sum against the per-sample gradients of the registered
    grad sampler (itself checked against a batch-of-1 loop) on random strides, paddings (incl. 'same' and
    reflect), dilations and groups; float64."""
    from dpquant_sim.nn import QConv2d
    from dpquant_sim.nn.grad_samplers import compute_qconv2d_grad_sample

    torch.manual_seed(seed)
    layer = QConv2d(g["cin"], g["cout"], g["k"], stride=g["stride"], padding=g["padding"], dilation=g["dilation"],
                    groups=g["groups"], bias=g["bias"], padding_mode=g["padding_mode"]).double()
    x = torch.randn(g["n"], g["cin"], g["h"], g["w"], dtype=torch.float64)
    with torch.no_grad():
        dy = torch.randn_like(layer(x))
    ref = compute_qconv2d_grad_sample(layer, [x], dy)
    want_sq = sum(v.reshape(len(v), -1).pow(2).sum(1) for v in ref.values())
    c = torch.rand(g["n"], dtype=torch.float64)
    ops = layer_ops(layer)
    for method in ("ghost", "materialize"):
        torch.testing.assert_close(ops.sq_norms(layer, x, dy, method), want_sq, rtol=1e-10, atol=1e-12)
    got = ops.weighted_sum(layer, ops.record(layer, x, dy, "ghost")[1], c)
    for p, v in ref.items():
        torch.testing.assert_close(got[p], torch.einsum("b,b...->...", c, v), rtol=1e-10, atol=1e-12)
    mats = ops.per_sample(layer, x, dy)
    for p, v in ref.items():
        torch.testing.assert_close(mats[p], v, rtol=1e-10, atol=1e-12)
