"""The schedule interface: each epoch, a schedule turns a context into an EpochPlan.

A schedule never touches numerics; it sees layer names and FLOPs, a seeded RNG, and (for dpquant only) a
callable that evaluates per-example losses with a given layer quantized, plus the privacy ledger so that
its own use of private data is accounted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from dpquant_sim.plan import EpochPlan


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: its name and forward GEMM FLOPs per example."""

    name: str
    flops: int


class PrivacyLedgerLike(Protocol):
    """What a schedule may do with the run's accountant (see dpquant_sim.training.accounting)."""

    def add_mechanism(self, name: str, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None: ...

    def epsilon(self) -> float: ...


# loss_deltas(layer_names, sample_rate, generator) -> (per-example deltas tensor [n, L], n_expected)
# d[i, l] = loss(x_i; only layer l quantized) - loss(x_i; full precision), on a Poisson sample of the private
# training set drawn with the given rate. Provided by the training engine; only dpquant calls it.
LossDeltaFn = Callable[[Sequence[str], float, "Any"], "tuple[Any, float]"]


@dataclass
class ScheduleContext:
    """Everything a schedule may read when planning an epoch."""

    epoch: int
    epochs: int
    layers: Sequence[LayerInfo]
    recipe: str
    rng: np.random.Generator
    private: bool = True
    ledger: PrivacyLedgerLike | None = None
    loss_deltas: LossDeltaFn | None = None
    torch_generator: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Schedule(Protocol):
    """Plans one epoch at a time; may keep state across epochs (e.g. an EMA of scores)."""

    def plan(self, ctx: ScheduleContext) -> EpochPlan: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
