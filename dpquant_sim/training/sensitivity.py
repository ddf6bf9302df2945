"""Per-example loss deltas for DPQuant's sensitivity estimator (DESIGN.md section 1).

``make_loss_delta_fn(model, dataset, ...)`` returns the ``LossDeltaFn`` that a ``ScheduleContext`` carries:

    fn(layer_names, sample_rate, generator) -> (d, n_expected)

It draws a Poisson sample of ``dataset`` (each example independently with probability ``sample_rate``, from
``generator``: the same sampling Opacus uses for DP-SGD, which is what the subsampled Gaussian accounting
assumes), and returns ``d[i, l] = loss(x_i; only layer l quantized with recipe) - loss(x_i; full precision)``
(float64 tensor [n, L], rows in sample order) and ``n_expected = sample_rate * len(dataset)``.

Why it is DP-safe: forward only, in eval mode and under no_grad; losses are per example
(``reduction='none'``), and every quantizer in the supported recipes scales activations per sample or per
block within a sample (``apply_plan(..., dp=True)`` refuses anything else), so row i depends on example i
only. The privatisation (per-row clipping, noise, accounting) is the schedule's job
(``dpquant_sim.schedules.dpquant``). The model's current precision plan and train/eval mode are restored
afterwards, also on error. An Opacus ``GradSampleModule`` (or anything with ``_module``) is unwrapped; layer
names may carry ``_module.`` prefixes.

Cost: (L + 1) forward passes over about q*N examples per estimate.

>>> import torch
>>> from torch.utils.data import TensorDataset
>>> from dpquant_sim.nn import convert_model                                # doctest: +SKIP
>>> model = convert_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))  # doctest: +SKIP
>>> data = TensorDataset(torch.randn(100, 4), torch.randint(0, 3, (100,)))  # doctest: +SKIP
>>> fn = make_loss_delta_fn(model, data, recipe="fp4")                      # doctest: +SKIP
>>> d, n_exp = fn(["1"], 0.5, torch.Generator().manual_seed(0))             # doctest: +SKIP
>>> d.shape[1], n_exp                                                       # doctest: +SKIP
(1, 50.0)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from dpquant_sim.errors import ConfigError, DPSafetyError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_PREFIX = "_module."


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus wrappers (GradSampleModule, DPDDP): follows ``._module``."""
    while isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module
    return model


def strip_prefix(name: str) -> str:
    """'_module._module.fc1' -> 'fc1' (names as the unwrapped model sees them)."""
    while name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    return name


def resolve_layers(model: nn.Module, layer_names: Sequence[str]) -> tuple[nn.Module, list[str], list[str]]:
    """(unwrapped model, all its quantizable layer names, ``layer_names`` without wrapper prefixes); an unknown
    name is a ConfigError listing the model's layers."""
    from dpquant_sim.nn.convert import quantizable_layers

    module = unwrap_model(model)
    all_layers = list(quantizable_layers(module))
    names = [strip_prefix(n) for n in layer_names]
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise ConfigError("layer_names", unknown, all_layers)
    return module, all_layers, names


def poisson_indices(n_total: int, sample_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Indices (CPU, ascending) of a Poisson sample of ``n_total`` examples: each independently with probability
    ``sample_rate``, as Opacus's sampler (one uniform per example from ``generator``, so a dataset with one example
    fewer at the end sees the same draws for every other example)."""
    if not (0.0 < float(sample_rate) <= 1.0):
        raise ConfigError("sample_rate", sample_rate, "a rate in (0, 1]")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keep = torch.rand(n_total, generator=generator, device=gen_device) < float(sample_rate)
    return keep.nonzero().squeeze(1).cpu()


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example (reduction='none'), in float32."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def _gather(dataset: Dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0], dataset.tensors[1]
        return x[idx], y[idx]
    items = [dataset[int(i)] for i in idx]
    if not items:
        x0, y0 = dataset[0]
        return torch.empty((0, *torch.as_tensor(x0).shape)), torch.empty((0,), dtype=torch.as_tensor(y0).dtype)
    xs, ys = zip(*items)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)


def make_loss_delta_fn(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: LossFn | None = None,
    recipe: Any = "fp4",
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    dp: bool = True,
) -> Callable[[Sequence[str], float, torch.Generator], tuple[torch.Tensor, float]]:
    """Build the loss-delta callable for ``ScheduleContext.loss_deltas``.

    Args:
        model: the (converted) model being trained; may be wrapped in an Opacus GradSampleModule.
        dataset: the PRIVATE training set (x, y pairs; a TensorDataset is gathered without copies per item).
        loss_fn: per-example loss ``(logits, y) -> [B]`` tensor; default cross-entropy with reduction='none'.
            A loss that returns a scalar (a batch mean) is refused: it would mix examples before clipping.
        recipe: the recipe the schedule quantizes with (name or LayerQuantConfig).
        device: where the forward passes run.
        batch_size: examples per forward pass (memory only; results do not depend on it).
        dp: passed to ``apply_plan`` (True refuses recipes whose activation scale mixes examples).
    """
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "an integer >= 1")
    loss = loss_fn or per_example_cross_entropy
    n_total = len(dataset)  # type: ignore[arg-type]
    if n_total == 0:
        raise ConfigError("dataset", "empty", "a non-empty private training set")

    def loss_deltas(
        layer_names: Sequence[str], sample_rate: float, generator: torch.Generator
    ) -> tuple[torch.Tensor, float]:
        from dpquant_sim.nn import apply_plan
        from dpquant_sim.nn.config import get_recipe

        cfg = get_recipe(recipe)
        module, all_layers, names = resolve_layers(model, layer_names)
        idx = poisson_indices(n_total, sample_rate, generator)
        n = int(idx.numel())
        out = torch.zeros((n, len(names)), dtype=torch.float64)
        if n == 0:
            return out, float(sample_rate) * n_total

        saved = {name: module.get_submodule(name).qconfig for name in all_layers}
        was_training = module.training
        full = {name: None for name in all_layers}
        x_all, y_all = _gather(dataset, idx)
        batches = [
            (x_all[s:s + batch_size].to(device), y_all[s:s + batch_size].to(device))
            for s in range(0, n, batch_size)
        ]

        def losses() -> torch.Tensor:
            parts = []
            for xb, yb in batches:
                lb = loss(module(xb), yb)
                if lb.ndim != 1 or lb.shape[0] != xb.shape[0]:
                    raise DPSafetyError(
                        f"loss_fn returned shape {tuple(lb.shape)} for a batch of {xb.shape[0]}: the sensitivity "
                        "estimator needs one loss per example (reduction='none'); a batch mean mixes examples "
                        "before clipping, so the estimator's sensitivity bound would not hold."
                    )
                parts.append(lb.detach().to("cpu", torch.float64))
            return torch.cat(parts)

        try:
            module.eval()
            with torch.no_grad():
                apply_plan(module, full, dp=dp)
                base = losses()
                for j, name in enumerate(names):
                    apply_plan(module, {**full, name: cfg}, dp=dp)
                    out[:, j] = losses() - base
        finally:
            for name, qc in saved.items():  # the exact previous configs, whatever mode set them
                module.get_submodule(name).qconfig = qc
            module.train(was_training)
        return out, float(sample_rate) * n_total

    return loss_deltas
