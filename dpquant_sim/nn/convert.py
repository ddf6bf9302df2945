"""Convert a model to Q layers, switch layers' precision by plan, and manage stochastic-rounding generators.

Layer names are those of ``model.named_modules()`` of the *unwrapped* model: an Opacus ``GradSampleModule``
(names prefixed ``_module.``) or a ``torch.compile`` wrapper (``_orig_mod.``) is looked through, so the same
plan works before and after ``PrivacyEngine.make_private``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dpquant_sim.plan import EpochPlan
    >>> m = convert_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)), seed=1)
    >>> quantizable_layers(m)
    ['0', '2']
    >>> apply_plan(m, EpochPlan(epoch=0, quantized={"2": "fp8"}))
    {'0': None, '2': 'fp8'}
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from dpquant_sim.errors import ConfigError, DPSafetyError
from dpquant_sim.nn.config import LayerQuantConfig, get_recipe
from dpquant_sim.nn.layers import QUANT_LAYER_TYPES, QConv2d, QLinear
from dpquant_sim.plan import EpochPlan

PlanLike = EpochPlan | Mapping[str, "str | LayerQuantConfig | None"]


def _unwrap(model: nn.Module) -> nn.Module:
    """Look through Opacus GradSampleModule and torch.compile wrappers."""
    from opacus.grad_sample.gsm_base import AbstractGradSampleModule

    while True:
        if isinstance(model, AbstractGradSampleModule):
            model = model._module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _q_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, QUANT_LAYER_TYPES)]


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the QLinear/QConv2d layers, in module registration order (``named_modules`` order).

    (Call order, for FLOP counting, is ``dpquant_sim.nn.shapes.gemm_layers``.)
    """
    return [n for n, _ in _q_layers(model)]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", seed, "a non-negative integer")
    return int(seed)


def layer_seed(seed: int, index: int) -> int:
    """Seed of the index-th quantizable layer's generator: SeedSequence([seed, index]) -> 64-bit int."""
    return int(np.random.SeedSequence([_check_seed(seed), index]).generate_state(1, dtype=np.uint64)[0])


def _to_q(m: nn.Module) -> nn.Module:
    """A Q layer that *shares* m's Parameter objects (so optimizers and references stay valid)."""
    if type(m) is nn.Linear:
        q: nn.Module = QLinear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    else:
        q = QConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                    padding_mode=m.padding_mode, device="meta")
    q.weight = m.weight
    if m.bias is not None:
        q.bias = m.bias
    q.train(m.training)
    return q


def convert_model(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` by QLinear/QConv2d, full precision, same weights.

    In place: the submodules of ``model`` are swapped and the new layers share the original Parameter
    objects (no copy; an optimizer built before still holds the right tensors); the model is returned. If
    ``model`` itself is a Linear/Conv2d, a new Q layer is returned. Only exact ``nn.Linear``/``nn.Conv2d``
    are converted (subclasses such as MultiheadAttention's out_proj, which is applied via F.linear on its
    weight, are left alone); hooks registered on a replaced module are not carried over. Existing Q layers
    are kept. Every Q layer then gets its own generator seeded from (seed, its index in
    ``quantizable_layers``), on the device of its weight.

    Args:
        model: any nn.Module (typically before ``PrivacyEngine.make_private``).
        seed: non-negative int; same seed, same stochastic rounding draws.
    """
    _check_seed(seed)
    if type(model) in (nn.Linear, nn.Conv2d):
        model = _to_q(model)
    else:
        done: dict[int, nn.Module] = {}  # a module registered under two parents becomes one Q module
        for parent in list(model.modules()):
            for child_name, child in list(parent._modules.items()):  # named_children() skips repeats
                if type(child) in (nn.Linear, nn.Conv2d):
                    if id(child) not in done:
                        done[id(child)] = _to_q(child)
                    setattr(parent, child_name, done[id(child)])
    set_generators(model, seed)
    return model


def set_generators(model: nn.Module, seed: int) -> None:
    """(Re)seed every Q layer's stochastic-rounding generator from (seed, layer index), on its weight's device."""
    _check_seed(seed)
    for i, (_, m) in enumerate(_q_layers(model)):
        g = torch.Generator(device=m.weight.device)
        g.manual_seed(layer_seed(seed, i))
        m.generator = g


def generator_states(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: generator state (uint8 CPU tensor)} for checkpoints (loadable with weights_only=True)."""
    return {n: m.generator.get_state() for n, m in _q_layers(model) if m.generator is not None}


def set_generator_states(model: nn.Module, states: Mapping[str, torch.Tensor]) -> None:
    """Restore generator states saved by :func:`generator_states` so stochastic rounding continues exactly.

    The saved layers must be exactly the model's layers with generators (after ``convert_model``, all).
    """
    layers = dict(_q_layers(model))
    expected = sorted(n for n, m in layers.items() if m.generator is not None) or sorted(layers)
    if sorted(states) != expected:
        raise ConfigError("generator states layers", sorted(states), f"exactly the layers {expected}")
    for name, state in states.items():
        m = layers[name]
        if m.generator is None:
            m.generator = torch.Generator(device=m.weight.device)
        m.generator.set_state(state)


def quantization_state(model: nn.Module) -> dict[str, str | None]:
    """{layer name: recipe name of its current config, or None for full precision}."""
    return {n: (m.qconfig.name if m.qconfig is not None else None) for n, m in _q_layers(model)}


def _resolve(name: str, value: object) -> LayerQuantConfig | None:
    if value is None or isinstance(value, LayerQuantConfig):
        return value
    if isinstance(value, str):
        return get_recipe(value)
    raise ConfigError(f"plan[{name!r}]", value, "a recipe name, a LayerQuantConfig or None")


def apply_plan(model: nn.Module, plan: PlanLike, *, dp: bool = True) -> dict[str, str | None]:
    """Switch layers between full precision and quantized configs; only flips state (no new modules).

    Args:
        model: a converted model (or its GradSampleModule / compiled wrapper).
        plan: an ``EpochPlan`` -- layers in ``plan.quantized`` get their recipe, every other quantizable layer
            goes to full precision -- or a mapping ``{layer: recipe name | LayerQuantConfig | None}`` that
            changes only the named layers.
        dp: refuse (DPSafetyError) any config whose activation or gradient scale is batch-wide.

    Returns the resulting {layer: recipe name or None}. Validates everything before changing anything.
    Raises ConfigError for an unknown layer (listing the known ones) or recipe.
    """
    layers = dict(_q_layers(model))
    if isinstance(plan, EpochPlan):
        requested: Mapping[str, object] = plan.quantized
        changes: dict[str, object] = {n: plan.quantized.get(n) for n in layers}
    elif isinstance(plan, Mapping):
        requested = changes = dict(plan)
    else:
        raise ConfigError("plan", type(plan).__name__, "an EpochPlan or a mapping {layer: recipe | None}")
    known = tuple(layers) if layers else "a quantizable layer name (none found: call convert_model first)"
    for name in requested:
        if name not in layers:
            raise ConfigError("plan layer", name, known)
    resolved = {n: _resolve(n, v) for n, v in changes.items()}
    if dp:
        for n, cfg in resolved.items():
            if cfg is not None:
                try:
                    cfg.check_dp_safe()
                except DPSafetyError as e:
                    raise DPSafetyError(f"layer {n!r}: {e}") from e
    for n, cfg in resolved.items():
        layers[n].qconfig = cfg
    return quantization_state(model)
