"""Per-example loss deltas after short training iterations: the DPQuant paper's estimator (``estimator: training``).

``make_training_delta_fn(model, dataset, ...)`` returns a callable

    fn(layer_names, sample_rate, generator, *, iters, lr=None, grad_clip=None) -> (d, n_expected)

with the same output contract as :func:`dpquant_sim.training.sensitivity.make_loss_delta_fn` (float64 [n, L] rows
in sample order, n_expected = sample_rate * N), so the schedule privatises both the same way.

What it computes. A Poisson sample of the private training set (rate ``sample_rate``, drawn from
``generator``). For each sampled example i (dataset index k) and each candidate policy P -- the unquantized
baseline P0, and "only layer l quantized" P_l for every requested layer -- starting from the SAME weight snapshot
w0:

    w <- w0;  repeat iters times:  g = grad_w loss(x_i; w, P);  w <- w - lr * g * min(1, C / (||g|| + 1e-6))
    L_i(P) = loss(x_i; w, P)                    (the loss under the policy that was trained, after the steps)
    d[i, l] = L_i(P_l) - L_i(P0)

In a run, the engine sets ``lr`` to the run's learning rate / expected batch size B and ``C`` (``grad_clip``) to
its per-example clipping norm: one short step is exactly example i's own share of one DP-SGD step (a DP-SGD step
is lr * (sum of clipped gradients + noise) / B), noise excluded. (A step of the full lr, as if every example
of the batch agreed with example i, drives example i's own loss to about the same value under every policy
and hides the differences: on the digits CNN the SNR per estimate is 0.32 at lr / B and 0.01 at the full lr 2.0;
docs/results.md.) The
steps are plain SGD (no momentum, no weight decay, no optimizer state: the training optimizer is never touched).
With step size 0 this is exactly the forward-only estimator (tested).

What the paper states and what it leaves open (docs/schedules.md): the paper measures each candidate policy's loss
on a Poisson subsample of the private data after a few short training iterations from the current model; the
number of iterations, their step size, whether they clip, and whether the loss is taken per example are not
stated in the public summaries. The choices above are ours.

Why each row depends on its own example only (what the privacy argument needs). The short iterations run on
example i ALONE (a batch of one), never on the whole sample: training on the batch would make every example's
post-step loss depend on every other example, so removing one example would move all n rows and the clipped
sum's sensitivity would grow with n. Each example's stochastic-rounding draws come from fresh generators seeded
from (a seed drawn from ``generator`` BEFORE the Poisson draw, the example's dataset index), the same for every
policy (common random numbers: the deltas carry less rounding noise), so row i is a function of (x_i, y_i, w0,
that seed) only. Forward passes see a batch of one, so no activation or gradient scale can mix examples.

State restored bit-exactly afterwards, also on error: every parameter and buffer (copied back from a snapshot),
each layer's precision config, each layer's stochastic-rounding generator object (the estimator uses fresh ones,
so the run's own generator streams do not advance), the train/eval mode, and ``.grad`` (never written: gradients
come from ``torch.autograd.grad``). Run under ``paused`` (the clipping algorithm's context manager) so that DP
hooks do not record the estimator's backward passes. The model runs in eval mode (no dropout; no BatchNorm
statistics updated).

Cost: per sampled example, (L + 1) x iters forward+backward passes and L + 1 forward passes, all on a batch of one:
about (L + 1) x (3 iters + 1) forward-pass equivalents per example, against L + 1 for the forward-only estimator
on batches; measured ratio in docs/results.md.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dpquant_sim.errors import ConfigError, DPSafetyError
from dpquant_sim.training.sensitivity import (
    LossFn, _gather, per_example_cross_entropy, poisson_indices, resolve_layers,
)

CLIP_EPS = 1e-6  # as Opacus and the engine: factor min(1, C / (||g|| + 1e-6))
SEED_BOUND = 2**62


def clip_factor(grads: Sequence[torch.Tensor], clip: float) -> torch.Tensor:
    """min(1, clip / (||g|| + 1e-6)) for the concatenation of ``grads`` (fp32 norm, as the engine clips).

    >>> float(clip_factor([torch.tensor([3.0, 4.0])], 1.0))  # doctest: +ELLIPSIS
    0.19999...
    """
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    return torch.clamp(clip / (norm + CLIP_EPS), max=1.0)


def make_training_delta_fn(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: LossFn | None = None,
    recipe: Any = "fp4",
    *,
    lr: float,
    grad_clip: float,
    device: str | torch.device = "cpu",
    dp: bool = True,
    paused: Callable[[], ContextManager[Any]] | None = None,
) -> Callable[..., tuple[torch.Tensor, float]]:
    """Build the training estimator's delta callable (see the module docstring).

    Args:
        model: the (converted) model being trained; may be wrapped in an Opacus GradSampleModule.
        dataset: the PRIVATE training set.
        loss_fn: per-example loss ``(logits, y) -> [B]``; default cross-entropy with reduction='none'.
        recipe: the recipe a quantized layer uses (name or LayerQuantConfig).
        lr: default step size of the short iterations (the run's learning rate), >= 0.
        grad_clip: default per-example L2 clip C of the short iterations' gradients (the run's max_grad_norm), > 0.
        device: where the passes run.
        dp: passed to ``apply_plan`` (True refuses recipes whose activation scale mixes examples).
        paused: a zero-argument context-manager factory under which the estimator's autograd runs (the clipping
            algorithm's ``paused``), so DP hooks do not record; default: none needed.
    """
    loss = loss_fn or per_example_cross_entropy
    n_total = len(dataset)  # type: ignore[arg-type]
    if n_total == 0:
        raise ConfigError("dataset", "empty", "a non-empty private training set")
    default_lr, default_clip = float(lr), float(grad_clip)
    pause = paused or contextlib.nullcontext

    def training_deltas(
        layer_names: Sequence[str], sample_rate: float, generator: torch.Generator, *, iters: int = 1,
        lr: float | None = None, grad_clip: float | None = None,
    ) -> tuple[torch.Tensor, float]:
        from dpquant_sim.nn import apply_plan, set_generators
        from dpquant_sim.nn.config import get_recipe

        step = default_lr if lr is None else float(lr)
        clip = default_clip if grad_clip is None else float(grad_clip)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ConfigError("estimator_iters", iters, "an integer >= 1")
        if not step >= 0.0:
            raise ConfigError("estimator_lr", step, "a step size >= 0")
        if not clip > 0.0:
            raise ConfigError("estimator_grad_clip", clip, "a clipping norm > 0")
        cfg = get_recipe(recipe)
        module, all_layers, names = resolve_layers(model, layer_names)
        # the rounding seed first, then the Poisson draw: a neighbouring dataset (one example fewer at the end)
        # sees the same seed and the same inclusion draws for every other example
        gen_device = generator.device if generator is not None else torch.device("cpu")
        base_seed = int(torch.randint(0, SEED_BOUND, (1,), generator=generator, device=gen_device))
        idx = poisson_indices(n_total, sample_rate, generator)
        n = int(idx.numel())
        out = torch.zeros((n, len(names)), dtype=torch.float64)
        n_exp = float(sample_rate) * n_total
        if n == 0:
            return out, n_exp

        params = [p for p in module.parameters() if p.requires_grad]
        state = [t for t in list(module.parameters()) + list(module.buffers())]
        snapshot = [t.detach().clone() for t in state]
        saved_cfg = {name: module.get_submodule(name).qconfig for name in all_layers}
        saved_gen = {name: module.get_submodule(name).generator for name in all_layers}
        was_training = module.training
        full: dict[str, Any] = {name: None for name in all_layers}
        x_all, y_all = _gather(dataset, idx)

        def restore() -> None:
            with torch.no_grad():
                for t, s in zip(state, snapshot):
                    t.copy_(s)

        def per_example(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            lb = loss(module(xb), yb)
            if lb.ndim != 1 or lb.shape[0] != 1:
                raise DPSafetyError(
                    f"loss_fn returned shape {tuple(lb.shape)} for one example: the estimator needs one loss per "
                    "example (reduction='none')."
                )
            return lb[0]

        def policy_loss(xb: torch.Tensor, yb: torch.Tensor, seed: int) -> float:
            set_generators(module, seed)  # the same rounding draws for every policy of this example
            for _ in range(iters):
                grads = torch.autograd.grad(per_example(xb, yb), params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
                c = clip_factor(grads, clip)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(g.to(p.dtype) * (step * c).to(p.dtype))
            with torch.no_grad():
                value = float(per_example(xb, yb).double())
            restore()
            return value

        try:
            module.eval()
            with pause(), warnings.catch_warnings():
                # The DP engine's full backward hooks stay registered (paused, they record nothing); torch warns
                # that they fire on module outputs because the estimator's inputs need no grad: harmless here.
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                for i in range(n):
                    xb, yb = x_all[i:i + 1].to(device), y_all[i:i + 1].to(device)
                    seed = (base_seed + int(idx[i])) % SEED_BOUND
                    apply_plan(module, full, dp=dp)
                    base = policy_loss(xb, yb, seed)
                    for j, name in enumerate(names):
                        apply_plan(module, {**full, name: cfg}, dp=dp)
                        out[i, j] = policy_loss(xb, yb, seed) - base
        finally:
            restore()
            for name in all_layers:  # the exact previous configs and generator objects
                m = module.get_submodule(name)
                m.qconfig, m.generator = saved_cfg[name], saved_gen[name]
            module.train(was_training)
        return out, n_exp

    return training_deltas
