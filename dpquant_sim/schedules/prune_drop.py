"""Pre-pruning and per-step gradient dropping for DP training (Adamczewski et al., arXiv 2306.11754).

Pre-pruning (``apply_pruning``), once before training, per quantizable layer (Linear/Conv2d weights):

- ``method``: ``random`` (seeded), ``magnitude`` (|w|; per output channel: L1 norm of the channel),
  ``synflow``: a data-free saliency, one-shot SynFlow (Tanaka et al. 2020): with every parameter replaced by
  its absolute value (float64), normalisation layers bypassed (identity) and an all-ones input, R = sum of the
  outputs; the score of weight w is |w * dR/dw| (its share of all input-to-output path products). Uses no
  data at all. (``snip-free`` is its deprecated former name.) Or ``snip-public``: SNIP (Lee et al. 2019),
  score |w * dL/dw| with L the summed cross-entropy of the initial model, in full precision, over the
  declared PUBLIC split only (``public=(x, y)``; the engine holds it out of the private training set:
  ``TrainConfig.public_fraction``). Data-dependent criteria are refused without public data.
- ``structure``: ``unstructured`` prunes exactly round(sparsity * numel) weights of every layer (layer-wise,
  so every layer keeps the same density; no layer collapse); ``channel`` prunes round(sparsity * C_out)
  output channels of every layer except the last (its outputs are the classes), at least one channel kept,
  weight rows and their bias entries together.
- Only ``channel`` pruning saves compute: ``kept_channel_fraction[layer]`` (share of output channels kept,
  1.0 for unstructured or unpruned layers) is what the cost model multiplies a layer's GEMM FLOPs by.
  Conservative: the next layer's now-dead input channels are not subtracted.

``PruneState.reapply(model)`` re-zeroes pruned weights (call after every optimizer step);
``PruneState.param_masks(model)`` gives {parameter: bool mask} (True = trainable) for the optimizer, so pruned
coordinates get neither gradient nor noise (the paper's point: noise norm shrinks with the kept dimension).

Gradient dropping (``GradDropper``), every step: keep ``keep`` of every parameter's coordinates (among those
not pruned), ``random`` (a seeded function of (seed, step): resumable) or ``magnitude`` (largest |w| of the
current WEIGHTS, never of the gradients). Masks are applied to per-sample gradients BEFORE clipping and noise
is added only on kept coordinates (``dpquant_sim.training.optim.MaskedDPOptimizer.set_masks``); a masked
coordinate does not move at all that step: its weight and its optimizer state (momentum buffer, Adam's m and
v) are restored after the base optimizer's step (``optim.freeze_masked``).

Privacy: random, magnitude and synflow selection read no private data (the weights are the initialisation or
post-processing of earlier DP releases), so they add nothing to the ledger; DP-SGD's accounting is unchanged.
A drop criterion on private GRADIENT magnitudes would read private data before clipping and noise (one
example could change which coordinates everyone's gradient keeps): it is deliberately not offered.
``snip-public`` reads only the public split, which DP-SGD never sees (docs/privacy.md).

>>> import torch
>>> from dpquant_sim.schedules.configs import PruneConfig, DropConfig
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
>>> st = apply_pruning(model, PruneConfig(method="magnitude", structure="unstructured", sparsity=0.5), seed=0)
>>> int((model[0].weight == 0).sum()), st.kept_channel_fraction["0"]
(24, 1.0)
>>> masks = GradDropper(DropConfig(method="random", keep=0.5), seed=0).masks(model, step=3)
>>> int(masks[model[2].weight].sum())   # half of the 3 x 6 weights
9
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dpquant_sim.errors import ConfigError
from dpquant_sim.schedules.configs import DATA_DEPENDENT_PRUNE_METHODS, DropConfig, PruneConfig

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module
    return model


def _strip(name: str) -> str:
    while name.startswith("_module."):
        name = name[len("_module."):]
    return name


def gemm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear/Conv2d (incl. QLinear/QConv2d) of the unwrapped model, in module order."""
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _round_count(share: float, n: int) -> int:
    return int(math.floor(share * n + 0.5))


def _seeded(seed: int, *extra: int) -> torch.Generator:
    ss = np.random.SeedSequence([int(seed), *[int(e) for e in extra]])
    return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest scores (stable: ties go to the lower index)."""
    return torch.argsort(scores, stable=True)[:k]


def synflow_scores(model: nn.Module, input_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """One-shot SynFlow saliency |w * dR/dw| of every GEMM weight (data-free; see the module docstring).

    The model is not modified: parameters are substituted with torch.func.functional_call.
    """
    from torch.func import functional_call

    module = _unwrap(model)
    params = {n: p.detach().abs().double().requires_grad_(True) for n, p in module.named_parameters()}
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in module.named_buffers()}
    hooks = [m.register_forward_hook(lambda mod, inp, out: inp[0]) for m in module.modules() if isinstance(m, _NORMS)]
    saved_q = {}
    for n, m in module.named_modules():
        if hasattr(m, "qconfig") and isinstance(m, (nn.Linear, nn.Conv2d)):
            saved_q[n] = m.qconfig
            m.qconfig = None  # full precision for the scoring pass
    was_training = module.training
    try:
        module.eval()
        x = torch.ones((1, *input_shape), dtype=torch.float64, device=next(iter(params.values())).device)
        out = functional_call(module, {**params, **buffers}, (x,))
        out.sum().backward()
    finally:
        for h in hooks:
            h.remove()
        for n, qc in saved_q.items():
            module.get_submodule(n).qconfig = qc
        module.train(was_training)
    scores = {}
    for name, m in gemm_modules(module):
        p = params[f"{name}.weight"]
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        scores[name] = (p * g).abs().detach().float()
    return scores


def snip_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
                ) -> dict[str, torch.Tensor]:
    """SNIP saliency |w * dL/dw| of every GEMM weight, L = summed cross-entropy of ``model`` on (x, y).

    Full precision (quantization off), eval mode (no dropout; normalisation layers of this project's models
    keep no running statistics), gradients accumulated over chunks of ``batch_size``. The model's weights and
    ``.grad`` are left as they were. ``(x, y)`` must be public data (see ``apply_pruning``).
    """
    module = _unwrap(model)
    params = [p for p in module.parameters()]
    saved_grad = [p.grad for p in params]
    saved_rg = [p.requires_grad for p in params]
    saved_q = {}
    for n, m in module.named_modules():
        if hasattr(m, "qconfig") and isinstance(m, (nn.Linear, nn.Conv2d)):
            saved_q[n] = m.qconfig
            m.qconfig = None
    was_training = module.training
    layers = gemm_modules(module)
    weights = [m.weight for _, m in layers]
    total = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    try:
        module.eval()
        dev = weights[0].device
        for s in range(0, len(y), batch_size):
            out = module(x[s:s + batch_size].to(dev))
            loss = nn.functional.cross_entropy(out.float(), y[s:s + batch_size].to(dev), reduction="sum")
            grads = torch.autograd.grad(loss, weights)
            for t, g in zip(total, grads):
                t += g.double()
    finally:
        for n, qc in saved_q.items():
            module.get_submodule(n).qconfig = qc
        module.train(was_training)
        for p, g, rg in zip(params, saved_grad, saved_rg):
            p.grad = g
            p.requires_grad_(rg)
    return {name: (w.detach().double() * t).abs().float() for (name, _), w, t in zip(layers, weights, total)}


@dataclass
class PruneState:
    """Pruning masks (True = kept) by parameter name of the unwrapped model, plus per-layer compute facts.

    Attributes:
        cfg: the PruneConfig that produced the masks.
        masks: "layer.weight" (and "layer.bias" for channel pruning) -> bool tensor, same shape.
        kept_channel_fraction: layer -> share of output channels kept (1.0 unless channel-pruned).
        density: layer -> share of the layer's weights kept.
    """

    cfg: PruneConfig
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    kept_channel_fraction: dict[str, float] = field(default_factory=dict)
    density: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def reapply(self, model: nn.Module) -> None:
        """Zero the pruned coordinates again (after every optimizer step; noise must not regrow them)."""
        module = _unwrap(model)
        for name, mask in self.masks.items():
            p = module.get_parameter(name)
            p.mul_(mask.to(p.device, p.dtype))

    def param_masks(self, model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
        """{parameter: bool mask} for the optimizer (pruned coordinates: no gradient, no noise)."""
        module = _unwrap(model)
        return {module.get_parameter(n): m.to(module.get_parameter(n).device) for n, m in self.masks.items()}

    def kept_flop_share(self, layers: Sequence[Any]) -> float:
        """Share of GEMM FLOPs still computed: sum_l flops_l * kept_channel_fraction_l / sum_l flops_l.

        ``layers``: objects with ``.name`` and ``.flops`` (``schedules.base.LayerInfo``); names may carry
        ``_module.`` prefixes. Unstructured pruning keeps every FLOP (dense kernels do not skip zeros).
        """
        tot = sum(float(layer.flops) for layer in layers)
        if tot <= 0:
            return 1.0
        kept = sum(float(layer.flops) * self.kept_channel_fraction.get(_strip(layer.name), 1.0)
                   for layer in layers)
        return kept / tot

    def state_dict(self) -> dict[str, Any]:
        return {"cfg": self.cfg.model_dump(), "masks": dict(self.masks),
                "kept_channel_fraction": dict(self.kept_channel_fraction), "density": dict(self.density)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks saved by ``state_dict`` (tensors, or nested lists after a JSON round trip)."""
        self.cfg = PruneConfig(**state["cfg"])
        self.masks = {k: torch.as_tensor(v, dtype=torch.bool) for k, v in state["masks"].items()}
        self.kept_channel_fraction = {k: float(v) for k, v in state["kept_channel_fraction"].items()}
        self.density = {k: float(v) for k, v in state["density"].items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "PruneState":
        st = cls(cfg=PruneConfig(**state["cfg"]))
        st.load_state_dict(state)
        return st


def apply_pruning(
    model: nn.Module, cfg: PruneConfig, seed: int = 0, *, input_shape: Sequence[int] | None = None,
    public: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PruneState:
    """Prune every Linear/Conv2d weight of ``model`` in place and return the masks.

    Args:
        model: the model (an Opacus wrapper is unwrapped).
        cfg: method / structure / sparsity (share of weights, or of output channels, removed per layer).
        seed: seeds the ``random`` method.
        input_shape: per-example input shape, needed by ``synflow`` (its all-ones input).
        public: (x, y) of the declared public split, needed by ``snip-public`` (and only read by it). Never
            pass private training data here: nothing accounts for it.
    """
    layers = gemm_modules(model)
    if not layers:
        raise ConfigError("model", type(model).__name__, "a model with Linear/Conv2d layers to prune")
    state = PruneState(cfg=cfg)
    if cfg.method == "synflow":
        if input_shape is None:
            raise ConfigError("input_shape", None, "the per-example input shape, e.g. (1, 8, 8), for synflow")
        all_scores = synflow_scores(model, input_shape)
    elif cfg.method in DATA_DEPENDENT_PRUNE_METHODS:
        if public is None or len(public[1]) == 0:
            raise ConfigError("prune.method", cfg.method, "a data-free method (random, magnitude, synflow) unless "
                              "a public split is given (public_fraction > 0): a data-dependent criterion on the "
                              "private training set would read private data that no epsilon accounts for")
        all_scores = snip_scores(model, public[0], public[1])
    last = layers[-1][0]
    for li, (name, m) in enumerate(layers):
        w = m.weight
        c_out = w.shape[0]
        if cfg.method == "random":
            g = _seeded(seed, li)
            shape = (c_out,) if cfg.structure == "channel" else tuple(w.shape)
            scores = torch.rand(shape, generator=g)
        elif cfg.method == "magnitude":
            scores = w.detach().abs().float().cpu()
        else:
            scores = all_scores[name].cpu()
        wmask = torch.ones(w.shape, dtype=torch.bool)
        kept_frac = 1.0
        if cfg.structure == "unstructured":
            k = _round_count(cfg.sparsity, w.numel())
            flat = wmask.view(-1)
            flat[_lowest(scores.reshape(-1), k)] = False
            state.masks[f"{name}.weight"] = wmask
        else:
            if scores.shape != (c_out,):
                scores = scores.reshape(c_out, -1).sum(dim=1)  # channel score: L1 / summed saliency
            k = 0 if name == last else min(_round_count(cfg.sparsity, c_out), c_out - 1)
            pruned = _lowest(scores, k)
            wmask[pruned] = False
            kept_frac = (c_out - k) / c_out
            state.masks[f"{name}.weight"] = wmask
            if m.bias is not None:
                bmask = torch.ones(m.bias.shape, dtype=torch.bool)
                bmask[pruned] = False
                state.masks[f"{name}.bias"] = bmask
        state.kept_channel_fraction[name] = kept_frac
        state.density[name] = float(wmask.float().mean())
    state.reapply(model)
    return state


class GradDropper:
    """Per-step gradient-coordinate masks (True = kept), chosen without private data.

    ``masks(model, step, base=None)`` returns {parameter: bool tensor} for every trainable parameter; with
    ``base`` (e.g. ``PruneState.param_masks``) only its True coordinates are eligible and ``keep`` is a share of
    those. ``random`` masks are a pure function of (seed, step, parameter index), so a resumed run gets the
    same masks; ``magnitude`` keeps the largest |w| of each parameter at the current weights.
    """

    def __init__(self, cfg: DropConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = int(seed)

    def masks(
        self, model: nn.Module, step: int, base: Mapping[nn.Parameter, torch.Tensor] | None = None
    ) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = {}
        module = _unwrap(model)
        for pi, (_, p) in enumerate(module.named_parameters()):
            if not p.requires_grad:
                continue
            eligible = torch.ones(p.shape, dtype=torch.bool)
            if base is not None and p in base:
                eligible = base[p].detach().cpu().bool().clone()
            idx = eligible.view(-1).nonzero().squeeze(1)
            n = int(idx.numel())
            k = min(n, max(1, _round_count(self.cfg.keep, n))) if n else 0
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            if k == n:
                mask[idx] = True
            elif self.cfg.method == "random":
                g = _seeded(self.seed, step, pi)
                mask[idx[torch.randperm(n, generator=g)[:k]]] = True
            else:
                mag = p.detach().abs().float().cpu().view(-1)[idx]
                mask[idx[torch.argsort(mag, descending=True, stable=True)[:k]]] = True
            out[p] = mask.view(p.shape).to(p.device)
        return out

