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


def cost(
    model: Optional[str] = typer.Option(None, help="mlp, cnn, resnet18, resnet50, densenet121"),
    input: Optional[str] = typer.Option(None, "--input", help="per-example input shape, e.g. 3x32x32"),
    num_classes: int = typer.Option(10, help="model output classes"),
    batch: List[float] = typer.Option([256.0], "--batch", help="examples per step (repeat for several)"),
    hw: List[str] = typer.Option(["h100_sxm"], "--hw", help="profile name(s), comma-separated or repeated; 'all'"),
    hw_dir: Optional[List[Path]] = typer.Option(None, "--hw-dir", help="extra folder of profile YAML files"),
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
    """Theoretical (peak-rate) and roofline step time, throughput and speedup over fp32/bf16 on accelerators."""
    profs = _profiles(hw, hw_dir)
    if run is not None:
        if model or input:
            raise ConfigError("--run", str(run), "either --run or --model/--input, not both")
        from dpquant_sim.cost.run import cost_run

        df = cost_run(run, profs, base=base, hw_dirs=hw_dir or ())
        if as_json:
            typer.echo(df.to_json(orient="records", indent=2))
        else:
            _table(df, ["epoch", "hw", "steps", "quantized_flop_share", "time_theoretical_s", "time_roofline_s",
                        "speedup_vs_fp32_theoretical", "speedup_vs_bf16_theoretical", "speedup_vs_bf16_roofline",
                        "energy_j", "fits"], f"run {run}")
        return
    if not model or not input:
        raise ConfigError("--model/--input", model or input, "both --model NAME and --input CxHxW (or --run RUN_DIR)")
    for b in batch:
        if not (b > 0 and math.isfinite(b)):
            raise ConfigError("--batch", b, "a positive number of examples per step")
    from dpquant_sim.cost.flops import BASES, OPTIMIZERS
    from dpquant_sim.cost.model import estimate
    from dpquant_sim.cost.run import build_shapes

    if base not in BASES:
        raise ConfigError("--base", base, BASES)
    if optimizer not in OPTIMIZERS:
        raise ConfigError("--optimizer", optimizer, tuple(OPTIMIZERS))
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError("--budget", budget, "a share in (0, 1]")
    shapes = build_shapes(model, _parse_input(input), num_classes)
    plan = make_plan(shapes, schedule, fmt, budget, seed)
    rows, ests = [], []
    for p in profs:
        for b in batch:
            e = estimate(shapes, plan, p, batch=b, base=base, dp=dp, optimizer=optimizer)
            ests.append(e)
            rows.append({"model": model, "input": input, "schedule": schedule, "format": fmt, **e.summary()})
    if as_json:
        typer.echo(json.dumps({"plan": plan.to_dict(), "results": rows}, indent=2, default=str))
        return
    import pandas as pd

    _table(pd.DataFrame(rows), ["hw", "batch", "quantized_flop_share", "theoretical_s", "roofline_s",
                                "throughput_roofline", "speedup_vs_fp32_theoretical", "speedup_vs_fp32_roofline",
                                "speedup_vs_bf16_theoretical", "speedup_vs_bf16_roofline", "energy_j", "memory_gb",
                                "fits"],
           f"{model} {input} {schedule} {fmt} ({'DP' if dp else 'non-DP'}, base {base})")
    if breakdown and ests:
        from rich.console import Console

        st = ests[0].step
        Console(width=160).print(f"breakdown on {st.profile}, batch {st.batch:g} (seconds):")
        Console(width=160).print(st.breakdown.groupby(["op", "runs_as"])[["theoretical_s", "roofline_s"]].sum()
                                 .sort_values("roofline_s", ascending=False).to_string())


def _table(df, cols, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in cols:
        t.add_column(c.replace("speedup_vs_", "x ").replace("_theoretical", " theo").replace("_roofline", " roof"),
                     justify="left" if c == "hw" else "right")
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append("n/a" if v != v else (f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"))
            else:
                cells.append(str(v))
        t.add_row(*cells)
    Console(width=200).print(t)


def register(app: typer.Typer) -> None:
    app.command("cost")(cost)
