"""The optional qtorch backend: it is used when asked for, and its documented differences ARE differences.

qtorch compiles a C++ extension on first import (~45-100 s on 2 cores; cached via TORCH_EXTENSIONS_DIR).
"""

import importlib.util
import sys

import pytest
import torch

from dpquant_sim.errors import ConfigError
from dpquant_sim.numerics import quantize

HAVE_QTORCH = importlib.util.find_spec("qtorch") is not None
needs_qtorch = [
    pytest.mark.qtorch,
    pytest.mark.skipif(not HAVE_QTORCH, reason='qtorch not installed (pip install "dpquant-sim[qtorch]")'),
]


def test_missing_qtorch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "qtorch", None)  # makes `import qtorch` raise ImportError
    with pytest.raises(ConfigError) as e:
        quantize(torch.ones(2), "fp8_e4m3", backend="qtorch")
    msg = str(e.value)
    assert 'pip install "dpquant-sim[qtorch]"' in msg and "backend" in msg


@pytest.fixture(scope="module")
def qt():
    try:
        from qtorch.quant import fixed_point_quantize, float_quantize
    except Exception as exc:  # pragma: no cover - build failure on an odd machine
        pytest.skip(f"qtorch extension unavailable: {exc}")
    return float_quantize, fixed_point_quantize


@pytest.mark.usefixtures("qt")
class TestQtorchDifferences:
    pytestmark = needs_qtorch

    def test_backend_calls_qtorch(self, qt):
        float_quantize, _ = qt
        x = torch.randn(1000) * 10
        assert torch.equal(quantize(x, "fp8_e4m3", backend="qtorch"), float_quantize(x, 4, 3, "nearest"))

    def test_ties_away_from_zero_vs_even(self):
        x = torch.tensor([1.25, -1.25, 2.5, 5.0])  # fp4_e2m1 ties: 1|1.5, 2|3, 4|6
        assert quantize(x, "fp4_e2m1", backend="qtorch").tolist() == [1.5, -1.5, 3.0, 6.0]
        assert quantize(x, "fp4_e2m1").tolist() == [1.0, -1.0, 2.0, 4.0]
        sub = torch.tensor([2.0**-10])  # e4m3 subnormal tie between 0 and 2^-9
        assert quantize(sub, "fp8_e4m3", backend="qtorch").item() == 2.0**-9
        assert quantize(sub, "fp8_e4m3").item() == 0.0

    def test_e4m3_max_480_and_nan_inf_to_max(self):
        x = torch.tensor([470.0, 1e9, float("inf"), float("nan"), -float("inf")])
        assert quantize(x, "fp8_e4m3", backend="qtorch").tolist() == [480.0, 480.0, 480.0, 480.0, -480.0]
        ours = quantize(x, "fp8_e4m3")
        assert ours[:3].tolist() == [448.0, 448.0, 448.0] and ours[3].isnan() and ours[4] == -448
        # e5m2: qtorch uses the inf exponent as a binade too -> max 1.75 * 2^16 = 114688
        assert quantize(torch.tensor([1e9]), "fp8_e5m2", backend="qtorch").item() == 114688.0

    def test_int_ties_to_even_and_symmetric_clamp(self):
        x = torch.tensor([2.5, 3.5, -2.5, 200.0, -200.0])
        assert quantize(x, "int8", backend="qtorch").tolist() == [2.0, 4.0, -2.0, 127.0, -127.0]
        assert quantize(x, "int8").tolist() == [2.0, 4.0, -2.0, 127.0, -127.0]

    def test_stochastic_rounding_ignores_seeds(self):
        x = torch.full((4096,), 1.1)
        kw = dict(rounding="stochastic", backend="qtorch")
        a = quantize(x, "fp4_e2m1", generator=torch.Generator().manual_seed(0), **kw)
        b = quantize(x, "fp4_e2m1", generator=torch.Generator().manual_seed(0), **kw)
        assert set(a.unique().tolist()) <= {1.0, 1.5}
        assert not torch.equal(a, b)  # same seed, different result: qtorch draws from C rand()
        ours = [quantize(x, "fp4_e2m1", rounding="stochastic", generator=torch.Generator().manual_seed(0))
                for _ in range(2)]
        assert torch.equal(*ours)

    def test_unsupported_formats(self):
        with pytest.raises(ConfigError, match="fmt"):
            quantize(torch.ones(2), "bf16", backend="qtorch")
