"""dpquant-sim: hardware simulation and cost modeling for DP training with dynamic quantization scheduling.

Data flows one way (see docs/architecture.md):
numerics -> nn -> training <- schedules -> results -> cost -> analysis.
"""

__version__ = "0.1.0"
