"""Rotation's variance argument (summary arithmetic against hand-computed values, a tiny engine run) and the
variance study's report page and command line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpquant_sim.analysis import rotation as R
from dpquant_sim.analysis import variance_report as VR
from dpquant_sim.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _table() -> pd.DataFrame:
    # One run, two layers, four epochs; layer a quantized in epochs 1 and 3 (p = 0.5), layer b always (p = 1).
    rows = []
    for e in range(1, 5):
        for layer, q, vplan, vall in (("a", e % 2 == 1, 2.0 if e % 2 else 0.0, 2.0), ("b", True, 3.0, 3.0)):
            rows.append({"model": "m", "recipe": "fp4", "schedule": "random", "seed": 0, "epoch": e, "layer": layer,
                         "layer_index": 0 if layer == "a" else 1, "quantized": q, "mc_var_plan": vplan,
                         "mc_var_all": vall, "mc_bias2_plan": 1.0, "pred_plan": vplan, "noise_var": 10.0,
                         "signal": 4.0, "test_acc": 0.5 + 0.1 * e, "quantized_flop_share": 0.75})
    return pd.DataFrame(rows)


def test_rotation_summary_arithmetic():
    s = R.rotation_summary(_table()).set_index("layer")
    assert s.loc["a", "p"] == 0.5 and s.loc["b", "p"] == 1.0
    assert s.loc["a", "var_plan"] == 1.0 and s.loc["a", "argument_quant"] == 1.0  # 0.5 x 2
    assert s.loc["a", "measured_total"] == 11.0 and s.loc["a", "argument_total"] == 11.0
    assert s.loc["b", "quant_ratio"] == 1.0
    runs = R.accuracy_relation(_table())
    assert len(runs) == 1
    r = runs.iloc[0]
    assert r["final_test_acc"] == pytest.approx(0.9) and r["quant_var"] == pytest.approx(4.0)  # (2+3, 0+3, ...)/4
    assert r["quant_var_over_noise"] == pytest.approx(4.0 / 20.0)
    assert r["quant_bias2_over_signal"] == pytest.approx(0.25)
    assert R.spearman([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert np.isnan(R.spearman([1, 2], [1, 2]))


def test_rotation_config_errors():
    with pytest.raises(ConfigError, match="schedules"):
        R.RotationConfig(schedules=("fp32",))
    with pytest.raises(ConfigError, match="budget"):
        R.RotationConfig(budget=1.5)
    with pytest.raises(ConfigError, match="recipe"):
        R.RotationConfig(recipe="fp3")


@pytest.mark.slow
def test_run_rotation_tiny(tmp_path):
    cfg = R.RotationConfig(model="mlp", epochs=2, n_train=96, batch_size=32, schedules=("static-all", "random"),
                           seeds=(0,), update_draws=2, epsilon=50.0)
    t = R.run_rotation(cfg, tmp_path, log=lambda s: None)
    assert set(t["schedule"]) == {"static-all", "random"} and set(t["epoch"]) == {1, 2}
    sa = t[t["schedule"] == "static-all"]
    assert sa["quantized"].all() and (sa["mc_var_plan"] == sa["mc_var_all"]).all()
    rnd = t[t["schedule"] == "random"]
    assert (rnd.loc[~rnd["quantized"], "pred_plan"] <= rnd.loc[~rnd["quantized"], "pred_all"] + 1e-30).all()
    s, table, runs = VR.rotation_tables(t)
    assert len(runs) == 2 and set(table["schedule"]) == {"static-all", "random"}


def test_mean_sd_and_tables():
    gn = []
    for seed in (0, 1):
        for regime, f in (("sgd", 1.0), ("dp-sgd", 2.0 + seed)):
            for epoch in (0, 1):
                gn.append({"model": "m", "regime": regime, "seed": seed, "epoch": epoch, "layer": "l",
                           "layer_index": 0, "recipe": "fp4", "linf_median": f * (epoch + 1), "linf_mean": f,
                           "l2_median": 2.0,
                           "spread_median": 9.0, "noise_to_clipped_elem": 30.0, "test_acc": 0.5,
                           "quant_var_rel": 0.01, "quant_var": f})
    gn = pd.DataFrame(gn)
    t = VR.mechanism_table(gn).set_index("regime")
    assert t.loc["dp-sgd", "linf_vs_sgd_last"].startswith("2.5 +- 0.71")  # seeds: 2x and 3x SGD
    q = VR.quant_table(gn).set_index("regime")
    assert q.loc["dp-sgd", "quant_var_vs_sgd"].startswith("2.5 +- 0.71")


def test_report_and_cli(tmp_path):
    spec = importlib.util.spec_from_file_location("variance_study", ROOT / "analysis" / "variance_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--only", "law", "--quick"]) == 0
    fits = pd.read_csv(tmp_path / "law_fits.csv")
    from dpquant_sim.nn.config import RECIPES

    assert set(fits["recipe"]) == set(RECIPES)  # every registered recipe, luq_fp4 included once it exists
    html = (tmp_path / "report.html").read_text()
    assert "Proposition 1" in html and "<script src=\"http" not in html
    assert (tmp_path / "report_data" / "law.csv").is_file()
    with pytest.raises(ConfigError, match="study folder"):
        VR.build_variance_report(tmp_path / "empty")


def test_cli_bad_flag_is_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("variance_study", ROOT / "analysis" / "variance_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--only", "mechanism", "--regimes", "adam"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "regime" in err[0] and "sgd+noise" in err[0]


def test_loss_adjusted_table_recovers_regime_factors():
    # linf = 2 * loss (sgd) and 2 * 3 * loss (dp-sgd): pooled slope 1, residual factors sqrt(3) apart.
    rows = []
    for seed in (0, 1):
        for regime, f in (("sgd", 1.0), ("dp-sgd", 3.0)):
            for epoch, loss in ((1, 2.0), (2, 1.0), (3, 0.5)):
                rows.append({"model": "m", "layer": "l", "recipe": "fp4", "regime": regime, "seed": seed,
                             "epoch": epoch, "loss_mean": loss, "linf_median": 2 * f * loss})
    t = VR.loss_adjusted_table(pd.DataFrame(rows)).iloc[0]
    assert t["slope"] == pytest.approx(1.0) and t["R2"] < 1
    assert t["dp-sgd"].startswith("1.73") and t["sgd"].startswith("0.577")
