"""The Ray executor on a local Ray instance (skipped when ray is not installed)."""

from __future__ import annotations

import pandas as pd
import pytest

from dpquant_sim.sweep.executors import ray_available

needs_ray = pytest.mark.skipif(
    not ray_available(), reason='ray is not installed (optional extra: pip install "dpquant-sim[ray]")'
)


@needs_ray
@pytest.mark.slow  # starting a local Ray instance takes 10-30 s on 2 cores
def test_ray_executor_matches_local(tmp_path):
    from dpquant_sim.sweep.runner import run_sweep
    from tests.test_sweep_runner import _cfg, fake_point

    ray_res = run_sweep(_cfg(), tmp_path / "ray", executor="ray", workers=2, point_fn=fake_point, progress=False)
    assert ray_res.ok and len(ray_res.finished) == 3
    local = run_sweep(_cfg(), tmp_path / "local", workers=1, point_fn=fake_point, progress=False)
    pd.testing.assert_frame_equal(ray_res.table, local.table)
    # Resume under Ray skips everything (no tasks are submitted).
    again = run_sweep(_cfg(), tmp_path / "ray", executor="ray", workers=2, point_fn=fake_point, progress=False)
    assert len(again.skipped) == 3 and not again.finished


def test_ray_missing_is_clear_error(monkeypatch, tmp_path):
    import builtins

    from dpquant_sim.errors import ConfigError
    from dpquant_sim.sweep.executors import run_ray

    real_import = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"dpquant-sim\[ray\]"):
        list(run_ray([("x", None, tmp_path)], print))
