"""``dpquant-sim hw list | show NAME | validate DIR``: the accelerator profiles."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

hw_app = typer.Typer(help="Accelerator profiles (hw_profiles/*.yaml plus your own folders).", no_args_is_help=True)


def _fmt_peak(p, prec: str) -> str:
    from dpquant_sim.cost.profiles import Peak

    e = getattr(p.peaks, prec)
    if isinstance(e, Peak):
        return f"{e.value:g}" + ("*" if e.uncertain else "")
    return f"-> {p.resolve(prec)}"


@hw_app.command("list")
def hw_list(
    hw_dir: Optional[List[Path]] = typer.Option(None, "--hw-dir", help="extra folder of profile YAML files"),
) -> None:
    """Table of every profile: dense peaks (TFLOP/s; '-> x' = runs as x; * = uncertain), memory, power."""
    from rich.console import Console
    from rich.table import Table

    from dpquant_sim.cost.profiles import load_profiles

    profs = load_profiles(hw_dir or ())
    t = Table(title="accelerator profiles (dense peaks, TFLOP/s or TOP/s)")
    for col in ("name", "vendor", "fp32", "bf16", "fp8", "fp6", "fp4", "int8", "BW TB/s", "mem GB", "TDP W"):
        t.add_column(col, justify="left" if col in ("name", "vendor") else "right")
    for p in profs.values():
        t.add_row(p.name, p.vendor, *(_fmt_peak(p, c) for c in ("fp32", "bf16", "fp8", "fp6", "fp4", "int8")),
                  f"{p.bandwidth / 1e12:.3g}", f"{p.capacity_bytes / 1e9:.0f}",
                  "n/p" if p.tdp_w is None else f"{p.tdp_w:g}")
    Console(width=140).print(t)


@hw_app.command("show")
def hw_show(
    name: str = typer.Argument(..., help="profile name (see `dpquant-sim hw list`)"),
    hw_dir: Optional[List[Path]] = typer.Option(None, "--hw-dir", help="extra folder of profile YAML files"),
    as_json: bool = typer.Option(False, "--json", help="print the validated profile as JSON"),
) -> None:
    """Every figure of one profile with its source URL."""
    from rich.console import Console
    from rich.table import Table

    from dpquant_sim.cost.profiles import PRECISIONS, Peak, get_profile

    p = get_profile(name, hw_dir or ())
    if as_json:
        typer.echo(p.model_dump_json(indent=2))
        return
    c = Console(width=160)
    c.print(f"[bold]{p.display_name}[/bold] ({p.name}; {p.vendor}, {p.kind}, {p.architecture})")
    t = Table(title="per-precision dense peak")
    for col in ("precision", "peak", "runs as", "dense?", "uncertain", "source / note"):
        t.add_column(col)
    for prec in PRECISIONS:
        e = getattr(p.peaks, prec)
        if isinstance(e, Peak):
            t.add_row(prec, f"{e.value:g} {e.unit}", prec, "yes" if e.dense else "from sparse",
                      "yes" if e.uncertain else "", f"{e.source}\n{e.note}".strip())
        else:
            t.add_row(prec, f"{p.peak_flops(prec) / 1e12:g} (fallback)", p.resolve(prec), "",
                      "yes" if e.uncertain else "", e.note)
    c.print(t)
    t2 = Table(title="memory, power, efficiency")
    for col in ("key", "value", "uncertain", "source / note"):
        t2.add_column(col)
    for key, q in (("vector", p.vector), ("memory.bandwidth", p.memory.bandwidth),
                   ("memory.capacity", p.memory.capacity), ("onchip", p.onchip), ("tdp", p.tdp),
                   ("efficiency.gemm", p.efficiency.gemm), ("efficiency.bandwidth", p.efficiency.bandwidth),
                   ("launch_floor", p.launch_floor), ("price_per_hour", p.price_per_hour)):
        if q is None:
            continue
        val = "n/p" if q.value is None else f"{q.value:g} {getattr(q, 'unit', '')}".strip()
        t2.add_row(key, val, "yes" if q.uncertain else "", f"{q.source}\n{q.note}".strip())
    c.print(t2)
    for m in p.power_modes:
        c.print(f"power mode {m.name}: {m.tdp_w:g} W, GPU INT8 {m.gpu_int8_sparse_tops} TOPS sparse ({m.source})")


@hw_app.command("validate")
def hw_validate(
    folder: Path = typer.Argument(..., help="folder of *.yaml profiles (or one file) to check"),
) -> None:
    """Validate profile files; the first invalid one ends with an error naming the file, key and what is allowed."""
    from dpquant_sim.cost.profiles import load_profile_file
    from dpquant_sim.errors import ConfigError

    if folder.is_file():
        files = [folder]
    elif folder.is_dir():
        files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    else:
        raise ConfigError("folder", str(folder), "an existing folder or YAML file")
    if not files:
        raise ConfigError("folder", str(folder), "a folder containing *.yaml profiles")
    for f in files:
        p = load_profile_file(f)
        typer.echo(f"ok  {f}  ({p.name})")
    typer.echo(f"{len(files)} profile(s) valid")


def register(app: typer.Typer) -> None:
    app.add_typer(hw_app, name="hw")
