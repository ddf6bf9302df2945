"""``dpquant-sim hw list | show NAME | validate DIR``: the accelerator profiles."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

hw_app = typer.Typer(help="Accelerator profiles (hw_profiles/*.yaml plus your own folders).", no_args_is_help=True,
                     rich_markup_mode=None)  # plain help, like the main app: full flag names at 80 columns


def _fmt_peak(p, prec: str) -> str:
    from dpquant_sim.cost.profiles import Peak

    e = getattr(p.peaks, prec)
    if isinstance(e, Peak):
        return f"{e.value:g}" + ("*" if e.uncertain else "")
    return f"-> {p.resolve(prec)}"


LIST_PRECISIONS = ("fp32", "bf16", "fp8", "fp6", "fp4", "int8")


def hw_list_row(p) -> dict:
    """One profile as ``hw list --json`` gives it: dense peaks in TFLOP/s (TOP/s for int8; None where the
    precision has no native path, with ``runs_as`` naming what runs instead), bandwidth TB/s, memory GB,
    TDP W, list price $/device-hour, data-parallel reach and the GEMM time band (fractions)."""
    from dpquant_sim.cost.profiles import Peak

    peaks, runs_as, uncertain = {}, {}, []
    for prec in LIST_PRECISIONS:
        e = getattr(p.peaks, prec)
        native = isinstance(e, Peak)
        peaks[prec] = e.value if native else None
        runs_as[prec] = prec if native else p.resolve(prec)
        if getattr(e, "uncertain", False):
            uncertain.append(prec)
    lo, hi, basis = p.error_band
    return {"name": p.name, "vendor": p.vendor, "peak_tflops": peaks, "runs_as": runs_as,
            "uncertain_peaks": uncertain, "bandwidth_tb_s": p.bandwidth / 1e12, "memory_gb": p.capacity_bytes / 1e9,
            "tdp_w": p.tdp_w, "price_per_hour": None if p.price_per_hour is None else p.price_per_hour.value,
            "max_devices": p.max_devices, "time_band": {"low": lo, "high": hi, "basis": basis}}


@hw_app.command("list")
def hw_list(
    hw_dir: Optional[List[Path]] = typer.Option(None, "--hw-dir", help="extra folder of profile YAML files"),
    as_json: bool = typer.Option(False, "--json", help="print the table's figures as one JSON document (every "
                                 "figure with its source: hw show NAME --json)"),
) -> None:
    """Table of every profile: dense peaks (TFLOP/s; '-> x' = no native path, runs as x; * = uncertain), memory,
    power, price, data-parallel reach and the error band of its GEMM times."""
    from rich.console import Console

    from dpquant_sim.cost.profiles import load_profiles

    profs = load_profiles(hw_dir or ())
    if as_json:
        from dpquant_sim.cli.output import json_document

        typer.echo(json_document({"profiles": [hw_list_row(p) for p in profs.values()]}))
        return
    from dpquant_sim.cli.tables import print_fitting

    names = ["name", "vendor", *LIST_PRECISIONS, "BW TB/s", "mem GB", "TDP W", "$/h", "max dev", "time band"]
    rows = []
    for p in profs.values():
        lo, hi, basis = p.error_band
        rows.append([p.name, p.vendor, *(_fmt_peak(p, c) for c in LIST_PRECISIONS),
                     f"{p.bandwidth / 1e12:.3g}", f"{p.capacity_bytes / 1e9:.0f}",
                     "n/p" if p.tdp_w is None else f"{p.tdp_w:g}",
                     "n/a" if p.price_per_hour is None else f"{p.price_per_hour.value:g}*",
                     str(p.max_devices), f"{lo * 100:+.0f}/{hi * 100:+.0f}% {basis}"])
    # as wide as the terminal (80 columns when not one); what does not fit goes to a continuation table
    print_fitting(Console(), "accelerator profiles (dense peaks, TFLOP/s or TOP/s; '-> x': runs as x)", names, rows,
                  fixed=1, left=("name", "vendor", "time band"))
    typer.echo("$/h: public on-demand price per device-hour (* unverified list price; see `hw show NAME`). time band: "
               "range of the GEMM model's cross-validated error (measured on this device, transferred from one, or "
               "the generic band).")


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
    for col in ("precision", "peak", "runs as", "vendor figure", "provenance", "uncertain", "source / page / note"):
        t.add_column(col)
    for prec in PRECISIONS:
        e = getattr(p.peaks, prec)
        if isinstance(e, Peak):
            vf = "" if e.vendor_value is None else f"{e.vendor_value:g}" + (" sparse" if e.vendor_sparse else "")
            t.add_row(prec, f"{e.value:g} {e.unit}", prec, vf, e.provenance, "yes" if e.uncertain else "",
                      "\n".join(x for x in (e.source, e.page, e.note) if x))
        else:
            t.add_row(prec, f"{p.peak_flops(prec) / 1e12:g} (fallback)", f"-> {p.resolve(prec)}", "", "",
                      "yes" if e.uncertain else "", e.note)
    c.print(t)
    t2 = Table(title="memory, power, efficiency, kernel model, interconnect, price")
    for col in ("key", "value", "provenance", "uncertain", "source / page / note"):
        t2.add_column(col)
    for key, q in p.figures():
        if key.startswith("peaks."):
            continue
        if hasattr(q, "file"):
            val = q.file
        else:
            val = "n/p" if getattr(q, "value", None) is None else f"{q.value:g} {getattr(q, 'unit', '')}".strip()
        extra = f"as of {q.as_of}; {q.offer}" if key == "price_per_hour" else ""
        t2.add_row(key, val, q.provenance, "yes" if q.uncertain else "",
                   "\n".join(x for x in (q.source, getattr(q, "page", ""), extra, q.note) if x))
    c.print(t2)
    lo, hi, basis = p.error_band
    k_fill, overlap = p.kernel_constants
    c.print(f"GEMM kernel model: {'untiled (no kernel section)' if p.kernel is None else p.kernel.tiles}, "
            f"k_fill {k_fill:g}, overlap {overlap:g}; time band {lo * 100:+.1f}% / {hi * 100:+.1f}% ({basis}); "
            f"data parallelism up to {p.max_devices} device(s)")
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
