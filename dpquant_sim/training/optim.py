"""Optimizers: the base optimizer factory and a DP optimizer with per-step gradient masks.

``MaskedDPOptimizer`` is Opacus's ``DPOptimizer`` (flat clipping, Gaussian noise, fp32 throughout) plus optional
coordinate masks (gradient dropping / pre-pruning, arXiv 2306.11754): each per-sample gradient is multiplied
by the mask BEFORE its norm is computed and clipped, and noise is added only on kept coordinates. A masked
coordinate then carries neither signal nor noise, so the noise norm shrinks with the kept dimension; the
sensitivity of the clipped sum is still C, so the accounting is unchanged (masks must not depend on private
data, e.g. random or weight-magnitude masks).

A masked coordinate also does not MOVE: the base optimizer's step would otherwise still move it through its
state (SGD momentum replays earlier gradients; Adam's m / sqrt(v) is nonzero after a zero gradient; weight
decay shrinks it). ``freeze_masked`` restores, after the step, the masked coordinates of every parameter and of
every optimizer-state tensor of the parameter's shape (momentum buffer, exp_avg, exp_avg_sq, ...), bit for bit.
So a dropped coordinate skips the step entirely, like torch's SparseAdam ("lazy" moments: its momentum/Adam
state resumes where it stopped the next time it is kept; Adam's bias correction uses the global step count).

Empty Poisson batches are handled as Opacus does: the step still adds noise (and is accounted).

>>> import torch
>>> p = torch.nn.Parameter(torch.zeros(3))
>>> opt = MaskedDPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
...                         expected_batch_size=2)
>>> p.grad_sample = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.5]])
>>> opt.set_masks({p: torch.tensor([True, True, False])})
>>> opt.step(); p.data   # example 1: (3,4)/5 clipped to norm 1; example 2 fully masked; mean over 2
tensor([-0.3000, -0.4000,  0.0000])
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _generate_noise, _mark_as_processed

from dpquant_sim.errors import ConfigError


def make_base_optimizer(name: str, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """torch SGD (with momentum) or Adam over ``params``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError("optimizer", name, ("sgd", "adam"))


_STATE_KEYS_NOT_PER_COORDINATE = ("step",)


@contextlib.contextmanager
def freeze_masked(optimizer: torch.optim.Optimizer,
                  masks: Mapping[torch.nn.Parameter, torch.Tensor] | None) -> Iterator[None]:
    """Run an optimizer step inside this block: afterwards every coordinate whose mask is False (bool, or 0.0)
    holds exactly its value from before the block, in the parameter and in each per-coordinate state tensor
    (same shape as the parameter, e.g. ``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``). State created by the
    step is zero on masked coordinates (no history). Parameters without a mask, or all-True masks, are left
    alone.

    >>> p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.Adam([p], lr=0.1)
    >>> p.grad = torch.tensor([1.0, 0.0])
    >>> with freeze_masked(opt, {p: torch.tensor([True, False])}):
    ...     opt.step()
    >>> p.data, opt.state[p]["exp_avg"]
    (tensor([0.9000, 1.0000]), tensor([0.1000, 0.0000]))
    """
    saved = []
    for p, m in (masks or {}).items():
        keep = m.to(device=p.device).bool()
        if bool(keep.all()):
            continue
        st = optimizer.state.get(p, {})
        st0 = {k: v.detach().clone() for k, v in st.items()
               if torch.is_tensor(v) and v.shape == p.shape and k not in _STATE_KEYS_NOT_PER_COORDINATE}
        saved.append((p, keep, p.detach().clone(), st0))
    yield
    with torch.no_grad():
        for p, keep, w0, st0 in saved:
            p.copy_(torch.where(keep, p, w0))
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and k not in _STATE_KEYS_NOT_PER_COORDINATE:
                    old = st0.get(k)
                    v.copy_(torch.where(keep, v, old if old is not None else torch.zeros_like(v)))


class MaskedDPOptimizer(DPOptimizer):
    """Opacus DPOptimizer with optional boolean masks per parameter (see module docstring).

    ``set_masks({param: bool tensor of param's shape})`` applies to the next ``step()`` (and stays until
    changed; ``set_masks(None)`` removes them).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._masks: dict[int, torch.Tensor] = {}

    def set_masks(self, masks: Mapping[torch.nn.Parameter, torch.Tensor] | None) -> None:
        self._masks = {}
        if not masks:
            return
        by_id = {id(p): p for p in self.params}
        for p, m in masks.items():
            if id(p) not in by_id:
                raise ConfigError("mask parameter", tuple(p.shape), "a parameter of this optimizer")
            if tuple(m.shape) != tuple(p.shape):
                raise ConfigError("mask shape", tuple(m.shape), f"the parameter's shape {tuple(p.shape)}")
            self._masks[id(p)] = m.to(device=p.device, dtype=p.dtype)

    def step(self, closure=None):
        """Opacus's DP step (clip, noise, scale, base step); masked coordinates then do not move at all
        (``freeze_masked``: weights and momentum/Adam state restored bit for bit)."""
        frozen = {p: self._masks[id(p)] for p in self.params if id(p) in self._masks}
        with freeze_masked(self.original_optimizer, frozen):
            return super().step(closure)

    def clip_and_accumulate(self) -> None:
        if self._masks:
            for p in self.params:
                m = self._masks.get(id(p))
                if m is not None and p.grad_sample is not None:
                    # mask before clipping: dropped coordinates never enter the per-sample norm
                    p.grad_sample = self._get_flat_grad_sample(p) * m.unsqueeze(0)
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = _generate_noise(std=self.noise_multiplier * self.max_grad_norm, reference=p.summed_grad,
                                    generator=self.generator, secure_mode=self.secure_mode)
            m = self._masks.get(id(p))
            if m is not None:
                noise = noise * m  # noise only on kept coordinates
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    def prepare_empty_batch(self) -> None:
        """Give every parameter a zero-length per-sample gradient, so ``step()`` adds pure noise (as Opacus
        does for an empty Poisson batch)."""
        for p in self.params:
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)


def mask_plain_grads(params, masks: Mapping[torch.nn.Parameter, torch.Tensor] | None) -> None:
    """Non-private counterpart: multiply ``p.grad`` by its mask (step under ``freeze_masked`` too, so that
    masked coordinates do not move through the optimizer's state)."""
    if not masks:
        return
    for p in params:
        m = masks.get(p)
        if m is not None and p.grad is not None:
            p.grad.mul_(m.to(p.grad.dtype))


class SummedDPOptimizer(MaskedDPOptimizer):
    """The DP step for algorithms that compute the clipped sum themselves (book-keeping, ghost clipping).

    ``set_summed({param: sum_i c_i g_i})`` hands over the clipped (and masked) sum; ``step()`` then adds the
    same noise as :class:`MaskedDPOptimizer` would (same generator, same parameter order, same masks), divides
    by the expected batch size and runs the wrapped optimizer. A parameter missing from the sum gets pure
    noise (an empty Poisson batch).

    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> opt = SummedDPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
    ...                         expected_batch_size=4)
    >>> opt.set_summed({p: torch.tensor([2.0, -4.0])}); opt.step(); p.data
    tensor([-0.5000,  1.0000])
    """

    def set_summed(self, summed: Mapping[torch.nn.Parameter, torch.Tensor]) -> None:
        for p in self.params:
            s = summed.get(p)
            p.summed_grad = (s.to(p.dtype) if s is not None else torch.zeros_like(p)).reshape(p.shape)
            m = self._masks.get(id(p))
            if m is not None:
                p.summed_grad = p.summed_grad * m

    @property
    def accumulated_iterations(self) -> int:
        return 1

    def clip_and_accumulate(self) -> None:  # the sum arrives clipped (set_summed)
        pass

    def pre_step(self, closure=None):
        if any(p.summed_grad is None for p in self.params):
            raise RuntimeError("SummedDPOptimizer.step() before set_summed(): no clipped sum to noise")
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.params:
            p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)
