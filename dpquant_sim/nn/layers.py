"""Quantized Linear and Conv2d layers whose three GEMMs all read quantized operands.

A layer with ``qconfig = None`` is exactly ``nn.Linear`` / ``nn.Conv2d`` (same kernels, bit for bit). With a
:class:`~dpquant_sim.nn.config.LayerQuantConfig` it computes, per training step::

    forward  y  = qx  @ qW^T (+ b)       qx = activation spec applied to x  (per sample / per block)
    dgrad    dx = qdy @ qW               qW = weight spec applied to W      (per channel / per block)
    wgrad    dW = qdy^T @ qx,  db = sum(qdy)    qdy = grad spec applied to dy  (per sample / per block)

Where each quantizer runs, and why (the Opacus contract)
-------------------------------------------------------
Opacus (``GradSampleModule``, hooks mode) records a module's *input* with a forward hook and its *output
gradient* with a full backward hook, then calls the grad sampler registered for the module type. For the
per-sample gradients to be exact for the quantized computation, Opacus must record ``qx`` and ``qdy``:

* ``qx`` is made by a forward **pre**-hook that every Q layer registers first, so the module's forward -- and
  Opacus's activation hook -- receive the quantized input (gradient passes straight through to ``x``).
* ``qdy`` is made by a full backward **pre**-hook (installed while the layer is quantized). PyTorch runs
  backward pre-hooks before any full backward hook of the same module, *and* the value it returns is the
  gradient that flows into the layer's own backward. This ordering is guaranteed even for a first layer whose
  input needs no gradient -- there PyTorch fires full backward hooks at the *output* gradient, before the
  layer's backward has run, so a quantizer inside an ``autograd.Function.backward`` would be too late for
  Opacus (checked in tests/test_nn_grad_sample.py).
* ``qW`` is a straight-through fake quantization of the weight inside ``forward``; autograd's own
  linear/conv backward then computes ``dx = qdy·qW`` and ``dW = qdy^T·qx`` from the saved quantized operands.

One quantization of each tensor feeds both the batch gradient and the per-sample gradients, so stochastic
rounding draws are shared, never re-drawn. Call the module (``layer(x)``), never ``layer.forward(x)``
directly: that would skip the input quantizer, and is refused with an error.

Block scalings (``mx``, ``nvfp4``) run their blocks along the GEMM reduction dimension inside each sample:
the last dim for Linear operands; the channel dim (NHWC layout, as MX conv kernels use) for conv activations,
conv output gradients and conv weights. Blocks never cross the batch dimension (DP rule).

Example:
    >>> import torch
    >>> from dpquant_sim.nn.config import get_recipe
    >>> layer = QLinear(8, 4, qconfig=get_recipe("fp8"), generator=torch.Generator().manual_seed(0))
    >>> y = layer(torch.randn(2, 8))
    >>> y.sum().backward()   # dy quantized to fp8_e5m2 (stochastic rounding, per sample)
    >>> layer.weight.grad.shape
    torch.Size([4, 8])
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dpquant_sim.errors import ConfigError
from dpquant_sim.nn.config import LayerQuantConfig, get_recipe
from dpquant_sim.numerics.spec import QuantSpec

_BLOCK_SCALINGS = ("mx", "nvfp4")

# Expected, not a problem: a quantized first layer (input needs no gradient) has its backward pre-hook run at
# the output gradient, which is exactly what we rely on; PyTorch warns about that situation on every backward.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                        "to module outputs since no inputs require gradients")


def _apply_spec(t: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None) -> torch.Tensor:
    """spec.apply in float32 (the numerics contract), returned in t's dtype; empty tensors pass through."""
    if t.numel() == 0:  # Poisson sampling can draw an empty batch: nothing to scale or round.
        return t
    if spec.rounding == "stochastic" and generator is None:
        raise ConfigError(
            "generator", None,
            "a torch.Generator for stochastic rounding: build the model with convert_model(model, seed=...), "
            "call set_generators(model, seed), or pass generator= to the layer",
        )
    if spec.rounding == "stochastic" and generator.device != t.device:
        raise ConfigError(
            "generator",
            f"generator on {generator.device}",
            f"a generator on {t.device} (the layer moved device: call set_generators(model, seed) after .to())",
        )
    out = spec.apply(t if t.dtype == torch.float32 else t.float(), generator)
    return out if out.dtype == t.dtype else out.to(t.dtype)


def row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with default (row-major) strides, copied only when needed.

    ``.contiguous()`` is not enough: torch ignores the strides of size-1 dims when it decides contiguity, so a
    channels-last tensor of a 1x1 feature map counts as contiguous and keeps its strides. Opacus's conv grad
    sampler (``unfold2d``: ``F.pad`` then ``as_strided``) trusts the strides and would read padding zeros, so
    every tensor a Q layer hands to a grad sampler goes through here.
    """
    if t.stride() == _default_strides(t.shape):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _default_strides(shape: torch.Size) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(out))


def quantize_data(
    t: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None, *, conv: bool
) -> torch.Tensor:
    """Quantize a batched activation or output gradient (dim 0 = examples), never mixing examples.

    Args:
        t: (B, ...) tensor; for conv (B, C, H, W).
        spec: the activation or grad spec ('sample' statistics run over dims 1.., blocks within a sample).
        generator: draws for stochastic rounding (required when spec.rounding is 'stochastic').
        conv: block scalings use channels-last order so blocks run along channels.
    """
    if conv and spec.scaling in _BLOCK_SCALINGS and t.dim() == 4:
        q = _apply_spec(t.permute(0, 2, 3, 1), spec, generator)
        return row_major(q.permute(0, 3, 1, 2))
    return row_major(_apply_spec(t, spec, generator))


def quantize_weight(
    w: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None, *, conv: bool
) -> torch.Tensor:
    """Quantize a weight (dim 0 = output channels). Conv block scalings block along input channels."""
    if conv and spec.scaling in _BLOCK_SCALINGS:
        return row_major(_apply_spec(w.permute(0, 2, 3, 1), spec, generator).permute(0, 3, 1, 2))
    return row_major(_apply_spec(w, spec, generator))


class _FakeQuant(torch.autograd.Function):
    """Straight-through fake quantization: forward ``quantizer(t, spec, generator, conv=conv)``, backward
    identity. ``quantizer`` is ``quantize_weight`` or ``quantize_data``."""

    @staticmethod
    def forward(t, quantizer, spec, generator, conv):  # type: ignore[override]
        return quantizer(t, spec, generator, conv=conv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None, None


def _batched(t: torch.Tensor, conv: bool) -> bool:
    return t.dim() == 4 if conv else t.dim() >= 2


def _input_pre_hook(module: "_QuantMixin", args: tuple) -> tuple | None:
    """Forward pre-hook: replace the input by its quantization, so Opacus records qx."""
    module._entered_via_call = True
    cfg = module._qconfig
    if cfg is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    if torch._C._are_functorch_transforms_active():
        raise ConfigError(
            "grad_sample_mode", "functorch (a torch.func transform is active)",
            "'hooks': a quantized Q layer quantizes its output gradient in a backward hook, which torch.func "
            "transforms (vmap/grad) bypass, so per-sample gradients would not be those of the quantized layer",
        )
    x = args[0]
    conv = module._is_conv
    unbatched = not _batched(x, conv)
    if unbatched:  # a single example without a batch dim is a batch of one for per-sample scaling
        x = x.unsqueeze(0)
    qx = _FakeQuant.apply(x, quantize_data, cfg.activation, module.generator, conv)
    if unbatched:
        qx = qx.squeeze(0)
    if module.record_quantized:
        module._q_act = qx.detach()
    return (qx, *args[1:])


def _grad_pre_hook(module: "_QuantMixin", grad_output: tuple) -> tuple | None:
    """Full backward pre-hook: quantize dy before both the layer's backward and Opacus's hook read it."""
    replay = module._replay_grad
    if replay is not None:  # ghost clipping's second pass: the recorded c * q(dy), never a new quantization
        module._replay_grad = None
        return (replay, *grad_output[1:])
    cfg = module._qconfig
    if cfg is None or not grad_output or grad_output[0] is None:
        return None
    dy = grad_output[0]
    conv = module._is_conv
    unbatched = not _batched(dy, conv)
    qdy = quantize_data(dy.unsqueeze(0) if unbatched else dy, cfg.grad, module.generator, conv=conv)
    if unbatched:
        qdy = qdy.squeeze(0)
    if module.record_quantized:
        module._q_grad = qdy.detach()
    return (qdy, *grad_output[1:])


class _QuantMixin:
    """State and switching shared by QLinear and QConv2d (see the module docstring)."""

    _is_conv: bool = False
    _qconfig: LayerQuantConfig | None
    generator: torch.Generator | None
    record_quantized: bool

    def _init_quant(self, qconfig, generator) -> None:
        self.generator = generator
        # Debug/test aid: keep the last quantized input and output gradient (detached) on the module.
        self.record_quantized = False
        self._q_act: torch.Tensor | None = None
        self._q_grad: torch.Tensor | None = None
        # Set by ghost clipping between its two backward passes: the output gradient to use instead of q(dy).
        self._replay_grad: torch.Tensor | None = None
        self._entered_via_call = False
        self._grad_hook_id: int | None = None  # id in _backward_pre_hooks (an int survives deepcopy/pickle)
        self._qconfig = None
        # Registered first, so it runs before any forward hook (e.g. Opacus's activation capture).
        self.register_forward_pre_hook(_input_pre_hook)  # type: ignore[attr-defined]
        self.qconfig = qconfig

    @property
    def qconfig(self) -> LayerQuantConfig | None:
        """The layer's quantization config, or None for full precision (plain float GEMMs)."""
        return self._qconfig

    @qconfig.setter
    def qconfig(self, cfg: "LayerQuantConfig | str | None") -> None:
        if isinstance(cfg, str):
            cfg = get_recipe(cfg)
        if cfg is not None and not isinstance(cfg, LayerQuantConfig):
            raise ConfigError("qconfig", cfg, "None, a recipe name or a LayerQuantConfig")
        self._qconfig = cfg
        hooks = self._backward_pre_hooks  # type: ignore[attr-defined]
        if cfg is not None and self._grad_hook_id not in hooks:
            self._grad_hook_id = self.register_full_backward_pre_hook(_grad_pre_hook).id  # type: ignore[attr-defined]
        elif cfg is None and self._grad_hook_id is not None:
            # Full precision keeps no backward hook at all: identical graph and cost to the float layer.
            hooks.pop(self._grad_hook_id, None)
            self._grad_hook_id = None
        self._q_act = self._q_grad = None

    @property
    def is_quantized(self) -> bool:
        return self._qconfig is not None

    def _check_called(self) -> None:
        if not self._entered_via_call:
            raise RuntimeError(
                f"{type(self).__name__}.forward was called directly; call the module instead (layer(x)) so "
                "that its input quantizer and Opacus hooks run"
            )
        self._entered_via_call = False

    def _quant_weight(self) -> torch.Tensor:
        cfg = self._qconfig
        assert cfg is not None
        if type(self.weight).__name__ == "ExpandedWeight":  # type: ignore[attr-defined]
            raise ConfigError("grad_sample_mode", "ew", "'hooks' (expanded weights bypass the Q layer's hooks)")
        w = self.weight  # type: ignore[attr-defined]
        return _FakeQuant.apply(w, quantize_weight, cfg.weight, self.generator, self._is_conv)

    def _quant_repr(self) -> str:
        return f", qconfig={self._qconfig.name if self._qconfig is not None else None}"


class QLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with switchable quantization (see the module docstring).

    Args: as ``nn.Linear``, plus ``qconfig`` (None = full precision; a recipe name or LayerQuantConfig) and
    ``generator`` (torch.Generator for stochastic rounding; required by configs that round stochastically,
    which every named recipe does for gradients; ``convert_model`` seeds one per layer).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 qconfig: LayerQuantConfig | str | None = None, generator: torch.Generator | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quant(qconfig, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_called()
        if self._qconfig is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self._quant_weight(), self.bias)  # x is already qx (forward pre-hook)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


class QConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with switchable quantization (see the module docstring).

    Args: as ``nn.Conv2d`` (any stride, padding incl. 'same', dilation, groups, padding_mode), plus
    ``qconfig`` and ``generator`` as for :class:`QLinear`.
    """

    _is_conv = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 qconfig: LayerQuantConfig | str | None = None, generator: torch.Generator | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_quant(qconfig, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_called()
        if self._qconfig is None:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, self._quant_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


QUANT_LAYER_TYPES: tuple[type[nn.Module], ...] = (QLinear, QConv2d)
