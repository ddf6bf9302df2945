"""Optional backend: the qtorch package's quantizers (``quantize(..., backend="qtorch")``).

For users who want qtorch's conventions or to compare against published qtorch-based results. qtorch is
imported lazily (it compiles a C++ extension on first import, ~45 s; ``TORCH_EXTENSIONS_DIR`` caches it).

Known differences from the OCP/IEEE formats of the default backend (tested as differences in
tests/test_numerics_qtorch.py):

* rounding to nearest breaks ties away from zero (qtorch adds half an ulp and truncates), not to even;
* no inf/NaN codes: the top exponent is an ordinary binade, so fp8_e4m3's max is 480 (S.1111.111, the
  e4m3fn NaN code) and fp8_e5m2's is 114688; +-inf and NaN become +-max; values above max saturate;
* stochastic rounding draws from the C library's ``rand()``: no torch.Generator, not reproducible by seed
  (the ``generator`` argument is ignored);
* int formats use ``fixed_point_quantize`` (symmetric clamp to +-qmax); there qtorch rounds ties to even
  (``nearbyint``), like the default backend;
* subnormal ties also go away from zero (e4m3: 2^-10 -> 2^-9, ours -> 0).

Example (needs qtorch):
    >>> quantize(torch.tensor([470.0, 1.25]), "fp8_e4m3", backend="qtorch")  # doctest: +SKIP
    tensor([480.0000, 1.2500])
    >>> quantize(torch.tensor([1.25]), "fp4_e2m1", backend="qtorch")  # tie away from zero  # doctest: +SKIP
    tensor([1.5000])
"""

from __future__ import annotations

import torch

from dpquant_sim.errors import ConfigError
from dpquant_sim.numerics.formats import Format

INSTALL_HINT = 'pip install "dpquant-sim[qtorch]"'


def _load():
    """Import qtorch.quant lazily; a clear error if it is missing or cannot build its extension."""
    try:
        from qtorch import quant  # noqa: PLC0415  (compiles C++ on first import)
    except ImportError as exc:
        raise ConfigError(
            "backend", "qtorch", f"an installed qtorch package ({INSTALL_HINT}); import failed: {exc}"
        ) from exc
    except Exception as exc:  # extension build failure (no compiler, no ninja, ...)
        raise ConfigError(
            "backend", "qtorch", f"a working qtorch (its C++ extension failed to build: {exc}); {INSTALL_HINT}"
        ) from exc
    return quant


def qtorch_quantize(x: torch.Tensor, fmt: Format, *, rounding: str = "nearest") -> torch.Tensor:
    """Quantize ``x`` with qtorch's ``float_quantize`` / ``fixed_point_quantize`` (float32 out)."""
    quant = _load()
    x = x.to(torch.float32).contiguous()
    if fmt.is_int:
        return quant.fixed_point_quantize(
            x, wl=fmt.bits, fl=0, clamp=True, symmetric=True, rounding=rounding
        )
    if fmt.name in ("fp16", "bf16") or fmt.mbits == 0:
        raise ConfigError("fmt", fmt.name, "an fp8/fp6/fp4 format or int8/int4 for backend='qtorch'")
    return quant.float_quantize(x, exp=fmt.ebits, man=fmt.mbits, rounding=rounding)
