"""``dpquant-sim report DIR``: one self-contained HTML report of a sweep or demo folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report(
    directory: Path = typer.Argument(..., help="sweep or demo folder (holds runs/)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default DIR/report.html); the figure "
                                       "data goes to <stem>_data/ beside it (report_data/, tiny_data/ for tiny.html)"),
    accelerators: Optional[str] = typer.Option(
        None, help="comma-separated profile names to cost on, or 'all' (default: the sweep's); the re-costed "
        "table goes beside the report as <stem>_results.csv, the sweep's results.csv is left as it is"
    ),
    recollect: bool = typer.Option(False, help="rebuild results.csv/.parquet from the run dirs first (refused if a "
                                   "run's metrics.csv disagrees with its summary.json)"),
    png: bool = typer.Option(False, help="also export each figure as PNG (same as --static png)"),
    static: Optional[str] = typer.Option(
        None, "--static", help="also export each figure as static images, comma-separated formats among png, svg, "
        "pdf, jpeg, webp, into <stem>_data/ beside its CSV (needs kaleido and a Chrome/Chromium; where they are "
        "missing one line says so and the HTML report is still written)"),
    clipping: Optional[str] = typer.Option(
        None, "--clipping", help="DP clipping algorithm(s) to cost every private run under: "
        "hooks, ghost, bk, mixed, comma-separated, or 'all' (default: the sweep's cost_clipping, else each run's "
        "own); a re-costed table goes beside the report like --accelerators"),
    clipping_old: Optional[str] = typer.Option(None, "--dp-algorithm", hidden=True, help="old name of --clipping"),
) -> None:
    """Write the HTML report (Pareto frontiers, accuracy and epsilon per epoch, layer plans, cost)."""
    from dpquant_sim.analysis.report import build_report
    from dpquant_sim.cli.vocab import merge_alias

    clipping = merge_alias(clipping, clipping_old, new="--clipping", old="--dp-algorithm")
    accs = None
    if accelerators:
        accs = "all" if accelerators == "all" else [a.strip() for a in accelerators.split(",") if a.strip()]
    if clipping is not None:
        from dpquant_sim.cost.clipping import parse_clipping

        clipping = list(parse_clipping(clipping, "--clipping"))
    formats: list[str] = []
    if static is not None:
        from dpquant_sim.analysis.figures import STATIC_FORMATS
        from dpquant_sim.errors import ConfigError

        formats = [f.strip().lower() for f in static.split(",") if f.strip()]
        for f in formats or [static]:
            if f not in STATIC_FORMATS:
                raise ConfigError("--static", f, STATIC_FORMATS)
    path = build_report(directory, out=out, accelerators=accs, recollect=recollect, png=png, clipping=clipping,
                        static=formats)
    typer.echo(f"report: {path}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
