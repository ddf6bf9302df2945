"""The three training regimes of the mechanism study, through the public engine, and the study's outputs."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from dpquant_sim.analysis import mechanism as M
from dpquant_sim.errors import ConfigError


def _tiny(**kw) -> M.MechanismConfig:
    base = dict(model="mlp", epochs=1, n_train=48, batch_size=48, lr=0.5, seeds=(0,), recipes=("int8",),
                update_draws=2, validate_every=0, threads=1)
    return M.MechanismConfig(**{**base, **kw})


def test_regime_configs_keep_the_noise_and_drop_the_clipping():
    st = _tiny(noise_multiplier=1.3, max_grad_norm=0.7)
    sgd = M.regime_train_config(st, "sgd", 0, 1.3)
    noisy = M.regime_train_config(st, "sgd+noise", 0, 1.3)
    dp = M.regime_train_config(st, "dp-sgd", 0, 1.3)
    assert sgd["private"] is False
    assert noisy["noise_multiplier"] * noisy["max_grad_norm"] == pytest.approx(1.3 * 0.7, rel=1e-12)
    assert noisy["max_grad_norm"] == M.UNCLIPPED_NORM
    assert dp["noise_multiplier"] == 1.3 and dp["max_grad_norm"] == 0.7 and dp["epsilon"] is None
    assert M.regime_train_config(st, "dp-sgd:lr=2", 0, 1.3)["lr"] == 2.0
    for cfg in (sgd, noisy, dp):  # same data, model, seed and schedule everywhere
        assert {k: cfg[k] for k in ("dataset", "model", "seed", "batch_size", "schedule")} == \
               {k: sgd[k] for k in ("dataset", "model", "seed", "batch_size", "schedule")}


def test_sgd_noise_regime_is_sgd_through_the_engine(tmp_path):
    # Sample rate 1 (every step sees all 48 examples), negligible noise: the unclipped regime must take exactly
    # plain SGD's step, and DP-SGD (clipped at C = 1) a different one.
    from dpquant_sim.training.engine import load_run, train

    st = _tiny(noise_multiplier=1e-12)
    w = {}
    for regime in ("sgd", "sgd+noise", "dp-sgd"):
        cfg = M.regime_train_config(st, regime, 0, 1e-12)
        train(cfg, tmp_path / regime.replace("+", "_"), progress=False)
        model = load_run(tmp_path / regime.replace("+", "_"))[2]
        w[regime] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(w["sgd+noise"], w["sgd"], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(w["dp-sgd"], w["sgd"], rtol=1e-3, atol=1e-5)


def test_run_mechanism_writes_three_regimes_and_resumes(tmp_path):
    st = _tiny(n_train=96, batch_size=32, regimes=("sgd", "sgd+noise", "dp-sgd"), epsilon=50.0)
    res = M.run_mechanism(st, tmp_path, log=lambda s: None)
    gn = pd.read_csv(tmp_path / "grad_norms.csv")
    need = {"regime", "epoch", "layer", "linf_median", "l2_median", "quant_var", "recipe", "noise_to_clipped_elem",
            "quant_var_rel", "spread_median"}
    assert need <= set(gn.columns)
    assert set(gn["regime"]) == {"sgd", "sgd+noise", "dp-sgd"} and set(gn["epoch"]) == {0, 1}
    assert set(gn["layer"]) == {"fc1", "fc2", "head"}
    # epoch 0 is the shared initialization: identical norms in every regime
    e0 = gn[gn["epoch"] == 0].pivot_table(index="layer", columns="regime", values="linf_median")
    assert (e0.max(axis=1) - e0.min(axis=1)).abs().max() == 0
    assert (gn["quant_var"] > 0).all() and (gn["linf_median"] <= gn["l2_median"] + 1e-12).all()
    uv = pd.read_csv(tmp_path / "update_variance.csv")
    assert set(uv["regime"]) == {"sgd", "sgd+noise", "dp-sgd"} and (uv["batch_size"] == 32).all()
    assert (uv.loc[uv["regime"] == "sgd", "noise_var"] == 0).all()
    assert (uv.loc[uv["regime"] != "sgd", "noise_var"] > 0).all()
    assert ((uv["pred_total"] / uv["mc_var"]).between(0.2, 5)).all()
    sigma = res["runs"]["sigma"].iloc[0]
    noisy = gn[(gn["regime"] == "sgd+noise") & (gn["epoch"] == 1)]
    assert noisy["noise_std"].iloc[0] == pytest.approx(sigma * st.max_grad_norm)
    # resume: everything is reused, the same tables come back
    again = M.run_mechanism(st, tmp_path, log=lambda s: "probed" in s and pytest.fail(f"re-probed: {s}"))
    pd.testing.assert_frame_equal(again["grad_norms"], res["grad_norms"])


def test_config_errors():
    with pytest.raises(ConfigError, match="regime"):
        _tiny(regimes=("adam",))
    with pytest.raises(ConfigError, match="regime"):
        _tiny(regimes=("dp-sgd:lr=-1",))
    with pytest.raises(ConfigError, match="recipes"):
        _tiny(recipes=("fp3",))
    with pytest.raises(ConfigError, match="update_draws"):
        _tiny(update_draws=1)
    with pytest.raises(ConfigError, match="regimes"):
        _tiny(regimes=("sgd", "sgd"))
    assert _tiny(epochs=10, validate_every=4).validates(8) and not _tiny(epochs=10, validate_every=4).validates(9)
    assert _tiny(epochs=10, validate_every=0).validates(10)


def test_default_recipes_follow_the_registry():
    from dpquant_sim.nn.config import RECIPES

    assert M.default_recipes() == tuple(r for r in M.STUDY_RECIPES if r in RECIPES)
    assert {"fp8", "fp4", "int8"} <= set(M.default_recipes())
    assert not math.isnan(M.MechanismConfig().epochs)
