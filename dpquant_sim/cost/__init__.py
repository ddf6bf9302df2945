"""Cost model: accelerator profiles + roofline time, energy and dollars of DP training steps and runs.

>>> from dpquant_sim.cost import get_profile
>>> get_profile("h100_sxm").resolve("fp4")
'fp8'

Names are imported on first use (PEP 562), so reading profiles (``dpquant-sim hw list``) never imports
torch, opacus or pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "MemoryFit": "flops", "Op": "flops", "memory_bytes": "flops", "step_ops": "flops",
    "CostEstimate": "model", "Speedup": "model", "StepCost": "model", "estimate": "model",
    "estimate_all": "model", "op_time": "model", "paper_formula": "model", "share_for_speedup": "model",
    "step_cost": "model",
    "PRECISIONS": "profiles", "HardwareProfile": "profiles", "get_profile": "profiles",
    "load_profile_file": "profiles", "load_profiles": "profiles", "parse_profile": "profiles",
    "build_shapes": "run", "cost_run": "run",
}

# Eager: "sweep" is both a submodule and a function; importing it here binds the function for good (numpy only).
from dpquant_sim.cost.sweep import SweepResult, sweep  # noqa: E402

__all__ = sorted([*_EXPORTS, "SweepResult", "sweep"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpquant_sim.cost' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dpquant_sim.cost.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
