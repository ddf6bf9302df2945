"""Cost of a finished training run: per epoch and per accelerator, from run_info.json + metrics.csv plans.

The run directory (written by the training engine) holds ``run_info.json`` (model, input_shape, num_classes,
n_train, batch_size, sample_rate, steps_per_epoch, ...), ``config.yaml`` and ``metrics.csv`` with one row per
epoch and the epoch's :class:`~dpquant_sim.plan.EpochPlan` as JSON in the ``plan`` column. The model is
rebuilt from its name (no weights are read) and traced once; all epochs x accelerators are evaluated with
the vectorized sweep. Under a ``dpquant`` schedule the sensitivity estimator's forward passes are added as
T_est (every ``interval`` epochs: a Poisson sample of ``sample_rate * n_train`` examples, L + 1 forwards).

Example: ``cost_run("runs/r1", ["h100_sxm", "b200"], devices=[1, 8])`` -> DataFrame with columns epoch, hw,
devices, steps, batch, time_theoretical_s, time_roofline_s (per epoch) with time_roofline_low_s/high_s (the
profile's error band), throughput_* (samples/s), speedup_vs_{fp32,bf16}_*, energy_j and dollars (all
devices), fallbacks, quantized_flop_share, memory_gb (per device), fits.
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
    metrics = pd.read_csv(run_dir / "metrics.csv")
    if "plan" not in metrics.columns:
        raise ConfigError("run", str(run_dir), "metrics.csv with a 'plan' column (EpochPlan JSON per epoch)")
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


def estimator_forward_s(shapes, profile: HardwareProfile, examples: float, *,
                        base: str = "bf16") -> tuple[float, float]:
    """(theoretical, roofline) seconds of one forward pass over ``examples`` examples (no backward)."""
    if examples <= 0:
        return 0.0, 0.0
    ops = [o for o in step_ops(shapes, None, batch=examples, base=base, dp=False) if o.op in ("fwd", "fwd_vec")]
    return (math.fsum(op_time(o, profile, "theoretical") for o in ops),
            math.fsum(op_time(o, profile, "roofline") for o in ops))


def run_plans(run_dir: str | Path) -> list[EpochPlan]:
    """Every epoch's EpochPlan of a finished run (metrics.csv)."""
    _, _, metrics = _read_run(Path(run_dir))
    return [EpochPlan.from_json(s) if isinstance(s, str) and s.strip() else EpochPlan(epoch=i)
            for i, s in enumerate(metrics["plan"])]


def cost_run(run_dir: str | Path, profiles: Iterable[str | HardwareProfile] | None = None, *, base: str = "bf16",
             hw_dirs: Iterable[str | Path] = (), devices: Sequence[int] = (1,),
             allreduce: str = "ring") -> pd.DataFrame:
    """Per-epoch, per-accelerator (and device count) time, throughput, speedups, energy and dollars of a run.

    ``profiles``: names or HardwareProfile objects (None: every known profile). ``base``: precision of
    layers the plan leaves unquantized. Speedups compare with the same run entirely in fp32 / bf16 on the
    same devices. ``devices``: data-parallel device counts (the run's batch is split over them); counts beyond
    a profile's interconnect are left out.
    """
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
    batch = float(info.get("batch_size") or info["sample_rate"] * info["n_train"])
    dp = bool(cfg.get("private", info.get("private", True)))
    opt = _optimizer(cfg)
    # The engine's clipping algorithm of the run; the cost model has per-layer costs for `hooks` only so far
    # (dpquant_sim.cost.clipping), so every run is costed as hooks and the table says which was costed.
    run_clipping = str(cfg.get("clipping", "hooks")) if dp else "none"
    plans = [EpochPlan.from_json(s) if isinstance(s, str) and s.strip() else EpochPlan(epoch=i)
             for i, s in enumerate(metrics["plan"])]
    steps = _steps(info, metrics)
    kw = dict(dp=dp, optimizer=opt, devices=tuple(devices), allreduce=allreduce)
    res = sweep(shapes, plans, profs, [batch], base=base, **kw)
    b32 = sweep(shapes, [{}], profs, [batch], base="fp32", **kw)
    b16 = sweep(shapes, [{}], profs, [batch], base="bf16", **kw)
    fb = [format_fallbacks(fallbacks(step_ops(shapes, plan, batch=batch, base=base, dp=dp), p))
          for plan in plans for p in profs]
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
                n = steps[e]
                # the estimator's forwards run on one device's share of the sample
                e_t, e_r = est_theo[h] / nd, est_roof[h] / nd
                theo = n * res.theoretical_s[e, h, 0, d] + e_t
                roof = n * res.roofline_s[e, h, 0, d] + e_r
                t32, r32 = n * b32.theoretical_s[0, h, 0, d], n * b32.roofline_s[0, h, 0, d]
                t16, r16 = n * b16.theoretical_s[0, h, 0, d], n * b16.roofline_s[0, h, 0, d]
                rows.append({
                    "epoch": int(metrics["epoch"].iloc[e]) if "epoch" in metrics.columns else plan.epoch,
                    "hw": p.name, "devices": nd, "steps": n, "batch": batch,
                    "time_theoretical_s": theo, "time_roofline_s": roof,
                    "time_roofline_low_s": roof / (1 + hi_b), "time_roofline_high_s": roof / (1 + lo_b),
                    "band_basis": basis, "allreduce_s": n * res.allreduce_s[e, h, 0, d],
                    "estimator_theoretical_s": e_t, "estimator_roofline_s": e_r,
                    "throughput_theoretical": n * batch / theo, "throughput_roofline": n * batch / roof,
                    "speedup_vs_fp32_theoretical": t32 / theo, "speedup_vs_fp32_roofline": r32 / roof,
                    "speedup_vs_bf16_theoretical": t16 / theo, "speedup_vs_bf16_roofline": r16 / roof,
                    "energy_j": roof * p.tdp_w * nd if p.tdp_w is not None else float("nan"),
                    "dollars": roof * p.price_usd_per_s * nd if p.price_usd_per_s is not None else float("nan"),
                    "fallbacks": fb[e * len(profs) + h],
                    "clipping_run": run_clipping, "clipping_costed": "hooks" if dp else "none",
                    "quantized_flop_share": res.quantized_flop_share[e, 0],
                    "memory_gb": res.memory_bytes[e, 0, d] / 1e9, "fits": bool(res.fits[e, h, 0, d]),
                })
    return pd.DataFrame(rows)
