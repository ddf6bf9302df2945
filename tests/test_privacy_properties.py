"""Privacy properties that must hold for every recipe, every model and every shape class.

1. Neighbouring datasets through the public ``train()``: D and D minus one example, one DP-SGD step at sample
   rate 1, same seed (same init, same noise, same rounding draws for the shared examples). Every example's
   gradient is clipped (tiny C), so the clipped sums must differ by exactly the removed example's clipped
   gradient: ||S_D - S_D'|| in [0.9 C, C (1 + 1e-5)]. Any computation that lets one example's contribution
   depend on another (a batch-wide scale, a mean-reduced loss feeding a power-of-two quantizer scale, ...)
   shows up as a larger difference. New recipes are covered without new code (the list is ``RECIPES``).
   S is recovered from the released weights: with SGD, lr = expected batch size = n, one step moves the
   weights by exactly S + Z (Z the noise, identical in both runs), so S_D - S_D' = w1_D' - w1_D.
2. Per-sample gradients equal a batch-of-1 loop (nearest rounding) or per-example GEMMs on the recorded
   quantized operands (stochastic rounding) on every spatial shape class: 1x1 maps (where a channels-last
   tensor passes as "contiguous"), 2x2, odd sizes, and empty batches, for every recipe.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from opacus import GradSampleModule

import dpquant_sim.nn as qnn
from dpquant_sim.clipping_rules import CLIPPING_ALGORITHMS, DEFAULT_CLIPPING
from dpquant_sim.errors import DPSafetyError
from dpquant_sim.nn import QConv2d
from dpquant_sim.nn.config import RECIPES
from dpquant_sim.training.config import TrainConfig
from dpquant_sim.training.data import load_dataset
from dpquant_sim.training.engine import build_run_model, load_checkpoint, train

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore::UserWarning:opacus")
# Per-sample properties hold for the recipes allowed under DP; batch-wide ones (luq_fp4_batch) are refused
# there (tests/test_luq.py, test_neighbouring_sensitivity_is_clip_norm).
DP_RECIPES = [r for r, c in RECIPES.items() if c.dp_safe]

C = 0.01  # far below every example's gradient norm at init, so every example is clipped to exactly C
N = 8


def _one_step(tmp_path, model: str, recipe: str, n: int, **extra) -> tuple[TrainConfig, dict]:
    cfg = TrainConfig.parse(dict(
        dataset="digits", model=model, n_train=n, n_test=4, batch_size=n, epochs=1, lr=float(n),
        noise_multiplier=1e-3, max_grad_norm=C, recipe=recipe, schedule={"kind": "static-all"},
        eval_batch_size=4, **extra))
    out = tmp_path / f"{model}-{recipe}-{n}-{extra.get('clipping', '')}"
    train(cfg, out, progress=False)
    return cfg, load_checkpoint(out / "checkpoint.pt")["model"]


def neighbouring_distance(tmp_path, model: str, recipe: str, **extra) -> float:
    """||S_D - S_D'|| / C for D = the first N digits examples (of the seeded order) and D' = D minus its last."""
    _, w_d = _one_step(tmp_path, model, recipe, N, **extra)
    _, w_d1 = _one_step(tmp_path, model, recipe, N - 1, **extra)
    sq = sum(float(((w_d[k].double() - w_d1[k].double()) ** 2).sum()) for k in w_d if w_d[k].is_floating_point())
    return sq ** 0.5 / C


def test_neighbouring_datasets_are_neighbours():
    """The construction the property relies on: n_train = N - 1 is n_train = N minus its last example."""
    a = load_dataset("digits", seed=0, n_train=N, n_test=4).train.tensors
    b = load_dataset("digits", seed=0, n_train=N - 1, n_test=4).train.tensors
    assert all(torch.equal(x[: N - 1], y) for x, y in zip(a, b))


def _cases():
    """cnn: every recipe x every clipping algorithm; resnet18-w16: every recipe with the default algorithm, the
    other algorithms in the slow suite."""
    for alg in CLIPPING_ALGORITHMS:
        for model in ("cnn", "resnet18-w16"):
            slow = model != "cnn" and alg != DEFAULT_CLIPPING
            for recipe in RECIPES:
                yield pytest.param(model, recipe, alg, marks=[pytest.mark.slow] if slow else [],
                                   id=f"{model}-{recipe}-{alg}")


@pytest.mark.parametrize("model,recipe,clipping", list(_cases()))
def test_neighbouring_sensitivity_is_clip_norm(tmp_path, model, recipe, clipping):
    if not RECIPES[recipe].dp_safe:
        with pytest.raises(DPSafetyError):
            _one_step(tmp_path, model, recipe, N, clipping=clipping)
        return
    d = neighbouring_distance(tmp_path, model, recipe, clipping=clipping)
    assert 0.9 <= d <= 1 + 1e-5, (f"{model}/{recipe}/{clipping}: removing one example moved the clipped sum by "
                                  f"{d:.6f} C")


def test_neighbouring_check_has_teeth(tmp_path, monkeypatch):
    """A mean-reduced loss (each dy divided by the realized batch size before the MX quantizer) breaks the
    bound; the check must see it."""
    import opacus
    import torch.nn.functional as F

    real_gsm, real_ce = opacus.GradSampleModule, F.cross_entropy
    monkeypatch.setattr(opacus, "GradSampleModule", lambda m, **kw: real_gsm(m, **{**kw, "loss_reduction": "mean"}))
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **kw: real_ce(*a, **{**kw, "reduction": "mean"}))
    d = neighbouring_distance(tmp_path, "cnn", "mxfp8", clipping="hooks")
    assert d > 1 + 1e-3


# ---------------------------------------------------------------- per-sample gradients on every shape class
SPATIAL = [(1, 1), (2, 2), (3, 5), (1, 4), (7, 7)]


def _nearest(recipe: str):
    cfg = RECIPES[recipe]
    return replace(cfg, name=cfg.name + "-rn", grad=replace(cfg.grad, rounding="nearest"))


def _conv(cfg, k: int) -> QConv2d:
    torch.manual_seed(0)
    return QConv2d(32, 8, k, padding=k // 2, qconfig=cfg, generator=torch.Generator().manual_seed(1))


def _per_sample(layer, x, r) -> torch.Tensor:
    gsm = GradSampleModule(layer, loss_reduction="sum")
    try:
        (gsm(x) * r).sum().backward()
        return layer.weight.grad_sample.detach().clone()
    finally:
        gsm._close()


@pytest.mark.parametrize("hw", SPATIAL, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("recipe", DP_RECIPES)
def test_conv_per_sample_equals_batch1_loop_every_shape_class(recipe, hw):
    """Nearest rounding: each example alone through the same layer gives the same gradient."""
    for k in (1, 3):
        layer = _conv(_nearest(recipe), k)
        x = torch.randn(3, 32, *hw) * torch.tensor([0.1, 1.0, 30.0]).reshape(-1, 1, 1, 1)
        with torch.no_grad():
            r = torch.randn_like(layer(x))
        got = _per_sample(layer, x, r)
        ref = []
        for i in range(3):
            layer.zero_grad()
            (layer(x[i:i + 1]) * r[i:i + 1]).sum().backward()
            ref.append(layer.weight.grad.clone())
        ref = torch.stack(ref)
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("hw", SPATIAL, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("recipe", DP_RECIPES)
def test_conv_per_sample_stochastic_uses_recorded_operands_every_shape_class(recipe, hw):
    """Stochastic rounding: per-sample gradients are per-example GEMMs of the recorded q(x) and q(dy)."""
    layer = _conv(RECIPES[recipe], 3)
    layer.record_quantized = True
    x = torch.randn(3, 32, *hw)
    with torch.no_grad():
        r = torch.randn_like(layer(x))
    got = _per_sample(layer, x, r)
    qa, qg = layer._q_act, layer._q_grad
    for t in (qa, qg):  # what a grad sampler reads must have default strides
        assert t.stride() == torch.empty(t.shape).stride()
    ref = torch.stack([torch.nn.grad.conv2d_weight(qa[i:i + 1], layer.weight.shape, qg[i:i + 1], layer.stride,
                                                   layer.padding, layer.dilation, layer.groups) for i in range(3)])
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("recipe", DP_RECIPES)
def test_conv_empty_batch_gives_empty_per_sample_gradients(recipe):
    layer = _conv(RECIPES[recipe], 3)
    got = _per_sample(layer, torch.randn(0, 32, 1, 1), torch.zeros(0, 8, 1, 1))
    assert got.shape == (0, *layer.weight.shape)


@pytest.mark.parametrize("recipe", DP_RECIPES)
def test_resnet18_w16_on_8x8_per_sample_equals_batch1_loop(recipe):
    """The model whose layer4 runs on 1x1 maps at 8x8 input: every layer's per-sample gradients are exact
    (none silently zero)."""
    torch.manual_seed(0)
    from dpquant_sim.training.models import build_model

    # float64, so that the batch and the batch-of-1 loop make the same rounding decisions (quantization runs
    # in float32; float64 GEMM differences from the batch layout never reach a float32 rounding boundary)
    model = build_model("resnet18-w16", in_channels=1, num_classes=4, image_size=8).double()
    model = qnn.convert_model(model, seed=0)
    qnn.apply_plan(model, {n: _nearest(recipe) for n in qnn.quantizable_layers(model)})
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 3])
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    got = {k.removeprefix("_module."): p.grad_sample.detach().clone() for k, p in gsm.named_parameters()}
    gsm.disable_hooks()
    ref: dict[str, list[torch.Tensor]] = {k: [] for k in got}
    for i in range(3):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for k, p in model.named_parameters():
            ref[k].append(p.grad.detach().clone())
    gsm._close()
    for k in got:
        want = torch.stack(ref[k])
        if k.endswith("weight") and want.dim() == 5:
            assert want.abs().max() > 0, k
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-4 * max(float(want.abs().max()), 1e-12),
                                   msg=lambda m: f"{recipe} {k}: {m}")
