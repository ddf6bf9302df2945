"""``dpquant-sim cost``: time, throughput, speedup, energy and memory of a schedule on accelerators.

From a model and input shape, per accelerator, format and DP clipping algorithm::

    dpquant-sim cost --model resnet18 --input 3x32x32 --batch-size 256 --accelerators h100_sxm \
        --schedule static-all --recipe fp8
    dpquant-sim cost --model resnet18 --input 3x32x32 --batch-size 256 --accelerators all --clipping all

or from a finished run directory (per-epoch plans from its metrics.csv; costed under the run's own clipping
algorithm unless ``--clipping`` names others)::

    dpquant-sim cost --run runs/r1 --accelerators all --json

Flag names follow the one table in docs/usage.md. The names this command used before (``--batch``, ``--hw``,
``--format``, ``--dp/--no-dp``, ``--dp-algorithm``) still work for one release, with a deprecation note on
stderr; errors name the flag as typed.
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


def _profiles(hw: List[str], hw_dir, flag: str = "--accelerators"):
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
                raise ConfigError(flag, n, ("all", *known))
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


def _parse_formats(items: List[str], flag: str = "--recipe") -> list[str]:
    from dpquant_sim.nn.config import get_recipe

    out = [f.strip() for item in items for f in item.split(",") if f.strip()]
    for f in out:
        try:
            get_recipe(f)
        except ConfigError as e:  # name the flag, not the config field
            raise ConfigError(flag, e.value, e.allowed) from None
    return list(dict.fromkeys(out)) or ["fp8"]


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
    batch: Optional[List[float]] = typer.Option(None, "--batch-size",
                                                help="examples per step over all devices (repeat for several; "
                                                "default 256)"),
    batch_old: Optional[List[float]] = typer.Option(None, "--batch", hidden=True, help="old name of --batch-size"),
    hw: Optional[List[str]] = typer.Option(None, "--accelerators", help="profile name(s), comma-separated or "
                                           "repeated, or 'all' (default h100_sxm)"),
    hw_old: Optional[List[str]] = typer.Option(None, "--hw", hidden=True, help="old name of --accelerators"),
    hw_dir: Optional[List[Path]] = typer.Option(None, "--hw-dir", help="extra folder of profile YAML files"),
    devices: List[str] = typer.Option(["1"], "--devices", help="data-parallel device counts, e.g. 1,8,64 (the batch "
                                      "is split over them; gradients all-reduced over the profile's interconnect)"),
    allreduce: str = typer.Option("ring", help="all-reduce algorithm: ring or tree"),
    schedule: str = typer.Option("static-all", help="fp32, static-all, static-subset, random"),
    fmt: Optional[List[str]] = typer.Option(None, "--recipe", help="recipe(s) of quantized layers, comma-separated "
                                            "or repeated (fp8, fp4, mxfp8, nvfp4, int8, ...; default fp8,fp4)"),
    fmt_old: Optional[List[str]] = typer.Option(None, "--format", hidden=True, help="old name of --recipe"),
    clipping: Optional[List[str]] = typer.Option(
        None, "--clipping", help="DP clipping algorithm(s): hooks, ghost, bk, mixed or all, "
        "comma-separated or repeated (default: the engine's default, mixed; with --run: the run's own)"),
    clipping_old: Optional[List[str]] = typer.Option(None, "--dp-algorithm", hidden=True,
                                                     help="old name of --clipping"),
    budget: Optional[float] = typer.Option(None, help="quantized FLOP share for static-subset/random (0,1]"),
    seed: int = typer.Option(0, help="seed of a random schedule's draw"),
    base: str = typer.Option("bf16", help="precision of unquantized layers: fp32, tf32, bf16, fp16"),
    dp: Optional[bool] = typer.Option(None, "--private/--non-private", help="DP-SGD extras (per-sample grads, "
                                      "clipping, noise; default) or a plain step"),
    dp_old: Optional[bool] = typer.Option(None, "--dp/--no-dp", hidden=True, help="old name of --private"),
    optimizer: str = typer.Option("sgd", help="sgd, momentum, adam"),
    run: Optional[Path] = typer.Option(None, "--run", help="finished run directory: cost every epoch's plan"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    breakdown: bool = typer.Option(False, "--breakdown", help="also print time by op and precision (first hw)"),
) -> None:
    """Theoretical (peak-rate) and roofline step time with its error band, throughput, speedup over fp32/bf16,
    precision fallbacks, energy and dollars on accelerators, on one or N data-parallel devices."""
    from dpquant_sim.cli.vocab import merge_alias
    from dpquant_sim.cost.comm import ALLREDUCE

    batch_flag = "--batch" if batch_old else "--batch-size"
    hw_flag = "--hw" if hw_old else "--accelerators"
    fmt_flag = "--format" if fmt_old else "--recipe"
    batch = merge_alias(batch, batch_old, new="--batch-size", old="--batch") or [256.0]
    hw = merge_alias(hw, hw_old, new="--accelerators", old="--hw") or ["h100_sxm"]
    fmt = merge_alias(fmt, fmt_old, new="--recipe", old="--format") or ["fp8,fp4"]
    clipping = merge_alias(clipping, clipping_old, new="--clipping", old="--dp-algorithm") or None
    if dp_old is not None:
        dp = merge_alias(dp, dp_old, new="--private/--non-private", old="--dp" if dp_old else "--no-dp")
    dp = True if dp is None else dp
    profs = _profiles(hw, hw_dir, hw_flag)
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

        df = cost_run(run, profs, base=base, hw_dirs=hw_dir or (), devices=devs, allreduce=allreduce,
                      clipping=_parse_clipping(clipping) if clipping else None)
        if as_json:
            from dpquant_sim.cli.output import json_document

            typer.echo(json_document({"run": str(run), "plans": [pl.to_dict() for pl in run_plans(run)],
                                      "results": json.loads(df.to_json(orient="records"))}))
        else:
            _table(df, ["epoch", "hw", "devices", "clipping_costed", "steps", "quantized_flop_share",
                        "time_theoretical_s",
                        "time_roofline_s", "roof band", "band_basis", "speedup_vs_fp32_theoretical",
                        "speedup_vs_bf16_theoretical", "speedup_vs_bf16_roofline", "fallbacks", "energy_j", "dollars",
                        "memory_gb", "fits"],
                   f"run {run} (seconds per epoch; clipping used: {df['clipping_run'].iloc[0] if len(df) else '-'})",
                   fixed=4)
            typer.echo(SPEEDUP_NOTE)
        return
    if not model or not input:
        raise ConfigError("--model/--input", model or input, "both --model NAME and --input CxHxW (or --run RUN_DIR)")
    for b in batch:
        if not (b > 0 and math.isfinite(b)):
            raise ConfigError(batch_flag, b, "a positive number of examples per step")
    from dpquant_sim.clipping_rules import DEFAULT_CLIPPING
    from dpquant_sim.cost.flops import BASES, OPTIMIZERS
    from dpquant_sim.cost.model import estimate, format_fallbacks
    from dpquant_sim.cost.run import build_shapes, check_input_shape, point_rows

    if base not in BASES:
        raise ConfigError("--base", base, BASES)
    if optimizer not in OPTIMIZERS:
        raise ConfigError("--optimizer", optimizer, tuple(OPTIMIZERS))
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError("--budget", budget, "a share in (0, 1]")
    dims = check_input_shape(model, _parse_input(input), "--input") if model else _parse_input(input)
    formats = _parse_formats(fmt, fmt_flag)
    algos = _parse_clipping(clipping) if dp else ("none",)
    shapes = build_shapes(model, dims, num_classes)
    if schedule == "fp32":
        formats = formats[:1]  # nothing is quantized: one plan
    plans = {f: make_plan(shapes, schedule, f, budget, seed) for f in formats}
    rows = point_rows(shapes, plans, profs, batch, devs, algos if dp else (DEFAULT_CLIPPING,), base=base, dp=dp,
                      optimizer=optimizer, allreduce=allreduce)
    for r in rows:
        r.update({"model": model, "input": input, "schedule": schedule,
                  "format": r["format"] if schedule != "fp32" else "-"})
    skipped = [f"{p.name} x{d}" for p in profs for d in devs if d > p.max_devices]
    if as_json:
        from dpquant_sim.cli.output import json_document

        typer.echo(json_document({"plans": {f: pl.to_dict() for f, pl in plans.items()}, "results": rows,
                                  "skipped": skipped}))
        return
    import pandas as pd

    df = pd.DataFrame(rows)
    df["fallbacks"] = [format_fallbacks(f) for f in df["fallbacks"]]
    _table(df, ["hw", "devices", "batch", "clipping", "format", "quantized_flop_share", "theoretical_s", "roofline_s",
                "roof band", "band_basis", "allreduce_s", "speedup_vs_fp32_theoretical", "speedup_vs_bf16_theoretical",
                "speedup_vs_bf16_roofline", "fallbacks", "energy_j", "dollars", "memory_gb", "fits"],
           f"{model} {input} {schedule} ({'DP' if dp else 'non-DP'}, base {base}; seconds per step)", fixed=5)
    typer.echo(SPEEDUP_NOTE)
    if len(algos) * len(plans) > 1:
        _speedup_matrix(df)
    if skipped:
        typer.echo(f"not shown (more devices than the interconnect reaches): {', '.join(skipped)}")
    if breakdown and rows:
        from rich.console import Console

        r0 = rows[0]
        st = estimate(shapes, plans[formats[0]], profs[0], batch=r0["batch"], base=base, dp=dp, optimizer=optimizer,
                      devices=r0["devices"], allreduce=allreduce, clipping=algos[0] if dp else DEFAULT_CLIPPING).step
        Console(width=160).print(f"breakdown on {st.profile} x{st.devices}, batch {st.batch:g}, clipping "
                                 f"{st.clipping or 'none'} (seconds):")
        Console(width=160).print(st.breakdown.groupby(["op", "runs_as"])[["theoretical_s", "roofline_s"]].sum()
                                 .sort_values("roofline_s", ascending=False).to_string())


def _parse_clipping(items) -> tuple[str, ...]:
    from dpquant_sim.cost.clipping import parse_clipping

    return parse_clipping(list(items) if items else None, "--clipping")


def _speedup_matrix(df) -> None:
    """One line per (hw, devices, batch): speedup over the same step in bf16, 'theoretical/roofline', per
    (format, clipping algorithm); '!' marks a step that does not fit the device memory."""
    from rich.console import Console

    from dpquant_sim.cli.tables import print_fitting

    keys = [k for k in ("devices", "batch") if df[k].nunique() > 1]
    cols = list(dict.fromkeys(zip(df["format"], df["clipping"])))
    names = [_SHORT.get(c, c) for c in ["hw", *keys]] + [f"{f} {a}" for f, a in cols]
    rows = []
    for key, g in df.groupby(["hw", *keys], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        cells = [str(k) if not isinstance(k, float) else f"{k:g}" for k in key]
        for f, a in cols:
            r = g[(g["format"] == f) & (g["clipping"] == a)]
            if r.empty:
                cells.append("-")
                continue
            r = r.iloc[0]
            fit = "" if r["fits"] in (True, None) or r["fits"] != r["fits"] else " !"
            cells.append(f"{r['speedup_vs_bf16_theoretical']:.2f} / {r['speedup_vs_bf16_roofline']:.2f}{fit}")
        rows.append(cells)
    # as wide as the terminal (80 columns when not one); columns that do not fit go to a continuation table
    print_fitting(Console(), "speedup over bf16 (theoretical / roofline) per format and clipping algorithm", names,
                  rows, fixed=1 + len(keys), left=("hw",))
    typer.echo("! = does not fit the device memory at this batch (per-device working set above capacity).")


_SHORT = {"devices": "dev", "band_basis": "band from", "quantized_flop_share": "q share", "theoretical_s": "theo s",
          "roofline_s": "roof s", "allreduce_s": "all-red s",
          "throughput_roofline": "ex/s roof", "time_theoretical_s": "theo s", "time_roofline_s": "roof s",
          "fallbacks": "runs as", "energy_j": "J", "dollars": "$", "memory_gb": "mem GB",
          "clipping_costed": "clipping"}


def _table(df, cols, title: str, fixed: int = 1) -> None:
    """``df[cols]`` as a table as wide as the terminal (80 columns when not one): the columns after the first
    ``fixed`` (which every part repeats) that do not fit go to continuation tables; no cell is cut off."""
    from rich.console import Console

    from dpquant_sim.cli.tables import print_fitting

    names = [_SHORT.get(c, c).replace("speedup_vs_", "x ").replace("_theoretical", " theo")
             .replace("_roofline", " roof") for c in cols]
    rows = []
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
        rows.append(cells)
    print_fitting(Console(), title, names, rows, fixed=fixed, left=("hw", "runs as", "roof band"))


def register(app: typer.Typer) -> None:
    app.command("cost")(cost)
