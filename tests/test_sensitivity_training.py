"""DPQuant's training estimator (estimator: training): an independent per-example loop, exact state restoration,
neighbouring-dataset sensitivity of the clipped sum, the ledger's accounting against opacus RDP at sigma_s / 2,
reproducibility, and detection of a planted fragile layer."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torch.utils.data import TensorDataset

from dpquant_sim.errors import ConfigError
from dpquant_sim.schedules import build_schedule
from dpquant_sim.schedules.base import LayerInfo, ScheduleContext
from dpquant_sim.schedules.dpquant import clipped_sum, resolve_estimator_noise
from dpquant_sim.schedules.configs import DPQuantConfig
from dpquant_sim.schedules.estimators import ESTIMATORS, get_estimator
from dpquant_sim.training.accounting import PrivacyLedger
from dpquant_sim.training.sensitivity import make_loss_delta_fn
from dpquant_sim.training.sensitivity_training import SEED_BOUND, make_training_delta_fn
from tests.test_sensitivity import fragile_mlp

qnn = pytest.importorskip("dpquant_sim.nn")
NAMES = ["0", "2", "4"]


def _data(n=48, d=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 2.0
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + 0.5 * torch.randn(n, d, generator=g), y


@pytest.fixture(scope="module")
def fragile():
    """test_sensitivity.py's planted-fragile MLP (layer '2' collapses under fp4), on the same data."""
    x, y = _data(96)
    return fragile_mlp(x, y), TensorDataset(x, y)


@pytest.fixture()
def small():
    """An untrained small MLP (all layers ordinary) and its data."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = _data(40, seed=1)
    return qnn.convert_model(model, seed=3), TensorDataset(x, y)


def reference(model, data, names, q, seed, *, iters, lr, clip, recipe="fp4"):
    """Independent loop: for each sampled example and policy a deep copy of the model, plain .backward() and a
    hand-written clipped SGD step; the sample and rounding seeds follow the documented draw order (a seed first,
    then one uniform per example; example k's generators seeded with (seed + k) mod 2^62)."""
    g = torch.Generator().manual_seed(seed)
    base_seed = int(torch.randint(0, SEED_BOUND, (1,), generator=g))
    keep = torch.rand(len(data), generator=g) < q
    x, y = data.tensors
    rows = []
    for k in keep.nonzero().flatten().tolist():
        def run(policy):
            m = copy.deepcopy(model)
            m.eval()
            qnn.apply_plan(m, {n: None for n in names} | ({policy: recipe} if policy else {}))
            qnn.set_generators(m, (base_seed + k) % SEED_BOUND)
            for _ in range(iters):
                m.zero_grad()
                F.cross_entropy(m(x[k:k + 1]), y[k:k + 1], reduction="sum").backward()
                gn = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in m.parameters()))
                c = min(1.0, clip / (gn + 1e-6))
                with torch.no_grad():
                    for p in m.parameters():
                        p -= lr * c * p.grad
            with torch.no_grad():
                return F.cross_entropy(m(x[k:k + 1]), y[k:k + 1]).item()

        b = run(None)
        rows.append([run(n) - b for n in names])
    return np.array(rows).reshape(-1, len(names))


@pytest.mark.parametrize("iters,lr", [(1, 0.5), (2, 0.3)])
def test_matches_independent_per_example_loop(small, iters, lr):
    model, data = small
    fn = make_training_delta_fn(model, data, recipe="fp4", lr=lr, grad_clip=0.7)
    d, n_exp = fn(NAMES, 0.4, torch.Generator().manual_seed(5), iters=iters)
    ref = reference(model, data, NAMES, 0.4, 5, iters=iters, lr=lr, clip=0.7)
    assert n_exp == pytest.approx(0.4 * len(data)) and d.shape == ref.shape and d.shape[0] > 5
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert np.abs(ref).max() > 1e-3  # not trivially zero


def test_step_size_zero_is_the_forward_estimator(small):
    model, data = small
    d_t, _ = make_training_delta_fn(model, data, lr=0.0, grad_clip=1.0)(NAMES, 1.0, torch.Generator().manual_seed(0))
    d_f, _ = make_loss_delta_fn(model, data)(NAMES, 1.0, torch.Generator())
    np.testing.assert_allclose(d_t.numpy(), d_f.numpy(), rtol=1e-4, atol=1e-6)
    d_1, _ = make_training_delta_fn(model, data, lr=1.0, grad_clip=1.0)(NAMES, 1.0, torch.Generator().manual_seed(0))
    assert not np.allclose(d_1.numpy(), d_f.numpy(), atol=1e-4)  # the steps change the answer


class Counter(nn.Module):
    """Counts forward passes in a buffer (in place), so that an unrestored buffer would show."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


def test_state_restored_bit_exactly_also_on_error():
    torch.manual_seed(2)
    model = qnn.convert_model(nn.Sequential(nn.Linear(8, 16), Counter(), nn.ReLU(), nn.Linear(16, 4)), seed=7)
    x, y = _data(30, seed=2)
    data = TensorDataset(x, y)
    qnn.apply_plan(model, {"0": "fp8", "3": None})
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    gens = {n: model.get_submodule(n).generator for n in ("0", "3")}
    gstates = qnn.generator_states(model)
    qstate = qnn.quantization_state(model)
    fn = make_training_delta_fn(model, data, recipe="fp4", lr=2.0, grad_clip=1.0)
    d, _ = fn(["0", "3"], 0.5, torch.Generator().manual_seed(0), iters=3)
    assert d.abs().max() > 0

    def check():
        after = model.state_dict()
        for k, v in before.items():
            assert torch.equal(after[k], v), k  # bit-exact: weights and the buffer
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        assert {n: model.get_submodule(n).generator for n in ("0", "3")} == gens
        assert all(torch.equal(a, b) for a, b in zip(qnn.generator_states(model).values(), gstates.values()))
        assert qnn.quantization_state(model) == qstate and model.training

    check()
    bad = make_training_delta_fn(model, data, loss_fn=lambda o, t: F.cross_entropy(o, t), lr=1.0, grad_clip=1.0)
    with pytest.raises(Exception, match="per"):
        bad(["0"], 1.0, torch.Generator().manual_seed(0))
    check()


def test_bad_inputs(small):
    model, data = small
    fn = make_training_delta_fn(model, data, lr=1.0, grad_clip=1.0)
    with pytest.raises(ConfigError, match="nope"):
        fn(["nope"], 0.5, torch.Generator())
    with pytest.raises(ConfigError, match="estimator_iters"):
        fn(["0"], 0.5, torch.Generator(), iters=0)
    with pytest.raises(ConfigError, match="estimator_lr"):
        fn(["0"], 0.5, torch.Generator(), lr=-1.0)
    with pytest.raises(ValidationError, match="estimator"):
        DPQuantConfig(estimator="bogus")
    with pytest.raises(ConfigError, match="bogus"):
        get_estimator("bogus")
    d, n_exp = fn(["0"], 1e-9, torch.Generator())
    assert d.shape == (0, 1) and n_exp > 0


def test_reproducible_with_a_seed(small):
    model, data = small
    fn = make_training_delta_fn(model, data, lr=1.0, grad_clip=1.0)
    a, _ = fn(NAMES, 0.5, torch.Generator().manual_seed(3), iters=2)
    b, _ = fn(NAMES, 0.5, torch.Generator().manual_seed(3), iters=2)
    c, _ = fn(NAMES, 0.5, torch.Generator().manual_seed(4), iters=2)
    assert torch.equal(a, b)
    assert a.shape != c.shape or not torch.equal(a, c)


def test_neighbouring_datasets_released_vector_within_2_clip(small):
    """D vs D minus one example (moved to the end in both, so the same seed draws the same Poisson inclusion
    for every other example): the clipped sum differs by at most C_a -- within the 2 C_a it is accounted for --
    and every other example's row is unchanged. Tight rows (norm >> C_a) make the bound bite."""
    model, data = small
    x, y = data.tensors[0][:16], data.tensors[1][:16]
    clip_a = 2e-4  # below most rows' norms (about 1e-3 on this untrained model)
    worst = 0.0
    for j in (0, 9, 15):
        order = [i for i in range(len(x)) if i != j] + [j]
        d_full = TensorDataset(x[order], y[order])
        d_less = TensorDataset(x[order[:-1]], y[order[:-1]])
        kw = dict(recipe="fp4", lr=1.5, grad_clip=1.0)
        a, _ = make_training_delta_fn(model, d_full, **kw)(NAMES, 1.0, torch.Generator().manual_seed(9), iters=2)
        b, _ = make_training_delta_fn(model, d_less, **kw)(NAMES, 1.0, torch.Generator().manual_seed(9), iters=2)
        assert torch.equal(a[:-1], b)  # no other example's row moves
        diff = float((clipped_sum(a, clip_a) - clipped_sum(b, clip_a)).norm())
        assert diff <= clip_a * (1 + 1e-9) <= 2 * clip_a
        worst = max(worst, diff)
    assert worst > 0.5 * clip_a  # the bound is exercised, not vacuous


def test_ledger_entry_is_sigma_over_two_and_matches_opacus_rdp(small):
    from opacus.accountants import RDPAccountant

    model, data = small
    fn = make_training_delta_fn(model, data, lr=1.0, grad_clip=1.0)
    layers = [LayerInfo(n, 100) for n in NAMES]
    ledger = PrivacyLedger("rdp", 1e-5)
    sched = build_schedule({"kind": "dpquant", "budget": 0.5, "budget_unit": "layers", "sample_rate": 0.3,
                            "noise_multiplier": 3.0, "estimator": "training", "interval": 1})
    for e in range(2):
        sched.plan(ScheduleContext(e, 4, layers, "fp4", np.random.default_rng(0), ledger=ledger,
                                   extra={"training_deltas": fn}))
    est = [m for m in ledger.entries if m.name == "dpquant-estimator"]
    assert {(m.noise_multiplier, m.sample_rate) for m in est} == {(1.5, 0.3)} and sum(m.steps for m in est) == 2
    acc = RDPAccountant()
    acc.history.append((1.5, 0.3, 2))  # the closed form the ledger must match: 2 compositions at sigma_s / 2
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert sched.planned_mechanisms(4) == [("dpquant-estimator", 1.5, 0.3, 4)]
    fwd = build_schedule({"kind": "dpquant", "sample_rate": 0.3, "noise_multiplier": 3.0, "interval": 1})
    assert fwd.planned_mechanisms(4) == [("dpquant-estimator", 3.0, 0.3, 4)]  # forward: unchanged


def test_noise_std_is_sigma_clip_while_accounted_at_half(small):
    """With all-zero rows the released score is pure noise: its std must be sigma_s C / (q N) (not 2x)."""
    n = 50
    zeros = lambda names, q, g, **kw: (torch.zeros((n, len(names)), dtype=torch.float64), float(n))  # noqa: E731
    layers = [LayerInfo(f"l{i}", 1) for i in range(8)]
    sched = build_schedule({"kind": "dpquant", "noise_multiplier": 2.0, "clip": 0.5, "estimator": "training",
                            "interval": 1, "ema": 0.0})
    class Ledger:  # records only (an accountant per plan would dominate the test's time)
        delta = 1e-5

        def add_mechanism(self, *a, **k):
            pass

        def breakdown(self):
            return {"dpquant-estimator": 0.0}

    ledger = Ledger()
    vals = []
    for e in range(150):
        sched.plan(ScheduleContext(e, 150, layers, "fp4", np.random.default_rng(0), ledger=ledger,
                                   extra={"training_deltas": zeros}))
        vals += list(sched.scores.values())
    assert np.std(vals) == pytest.approx(2.0 * 0.5 / n, rel=0.08)  # 1200 draws: se of the std ~2%


def test_auto_sigma_doubles_and_spends_the_same_epsilon():
    kw = dict(epochs=10, epsilon=8.0, delta=1e-5)
    f = resolve_estimator_noise(DPQuantConfig(), **kw)
    t = resolve_estimator_noise(DPQuantConfig(estimator="training"), **kw)
    assert t.noise_multiplier == pytest.approx(2 * f.noise_multiplier)
    assert ESTIMATORS["training"].sensitivity_factor == 2.0 and ESTIMATORS["forward"].sensitivity_factor == 1.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history.append((t.noise_multiplier / 2, t.sample_rate, 5))
    assert acc.get_epsilon(1e-5) == pytest.approx(0.25 * 8.0, rel=0.02)


@pytest.mark.slow
def test_detects_the_planted_fragile_layer(fragile):
    model, data = fragile
    fn = make_training_delta_fn(model, data, recipe="fp4", lr=0.5, grad_clip=1.0)
    d, _ = fn(NAMES, 1.0, torch.Generator().manual_seed(0), iters=2)
    m = d.mean(0)
    assert m[1] > 5 * max(m[0], m[2], 1e-3)
    layers = [LayerInfo(n, 100) for n in NAMES]
    ledger = PrivacyLedger("rdp", 1e-5)
    sched = build_schedule({"kind": "dpquant", "budget": 2 / 3, "budget_unit": "layers", "sample_rate": 0.5,
                            "estimator": "training", "estimator_lr": 0.5})
    plan = sched.plan(ScheduleContext(0, 4, layers, "fp4", np.random.default_rng(0), ledger=ledger,
                                      extra={"training_deltas": fn}))
    assert min(plan.probs, key=plan.probs.get) == "2"
    assert plan.info["estimator_epsilon"] > 0


def test_missing_callable_is_a_clear_error(small):
    sched = build_schedule({"kind": "dpquant", "estimator": "training"})
    layers = [LayerInfo(n, 100) for n in NAMES]
    with pytest.raises(ConfigError, match="training_deltas"):
        sched.plan(ScheduleContext(0, 4, layers, "fp4", np.random.default_rng(0), private=False))


@pytest.mark.slow
def test_train_cli_estimator_flag_end_to_end(tmp_path, capsys):
    """`dpquant-sim train --estimator training`: saved in the config, accounted in the run at sigma_s / 2."""
    import json

    import yaml

    from dpquant_sim.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "digits", "--model", "mlp", "--n-train", "120", "--n-test", "60",
              "--batch-size", "40", "--epochs", "1", "--epsilon", "8", "--quantize", "fp4", "--schedule", "dpquant",
              "--estimator", "training", "--schedule-opt", "sample_rate=0.1", "--out", str(out), "--no-progress"])
    assert e.value.code == 0, capsys.readouterr().err
    sched = yaml.safe_load((out / "config.yaml").read_text())["schedule"]
    assert sched["estimator"] == "training"
    info = json.loads((out / "run_info.json").read_text())
    mech = [m for m in info["planned_mechanisms"] if m[0] == "dpquant-estimator"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] <= 8.0 * 1.001 and summary["epsilon_by_mechanism"]["dpquant-estimator"] > 0
    # auto sigma_s: the training estimator's is twice the forward one's, so the ledger's entry equals forward's
    cfg = json.loads(json.dumps(sched))
    resolved = resolve_estimator_noise(DPQuantConfig(**cfg), epochs=1, epsilon=8.0, delta=1e-5)
    fwd = resolve_estimator_noise(DPQuantConfig(**{**cfg, "estimator": "forward"}), epochs=1, epsilon=8.0, delta=1e-5)
    assert mech[0][1] == pytest.approx(resolved.noise_multiplier / 2) == pytest.approx(fwd.noise_multiplier)
    with pytest.raises(SystemExit) as e:
        main(["train", "--schedule", "dpquant", "--estimator", "bogus", "--out", str(tmp_path / "x"), "--no-progress"])
    assert e.value.code == 2 and "estimator='bogus' is not allowed" in capsys.readouterr().err


def test_sweep_expands_the_estimator_as_a_schedule_field():
    from dpquant_sim.sweep.config import SweepConfig

    sc = SweepConfig.model_validate({"name": "e", "base": {"dataset": "digits", "model": "mlp", "epsilon": 8.0},
                                     "grid": {"schedule": [{"kind": "dpquant", "estimator": ["forward", "training"]}]}})
    pts = sc.points()
    assert sorted(p.config.schedule.estimator for p in pts) == ["forward", "training"]
    assert len({p.id for p in pts}) == 2


@pytest.mark.slow
@pytest.mark.parametrize("clipping", ["hooks", "bk", "ghost", "mixed"])
def test_engine_step_after_an_estimate_is_bit_identical(clipping):
    """Inside the engine (hooks: an Opacus GradSampleModule around the model; bk, ghost, mixed: recording hooks)
    a training estimate between two DP-SGD steps leaves no trace: the next step's weights are bit-identical to a run that
    did not estimate (weights, grad samples, rounding generators and the DP noise stream untouched)."""
    from dpquant_sim.training.config import TrainConfig
    from dpquant_sim.training.engine import _Run

    cfg = TrainConfig.parse({"dataset": "digits", "model": "cnn", "n_train": 80, "n_test": 20, "batch_size": 20,
                             "epochs": 1, "noise_multiplier": 1.0, "recipe": "fp4", "clipping": clipping,
                             "schedule": {"kind": "static-all"}, "seed": 4})
    after = []
    for estimate in (False, True):
        run = _Run(cfg, None)
        run.plan_epoch()
        run.train_step()
        if estimate:
            d, _ = run.training_deltas([l.name for l in run.layers], 0.5, torch.Generator().manual_seed(0), iters=2)
            assert d.shape[0] > 0 and d.abs().max() > 0
        run.train_step()
        after.append([p.detach().clone() for p in run.model.parameters()])
        run.clipper.close()
    assert all(torch.equal(a, b) for a, b in zip(*after))


@pytest.mark.slow
def test_bench_estimators_script_runs_on_cpu(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_estimators", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_estimators.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--model", "mlp", "--channels", "1", "--image-size", "8", "--n", "40", "--q", "0.5",
                    "--repeats", "1"])
    assert out["layers"] >= 2 and out["training"]["seconds_per_estimate"] > 0
    assert out["ratio_training_over_forward"] == pytest.approx(
        out["training"]["seconds_per_estimate"] / out["forward"]["seconds_per_estimate"])
    assert '"ratio_training_over_forward"' in capsys.readouterr().out
