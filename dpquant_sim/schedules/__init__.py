"""dpquant_sim.schedules: which layers run in low precision, each epoch.

``build_schedule(cfg)`` turns a typed config (``configs.ScheduleConfig``, or a dict with ``kind``) into a
schedule whose ``plan(ctx)`` returns the epoch's ``EpochPlan``. Kinds: fp32, static-all, static-subset,
random, dpquant. All budgeted kinds share ``budget`` semantics (see ``budget``): equal budgets mean equal
expected quantized compute. ``prune_drop`` holds pre-pruning and gradient dropping (arXiv 2306.11754).

>>> from dpquant_sim.schedules import build_schedule, SCHEDULE_KINDS
>>> sorted(SCHEDULE_KINDS)
['dpquant', 'fp32', 'random', 'static-all', 'static-subset']
"""

from dpquant_sim.schedules import configs
from dpquant_sim.schedules.configs import SCHEDULE_KINDS
from dpquant_sim.schedules.registry import build_schedule, parse_schedule_config, register_schedule

__all__ = ["build_schedule", "parse_schedule_config", "register_schedule", "SCHEDULE_KINDS", "configs"]
