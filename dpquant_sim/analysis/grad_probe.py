"""What the engine's quantizers see, captured on a probe batch, and the variance it puts into the released update.

DP-SGD quantizes inside every quantized layer, *before* clipping and noise (DESIGN.md section 5): the forward
reads ``qx`` (activation spec) and ``qW`` (weight spec); the backward quantizes the raw per-sample output
gradient ``dy_i = d loss_i / d y_i`` (grad spec, stochastic rounding) and forms the per-sample weight gradient
``G_i = qdy_i^T qx_i``; the engine then clips each example's gradient to norm C, sums, adds N(0, sigma^2 C^2)
and divides by the expected batch size B. This module measures that chain on a model state:

- :func:`capture`: one forward/backward of a probe batch with a **sum-reduced** loss (so ``dy_i`` is example
  i's own gradient, independent of the batch size) that records, per quantizable layer, the raw input ``x``
  and the raw output gradient ``dy`` *before* the layer's quantizers (hooks prepended to the Q layer's own),
  plus every example's per-sample gradient norm per layer and over the whole model (Opacus hooks).
- :func:`layer_norms`: per example, ||dy_i||_inf and ||dy_i||_2 (the paper's mechanism variables).
- :func:`quantization_error`: realized E[(q(dy) - dy)^2] of a recipe's grad quantizer on those tensors (and
  the forward weight / activation errors).
- :func:`predicted_update_variance`: the corrected analytic model. Stochastic rounding errors ``e`` of ``qdy``
  are independent across elements with exact variances ``v`` (from the grid, :mod:`variance_law`), so for one
  example ``Var(G_i) = sum_{o,t} v_i[o,t] * ||qx_i[:, t]||^2`` (t runs over tokens / output positions; for a
  convolution ``qx`` is unfolded) plus ``sum v`` for the bias; with clip factors ``c_i`` (held at their
  full-precision values) the released update ``u = (sum_i c_i G_i + noise) / B`` gets

      Var_q(u_l) = sum_i c_i^2 Var(G_i,l) / B^2    next to the DP noise  sigma^2 C^2 d_l / B^2.

  This is the *direct* term (the error of layer l's own ``qdy`` in layer l's own gradient). Errors that a
  quantized layer passes on to the layers before it (through its ``dx = qdy qW``) are added by an isotropic
  first-order rule (the *propagated* term, see the function). ``model="law"`` replaces the exact ``v`` by the
  recipe's fitted Proposition-1 law ``v = c rms^2 (||dy_i||_inf^2 / rms^2)^b`` per element: the variance
  predicted from the two norms alone.
- :func:`update_variance_mc`: the same quantity measured: ``draws`` independent stochastic-rounding draws of
  the engine's quantized per-sample gradients (Opacus over the Q layers), clipped and summed as the engine
  does, variance across draws per coordinate, summed per layer.

Example:
    >>> import torch, dpquant_sim.nn as qnn
    >>> from torch import nn
    >>> m = qnn.convert_model(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), seed=0)
    >>> p = capture(m, torch.randn(8, 6), torch.randint(0, 3, (8,)))
    >>> sorted(p.layers), tuple(p.dy["2"].shape)
    (['0', '2'], (8, 3))
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpquant_sim.errors import ConfigError

OPACUS_EPS = 1e-6  # Opacus's clip factor is C / (norm + 1e-6), clamped to 1


@dataclass
class Probe:
    """One probe: raw layer inputs and output gradients (full batch, CPU float32) and per-sample norms.

    Attributes:
        layers: quantizable layer names, in ``quantizable_layers`` order.
        modules: the Q layer modules (for weights and conv geometry).
        x: raw input of each layer (before its input quantizer), (B, ...).
        dy: raw output gradient of each layer, d loss_i / d y_i (before its grad quantizer), (B, ...).
        layer_grad_norm: (B, L) per-sample gradient norm of each layer's weight and bias.
        total_grad_norm: (B,) per-sample gradient norm over every trainable parameter (what clipping uses).
        layer_params: number of parameters (weight + bias) of each layer, d_l.
        loss: (B,) per-example losses.
        call_order: layer names in the order the forward called them (backward reaches them in reverse).
    """

    layers: list[str]
    modules: dict[str, nn.Module]
    x: dict[str, torch.Tensor]
    dy: dict[str, torch.Tensor]
    layer_grad_norm: torch.Tensor
    total_grad_norm: torch.Tensor
    layer_params: dict[str, int]
    loss: torch.Tensor
    call_order: list[str]
    batch: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch = int(self.total_grad_norm.shape[0])

    def clip_factors(self, clip: float | None) -> torch.Tensor:
        """Opacus's per-sample clip factors min(1, C / (norm + 1e-6)); all ones when ``clip`` is None."""
        if clip is None:
            return torch.ones_like(self.total_grad_norm)
        return (clip / (self.total_grad_norm + OPACUS_EPS)).clamp(max=1.0)


def _q_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from dpquant_sim.nn.convert import _unwrap
    from dpquant_sim.nn.layers import QUANT_LAYER_TYPES

    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, QUANT_LAYER_TYPES)]


def _per_sample_grads(gsm, xb, yb) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor]:
    """Forward/backward of one chunk with a sum-reduced loss; ({param: (b, d) per-sample gradient}, losses)."""
    out = gsm(xb)
    loss = F.cross_entropy(out, yb, reduction="none")
    with warnings.catch_warnings():  # a first layer's full backward hooks fire at its output gradient: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.sum().backward()
    gs = {}
    for p in gsm.parameters():
        if p.requires_grad and getattr(p, "grad_sample", None) is not None:
            gs[p] = p.grad_sample.detach().reshape(xb.shape[0], -1)
        p.grad_sample = None
        p.grad = None
    return gs, loss.detach()


def _checked_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ConfigError("probe batch", (tuple(x.shape), tuple(y.shape)), "inputs and labels of the same length >= 1")


def capture(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 64) -> Probe:
    """Record every Q layer's raw input and output gradient for the batch (x, y), in the model's current plan.

    The model is used as is (its quantizers run where layers are quantized; the recorded tensors are the ones
    *before* each layer's quantizer). It is wrapped in a temporary Opacus GradSampleModule (hooks removed
    afterwards); its ``.grad`` fields are left empty. ``chunk`` examples per forward/backward (memory only:
    every recorded quantity is per example).
    """
    from opacus import GradSampleModule

    _checked_batch(x, y)
    named = _q_layers(model)
    if not named:
        raise ConfigError("model", type(model).__name__, "a converted model with quantizable layers (convert_model)")
    store_x: dict[str, list[torch.Tensor]] = {n: [] for n, _ in named}
    store_dy: dict[str, list[torch.Tensor]] = {n: [] for n, _ in named}
    handles = []
    order: list[str] = []
    for name, mod in named:
        def fwd(module, args, _n=name):
            if _n not in order:
                order.append(_n)
            store_x[_n].append(args[0].detach().float().cpu())

        def bwd(module, grad_output, _n=name):
            store_dy[_n].append(grad_output[0].detach().float().cpu())

        # prepend: run before the Q layer's own input / grad quantizer hooks, so we see the raw tensors
        handles.append(mod.register_forward_pre_hook(fwd, prepend=True))
        handles.append(mod.register_full_backward_pre_hook(bwd, prepend=True))
    was = model.training
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    layer_params = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in named}
    owner = {id(p): n for n, m in named for p in m.parameters()}
    lnorms, tnorms, losses = [], [], []
    try:
        for s in range(0, x.shape[0], chunk):
            gs, loss = _per_sample_grads(gsm, x[s:s + chunk], y[s:s + chunk])
            b = loss.shape[0]
            sq = {n: torch.zeros(b, dtype=torch.float64) for n, _ in named}
            tot = torch.zeros(b, dtype=torch.float64)
            for p, g in gs.items():
                g2 = g.double().pow(2).sum(1)
                tot += g2
                if id(p) in owner:
                    sq[owner[id(p)]] += g2
            lnorms.append(torch.stack([sq[n] for n, _ in named], 1).sqrt())
            tnorms.append(tot.sqrt())
            losses.append(loss.double().cpu())
    finally:
        for h in handles:
            h.remove()
        gsm._close()
        model.train(was)
    return Probe(
        layers=[n for n, _ in named], modules=dict(named),
        x={n: torch.cat(v) for n, v in store_x.items()}, dy={n: torch.cat(v) for n, v in store_dy.items()},
        layer_grad_norm=torch.cat(lnorms), total_grad_norm=torch.cat(tnorms), layer_params=layer_params,
        loss=torch.cat(losses), call_order=order + [n for n, _ in named if n not in order],
    )


# ------------------------------------------------------------------------------------------------ statistics
def layer_norms(probe: Probe, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(||dy_i||_inf, ||dy_i||_2) per example of one layer's raw output gradient (float64 arrays)."""
    d = probe.dy[layer].double().reshape(probe.batch, -1)
    return d.abs().amax(1).numpy(), d.norm(dim=1).numpy()


def quantization_error(probe: Probe, layer: str, recipe: str, *, draws: int = 2,
                       generator: torch.Generator | None = None) -> dict[str, np.ndarray | float]:
    """Realized quantization errors of ``recipe`` on one layer's probe tensors, with the engine's quantizers.

    Returns ``grad_sq`` (per example: sum over elements of E[(q(dy) - dy)^2], mean over ``draws``),
    ``grad_elems`` (elements per example), ``weight_rel`` (||q(W) - W||^2 / ||W||^2) and ``act_rel``
    (sum ||q(x) - x||^2 / sum ||x||^2 over the batch).
    """
    from dpquant_sim.analysis.variance_law import realized_sq_error
    from dpquant_sim.nn.config import get_recipe

    cfg = get_recipe(recipe)
    mod = probe.modules[layer]
    conv = bool(getattr(mod, "_is_conv", False))
    dy, x = probe.dy[layer], probe.x[layer]
    g = realized_sq_error(dy, cfg.grad, conv=conv, draws=draws, generator=generator)
    w = mod.weight.detach().float().cpu()
    werr = realized_sq_error(w, cfg.weight, conv=conv, weight=True, draws=draws, generator=generator)
    aerr = realized_sq_error(x, cfg.activation, conv=conv, draws=draws, generator=generator)
    return {
        "grad_sq": g.reshape(probe.batch, -1).sum(1).numpy(),
        "grad_elems": int(dy[0].numel()),
        "weight_rel": float(werr.sum() / w.double().pow(2).sum().clamp_min(1e-300)),
        "act_rel": float(aerr.sum() / x.double().pow(2).sum().clamp_min(1e-300)),
    }


def _grad_variance_field(probe: Probe, layer: str, recipe: str, model: str, law: tuple[float, float] | None,
                         generator: torch.Generator | None) -> torch.Tensor:
    """Per-element variance ``v`` of the stochastic rounding of dy (float64, dy's shape)."""
    from dpquant_sim.analysis.variance_law import expected_sq_error, realized_sq_error
    from dpquant_sim.nn.config import get_recipe

    spec = get_recipe(recipe).grad
    mod = probe.modules[layer]
    conv = bool(getattr(mod, "_is_conv", False))
    dy = probe.dy[layer]
    if model == "law":
        if law is None:
            raise ConfigError("law", None, "(exponent, constant) of the recipe's fitted law for model='law'")
        b, c = law
        d = dy.double().reshape(probe.batch, -1)
        rms2 = d.pow(2).mean(1, keepdim=True).clamp_min(1e-300)
        linf2 = d.abs().amax(1, keepdim=True).pow(2)
        v = (c * rms2 * (linf2 / rms2) ** b).expand_as(d)
        return v.reshape(dy.shape)
    if model != "exact":
        raise ConfigError("model", model, ("exact", "law"))
    try:
        return torch.from_numpy(expected_sq_error(dy, spec, conv=conv))
    except ConfigError:  # a scale rule the exact reference does not know: measure it instead
        return realized_sq_error(dy, spec, conv=conv, draws=8, generator=generator)


def _operand_sq(probe: Probe, layer: str, recipe: str) -> torch.Tensor:
    """Squared forward operand the weight gradient multiplies dy with: qx (unfolded for a conv), as
    (B, positions, features) for Linear and (B, groups, features, positions) for conv."""
    from dpquant_sim.nn.config import get_recipe
    from dpquant_sim.nn.layers import quantize_data

    mod = probe.modules[layer]
    conv = bool(getattr(mod, "_is_conv", False))
    spec = get_recipe(recipe).activation
    x = probe.x[layer].float()
    qx = quantize_data(x, spec, torch.Generator().manual_seed(0), conv=conv) if spec.rounding == "nearest" else x
    qx = qx.double()
    if not conv:
        return qx.reshape(probe.batch, -1, qx.shape[-1]).pow(2)
    from opacus.utils.tensor_utils import unfold2d

    padding = mod.padding
    if mod.padding_mode != "zeros":
        qx = F.pad(qx, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        padding = (0, 0)
    cols = unfold2d(qx.contiguous(), kernel_size=mod.kernel_size, padding=padding, stride=mod.stride,
                    dilation=mod.dilation)
    return cols.reshape(probe.batch, mod.groups, -1, cols.shape[-1]).pow(2)


def _plan_map(probe: Probe, plan: "Mapping[str, str | None] | str") -> dict[str, str | None]:
    if isinstance(plan, str):
        return {n: plan for n in probe.layers}
    unknown = [n for n in plan if n not in probe.layers]
    if unknown:
        raise ConfigError("plan layer", unknown[0], tuple(probe.layers))
    return {n: plan.get(n) for n in probe.layers}


def predicted_update_variance(probe: Probe, plan: "Mapping[str, str | None] | str", *, clip: float | None,
                              batch_size: int, model: str = "exact",
                              laws: Mapping[str, tuple[float, float]] | None = None, propagate: bool = True,
                              generator: torch.Generator | None = None) -> dict[str, dict[str, float]]:
    """Analytic variance that stochastic gradient rounding adds to each layer's block of the released update
    (sum over the block's coordinates) under ``plan`` ({layer: recipe or None}, or one recipe for every layer).

    Per layer: ``direct`` (the layer's own qdy error in its own weight gradient, exact; module docstring),
    ``propagated`` (errors of the quantized layers called after it, passed back through the backward: we take
    each such layer's per-example relative error rho_ik = sum_j v_ikj / ||dy_ik||^2 to reach this layer's
    per-example gradient with the same relative size -- an isotropic first-order approximation -- so it adds
    ``sum_i c_i^2 ||g_il||^2 sum_k rho_ik / B^2``), and ``total``.

    Args:
        clip: the clipping norm C (None: no clipping, as in SGD). Clip factors are the full-precision ones.
        batch_size: B, the divisor of the released update (the engine's expected batch size).
        model: "exact" (grid-exact stochastic-rounding variance of each element of dy) or "law" (each recipe's
            fitted Proposition-1 law from ||dy_i||_inf and ||dy_i||_2 alone; ``laws={recipe: (b, c)}``).
        propagate: include the propagated term.
    """
    pm = _plan_map(probe, plan)
    c2 = probe.clip_factors(clip).double().pow(2)
    order = probe.call_order
    direct: dict[str, torch.Tensor] = {}
    rho: dict[str, torch.Tensor] = {}
    for layer in probe.layers:
        recipe = pm[layer]
        if recipe is None:
            continue
        mod = probe.modules[layer]
        conv = bool(getattr(mod, "_is_conv", False))
        law = None if laws is None else laws.get(recipe)
        v = _grad_variance_field(probe, layer, recipe, model, law, generator)
        a2 = _operand_sq(probe, layer, recipe)
        if not conv:
            v3 = v.reshape(probe.batch, -1, v.shape[-1])          # (B, T, out)
            per = (v3 * a2.sum(-1, keepdim=True)).sum((1, 2))      # sum_t sum_o v[t,o] ||qx_t||^2
        else:
            v4 = v.reshape(probe.batch, mod.groups, -1, a2.shape[-1])  # (B, g, out/g, L)
            per = (v4.sum(2) * a2.sum(2)).sum((1, 2))              # sum_l (sum_o v[o,l]) ||cols[:,l]||^2
        vs = v.reshape(probe.batch, -1).sum(1)
        if mod.bias is not None and mod.bias.requires_grad:
            per = per + vs
        direct[layer] = per
        rho[layer] = vs / probe.dy[layer].double().reshape(probe.batch, -1).pow(2).sum(1).clamp_min(1e-300)
    out = {}
    for j, layer in enumerate(probe.layers):
        d = float((c2 * direct[layer]).sum() / batch_size**2) if layer in direct else 0.0
        p = 0.0
        if propagate:
            later = [k for k in rho if order.index(k) > order.index(layer)]
            if later:
                r = torch.stack([rho[k] for k in later]).sum(0)
                g2 = probe.layer_grad_norm[:, j].double().pow(2)
                p = float((c2 * g2 * r).sum() / batch_size**2)
        out[layer] = {"direct": d, "propagated": p, "total": d + p}
    return out


def noise_variance(probe: Probe, *, noise_multiplier: float, clip: float, batch_size: int) -> dict[str, float]:
    """DP noise variance in each layer's block of the released update: sigma^2 C^2 d_l / B^2."""
    return {n: (noise_multiplier * clip) ** 2 * probe.layer_params[n] / batch_size**2 for n in probe.layers}


def _released_sum(gsm, named, x, y, clip, chunk) -> dict[str, torch.Tensor]:
    """sum_i c_i g_i per layer (flattened weight+bias), computed as the engine's optimizer does."""
    owner = {id(p): n for n, m in named for p in m.parameters()}
    acc: dict[str, torch.Tensor] = {}
    for s in range(0, x.shape[0], chunk):
        gs, _ = _per_sample_grads(gsm, x[s:s + chunk], y[s:s + chunk])
        norms = torch.stack([g.double().pow(2).sum(1) for g in gs.values()], 1).sum(1).sqrt()
        f = torch.ones_like(norms) if clip is None else (clip / (norms + OPACUS_EPS)).clamp(max=1.0)
        parts: dict[str, list[torch.Tensor]] = {}
        for p, g in gs.items():
            if id(p) in owner:
                parts.setdefault(owner[id(p)], []).append((g.double() * f[:, None]).sum(0))
        for n, ps in parts.items():
            v = torch.cat(ps)
            acc[n] = acc[n] + v if n in acc else v
    return acc


def update_variance_mc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: Mapping[str, str | None], *,
                       clip: float | None, batch_size: int, draws: int = 8, seed: int = 0,
                       chunk: int = 64) -> dict[str, dict[str, float]]:
    """Measured variance of each layer's block of the released update under ``plan`` (stochastic rounding only;
    the batch, weights and noise are held fixed), and its bias against full precision.

    Runs the engine's quantized layers ``draws`` times (layer generators reseeded from ``seed``), each time the
    clipped per-sample gradient sum (Opacus clip factors, ``clip=None``: no clipping) divided by
    ``batch_size``. Returns, per layer: ``var`` (sum over the block's coordinates of the unbiased variance
    across draws), ``bias2`` (||mean over draws - full precision||^2 minus var/draws, the squared bias of the
    quantized update; deterministic forward rounding lands here), ``signal`` (||full-precision block||^2).
    The model's plan is restored afterwards.
    """
    import dpquant_sim.nn as qnn
    from opacus import GradSampleModule

    if draws < 2:
        raise ConfigError("draws", draws, "an integer >= 2 (a variance needs two draws)")
    _checked_batch(x, y)
    named = _q_layers(model)
    saved = qnn.quantization_state(model)
    saved_gen = qnn.generator_states(model)
    was = model.training
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        qnn.apply_plan(model, {n: None for n, _ in named}, dp=False)
        fp = {n: v / batch_size for n, v in _released_sum(gsm, named, x, y, clip, chunk).items()}
        qnn.apply_plan(model, dict(plan), dp=clip is not None)
        qnn.set_generators(model, seed)
        mean = {n: torch.zeros_like(v) for n, v in fp.items()}
        m2 = {n: torch.zeros_like(v) for n, v in fp.items()}
        for k in range(1, draws + 1):  # Welford per coordinate
            u = {n: v / batch_size for n, v in _released_sum(gsm, named, x, y, clip, chunk).items()}
            for n in fp:
                d = u[n] - mean[n]
                mean[n] += d / k
                m2[n] += d * (u[n] - mean[n])
    finally:
        gsm._close()
        qnn.apply_plan(model, saved, dp=False)
        qnn.set_generator_states(model, saved_gen)
        model.train(was)
    out = {}
    for n in fp:
        var = float(m2[n].sum() / (draws - 1))
        out[n] = {"var": var, "bias2": float((mean[n] - fp[n]).pow(2).sum()) - var / draws,
                  "signal": float(fp[n].pow(2).sum())}
    return out


def probe_indices(n_train: int, size: int, seed: int = 0) -> torch.Tensor:
    """A fixed, seeded subset of ``size`` training indices (the same for every regime, seed and epoch)."""
    if not 1 <= size <= n_train:
        raise ConfigError("probe size", size, f"an integer in [1, {n_train}] (the training set size)")
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(10_000 + seed))[:size]


def summarize(values: Sequence[float] | np.ndarray, prefix: str) -> dict[str, float]:
    """{prefix_median, prefix_p10, prefix_p90, prefix_mean} of a sample (NaN-free)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {f"{prefix}_{k}": math.nan for k in ("median", "p10", "p90", "mean")}
    return {f"{prefix}_median": float(np.median(a)), f"{prefix}_p10": float(np.quantile(a, 0.1)),
            f"{prefix}_p90": float(np.quantile(a, 0.9)), f"{prefix}_mean": float(a.mean())}


__all__ = ["Probe", "capture", "layer_norms", "quantization_error", "predicted_update_variance",
           "noise_variance", "update_variance_mc", "probe_indices", "summarize"]
