"""Cost of a finished training run: per epoch and per accelerator, from run_info.json, metrics.csv and plans.jsonl.

The run directory (written by the training engine) holds ``run_info.json`` (model, input_shape, num_classes,
n_train, batch_size, sample_rate, steps_per_epoch, ...), ``config.yaml`` and ``metrics.csv`` with one row per
epoch and the epoch's :class:`~dpquant_sim.plan.EpochPlan` as JSON in the ``plan`` column. The model is
rebuilt from its name (no weights are read) and traced once; all epochs x accelerators are evaluated with
the vectorized sweep. A channel-pruned run (run_info.json ``prune.kept_channel_fraction``) is costed with its
pruned layers' smaller GEMMs (:func:`pruned_shapes`). Under a ``dpquant`` schedule the sensitivity
estimator's forward passes are added as
T_est (every ``interval`` epochs: a Poisson sample of ``sample_rate * n_train`` examples, L + 1 forwards).

The run is costed under the clipping algorithm it used (run_info.json's ``clipping``), or under others on
request (every exact algorithm computes the same update, so costing a finished run under another is exact).

Example: ``cost_run("runs/r1", ["h100_sxm", "b200"], devices=[1, 8], clipping="all")`` -> DataFrame with
columns epoch, hw, devices, clipping_run, clipping_costed, steps, batch, time_theoretical_s, time_roofline_s
(per epoch) with time_roofline_low_s/high_s (the profile's error band), throughput_* (samples/s),
speedup_vs_{fp32,bf16}_*, energy_j and dollars (all devices), fallbacks, quantized_flop_share, memory_gb (per
device), fits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml

from dpquant_sim.cost.flops import step_ops
from dpquant_sim.cost.model import fallbacks, format_fallbacks, op_time
from dpquant_sim.cost.profiles import HardwareProfile, load_profiles
from dpquant_sim.cost.sweep import sweep
from dpquant_sim.errors import ConfigError
from dpquant_sim.plan import EpochPlan


def _read_run(run_dir: Path) -> tuple[dict, dict, pd.DataFrame]:
    if not run_dir.is_dir():
        raise ConfigError("run", str(run_dir), "a finished run directory (with run_info.json and metrics.csv)")
    missing = [f for f in ("run_info.json", "metrics.csv") if not (run_dir / f).is_file()]
    if missing:
        raise ConfigError("run", str(run_dir), f"a run directory containing {', '.join(missing)}")
    info = json.loads((run_dir / "run_info.json").read_text())
    cfg = {}
    if (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    from dpquant_sim.plan import PLANS_FILE, read_metrics

    metrics = read_metrics(run_dir)
    if "plan" not in metrics.columns or (len(metrics) and metrics["plan"].isna().all()):
        raise ConfigError("run", str(run_dir), f"a run directory with {PLANS_FILE} (each epoch's plan)")
    return info, cfg, metrics


def _optimizer(cfg: dict) -> str:
    if cfg.get("optimizer") == "adam":
        return "adam"
    return "momentum" if float(cfg.get("momentum") or 0.0) > 0 else "sgd"


def _steps(info: dict, metrics: pd.DataFrame) -> np.ndarray:
    if info.get("steps_per_epoch"):
        return np.full(len(metrics), float(info["steps_per_epoch"]))
    if "steps" in metrics.columns:  # cumulative step counter -> per-epoch steps
        s = metrics["steps"].to_numpy(dtype=float)
        return np.diff(np.concatenate([[0.0], s])) if np.all(np.diff(s) >= 0) and len(s) > 1 else s
    raise ConfigError("run", "run_info.json", "steps_per_epoch in run_info.json or a steps column in metrics.csv")


# Models that flatten their input: a 1-D (features,) input is allowed (built as F channels of a 1x1 image).
FLAT_INPUT_MODELS = frozenset({"mlp"})


def check_input_shape(model: str, input_shape: Sequence[int], field: str = "input_shape") -> tuple[int, ...]:
    """The per-example input shape ``model`` accepts: (C, H, W) with H == W, or (F,) for models that flatten.

    >>> check_input_shape("mlp", (64,))
    (64,)
    >>> check_input_shape("resnet18", (3, 32))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dpquant_sim.errors.ConfigError: input_shape=(3, 32) is not allowed; expected CxHxW with H == W for model ...
    """
    dims = tuple(int(v) for v in input_shape)
    if len(dims) == 3 and dims[1] == dims[2] and min(dims) >= 1:
        return dims
    if len(dims) == 1 and dims[0] >= 1 and model in FLAT_INPUT_MODELS:
        return dims
    allowed = f"CxHxW with H == W for model {model} (e.g. 3x32x32)"
    if model in FLAT_INPUT_MODELS:
        allowed = f"CxHxW with H == W, or a feature count F, for model {model} (e.g. 1x8x8 or 64)"
    raise ConfigError(field, dims, allowed)


def build_shapes(model: str, input_shape: Sequence[int], num_classes: int):
    """Trace the project's model ``model`` for per-example ``input_shape`` (C, H, W) or, for models that
    flatten their input (mlp), (features,)."""
    from dpquant_sim.nn.shapes import trace_layers
    from dpquant_sim.training.models import MODELS, build_model

    if model not in MODELS:
        raise ConfigError("model", model, tuple(MODELS))
    input_shape = check_input_shape(model, input_shape)
    if len(input_shape) == 1:  # F features = F channels of a 1x1 image (the MLP flattens either way)
        m = build_model(model, in_channels=input_shape[0], num_classes=int(num_classes), image_size=1)
    else:
        m = build_model(model, in_channels=input_shape[0], num_classes=int(num_classes), image_size=input_shape[-1])
    return trace_layers(m, input_shape)


def pruned_shapes(shapes, kept_channel_fraction: dict[str, float]):
    """``shapes`` with channel pruning applied (run_info.json's ``prune.kept_channel_fraction``): a GEMM layer
    that keeps a share f < 1 of its output channels computes round(f x N) of them (its GEMM's N, its output
    and weight shapes and its parameters shrink). Conservative: every other layer is unchanged (the next
    layer's input channels are not removed: after a normalisation layer a pruned channel is not zero)."""
    import dataclasses

    out = []
    for s in shapes:
        f = float(kept_channel_fraction.get(s.name, 1.0))
        if s.is_gemm and f < 1.0:
            m, k, n = s.gemm_mnk
            n2 = max(1, int(round(f * n)))
            w = (n2, *s.weight_shape[1:])
            s = dataclasses.replace(s, gemm_mnk=(m, k, n2), out_shape=(n2, *s.out_shape[1:]), weight_shape=w,
                                    params=math.prod(w) + (n2 if s.has_bias else 0))
        out.append(s)
    return out


def estimator_forward_s(shapes, profile: HardwareProfile, examples: float, *,
                        base: str = "bf16") -> tuple[float, float]:
    """(theoretical, roofline) seconds of one forward pass over ``examples`` examples (no backward)."""
    if examples <= 0:
        return 0.0, 0.0
    ops = [o for o in step_ops(shapes, None, batch=examples, base=base, dp=False) if o.op in ("fwd", "fwd_vec")]
    return (math.fsum(op_time(o, profile, "theoretical") for o in ops),
            math.fsum(op_time(o, profile, "roofline") for o in ops))


def run_plans(run_dir: str | Path) -> list[EpochPlan]:
    """Every epoch's EpochPlan of a finished run (plans.jsonl, joined to metrics.csv on epoch)."""
    _, _, metrics = _read_run(Path(run_dir))
    return [EpochPlan.from_json(s) if isinstance(s, str) and s.strip() else EpochPlan(epoch=i)
            for i, s in enumerate(metrics["plan"])]


def point_rows(shapes, plans: dict[str, Any], profiles: Sequence[HardwareProfile], batches: Sequence[float],
               devices: Sequence[int], clipping: Sequence[str], *, base: str = "bf16", dp: bool = True,
               optimizer: str = "sgd", allreduce: str = "ring") -> list[dict[str, Any]]:
    """One row per (profile, devices, batch, clipping algorithm, plan) with the fields of
    :meth:`~dpquant_sim.cost.model.CostEstimate.summary` plus ``format`` (the plan's key), from three vectorised
    sweeps (the plans, all-fp32 and all-bf16 baselines under the same algorithm). Device counts beyond a
    profile's interconnect are left out."""

    keys, plan_list = list(plans), list(plans.values())
    kw = dict(dp=dp, optimizer=optimizer, devices=tuple(devices), allreduce=allreduce, clipping=tuple(clipping))
    res = sweep(shapes, plan_list, profiles, list(batches), base=base, **kw)
    b32 = sweep(shapes, [{}], profiles, list(batches), base="fp32", **kw)
    b16 = sweep(shapes, [{}], profiles, list(batches), base="bf16", **kw)
    per_plan = {}  # (plan, algorithm) -> (GEMM FLOPs per example, fallbacks per profile); both batch-independent
    for i, plan in enumerate(plan_list):
        for a, algo in enumerate(res.clipping):
            ops = step_ops(shapes, plan, batch=1.0, base=base, dp=dp, clipping=algo)
            per_plan[i, a] = (math.fsum(o.flops for o in ops if o.kind == "gemm"),
                              [fallbacks(ops, p) for p in profiles])
    rows = []
    for h, p in enumerate(profiles):
        lo_b, hi_b, basis = p.error_band
        for d, nd in enumerate(res.devices):
            if not res.feasible[h, d]:
                continue
            for b, batch in enumerate(res.batches):
                for a, algo in enumerate(res.clipping):
                    for i, key in enumerate(keys):
                        theo, roof = res.theoretical_s[i, h, b, d, a], res.roofline_s[i, h, b, d, a]
                        mem = res.memory_bytes[i, b, d, a]
                        flops1, fb = per_plan[i, a]
                        rows.append({
                            "hw": p.name, "devices": nd, "batch": batch, "base": base,
                            "clipping": algo if dp else "none", "format": key,
                            "theoretical_s": theo, "roofline_s": roof,
                            "roofline_low_s": res.roofline_low_s[i, h, b, d, a],
                            "roofline_high_s": res.roofline_high_s[i, h, b, d, a], "band_basis": basis,
                            "allreduce_s": res.allreduce_s[i, h, b, d, a],
                            "throughput_theoretical": batch / theo, "throughput_roofline": batch / roof,
                            "speedup_vs_fp32_theoretical": b32.theoretical_s[0, h, b, d, a] / theo,
                            "speedup_vs_fp32_roofline": b32.roofline_s[0, h, b, d, a] / roof,
                            "speedup_vs_bf16_theoretical": b16.theoretical_s[0, h, b, d, a] / theo,
                            "speedup_vs_bf16_roofline": b16.roofline_s[0, h, b, d, a] / roof,
                            "quantized_flop_share": res.quantized_flop_share[i, b, a], "gemm_flops": flops1 * batch,
                            "fallbacks": fb[h],
                            "energy_j": None if p.tdp_w is None else float(res.energy_j[i, h, b, d, a]),
                            "dollars": None if p.price_usd_per_s is None else float(res.dollars[i, h, b, d, a]),
                            "memory_gb": mem / 1e9,
                            "capacity_gb": None if p.capacity_bytes is None else p.capacity_bytes / 1e9,
                            "fits": None if p.capacity_bytes is None else bool(mem <= p.capacity_bytes),
                        })
    return rows


def run_clipping(info: dict, cfg: dict) -> str | None:
    """The clipping algorithm a run used: run_info.json's ``clipping`` (None for a non-private run), else
    config.yaml's, else ``hooks`` (runs written before the engine had other algorithms used Opacus hooks)."""
    if "clipping" in info:
        return info["clipping"]
    if not bool(cfg.get("private", info.get("private", True))):
        return None
    return str(cfg.get("clipping", "hooks"))


def cost_run(run_dir: str | Path, profiles: Iterable[str | HardwareProfile] | None = None, *, base: str = "bf16",
             hw_dirs: Iterable[str | Path] = (), devices: Sequence[int] = (1,),
             allreduce: str = "ring", clipping: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Per-epoch, per-accelerator (and device count, and clipping algorithm) time, throughput, speedups, energy
    and dollars of a run.

    ``profiles``: names or HardwareProfile objects (None: every known profile). ``base``: precision of
    layers the plan leaves unquantized. Speedups compare with the same run entirely in fp32 / bf16 on the
    same devices under the same clipping algorithm. ``devices``: data-parallel device counts (the run's batch is
    split over them); counts beyond a profile's interconnect are left out. ``clipping``: the DP clipping
    algorithm(s) to cost the run under (None: the one it used, :func:`run_clipping`; 'all' or names: each, a
    what-if that is exact because every algorithm computes the same update). Columns ``clipping_run`` and
    ``clipping_costed`` say which is which ('none' for a non-private run).
    """
    from dpquant_sim.cost.clipping import parse_clipping

    run_dir = Path(run_dir)
    info, cfg, metrics = _read_run(run_dir)
    known = load_profiles(hw_dirs)
    if profiles is None:
        profs = list(known.values())
    else:
        profs = []
        for p in profiles:
            if isinstance(p, HardwareProfile):
                profs.append(p)
            elif p in known:
                profs.append(known[p])
            else:
                raise ConfigError("hw", p, tuple(known))
    shapes = build_shapes(info["model"], info["input_shape"], info["num_classes"])
    kept = (info.get("prune") or {}).get("kept_channel_fraction") or {}
    if any(float(v) < 1.0 for v in kept.values()):  # channel-pruned run: its smaller GEMMs (speedups below are
        shapes = pruned_shapes(shapes, kept)        # vs the PRUNED model in fp32/bf16; compare runs' times)
    batch = float(info.get("batch_size") or info["sample_rate"] * info["n_train"])
    dp = bool(cfg.get("private", info.get("private", True)))
    opt = _optimizer(cfg)
    used = run_clipping(info, cfg) if dp else None
    algos = parse_clipping(used if clipping is None else clipping, "clipping") if dp else parse_clipping(None)
    plans = [EpochPlan.from_json(s) if isinstance(s, str) and s.strip() else EpochPlan(epoch=i)
             for i, s in enumerate(metrics["plan"])]
    steps = _steps(info, metrics)
    kw = dict(dp=dp, optimizer=opt, devices=tuple(devices), allreduce=allreduce, clipping=algos)
    res = sweep(shapes, plans, profs, [batch], base=base, **kw)
    b32 = sweep(shapes, [{}], profs, [batch], base="fp32", **kw)
    b16 = sweep(shapes, [{}], profs, [batch], base="bf16", **kw)
    fb = {}  # requested -> running precision per (plan, profile, algorithm); the op list is profile-independent
    for e, plan in enumerate(plans):
        for a, algo in enumerate(res.clipping):
            ops = step_ops(shapes, plan, batch=batch, base=base, dp=dp, clipping=algo)
            for h, p in enumerate(profs):
                fb[e, h, a] = format_fallbacks(fallbacks(ops, p))
    # DPQuant's estimator: every `interval` epochs, (L + 1) forwards over a Poisson sample of the private data
    sched = cfg.get("schedule") or {}
    est_theo = np.zeros(len(profs))
    est_roof = np.zeros(len(profs))
    if isinstance(sched, dict) and sched.get("kind") == "dpquant":
        n_layers = sum(1 for s in shapes if s.is_gemm)
        ex = float(sched.get("sample_rate", 0.05)) * float(info.get("n_train") or batch / info["sample_rate"])
        per = max(int(sched.get("interval", 2)), 1)
        for h, p in enumerate(profs):
            t, r = estimator_forward_s(shapes, p, ex, base=base)
            est_theo[h], est_roof[h] = (n_layers + 1) * t / per, (n_layers + 1) * r / per
    rows = []
    for e, plan in enumerate(plans):
        for h, p in enumerate(profs):
            lo_b, hi_b, basis = p.error_band
            for d, nd in enumerate(res.devices):
                if not res.feasible[h, d]:
                    continue
                for a, algo in enumerate(res.clipping):
                    n = steps[e]
                    # the estimator's forwards run on one device's share of the sample
                    e_t, e_r = est_theo[h] / nd, est_roof[h] / nd
                    theo = n * res.theoretical_s[e, h, 0, d, a] + e_t
                    roof = n * res.roofline_s[e, h, 0, d, a] + e_r
                    t32, r32 = n * b32.theoretical_s[0, h, 0, d, a], n * b32.roofline_s[0, h, 0, d, a]
                    t16, r16 = n * b16.theoretical_s[0, h, 0, d, a], n * b16.roofline_s[0, h, 0, d, a]
                    rows.append({
                        "epoch": int(metrics["epoch"].iloc[e]) if "epoch" in metrics.columns else plan.epoch,
                        "hw": p.name, "devices": nd, "steps": n, "batch": batch,
                        "time_theoretical_s": theo, "time_roofline_s": roof,
                        "time_roofline_low_s": roof / (1 + hi_b), "time_roofline_high_s": roof / (1 + lo_b),
                        "band_basis": basis, "allreduce_s": n * res.allreduce_s[e, h, 0, d, a],
                        "estimator_theoretical_s": e_t, "estimator_roofline_s": e_r,
                        "throughput_theoretical": n * batch / theo, "throughput_roofline": n * batch / roof,
                        "speedup_vs_fp32_theoretical": t32 / theo, "speedup_vs_fp32_roofline": r32 / roof,
                        "speedup_vs_bf16_theoretical": t16 / theo, "speedup_vs_bf16_roofline": r16 / roof,
                        "energy_j": roof * p.tdp_w * nd if p.tdp_w is not None else float("nan"),
                        "dollars": roof * p.price_usd_per_s * nd if p.price_usd_per_s is not None else float("nan"),
                        "fallbacks": fb[e, h, a],
                        "clipping_run": used or "none", "clipping_costed": algo if dp else "none",
                        "quantized_flop_share": res.quantized_flop_share[e, 0, a],
                        "memory_gb": res.memory_bytes[e, 0, d, a] / 1e9, "fits": bool(res.fits[e, h, 0, d, a]),
                    })
    return pd.DataFrame(rows)
