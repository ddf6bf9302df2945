"""Cost model: accelerator profiles + roofline time, energy and dollars of DP training steps and runs.

>>> from dpquant_sim.cost import get_profile
>>> get_profile("h100_sxm").resolve("fp4")
'fp8'
"""

from dpquant_sim.cost.flops import MemoryFit, Op, memory_bytes, step_ops
from dpquant_sim.cost.model import (
    CostEstimate, Speedup, StepCost, estimate, estimate_all, op_time, paper_formula, share_for_speedup, step_cost,
)
from dpquant_sim.cost.profiles import (
    PRECISIONS, HardwareProfile, get_profile, load_profile_file, load_profiles, parse_profile,
)
from dpquant_sim.cost.run import build_shapes, cost_run
from dpquant_sim.cost.sweep import SweepResult, sweep

__all__ = [
    "PRECISIONS", "CostEstimate", "HardwareProfile", "MemoryFit", "Op", "Speedup", "StepCost", "SweepResult",
    "build_shapes", "cost_run", "estimate", "estimate_all", "get_profile", "load_profile_file", "load_profiles",
    "memory_bytes", "op_time", "paper_formula", "parse_profile", "share_for_speedup", "step_cost", "step_ops",
    "sweep",
]
