"""DP clipping algorithms, registered by name: each owns its model hooks, its backward pass(es) and the DP
optimizer step, so the pieces are consistent by construction.

``build_clipping(name, model, base_optimizer, ...)`` returns an object with

    step(chunks, masks) -> sum of the example losses     one logical (Poisson) batch, split into chunks
    paused()                                              context: run plain autograd on the model, no DP hooks
    close()                                               remove every hook

Names (``dpquant_sim.clipping_rules`` explains the algorithms): ``hooks`` (Opacus per-sample gradients),
``ghost`` (two backward passes, the second replaying the recorded quantized output gradients), ``bk``
(book-keeping: one backward pass, weighted GEMMs), ``mixed`` (book-keeping with a per-layer norm method), and
``none`` (non-private training). All private ones give the same update for the same seed: the same per-example
operands (one quantization per tensor, shared by norm and sum), clip factors c_i = min(1, C / (||g_i|| + 1e-6))
as Opacus computes them, the same noise draws, division by the expected batch size once. Losses are summed, so
nothing an example contributes depends on the realized batch size.

Example:
    >>> import torch, dpquant_sim.nn as qnn
    >>> model = qnn.convert_model(torch.nn.Sequential(torch.nn.Linear(4, 3)), seed=0)
    >>> clip = build_clipping("bk", model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
    ...                       max_grad_norm=1.0, expected_batch_size=2, generator=torch.Generator().manual_seed(0))
    >>> loss = clip.step([(torch.randn(2, 4), torch.tensor([0, 2]))], None)
    >>> clip.close()
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpquant_sim.clipping_rules import CLIPPING_ALGORITHMS, norm_method
from dpquant_sim.errors import ConfigError
from dpquant_sim.nn.clip_ops import layer_ops, shape_dims
from dpquant_sim.nn.layers import QConv2d, QLinear

Chunk = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels) of part of one Poisson batch
Masks = Mapping[nn.Parameter, torch.Tensor] | None
CLIP_EPS = 1e-6  # Opacus's: c_i = min(1, C / (||g_i|| + 1e-6))

_CLIPPING: dict[str, type["ClippingAlgorithm"]] = {}


def register_clipping(name: str) -> Callable[[type], type]:
    """Class decorator: make a ClippingAlgorithm available under ``name``."""

    def deco(cls: type) -> type:
        cls.name = name
        _CLIPPING[name] = cls
        return cls

    return deco


def build_clipping(name: str, model: nn.Module, base_optimizer: torch.optim.Optimizer, **dp: Any
                   ) -> "ClippingAlgorithm":
    """The clipping algorithm ``name`` over ``model`` (a converted model) and ``base_optimizer``.

    ``dp`` (private algorithms): noise_multiplier, max_grad_norm, expected_batch_size, generator, secure_mode.
    """
    try:
        cls = _CLIPPING[name]
    except KeyError:
        raise ConfigError("clipping", name, tuple(_CLIPPING)) from None
    return cls(model, base_optimizer, **dp)


def per_example_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example (reduction='none')."""
    return F.cross_entropy(out, y, reduction="none")


class ClippingAlgorithm:
    """Base: the non-private parts (model, optimizer) and the shared DP optimizer for summed algorithms."""

    name: str = ""

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, **dp: Any):
        self.model, self.base_optimizer = model, base_optimizer

    def step(self, chunks: Sequence[Chunk], masks: Masks) -> float:
        raise NotImplementedError

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Plain autograd on the model (e.g. an estimator's short training runs): no DP hooks record."""
        yield

    def close(self) -> None:
        pass


@register_clipping("none")
class NoClipping(ClippingAlgorithm):
    """Non-private training: the mean loss of the logical batch, masks applied to the gradient."""

    def step(self, chunks, masks):
        from dpquant_sim.training.optim import freeze_masked, mask_plain_grads

        n = sum(len(y) for _, y in chunks)
        if n == 0:
            return 0.0
        self.model.train()
        total = 0.0
        for x, y in chunks:
            loss = per_example_loss(self.model(x), y).sum()
            (loss / n).backward()
            total += float(loss.detach())
        mask_plain_grads(self.model.parameters(), masks)
        with freeze_masked(self.base_optimizer, masks):  # masked coordinates do not move (optimizer state too)
            self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)
        return total


@register_clipping("hooks")
class Hooks(ClippingAlgorithm):
    """Opacus hooks mode: per-sample gradients of every layer materialised, clipped and summed by
    :class:`~dpquant_sim.training.optim.MaskedDPOptimizer`."""

    def __init__(self, model, base_optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size,
                 generator=None, secure_mode=False):
        from opacus import GradSampleModule

        from dpquant_sim.training.optim import MaskedDPOptimizer

        super().__init__(model, base_optimizer)
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.optimizer = MaskedDPOptimizer(base_optimizer, noise_multiplier=noise_multiplier,
                                           max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                           generator=generator, secure_mode=secure_mode)

    def step(self, chunks, masks):
        opt = self.optimizer
        opt.set_masks(masks)
        total = 0.0
        if not chunks:
            opt.prepare_empty_batch()
        for i, (x, y) in enumerate(chunks):
            loss = per_example_loss(self.gsm(x), y).sum()
            loss.backward()
            total += float(loss.detach())
            if i < len(chunks) - 1:
                opt.signal_skip_step(do_skip=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    @contextlib.contextmanager
    def paused(self):
        self.gsm.disable_hooks()
        try:
            yield
        finally:
            self.gsm.enable_hooks()

    def close(self) -> None:
        self.gsm._close()


class _Recorder:
    """Forward and full-backward hooks on every module with trainable parameters of its own. In the backward
    hook each layer's squared per-sample gradient norms are added up at once from its input and output gradient
    (for a quantized Q layer: q(x) and q(dy), the operands its GEMMs used); the operands are kept only where
    ``keep(module)`` says so (book-keeping keeps all for the weighted GEMMs; ghost only quantized layers' q(dy)
    for its replay), so transient buffers live one layer at a time."""

    def __init__(self, model: nn.Module, algorithm: str):
        self.algorithm = algorithm
        self.layers = [m for m in model.modules()
                       if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.ops = {m: layer_ops(m) for m in self.layers}  # refuses a module type with no per-sample rule
        self.acts: dict[nn.Module, torch.Tensor] = {}
        self.kept: dict[nn.Module, Any] = {}  # what each kept layer's weighted sum needs (ClipOps.record)
        self.grads: dict[nn.Module, torch.Tensor] = {}  # output gradients of the kept layers
        self.sq: torch.Tensor | None = None
        self.masks: Masks = None
        self.keep: Callable[[nn.Module], bool] = lambda m: True
        self.active = False
        self.handles = []
        for m in self.layers:
            self.handles.append(m.register_forward_hook(self._forward))
            self.handles.append(m.register_full_backward_hook(self._backward))

    def start(self, masks: Masks, keep: Callable[[nn.Module], bool]) -> None:
        self.clear()
        self.masks, self.keep, self.active = masks, keep, True

    def method(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> str:
        if not isinstance(module, (QLinear, QConv2d)):
            return "materialize"
        return norm_method(*shape_dims(module, tuple(x.shape), tuple(dy.shape)), algorithm=self.algorithm)

    def _forward(self, module, args, output) -> None:
        if not self.active:
            return
        if module in self.acts:
            raise ConfigError("model", f"{type(module).__name__} called twice in one forward pass",
                              "each layer used once per forward pass (weight sharing needs clipping: hooks)")
        self.acts[module] = args[0].detach()

    def _backward(self, module, grad_input, grad_output) -> None:
        if not self.active or grad_output[0] is None:
            return
        x, dy = self.acts.pop(module), grad_output[0].detach()
        s, state = self.ops[module].record(module, x, dy, self.method(module, x, dy), self.masks)
        self.sq = s if self.sq is None else self.sq + s
        if self.keep(module):
            self.kept[module], self.grads[module] = state, dy

    def clip_factors(self, max_grad_norm: float) -> torch.Tensor:
        assert self.sq is not None, "no layer with trainable parameters was reached by the backward pass"
        return (max_grad_norm / (self.sq.clamp_min(0).sqrt() + CLIP_EPS)).clamp(max=1.0)

    def clear(self) -> None:
        self.acts.clear()
        self.kept.clear()
        self.grads.clear()
        self.sq = None

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _Summed(ClippingAlgorithm):
    """Shared machinery of the algorithms that compute the clipped sum themselves (bk, mixed, ghost)."""

    def __init__(self, model, base_optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size,
                 generator=None, secure_mode=False):
        from dpquant_sim.training.optim import SummedDPOptimizer

        super().__init__(model, base_optimizer)
        self.max_grad_norm = float(max_grad_norm)
        self.optimizer = SummedDPOptimizer(base_optimizer, noise_multiplier=noise_multiplier,
                                           max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                           generator=generator, secure_mode=secure_mode)
        self.rec = _Recorder(model, self.name)

    def _record(self, x: torch.Tensor, y: torch.Tensor, masks: Masks, keep, *, retain_graph: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, then one backward pass that computes output gradients only (no parameter gradients: it
        asks for the gradient of the input) while the recorder adds up per-sample norms. Returns the
        per-example losses (graph kept if ``retain_graph``) and the clip factors."""
        self.rec.start(masks, keep)
        try:
            x = x.detach().requires_grad_(True)
            losses = per_example_loss(self.model(x), y)
            torch.autograd.grad(losses.sum(), x, retain_graph=retain_graph)
        finally:
            self.rec.active = False
        return losses, self.rec.clip_factors(self.max_grad_norm)

    def _finish(self, summed: dict[nn.Parameter, torch.Tensor], masks: Masks) -> None:
        opt = self.optimizer
        opt.set_masks(masks)
        opt.set_summed(summed)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.rec.close()


def _add(summed: dict[nn.Parameter, torch.Tensor], part: Mapping[nn.Parameter, torch.Tensor]) -> None:
    for p, t in part.items():
        summed[p] = summed[p] + t if p in summed else t


@register_clipping("bk")
class BookKeeping(_Summed):
    """One backward pass for output gradients; ghost norms; the clipped sum per layer as one weighted GEMM
    sum_i c_i q(dy_i)^T q(x_i) on the recorded operands (Bu et al. 2023)."""

    def step(self, chunks, masks):
        self.model.train()
        summed: dict[nn.Parameter, torch.Tensor] = {}
        total = 0.0
        for x, y in chunks:
            losses, c = self._record(x, y, masks, keep=lambda m: True, retain_graph=False)
            total += float(losses.detach().sum())
            for m in self.rec.layers:
                if m in self.rec.kept:
                    _add(summed, self.rec.ops[m].weighted_sum(m, self.rec.kept[m], c))
            self.rec.clear()
        self._finish(summed, masks)
        return total


@register_clipping("mixed")
class MixedBookKeeping(BookKeeping):
    """Book-keeping with, per layer, the cheaper norm method (``clipping_rules.norm_method``)."""


def _replays(m: nn.Module) -> bool:
    return isinstance(m, (QLinear, QConv2d)) and m.is_quantized


@register_clipping("ghost")
class Ghost(_Summed):
    """Ghost clipping: pass 1 computes per-sample norms (ghost norms) from the recorded operands; pass 2
    back-propagates sum_i c_i loss_i through the kept graph, with every quantized layer replaying its recorded
    c_i q(dy_i) instead of quantizing again (so stochastic rounding is not re-drawn and power-of-two scales
    see the same values)."""

    def step(self, chunks, masks):
        self.model.train()
        summed: dict[nn.Parameter, torch.Tensor] = {}
        total = 0.0
        params = [p for p in self.model.parameters() if p.requires_grad]
        for x, y in chunks:
            losses, c = self._record(x, y, masks, keep=_replays, retain_graph=True)
            total += float(losses.detach().sum())
            replayed = []
            for m in self.rec.layers:
                if _replays(m) and m in self.rec.grads:
                    g = self.rec.grads[m]
                    m._replay_grad = g * c.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
                    replayed.append(m)
            self.rec.clear()
            try:
                grads = torch.autograd.grad((losses * c.to(losses.dtype)).sum(), params, allow_unused=True)
            finally:
                for m in replayed:
                    m._replay_grad = None
            _add(summed, {p: g for p, g in zip(params, grads) if g is not None})
        self._finish(summed, masks)
        return total


assert set(CLIPPING_ALGORITHMS) <= set(_CLIPPING), "every algorithm in clipping_rules has an implementation"
