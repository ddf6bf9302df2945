"""The training engine: exact resume, run files, privacy budget enforcement, and the DP step itself."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpquant_sim.errors import ConfigError, PrivacyBudgetExceeded
from dpquant_sim.training.accounting import Mechanism, compose_epsilon
from dpquant_sim.training.engine import METRIC_COLUMNS, load_checkpoint, train

TINY = dict(dataset="digits", model="mlp", n_train=200, n_test=100, batch_size=50, epochs=3, lr=0.5)


def weights(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def test_resume_is_identical_to_uninterrupted(tmp_path):
    # quantized layers with stochastic rounding + a random schedule: every RNG stream matters
    cfg = dict(TINY, schedule={"kind": "random", "budget": 0.5}, recipe="fp4", epochs=2, noise_multiplier=1.0)
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_after=1)
    assert part.summary["complete"] is False and not (tmp_path / "part" / "summary.json").exists()
    assert len(pd.read_csv(tmp_path / "part" / "metrics.csv")) == 1
    resumed = train(cfg, tmp_path / "part", progress=False)
    a, b = full.metrics.drop(columns="wall_s"), resumed.metrics.drop(columns="wall_s")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # and the plans really varied (the schedule's RNG was restored, not restarted)
    plans = [json.loads(p)["quantized"] for p in a["plan"]]
    assert any(plans) and full.summary["test_acc"] == resumed.summary["test_acc"]


def test_run_files_and_metrics(tmp_path):
    res = train(dict(TINY, epsilon=4.0), tmp_path, progress=False)
    m = pd.read_csv(tmp_path / "metrics.csv")
    assert tuple(m.columns) == METRIC_COLUMNS and m["epoch"].tolist() == [0, 1, 2]
    assert (m["epsilon"].diff().dropna() > 0).all()
    assert 4.0 - 0.05 <= m["epsilon"].iloc[-1] <= 4.0
    assert (m["sample_rate"] == 50 / 200).all() and m["steps"].tolist() == [4, 8, 12]
    assert (m["clip_norm"] == 1.0).all() and (m["accountant"] == "rdp").all()
    assert (m["quantized_layers"] == 0).all() and (m["quantized_flop_share"] == 0).all()
    # the recorded epsilon is the RDP composition of exactly the recorded steps
    sigma = m["noise_multiplier"].iloc[0]
    assert compose_epsilon([Mechanism("dpsgd", sigma, 0.25, 12)], 1e-5) == pytest.approx(m["epsilon"].iloc[-1])
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["n_train"] == 200 and info["steps_per_epoch"] == 4 and info["input_shape"] == [1, 8, 8]
    assert [x["name"] for x in info["quantizable_layers"]] == ["fc1", "fc2", "head"]
    assert info["quantizable_layers"][0]["forward_flops"] == 2 * 64 * 256
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and summary["stopped"] is None and summary["epochs_completed"] == 3
    assert summary["epsilon_by_mechanism"] == {"dpsgd": pytest.approx(summary["epsilon"])}
    # checkpoint loads with weights_only=True (load_checkpoint uses it) and holds every RNG state
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(ck["rng"]) == {"sampler", "estimator", "noise", "torch"} and ck["epoch"] == 3
    assert set(ck["layer_generators"]) == {"fc1", "fc2", "head"}
    # a finished run is returned as is; a different config in the same folder is refused
    again = train(dict(TINY, epsilon=4.0), tmp_path, progress=False)
    assert again.summary == res.summary
    with pytest.raises(ConfigError, match="another run's config"):
        train(dict(TINY, epsilon=5.0), tmp_path, progress=False)


def test_same_seed_same_numbers_other_seed_differs(tmp_path):
    cfg = dict(TINY, epochs=1, noise_multiplier=1.0)
    a = train(cfg, tmp_path / "a", progress=False).metrics
    b = train(cfg, tmp_path / "b", progress=False).metrics
    c = train(dict(cfg, seed=1), tmp_path / "c", progress=False).metrics
    assert a["test_loss"].tolist() == b["test_loss"].tolist()
    assert a["test_loss"].tolist() != c["test_loss"].tolist()


def test_non_private(tmp_path):
    res = train(dict(TINY, private=False, optimizer="adam", lr=0.01), tmp_path, progress=False)
    m = res.metrics
    assert math.isinf(m["epsilon"].iloc[-1]) and (m["noise_multiplier"] == 0).all()
    assert m["clip_norm"].isna().all() and (m["accountant"] == "none").all()
    assert res.summary["test_acc"] > 0.5  # 12 steps of plain Adam on digits learn something


def test_refuses_to_start_over_budget(tmp_path):
    with pytest.raises(PrivacyBudgetExceeded, match="refusing to start"):
        train(dict(TINY, noise_multiplier=0.3, epsilon=1.0), tmp_path, progress=False)
    assert not (tmp_path / "metrics.csv").exists()


def test_batch_larger_than_data(tmp_path):
    with pytest.raises(ConfigError, match="batch_size=500 .* at most the training set size 200"):
        train(dict(TINY, batch_size=500), tmp_path, progress=False)


def test_planned_estimator_is_in_the_calibration(tmp_path):
    """dpquant declares its estimator runs in advance: the DP-SGD noise rises so the total stays <= target."""
    base = dict(TINY, epochs=2, epsilon=3.0)
    fp = train(base, tmp_path / "fp32", progress=False)
    dq = train(dict(base, recipe="fp8", schedule={"kind": "dpquant", "budget": 0.5, "interval": 1,
                                                   "noise_multiplier": 3.0, "sample_rate": 0.2}),
               tmp_path / "dq", progress=False)
    assert dq.summary["noise_multiplier"] > fp.summary["noise_multiplier"]
    assert dq.summary["epsilon"] <= 3.0 and dq.summary["stopped"] is None
    bd = dq.summary["epsilon_by_mechanism"]
    assert set(bd) == {"dpsgd", "dpquant-estimator"} and 0 < dq.summary["estimator_epsilon"] < dq.summary["epsilon"]
    assert (dq.metrics["estimator_epsilon"] > 0).all()


def test_stops_when_a_schedule_overspends(tmp_path, monkeypatch):
    """A schedule that spends privacy it did not declare is stopped before training past the target."""
    import dpquant_sim.schedules as sched_pkg
    from dpquant_sim.plan import EpochPlan

    class Greedy:
        def plan(self, ctx):
            if ctx.epoch == 1:
                ctx.ledger.add_mechanism("greedy", 0.5, 1.0, steps=5)
            return EpochPlan(epoch=ctx.epoch)

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    monkeypatch.setattr(sched_pkg, "build_schedule", lambda cfg: Greedy())
    res = train(dict(TINY, epsilon=3.0), tmp_path, progress=False)
    assert res.summary["epochs_completed"] == 1 and "privacy budget" in res.summary["stopped"]
    assert len(res.metrics) == 1


# ------------------------------------------------------------------------------------------------ the DP step
def test_dp_step_matches_microbatch_reference():
    """One MaskedDPOptimizer step on a GradSampleModule equals: per-example gradients from a batch-size-1 loop,
    masked, clipped to C, summed, plus N(0, sigma^2 C^2) on kept coordinates only, divided by the expected
    batch size."""
    from opacus import GradSampleModule

    from dpquant_sim.training.optim import MaskedDPOptimizer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ref = copy.deepcopy(net)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    C, sigma, B = 0.5, 0.8, 10
    masks = {p: torch.rand(p.shape) < 0.6 for p in net.parameters()}

    gsm = GradSampleModule(net, loss_reduction="mean")
    opt = MaskedDPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=sigma, max_grad_norm=C,
                            expected_batch_size=B, generator=torch.Generator().manual_seed(5))
    opt.set_masks(masks)
    F.cross_entropy(gsm(x), y).backward()
    opt.step()
    got = [p.grad.clone() for p in net.parameters()]

    ref_masks = [masks[p] for p in net.parameters()]
    summed = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(len(x)):
        ref.zero_grad()
        F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]).backward()
        g = [p.grad * m for p, m in zip(ref.parameters(), ref_masks)]
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        f = min(1.0, C / (float(norm) + 1e-6))
        summed = [s + f * t for s, t in zip(summed, g)]
    gen = torch.Generator().manual_seed(5)
    want = [(s + torch.normal(0, sigma * C, s.shape, generator=gen) * m) / B for s, m in zip(summed, ref_masks)]
    for a, b, m in zip(got, want, ref_masks):
        assert torch.allclose(a, b, atol=1e-6)
        assert (a[~m] == 0).all()  # dropped coordinates get neither signal nor noise
    gsm._close()


def test_empty_batch_step_is_pure_noise():
    from opacus import GradSampleModule

    from dpquant_sim.training.optim import MaskedDPOptimizer

    net = nn.Linear(3, 2)
    gsm = GradSampleModule(net)
    opt = MaskedDPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=2.0,
                            expected_batch_size=4, generator=torch.Generator().manual_seed(1))
    opt.prepare_empty_batch()
    opt.step()
    gen = torch.Generator().manual_seed(1)
    for p in net.parameters():
        assert torch.allclose(p.grad, torch.normal(0, 2.0, p.shape, generator=gen) / 4)
    gsm._close()


def test_prune_and_drop_run_resumes_and_keeps_pruned_weights_zero(tmp_path):
    cfg = dict(TINY, epochs=2, noise_multiplier=1.0, prune={"method": "magnitude", "sparsity": 0.5},
               drop={"method": "random", "keep": 0.5})
    full = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after=1)
    resumed = train(cfg, tmp_path / "b", progress=False)
    pd.testing.assert_frame_equal(full.metrics.drop(columns="wall_s"), resumed.metrics.drop(columns="wall_s"))
    ck = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    for name in ("fc1.weight", "fc2.weight", "head.weight"):
        kept = ck["prune"]["masks"][name]
        assert (ck["model"][name][~kept] == 0).all() and kept.float().mean() == pytest.approx(0.5, abs=0.01)


# ------------------------------------------------------------------------------------------------ releases
def test_private_run_releases_no_train_loss_unless_asked(tmp_path):
    import warnings

    cfg = dict(TINY, epochs=1, noise_multiplier=1.0)
    res = train(cfg, tmp_path / "a", progress=False)
    m = pd.read_csv(tmp_path / "a" / "metrics.csv")
    assert m["train_loss"].isna().all() and res.summary["train_loss"] is None
    info = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert info["train_loss_released"] is False and "seed=0" in info["secret_randomness"]
    assert "secret" in info["secret_randomness"]
    opted = train(dict(cfg, release_train_loss=True), tmp_path / "b", progress=False)
    assert 0 < opted.metrics["train_loss"].iloc[0] < 10
    nonpriv = train(dict(cfg, private=False, noise_multiplier=None), tmp_path / "c", progress=False)
    assert 0 < nonpriv.summary["train_loss"] < 10  # no privacy claim, nothing to protect
    # the engine no longer silences Opacus's secure-RNG warning for the whole process
    assert not any("Secure RNG" in str(f[1].pattern if f[1] else "") for f in warnings.filters)


def test_secure_noise_is_unseeded_unwritten_and_resumes_from_the_checkpoint(tmp_path, monkeypatch):
    import secrets
    import shutil

    cfg = dict(TINY, epochs=2, noise_multiplier=1.0, secure_noise=True)
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert a.metrics["test_loss"].tolist() != b.metrics["test_loss"].tolist()  # same seed, different noise
    # a finished secure run keeps no secret generator state
    ck = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert ck["rng"]["noise"] is None and ck["rng"]["sampler"] is None and ck["rng"]["estimator"] is None
    # the entropy is written nowhere
    drawn = []
    monkeypatch.setattr(secrets, "randbits", lambda k: drawn.append(123456789012345) or drawn[-1])
    train(cfg, tmp_path / "c", progress=False, stop_after=1)
    assert drawn
    for f in (tmp_path / "c").iterdir():
        assert b"123456789012345" not in f.read_bytes(), f.name
    # an unfinished secure run resumes from the checkpoint's states, whatever fresh entropy the new process draws
    shutil.copytree(tmp_path / "c", tmp_path / "d")
    monkeypatch.setattr(secrets, "randbits", lambda k: 42)
    r1 = train(cfg, tmp_path / "c", progress=False)
    monkeypatch.setattr(secrets, "randbits", lambda k: 7)
    r2 = train(cfg, tmp_path / "d", progress=False)
    pd.testing.assert_frame_equal(r1.metrics.drop(columns="wall_s"), r2.metrics.drop(columns="wall_s"))
    info = json.loads((tmp_path / "c" / "run_info.json").read_text())
    assert "OS entropy" in info["secret_randomness"]
