"""Analysis of sweep results: Pareto frontiers, quantization-variance studies, plotly figures, HTML report.

>>> from dpquant_sim.analysis import pareto_mask
>>> pareto_mask([1, 2], [2, 1]).tolist()
[True, True]
"""

from dpquant_sim.analysis.pareto import aggregate_seeds, pareto_front, pareto_mask, seed_frontier

__all__ = ["aggregate_seeds", "pareto_front", "pareto_mask", "seed_frontier", "build_report"]


def build_report(*args, **kwargs):
    """See :func:`dpquant_sim.analysis.report.build_report` (imported lazily: plotly is heavy)."""
    from dpquant_sim.analysis.report import build_report as _build

    return _build(*args, **kwargs)
