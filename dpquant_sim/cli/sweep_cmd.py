"""``dpquant-sim sweep CONFIG --out DIR``: run a sweep (process pool or Ray), resumable, then collect."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def sweep(
    config: Path = typer.Argument(..., help="sweep YAML (see docs/usage.md and analysis/sweeps/*.yaml)"),
    out: Path = typer.Option(..., "--out", "-o", help="sweep folder (created; rerun to resume)"),
    executor: Optional[str] = typer.Option(None, help="local (process pool, default) or ray"),
    workers: Optional[int] = typer.Option(None, min=1, help="parallel points (default: CPU count)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto', 'ray://host:10001')"),
    collect: bool = typer.Option(True, help="build results.csv/.parquet when done"),
    report: bool = typer.Option(False, help="also write OUT/report.html"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the points and exit"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Run every point of a sweep; finished points are skipped, so an interrupted sweep resumes."""
    from dpquant_sim.cli import fail
    from dpquant_sim.sweep.config import SweepConfig
    from dpquant_sim.sweep.runner import is_done, run_sweep

    cfg = SweepConfig.from_yaml(config)
    if dry_run:
        pts = cfg.points()
        for p in pts:
            state = "done" if is_done(out / "runs" / p.id) else "todo"
            typer.echo(f"{p.id}  {state}  {p.label}")
        typer.echo(f"{len(pts)} points; accelerators: {', '.join(cfg.profile_names()) or '(none)'}")
        return
    res = run_sweep(cfg, out, executor=executor, workers=workers, address=address, progress=not quiet,
                    collect=collect)
    typer.echo(
        f"{len(res.points)} points: {len(res.finished)} run, {len(res.skipped)} already done, {len(res.failed)} failed"
    )
    if res.table is not None:
        typer.echo(f"table: {out / 'results.csv'} ({len(res.table)} rows) and {out / 'results.parquet'}")
    if report and res.table is not None and len(res.table):
        from dpquant_sim.analysis.report import build_report

        typer.echo(f"report: {build_report(out)}")
    if res.failed:
        for pid in res.failed:
            typer.echo(f"failed: {pid} (traceback in {out / 'runs' / pid / 'error.txt'})", err=True)
        raise fail(f"{len(res.failed)} point(s) failed; fix and rerun the same command to resume", code=1)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
