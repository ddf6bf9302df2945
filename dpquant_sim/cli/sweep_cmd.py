"""``dpquant-sim sweep CONFIG --out DIR``: run a sweep (process pool or Ray), resumable, then collect.

``--json`` prints one JSON document on stdout (points run, skipped and failed, the table and report paths;
with ``--dry-run`` every point's id, state and label); progress goes to stderr: a bar on a terminal, else one
line per finished point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dpquant_sim.cli.output import json_document
from dpquant_sim.errors import ConfigError


def sweep(
    config: Path = typer.Argument(..., help="sweep YAML (see docs/usage.md and analysis/sweeps/*.yaml)"),
    out: Path = typer.Option(..., "--out", "-o", help="sweep folder (created; rerun to resume)"),
    executor: Optional[str] = typer.Option(None, help="local (process pool, default) or ray"),
    workers: Optional[int] = typer.Option(None, min=1, help="parallel points (default: CPU count)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto', 'ray://host:10001')"),
    collect: bool = typer.Option(True, help="build results.csv/.parquet when done"),
    report: bool = typer.Option(False, help="also write OUT/report.html"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the points and exit"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress on stderr (default: a bar on a terminal, "
                               "else one line per finished point)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document on stdout instead of the summary "
                                 "lines"),
) -> None:
    """Run every point of a sweep; finished points are skipped, so an interrupted sweep resumes."""
    from dpquant_sim.cli import fail
    from dpquant_sim.sweep.config import SweepConfig
    from dpquant_sim.sweep.runner import is_done, run_sweep

    cfg = SweepConfig.from_yaml(config)
    if executor is not None and executor not in ("local", "ray"):
        raise ConfigError("--executor", executor, ("local", "ray"))
    if dry_run:
        pts = cfg.points()
        if as_json:
            points = [{"id": p.id, "state": "done" if is_done(out / "runs" / p.id) else "todo", "label": p.label}
                      for p in pts]
            typer.echo(json_document({"points": points, "accelerators": list(cfg.profile_names())}))
            return
        for p in pts:
            state = "done" if is_done(out / "runs" / p.id) else "todo"
            typer.echo(f"{p.id}  {state}  {p.label}")
        typer.echo(f"{len(pts)} points; accelerators: {', '.join(cfg.profile_names()) or '(none)'}")
        return
    res = run_sweep(cfg, out, executor=executor, workers=workers, address=address, progress=not quiet,
                    collect=collect)
    report_path = None
    if report and res.table is not None and len(res.table):
        from dpquant_sim.analysis.report import build_report

        report_path = build_report(out)
    if as_json:
        from dpquant_sim.sweep.collect import TABLE_CSV, TABLE_PARQUET, plans_path

        typer.echo(json_document({
            "out": str(out), "points": len(res.points), "finished": list(res.finished), "skipped": list(res.skipped),
            "failed": {pid: str(out / "runs" / pid / "error.txt") for pid in res.failed},
            "table": None if res.table is None else {
                "csv": str(out / TABLE_CSV), "parquet": str(out / TABLE_PARQUET),
                "plans": str(plans_path(out / TABLE_CSV)), "rows": len(res.table)},
            "report": None if report_path is None else str(report_path),
        }))
    else:
        _print_summary(res, out, report_path)
    if res.failed:
        if not as_json:
            for pid in res.failed:
                typer.echo(f"failed: {pid} (traceback in {out / 'runs' / pid / 'error.txt'})", err=True)
        raise fail(f"{len(res.failed)} point(s) failed; fix and rerun the same command to resume", code=1)


def _print_summary(res, out: Path, report_path) -> None:
    typer.echo(
        f"{len(res.points)} points: {len(res.finished)} run, {len(res.skipped)} already done, {len(res.failed)} failed"
    )
    if res.table is not None:
        typer.echo(f"table: {out / 'results.csv'} ({len(res.table)} rows) and {out / 'results.parquet'}")
    if report_path is not None:
        typer.echo(f"report: {report_path}")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
