"""analysis/layer_sensitivity.py: the noise-free R_l against a direct one-layer-at-a-time loop, the sampling std
against a Monte-Carlo of Poisson samples, the DP noise std against its closed form sigma C / (q N)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

_SPEC = importlib.util.spec_from_file_location(
    "layer_sensitivity", Path(__file__).resolve().parents[1] / "analysis" / "layer_sensitivity.py"
)
ls = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ls)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from dpquant_sim.training.engine import train

    out = tmp_path_factory.mktemp("sens") / "run"
    train({"dataset": "digits", "model": "mlp", "epochs": 1, "epsilon": 8.0, "recipe": "fp4", "seed": 3,
           "schedule": {"kind": "dpquant", "budget": 0.5}, "threads": 1}, out, progress=False)
    return out


def test_matches_direct_loop_and_closed_forms(run_dir):
    import dpquant_sim.nn as qnn
    from dpquant_sim.training.config import TrainConfig
    from dpquant_sim.training.engine import _load_data, load_checkpoint
    from dpquant_sim.training.models import build_model

    table, meta = ls.layer_sensitivity(run_dir)
    cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    data = _load_data(cfg)
    x, y = data.train.tensors
    model = qnn.convert_model(build_model("mlp", in_channels=1, num_classes=10, image_size=8))
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["model"])
    model.eval()
    with torch.no_grad():
        base = F.cross_entropy(model(x), y, reduction="none").double()
        rows = []
        for name in table["layer"]:
            qnn.apply_plan(model, {name: "fp4"})
            rows.append(F.cross_entropy(model(x), y, reduction="none").double() - base)
            qnn.apply_plan(model, {name: None})
    d = torch.stack(rows, 1).numpy()
    np.testing.assert_allclose(table["R"], d.mean(0), rtol=1e-6, atol=1e-9)

    # DP noise: sigma_s C_s / (q_s N) with the run's own planned estimator mechanism
    info = json.loads((run_dir / "run_info.json").read_text())
    _, sigma, q, _ = next(m for m in info["planned_mechanisms"] if m[0] == "dpquant-estimator")
    assert meta["noise_std"] == pytest.approx(sigma * 1.0 / (q * len(y)))

    # sampling std: Monte-Carlo over Poisson samples of the clipped rows, estimate = sum / (q N)
    norms = np.linalg.norm(d, axis=1, keepdims=True)
    dc = d * np.minimum(1.0, meta["clip_s"] / norms)
    np.testing.assert_allclose(table["R_clipped"], dc.mean(0), rtol=1e-6, atol=1e-9)
    rng = np.random.default_rng(0)
    masks = rng.random((8000, len(y))) < q
    est = masks.astype(np.float64) @ dc / (q * len(y))
    # MC error of a std from 8000 draws: ~0.8% (1 / sqrt(2 x 8000)) for Gaussian estimates, more for these
    # heavy-tailed ones; 3% is about 4 standard errors
    np.testing.assert_allclose(table["sampling_std"], est.std(0), rtol=0.03)
    total = np.sqrt(table["sampling_std"] ** 2 + meta["noise_std"] ** 2)
    assert meta["snr"] == pytest.approx(dc.mean(0).std(ddof=1) / np.sqrt((total ** 2).mean()))


def test_cli_writes_outputs_and_refuses_a_non_run(run_dir, tmp_path, capsys):
    ls.main([str(run_dir), "--out", str(tmp_path / "o")])
    assert {p.name for p in (tmp_path / "o").iterdir()} == {
        "layer_sensitivity.csv", "layer_sensitivity.html", "layer_sensitivity.json"}
    assert '"snr"' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="has no config.yaml"):
        ls.main([str(tmp_path)])


@pytest.mark.slow
def test_compare_estimators_side_by_side(run_dir, tmp_path, capsys):
    """Forward vs training: with step size 0 the training estimator's rows are the forward ones (an identity of
    the two code paths), the forward R_l equals a direct loop, the training estimator's sigma_s (and so its DP
    noise) is twice the forward one's at the same epsilon, the SNR follows its formula, and the time ratio is the
    ratio of the two timings."""
    import dpquant_sim.nn as qnn
    from dpquant_sim.training.engine import load_run

    m = 30
    t0, s0 = ls.compare_estimators(run_dir, lr=0.0, repeats=1, max_examples=m)
    np.testing.assert_allclose(t0["training_R"], t0["forward_R"], rtol=1e-4, atol=1e-6)
    cfg, data, model = load_run(run_dir)
    x, y = (t[:m] for t in data.train.tensors)
    model.eval()
    with torch.no_grad():
        base = F.cross_entropy(model(x), y, reduction="none").double()
        direct = []
        for name in t0["layer"]:
            qnn.apply_plan(model, {name: "fp4"})
            direct.append((F.cross_entropy(model(x), y, reduction="none").double() - base).mean().item())
            qnn.apply_plan(model, {name: None})
    np.testing.assert_allclose(t0["forward_R"], direct, rtol=1e-5, atol=1e-7)
    f, t = s0["forward"], s0["training"]
    assert t["sigma_s"] == pytest.approx(2 * f["sigma_s"]) and t["noise_std"] == pytest.approx(2 * f["noise_std"])
    assert f["noise_std"] == pytest.approx(f["sigma_s"] * f["clip_s"] / (f["q_s"] * s0["n_train"]))
    total = np.sqrt(t0["forward_sampling_std"] ** 2 + f["noise_std"] ** 2)
    assert f["snr"] == pytest.approx(t0["forward_R_clipped"].std(ddof=1) / np.sqrt((total ** 2).mean()))
    assert s0["time_ratio_training_over_forward"] == pytest.approx(t["seconds_per_estimate"]
                                                                   / f["seconds_per_estimate"])
    assert "| training |" in ls.estimator_markdown(s0)
    ls.main([str(run_dir), "--out", str(tmp_path / "c"), "--compare-estimators", "--max-examples", "10",
             "--timing-repeats", "1"])
    assert {"estimators.csv", "estimators.json"} <= {p.name for p in (tmp_path / "c").iterdir()}
    assert "training / forward wall-clock" in capsys.readouterr().out
