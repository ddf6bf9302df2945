"""``dpquant-sim cost``: time, throughput, speedup, energy and memory of a schedule on accelerators.

From a model and input shape::

    dpquant-sim cost --model resnet18 --input 3x32x32 --batch 256 --hw h100_sxm --schedule static-all --format fp8

or from a finished run directory (per-epoch plans from its metrics.csv)::

    dpquant-sim cost --run runs/r1 --hw all --json
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from dpquant_sim.errors import ConfigError


def _parse_input(s: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in s.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise ConfigError("--input", s, "a per-example shape like 3x32x32 (CxHxW) or 64 (features)")
    return dims


def _profiles(hw: List[str], hw_dir):
    from dpquant_sim.cost.profiles import load_profiles

    known = load_profiles(hw_dir or ())
    names: list[str] = []
    for item in hw:
        for n in item.split(","):
            n = n.strip()
            if not n:
                continue
            if n == "all":
                names += list(known)
            elif n not in known:
                raise ConfigError("--hw", n, ("all", *known))
            else:
                names.append(n)
    return [known[n] for n in dict.fromkeys(names)]


def make_plan(shapes, schedule: str, recipe: str, budget: Optional[float], seed: int):
    """EpochPlan for epoch 0 of a schedule kind (no private data: dpquant needs a run directory)."""
    from dpquant_sim.nn.config import get_recipe
    from dpquant_sim.schedules import SCHEDULE_KINDS, build_schedule
    from dpquant_sim.schedules.base import LayerInfo, ScheduleContext

    import numpy as np

    get_recipe(recipe)  # ConfigError on unknown recipe names
    if schedule not in SCHEDULE_KINDS:
        raise ConfigError("--schedule", schedule, SCHEDULE_KINDS)
    if schedule == "dpquant":
        raise ConfigError("--schedule", schedule, "fp32, static-all, static-subset or random here; a dpquant plan "
                          "depends on private data: cost a finished run with --run RUN_DIR")
    cfg: dict = {"kind": schedule}
    if budget is not None:
        if schedule in ("fp32", "static-all"):
            raise ConfigError("--budget", budget, f"no --budget with --schedule {schedule} (use static-subset/random)")
        cfg["budget"] = budget
    sched = build_schedule(cfg)
    layers = [LayerInfo(s.name, s.forward_flops) for s in shapes if s.is_gemm]
    ctx = ScheduleContext(epoch=0, epochs=1, layers=layers, recipe=recipe, rng=np.random.default_rng(seed),
                          private=False)
    return sched.plan(ctx)


def _parse_devices(items: List[str]) -> list[int]:
    out: list[int] = []
    for item in items:
        for v in item.split(","):
            v = v.strip()
            if not v:
                continue
            if not v.isdigit() or int(v) < 1:
                raise ConfigError("--devices", v, "positive whole numbers of devices, e.g. 1,8,64")
            out.append(int(v))
    return list(dict.fromkeys(out)) or [1]


SPEEDUP_NOTE = ("x fp32 / x bf16 = the same step with every layer in fp32 / bf16 divided by this step's time, on "
                "the same device(s). theo: peak rates only (the paper's convention, no memory, launches or communication); "
                "roof: GEMM kernel model + memory + launches + exposed all-reduce. roof band: the range a measured "
                "time could take given the profile's cross-validated GEMM error (measured / transferred / generic). "
                "runs as: precisions without a native path and what runs instead. $ and J: all devices.")


def cost(
    model: Optional[str] = typer.Option(None, help="mlp, cnn, resnet18, resnet18-w16, resnet50, densenet121"),
    input: Optional[str] = typer.Option(None, "--input", help="per-example input shape: CxHxW with H == W (e.g. "
                                        "3x32x32), or a feature count for mlp (e.g. 64)"),
    num_classes: int = typer.Option(10, help="model output classes"),
    batch: List[float] = typer.Option([256.0], "--batch",
                                      help="examples per step over all devices (repeat for several)"),
    hw: List[str] = typer.Option(["h100_sxm"], "--hw", help="profile name(s), comma-separated or repeated; 'all'"),
    hw_dir: Optional[List[Path]] = typer.Option(None, "--hw-dir", help="extra folder of profile YAML files"),
    devices: List[str] = typer.Option(["1"], "--devices", help="data-parallel device counts, e.g. 1,8,64 (the batch "
                                      "is split over them; gradients all-reduced over the profile's interconnect)"),
    allreduce: str = typer.Option("ring", help="all-reduce algorithm: ring or tree"),
    schedule: str = typer.Option("static-all", help="fp32, static-all, static-subset, random"),
    fmt: str = typer.Option("fp8", "--format", help="recipe of quantized layers (fp8, fp4, mxfp8, nvfp4, int8, ...)"),
    budget: Optional[float] = typer.Option(None, help="quantized FLOP share for static-subset/random (0,1]"),
    seed: int = typer.Option(0, help="seed of a random schedule's draw"),
    base: str = typer.Option("bf16", help="precision of unquantized layers: fp32, tf32, bf16, fp16"),
    dp: bool = typer.Option(True, "--dp/--no-dp", help="DP-SGD extras (per-sample grads, clipping, noise)"),
    optimizer: str = typer.Option("sgd", help="sgd, momentum, adam"),
    run: Optional[Path] = typer.Option(None, "--run", help="finished run directory: cost every epoch's plan"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    breakdown: bool = typer.Option(False, "--breakdown", help="also print time by op and precision (first hw)"),
) -> None:
    """Theoretical (peak-rate) and roofline step time with its error band, throughput, speedup over fp32/bf16,
    precision fallbacks, energy and dollars on accelerators, on one or N data-parallel devices."""
    from dpquant_sim.cost.comm import ALLREDUCE

    profs = _profiles(hw, hw_dir)
    devs = _parse_devices(devices)
    if allreduce not in ALLREDUCE:
        raise ConfigError("--allreduce", allreduce, tuple(ALLREDUCE))
    for p in profs:
        over = [d for d in devs if d > p.max_devices]
        if over and len(profs) == 1:
            from dpquant_sim.cost.comm import check_devices

            check_devices(p, over[0])
    if run is not None:
        if model or input:
            raise ConfigError("--run", str(run), "either --run or --model/--input, not both")
        from dpquant_sim.cost.run import cost_run, run_plans

        df = cost_run(run, profs, base=base, hw_dirs=hw_dir or (), devices=devs, allreduce=allreduce)
        if as_json:
            typer.echo(json.dumps({"run": str(run), "plans": [pl.to_dict() for pl in run_plans(run)],
                                   "results": json.loads(df.to_json(orient="records"))}, indent=2, default=str))
        else:
            _table(df, ["epoch", "hw", "devices", "steps", "quantized_flop_share", "time_theoretical_s",
                        "time_roofline_s", "roof band", "band_basis", "speedup_vs_fp32_theoretical",
                        "speedup_vs_bf16_theoretical", "speedup_vs_bf16_roofline", "fallbacks", "energy_j", "dollars",
                        "fits"],
                   f"run {run} (seconds per epoch)")
            typer.echo(SPEEDUP_NOTE)
        return
    if not model or not input:
        raise ConfigError("--model/--input", model or input, "both --model NAME and --input CxHxW (or --run RUN_DIR)")
    for b in batch:
        if not (b > 0 and math.isfinite(b)):
            raise ConfigError("--batch", b, "a positive number of examples per step")
    from dpquant_sim.cost.flops import BASES, OPTIMIZERS
    from dpquant_sim.cost.model import estimate, format_fallbacks
    from dpquant_sim.cost.run import build_shapes, check_input_shape

    if base not in BASES:
        raise ConfigError("--base", base, BASES)
    if optimizer not in OPTIMIZERS:
        raise ConfigError("--optimizer", optimizer, tuple(OPTIMIZERS))
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError("--budget", budget, "a share in (0, 1]")
    dims = check_input_shape(model, _parse_input(input), "--input") if model else _parse_input(input)
    shapes = build_shapes(model, dims, num_classes)
    plan = make_plan(shapes, schedule, fmt, budget, seed)
    rows, ests = [], []
    for p in profs:
        for nd in devs:
            if nd > p.max_devices:
                continue  # reported below the table
            for b in batch:
                e = estimate(shapes, plan, p, batch=b, base=base, dp=dp, optimizer=optimizer, devices=nd,
                             allreduce=allreduce)
                ests.append(e)
                rows.append({"model": model, "input": input, "schedule": schedule, "format": fmt, **e.summary()})
    skipped = [f"{p.name} x{d}" for p in profs for d in devs if d > p.max_devices]
    if as_json:
        typer.echo(json.dumps({"plan": plan.to_dict(), "results": rows, "skipped": skipped}, indent=2, default=str))
        return
    import pandas as pd

    df = pd.DataFrame(rows)
    df["fallbacks"] = [format_fallbacks(f) for f in df["fallbacks"]]
    _table(df, ["hw", "devices", "batch", "quantized_flop_share", "theoretical_s", "roofline_s", "roof band",
                "band_basis", "allreduce_s", "speedup_vs_fp32_theoretical", "speedup_vs_bf16_theoretical",
                "speedup_vs_bf16_roofline", "fallbacks", "energy_j", "dollars", "fits"],
           f"{model} {input} {schedule} {fmt} ({'DP' if dp else 'non-DP'}, base {base}; seconds per step)")
    typer.echo(SPEEDUP_NOTE)
    if skipped:
        typer.echo(f"not shown (more devices than the interconnect reaches): {', '.join(skipped)}")
    if breakdown and ests:
        from rich.console import Console

        st = ests[0].step
        Console(width=160).print(f"breakdown on {st.profile} x{st.devices}, batch {st.batch:g} (seconds):")
        Console(width=160).print(st.breakdown.groupby(["op", "runs_as"])[["theoretical_s", "roofline_s"]].sum()
                                 .sort_values("roofline_s", ascending=False).to_string())


_SHORT = {"devices": "dev", "band_basis": "band from", "quantized_flop_share": "q share", "theoretical_s": "theo s",
          "roofline_s": "roof s", "allreduce_s": "all-red s",
          "throughput_roofline": "ex/s roof", "time_theoretical_s": "theo s", "time_roofline_s": "roof s",
          "fallbacks": "runs as", "energy_j": "J", "dollars": "$", "memory_gb": "mem GB"}


def _table(df, cols, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in cols:
        name = _SHORT.get(c, c)
        t.add_column(name.replace("speedup_vs_", "x ").replace("_theoretical", " theo").replace("_roofline", " roof"),
                     justify="left" if c in ("hw", "fallbacks", "roof band") else "right")
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            if c == "roof band":
                lo = r.get("roofline_low_s", r.get("time_roofline_low_s"))
                hi = r.get("roofline_high_s", r.get("time_roofline_high_s"))
                cells.append(f"{lo:.3g}-{hi:.3g}")
                continue
            v = r[c]
            if isinstance(v, float):
                cells.append("n/a" if v != v else (f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"))
            else:
                cells.append(str(v))
        t.add_row(*cells)
    Console(width=220).print(t)


def register(app: typer.Typer) -> None:
    app.command("cost")(cost)
