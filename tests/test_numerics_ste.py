"""Straight-through estimator: identity gradient, torch.func.grad / vmap (against per-slice loops)."""

import pytest
import torch

from dpquant_sim.numerics import QuantSpec, fake_quantize, quantize_scaled


def test_forward_quantizes_and_gradient_is_identity():
    x = torch.tensor([[0.3, -1.7, 5.2, 100.0]], requires_grad=True)
    spec = QuantSpec("fp4_e2m1", scaling="none")
    y = fake_quantize(x, spec)
    assert y.tolist() == [[0.5, -1.5, 6.0, 6.0]]  # saturates at 6, but the STE still passes gradient
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_dtype_kept():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = fake_quantize(x, QuantSpec("fp8_e4m3", "sample"))
    assert y.dtype == torch.float64
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_torch_func_grad():
    spec = QuantSpec("fp8_e4m3", "sample")
    x = torch.randn(3, 16)
    g = torch.func.grad(lambda t: (fake_quantize(t, spec) ** 2).sum())(x)
    assert torch.equal(g, 2 * quantize_scaled(x, "fp8_e4m3", "sample"))


@pytest.mark.parametrize("scaling", ["none", "tensor", "channel", "sample", "mx", "nvfp4"])
@pytest.mark.parametrize("slice_shape", [(5, 40), (40,), (2, 3, 20)])
def test_vmap_equals_loop_over_slices(scaling, slice_shape):
    spec = QuantSpec("fp4_e2m1", scaling)
    x = torch.randn(4, *slice_shape) * torch.logspace(-2, 2, 4).reshape(4, *[1] * len(slice_shape))
    got = torch.func.vmap(lambda t: fake_quantize(t, spec))(x)
    want = torch.stack([quantize_scaled(t, "fp4_e2m1", scaling) for t in x])
    assert torch.equal(got, want)


def test_vmap_on_other_dim_and_channel_dim():
    spec = QuantSpec("fp8_e4m3", "channel")
    x = torch.randn(6, 3, 5)
    got = torch.func.vmap(lambda t: fake_quantize(t, spec, channel_dim=1), in_dims=1, out_dims=1)(x)
    want = torch.stack([quantize_scaled(x[:, i], "fp8_e4m3", "channel", channel_dim=1) for i in range(3)], dim=1)
    assert torch.equal(got, want)


def test_per_sample_grads_vmap_of_grad():
    """The functorch per-sample-gradient pattern: vmap(grad(loss)) over a batch of examples."""
    spec = QuantSpec("fp8_e4m3", "sample")
    w = torch.randn(8, 16)

    def loss(wt, xi):
        return (fake_quantize(xi.unsqueeze(0), spec) @ wt.T).pow(2).sum()

    x = torch.randn(5, 16)
    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, x)
    loop = torch.stack([torch.func.grad(loss)(w, xi) for xi in x])
    torch.testing.assert_close(per, loop)


def test_stochastic_needs_generator_and_is_reproducible():
    spec = QuantSpec("fp4_e2m1", "sample", rounding="stochastic")
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match="generator"):
        fake_quantize(x, spec)
    a = fake_quantize(x, spec, torch.Generator().manual_seed(0))
    b = fake_quantize(x, spec, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    y = torch.func.vmap(lambda t: fake_quantize(t, spec, torch.Generator().manual_seed(0)))(x)
    assert y.shape == x.shape
