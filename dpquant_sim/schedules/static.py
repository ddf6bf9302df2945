"""Static schedules: fp32 (nothing quantized), static-all, static-subset (a fixed set chosen once).

static-subset selects with ``budget.greedy_subset`` (first / last / largest-FLOP layers until the share
reaches the budget, rounding up) or takes ``layers`` verbatim (``select='named'``; unknown names are a
ConfigError). The subset never changes between epochs; the plan records its actual FLOP share.

``select='random'`` (the DPQuant paper's static baseline, reported there as mean +- std over random subsets):
the layers in a uniformly random order (a permutation from ``subset_seed``, or, when it is None, from a seed
drawn once from the run's schedule RNG), then the prefix of that order whose share is nearest the budget
(``greedy_subset``'s rule). With ``budget_unit='layers'`` that is a uniformly random set of
round(budget x n) layers (halves up, at least one); with ``'flops'`` a random set whose FLOP share is as near
the budget as that order allows. The set is drawn on the first plan and kept in ``state_dict`` (resume).

>>> import numpy as np
>>> from dpquant_sim.schedules.base import LayerInfo, ScheduleContext
>>> from dpquant_sim.schedules.configs import StaticSubsetConfig
>>> ctx = ScheduleContext(epoch=0, epochs=1, layers=[LayerInfo("a", 10), LayerInfo("b", 30)], recipe="fp4",
...                       rng=np.random.default_rng(0))
>>> StaticSubsetSchedule(StaticSubsetConfig(budget=0.5, select="largest")).plan(ctx).quantized
{'b': 'fp4'}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpquant_sim.errors import ConfigError
from dpquant_sim.plan import EpochPlan
from dpquant_sim.schedules.base import ScheduleContext
from dpquant_sim.schedules.budget import build_plan, greedy_subset, layer_sizes
from dpquant_sim.schedules.configs import Fp32Config, StaticAllConfig, StaticSubsetConfig
from dpquant_sim.schedules.registry import register_schedule


class _Stateless:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@register_schedule("fp32")
class Fp32Schedule(_Stateless):
    """Full precision every epoch (the baseline): an empty plan."""

    def __init__(self, cfg: Fp32Config | None = None):
        self.cfg = cfg or Fp32Config()

    def plan(self, ctx: ScheduleContext) -> EpochPlan:
        return build_plan(ctx, np.zeros(len(ctx.layers), dtype=bool), info={"schedule": "fp32"})


@register_schedule("static-all")
class StaticAllSchedule(_Stateless):
    """Every quantizable layer in ``ctx.recipe`` every epoch."""

    def __init__(self, cfg: StaticAllConfig | None = None):
        self.cfg = cfg or StaticAllConfig()

    def plan(self, ctx: ScheduleContext) -> EpochPlan:
        return build_plan(ctx, np.ones(len(ctx.layers), dtype=bool), info={"schedule": "static-all"})


@register_schedule("static-subset")
class StaticSubsetSchedule:
    """A fixed subset: the first / last / largest-FLOP layers whose share is nearest the budget, or named layers."""

    def __init__(self, cfg: StaticSubsetConfig):
        self.cfg = cfg
        self.chosen: list[str] | None = None  # select='random': the drawn set (kept for the whole run)
        if cfg.select == "named" and not cfg.layers:
            raise ConfigError("schedule.layers", cfg.layers, "at least one layer name when select='named'")

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen} if self.chosen is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        chosen = state.get("chosen")
        self.chosen = None if chosen is None else [str(n) for n in chosen]

    def select(self, ctx: ScheduleContext) -> list[str]:
        """The layer names this schedule quantizes for the given model's layers."""
        names = [layer.name for layer in ctx.layers]
        if self.cfg.select == "random":
            if self.chosen is None or not set(self.chosen) <= set(names):
                seed = self.cfg.subset_seed
                if seed is None:
                    seed = int(ctx.rng.integers(0, 2**63 - 1))
                perm = np.random.default_rng(seed).permutation(len(names))
                sizes = layer_sizes([layer.flops for layer in ctx.layers], self.cfg.budget_unit)
                picked = set(greedy_subset([names[i] for i in perm], sizes[perm], self.cfg.budget, order="first"))
                self.chosen = [n for n in names if n in picked]
            return list(self.chosen)
        if self.cfg.select == "named":
            unknown = [n for n in self.cfg.layers if n not in names]
            if unknown:
                raise ConfigError("schedule.layers", unknown, names)
            return [n for n in names if n in set(self.cfg.layers)]
        sizes = layer_sizes([layer.flops for layer in ctx.layers], self.cfg.budget_unit)
        return greedy_subset(names, sizes, self.cfg.budget, order=self.cfg.select)

    def plan(self, ctx: ScheduleContext) -> EpochPlan:
        chosen = set(self.select(ctx))
        mask = np.array([layer.name in chosen for layer in ctx.layers], dtype=bool)
        info = {"schedule": "static-subset", "select": self.cfg.select, "budget": self.cfg.budget,
                "budget_unit": self.cfg.budget_unit}
        if self.cfg.select == "random":
            info["subset_seed"] = self.cfg.subset_seed
        return build_plan(ctx, mask, info=info)
