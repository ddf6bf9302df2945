"""dpquant_sim.nn: quantized layers, their Opacus grad samplers, model conversion and plans.

>>> import torch
>>> from torch import nn
>>> import dpquant_sim.nn as qnn
>>> m = qnn.convert_model(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), seed=0)
>>> qnn.apply_plan(m, {"0": "fp8"})
{'0': 'fp8', '2': None}
"""

from dpquant_sim.nn import clip_ops  # noqa: F401  (registers the Opacus norm samplers)
from dpquant_sim.nn import grad_samplers  # noqa: F401  (registers the Opacus grad samplers)
from dpquant_sim.nn.convert import (
    apply_plan,
    convert_model,
    generator_states,
    quantizable_layers,
    quantization_state,
    set_generator_states,
    set_generators,
)
from dpquant_sim.nn.layers import QConv2d, QLinear

__all__ = [
    "QLinear",
    "QConv2d",
    "convert_model",
    "quantizable_layers",
    "apply_plan",
    "set_generators",
    "generator_states",
    "set_generator_states",
    "quantization_state",
]
