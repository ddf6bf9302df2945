"""dpquant_sim.numerics: bit-exact low-precision formats, rounding, scaling and the STE autograd Function.

>>> import torch
>>> from dpquant_sim.numerics import quantize, quantize_scaled
>>> quantize(torch.tensor([1.3]), "fp4_e2m1").item()
1.5
"""

from dpquant_sim.numerics.formats import FORMATS, FloatFormat, Format, IntFormat, get_format
from dpquant_sim.numerics.quantize import quantize, set_default_backend
from dpquant_sim.numerics.scaling import SCALINGS, quantize_scaled
from dpquant_sim.numerics.spec import QuantSpec
from dpquant_sim.numerics.ste import FakeQuantize, fake_quantize

__all__ = [
    "FORMATS", "FloatFormat", "IntFormat", "Format", "get_format", "quantize", "set_default_backend",
    "quantize_scaled", "SCALINGS", "fake_quantize", "FakeQuantize", "QuantSpec",
]
