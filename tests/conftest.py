"""Test-wide settings.

The quantizer's default backend is "auto" (torch.compile'd kernels for large tensors). Tests pin the eager
backend so that no test pays a cold compile (5-17 s per format variant) by accident; the compiled and auto
paths are tested explicitly (tests/test_numerics_quantize.py), bit for bit against eager.
"""

import os

os.environ.setdefault("DPQUANT_QUANT_BACKEND", "torch")
