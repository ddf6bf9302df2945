"""``dpquant-sim report DIR``: one self-contained HTML report of a sweep or demo folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report(
    directory: Path = typer.Argument(..., help="sweep or demo folder (holds runs/)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default DIR/report.html)"),
    accelerators: Optional[str] = typer.Option(
        None, help="comma-separated profile names to cost on, or 'all' (default: the sweep's); the re-costed "
        "table goes beside the report as <stem>_results.csv, the sweep's results.csv is left as it is"
    ),
    recollect: bool = typer.Option(False, help="rebuild results.csv/.parquet from the run dirs first (refused if a "
                                   "run's metrics.csv disagrees with its summary.json)"),
    png: bool = typer.Option(False, help="also export each figure as PNG (needs kaleido and a browser)"),
) -> None:
    """Write the HTML report (Pareto frontiers, accuracy and epsilon per epoch, layer plans, cost)."""
    from dpquant_sim.analysis.report import build_report

    accs = None
    if accelerators:
        accs = "all" if accelerators == "all" else [a.strip() for a in accelerators.split(",") if a.strip()]
    path = build_report(directory, out=out, accelerators=accs, recollect=recollect, png=png)
    typer.echo(f"report: {path}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
