"""Random rotation: each epoch a uniformly random subset meeting the budget (no priorities).

Every layer gets inclusion probability pi_l = b (the capped-proportional rule of ``budget`` with uniform
weights), drawn by randomized systematic sampling, so the expected quantized share is exactly b in either
budget unit, and with ``budget_unit='layers'`` and integer b*L the set is a uniform random b*L-subset.

``hold_epochs`` R > 1 keeps each draw for R epochs (draws at epochs 0, R, 2R, ...): every layer still has
inclusion probability b in every epoch, but layers switch precision R times less often.

``pattern='alternate'`` is the opposite extreme of holding: ONE uniformly random set S of share 2b (inclusion
probability 2b for every layer, drawn once on the first call) is quantized every other epoch (epochs e with
(e + ``alternate_phase``) even) and nothing is quantized in between, so every layer of S switches precision every
epoch while the time-averaged share stays b. It needs b <= 0.5 and ``hold_epochs`` 1 (ConfigError otherwise).
Its plans record the epoch's inclusion probabilities (2b on an "on" epoch, 0 on an "off" one) and
``info.on``. Together, hold for the whole run / redraw every epoch / alternate are the switching ablation
(analysis/sweeps/switching.yaml, docs/results.md "Switching precision").

The schedule owns its random stream (seeded from ``ctx.rng`` on the first call and kept in
``state_dict``) so a resumed run draws the same sets.

>>> import numpy as np
>>> from dpquant_sim.schedules.base import LayerInfo, ScheduleContext
>>> from dpquant_sim.schedules.configs import RandomConfig
>>> layers = [LayerInfo(f"l{i}", 100) for i in range(4)]
>>> s = RandomRotationSchedule(RandomConfig(budget=0.5, budget_unit="layers"))
>>> len(s.plan(ScheduleContext(0, 1, layers, "fp8", np.random.default_rng(1))).quantized)
2
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpquant_sim.errors import ConfigError
from dpquant_sim.plan import EpochPlan
from dpquant_sim.schedules.base import ScheduleContext
from dpquant_sim.schedules.budget import (
    build_plan, draw_subset, expected_share, inclusion_probabilities, layer_sizes, realized_share,
)
from dpquant_sim.schedules.configs import RandomConfig
from dpquant_sim.schedules.registry import register_schedule


class OwnRng:
    """A numpy Generator seeded once from the context's RNG, whose state travels in state_dict."""

    def __init__(self) -> None:
        self._rng: np.random.Generator | None = None

    def rng(self, ctx: ScheduleContext) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(int(ctx.rng.integers(0, 2**63 - 1)))
        return self._rng

    def rng_state(self) -> dict[str, Any] | None:
        return None if self._rng is None else self._rng.bit_generator.state

    def load_rng_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self._rng = None
            return
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state


@register_schedule("random")
class RandomRotationSchedule(OwnRng):
    """Uniform probabilistic rotation: pi_l = b for every layer."""

    def __init__(self, cfg: RandomConfig):
        super().__init__()
        self.cfg = cfg
        self.held: list[str] | None = None  # the current draw's quantized layers (kept for hold_epochs)
        if cfg.pattern == "alternate":
            if cfg.budget > 0.5:
                raise ConfigError("schedule.budget", cfg.budget, "at most 0.5 with pattern='alternate' (its set, "
                                  "quantized every other epoch, has share 2 x budget)")
            if cfg.hold_epochs != 1:
                raise ConfigError("schedule.hold_epochs", cfg.hold_epochs, "1 with pattern='alternate' (the set is "
                                  "drawn once and alternates on and off every epoch)")

    def plan(self, ctx: ScheduleContext) -> EpochPlan:
        if self.cfg.pattern == "alternate":
            return self._plan_alternate(ctx)
        names = [layer.name for layer in ctx.layers]
        sizes = layer_sizes([layer.flops for layer in ctx.layers], self.cfg.budget_unit)
        pi = inclusion_probabilities(np.ones(len(names)), sizes, self.cfg.budget)
        redraw = self.held is None or ctx.epoch % self.cfg.hold_epochs == 0 or not set(self.held) <= set(names)
        if redraw:
            mask = draw_subset(pi, self.rng(ctx))
            self.held = [n for n, m in zip(names, mask) if m]
        else:
            held = set(self.held)
            mask = np.array([n in held for n in names])
        info = {"schedule": "random", "budget": self.cfg.budget, "budget_unit": self.cfg.budget_unit,
                "expected_share": expected_share(pi, sizes), "realized_share": realized_share(mask, sizes),
                "redrawn": bool(redraw)}
        return build_plan(ctx, mask, probs={n: float(p) for n, p in zip(names, pi)}, info=info)

    def _plan_alternate(self, ctx: ScheduleContext) -> EpochPlan:
        names = [layer.name for layer in ctx.layers]
        sizes = layer_sizes([layer.flops for layer in ctx.layers], self.cfg.budget_unit)
        pi_set = inclusion_probabilities(np.ones(len(names)), sizes, min(1.0, 2.0 * self.cfg.budget))
        drawn = self.held is None or not set(self.held) <= set(names)
        if drawn:
            self.held = [n for n, m in zip(names, draw_subset(pi_set, self.rng(ctx))) if m]
        on = (ctx.epoch + self.cfg.alternate_phase) % 2 == 0
        held = set(self.held)
        mask = np.array([on and n in held for n in names], dtype=bool)
        pi = pi_set if on else np.zeros(len(names))
        info = {"schedule": "random", "pattern": "alternate", "budget": self.cfg.budget,
                "budget_unit": self.cfg.budget_unit, "on": bool(on), "alternate_set": sorted(held),
                "expected_share": expected_share(pi, sizes), "realized_share": realized_share(mask, sizes),
                "redrawn": bool(drawn)}
        return build_plan(ctx, mask, probs={n: float(p) for n, p in zip(names, pi)}, info=info)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng_state(), "held": self.held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_rng_state(state.get("rng"))
        held = state.get("held")
        self.held = None if held is None else [str(n) for n in held]
