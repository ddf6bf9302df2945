"""Sweeps: a typed grid of training runs, run on a process pool or Ray, resumable, collected into one table.

>>> from dpquant_sim.sweep import SweepConfig
>>> cfg = SweepConfig.from_dict({"base": {"model": "mlp", "epochs": 1}, "grid": {"seed": [0, 1]}})
>>> len(cfg.points())
2
"""

from dpquant_sim.sweep.collect import collect_sweep, load_table
from dpquant_sim.sweep.config import ExecutorConfig, SweepConfig, SweepPoint
from dpquant_sim.sweep.runner import SweepResult, run_sweep, train_point

__all__ = [
    "ExecutorConfig", "SweepConfig", "SweepPoint", "SweepResult", "collect_sweep", "load_table", "run_sweep",
    "train_point",
]
