"""Run a sweep: every point in ``OUT/runs/<id>/``, finished points skipped, then one tidy results table.

Layout of a sweep folder::

    OUT/sweep.yaml        the sweep config as run; a rerun must give the same sweep (executor settings aside)
    OUT/points.csv        one row per point: id, label, descriptive columns
    OUT/runs/<id>/        one training run dir each (config.yaml, metrics.csv, checkpoint.pt, summary.json)
    OUT/runs/<id>/error.txt   traceback of the last failed attempt (removed when the point later succeeds)
    OUT/results.csv|.parquet  the tidy table: runs x epochs x accelerators (see collect.py)
    OUT/.lock             while a sweep process writes the folder (its pid); each run dir has its own

One folder, one sweep: a folder whose sweep.yaml describes another sweep (other points, accelerators or name),
or that holds run dirs of points not in this sweep, is refused; otherwise the old runs would be orphaned and
the table would mix two sweeps. Executor settings (kind, workers, threads, address) may change between reruns.

Example: ``run_sweep(SweepConfig.from_yaml("analysis/sweeps/tiny.yaml"), "runs/tiny")``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from dpquant_sim.errors import ConfigError, RunFolderError, check_choice
from dpquant_sim.io import atomic_write_df, atomic_write_text, clean_stale_temps
from dpquant_sim.locking import folder_lock
from dpquant_sim.sweep.config import SweepConfig, SweepPoint
from dpquant_sim.training.config import flatten_config
from dpquant_sim.sweep.executors import (MAIN_GUARD_HINT, PointFn, in_spawned_bootstrap, run_local, run_ray,
                                         run_serial)


def train_point(config: Any, run_dir: Path) -> None:
    """Default point function: ``training.engine.train`` (which resumes an interrupted run itself)."""
    from dpquant_sim.training.engine import train

    train(config, run_dir, progress=False)


def is_done(run_dir: Path) -> bool:
    """A point is finished when its run dir holds summary.json (written last, atomically)."""
    return (Path(run_dir) / "summary.json").is_file()


@dataclass
class SweepResult:
    """What a sweep run did."""

    out_dir: Path
    points: list[SweepPoint]
    skipped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    table: pd.DataFrame | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def write_index(cfg: SweepConfig, points: list[SweepPoint], out_dir: Path) -> None:
    """Write sweep.yaml and points.csv (atomic)."""
    atomic_write_text(out_dir / "sweep.yaml", cfg.to_yaml())
    rows = [{**p.params(), "label": p.label} for p in points]
    atomic_write_df(out_dir / "points.csv", pd.DataFrame(rows))


def check_sweep_folder(cfg: SweepConfig, points: list[SweepPoint], out_dir: Path) -> None:
    """Refuse ``out_dir`` when it belongs to another sweep (see the module docstring). RunFolderError names the
    differing keys, or the run dirs that are not points of ``cfg``."""
    prev_yaml = out_dir / "sweep.yaml"
    if prev_yaml.is_file():
        try:
            prev = SweepConfig.from_yaml(prev_yaml)
        except ConfigError as e:
            raise RunFolderError(f"{str(out_dir)!r} holds a sweep.yaml that does not load ({e}); use another "
                                 "--out, or restore that file") from None
        a = flatten_config(prev.model_dump(mode="json", exclude={"executor"}))
        b = flatten_config(cfg.model_dump(mode="json", exclude={"executor"}))
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
        if diff:
            shown = "; ".join(f"{k}: {a.get(k, '<unset>')!r} there, {b.get(k, '<unset>')!r} here" for k in diff[:4])
            more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
            raise RunFolderError(
                f"{str(out_dir)!r} holds another sweep ({shown}{more}); one folder holds one sweep, so its "
                "finished runs are not orphaned: use another --out, or rerun with that folder's sweep.yaml")
    runs = out_dir / "runs"
    if runs.is_dir():
        ids = {p.id for p in points}
        strangers = sorted(d.name for d in runs.iterdir() if d.is_dir() and d.name not in ids)
        if strangers:
            raise RunFolderError(
                f"{str(out_dir)!r} holds {len(strangers)} run dir(s) that are not points of this sweep (e.g. "
                f"runs/{strangers[0]}); one folder holds one sweep: use another --out")


def run_sweep(
    cfg: SweepConfig,
    out_dir: str | Path,
    *,
    executor: str | None = None,
    workers: int | None = None,
    address: str | None = None,
    point_fn: PointFn = train_point,
    progress: bool = True,
    collect: bool = True,
    on_point: Callable[[str, str | None], None] | None = None,
) -> SweepResult:
    """Run every point of ``cfg`` not yet finished, then (``collect=True``) build the results table.

    Args:
        cfg: the sweep.
        out_dir: sweep folder (created).
        executor: "local" (process pool; serial when workers=1) or "ray"; default from ``cfg.executor``.
        workers: parallel points; default ``cfg.executor.workers`` or the CPU count, capped by the points.
        address: Ray cluster address (``--address``); None starts a local Ray instance.
        point_fn: ``fn(train_config, run_dir)``; must be a picklable top-level function.
        progress: progress on stderr: a rich bar when stderr is a terminal, else one line per finished point,
            e.g. ``point 3/12 done 41.2s: dpquant b=0.5 fp4 seed=0 (a1b2c3d4e5f6)``.
        collect: build ``results.csv``/``results.parquet`` afterwards (from every finished point).
        on_point: callback ``(point_id, error_or_None)`` after each point (tests, custom logging).

    Raises:
        RunFolderError: ``out_dir`` holds another sweep, or another process is running a sweep in it.
        WorkersDidNotStart: the process pool's workers died while starting (a script calling run_sweep
            without the ``if __name__ == "__main__":`` guard); RuntimeError too when called from such a worker.
        ConfigError: ``out_dir`` is a file, lies under one, or is not writable.
    """
    if in_spawned_bootstrap():
        raise RuntimeError(f"run_sweep was called while a worker process imported the main script; {MAIN_GUARD_HINT}")
    out_dir = Path(out_dir)
    kind = executor or cfg.executor.kind
    check_choice("executor", kind, ("local", "ray"))
    points = cfg.points()
    if not points:
        raise ConfigError("grid", cfg.grid, "a grid that yields at least one point")
    with folder_lock(out_dir, what="sweep folder"):
        clean_stale_temps(out_dir)
        check_sweep_folder(cfg, points, out_dir)
        return _run_locked(cfg, points, out_dir, kind=kind, workers=workers, address=address, point_fn=point_fn,
                           progress=progress, collect=collect, on_point=on_point)


def _run_locked(cfg: SweepConfig, points: list[SweepPoint], out_dir: Path, *, kind: str, workers: int | None,
                address: str | None, point_fn: PointFn, progress: bool, collect: bool,
                on_point: Callable[[str, str | None], None] | None) -> SweepResult:
    """``run_sweep`` once it holds the folder."""
    write_index(cfg, points, out_dir)
    result = SweepResult(out_dir=out_dir, points=points)
    todo = []
    for p in points:
        rd = out_dir / "runs" / p.id
        clean_stale_temps(rd, owned=False)  # left by writers killed in an earlier attempt (any point function)
        if is_done(rd):
            result.skipped.append(p.id)
        else:
            todo.append((p.id, p.config, rd))
    n_workers = workers or cfg.executor.workers or (os.cpu_count() or 1)
    n_workers = max(1, min(n_workers, len(todo) or 1))
    threads = cfg.executor.threads_per_worker
    if kind == "ray":
        stream = run_ray(todo, point_fn, workers=n_workers, threads=threads, address=address or cfg.executor.address)
    elif n_workers == 1:
        stream = run_serial(todo, point_fn, threads=threads)
    else:
        stream = run_local(todo, point_fn, workers=n_workers, threads=threads)

    labels = {p.id: p.label for p in points}

    def handle(pid: str, err: str | None) -> None:
        rd = out_dir / "runs" / pid
        if err is None:
            result.finished.append(pid)
            (rd / "error.txt").unlink(missing_ok=True)
        else:
            result.failed[pid] = err
            atomic_write_text(rd / "error.txt", err)
        if on_point is not None:
            on_point(pid, err)

    if todo:
        if progress and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn("[bold]sweep[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), transient=False, console=Console(stderr=True),
            ) as bar:
                task = bar.add_task(f"{len(todo)} to run, {len(result.skipped)} done", total=len(todo))
                for pid, err in stream:
                    handle(pid, err)
                    status = "failed" if err else "done"
                    bar.update(task, advance=1, description=f"{labels[pid]} {status}")
        elif progress:  # not a terminal (a log file, a batch job): one line per finished point
            t0 = time.perf_counter()
            for i, (pid, err) in enumerate(stream, 1):
                handle(pid, err)
                print(f"point {i}/{len(todo)} {'failed' if err else 'done'} {time.perf_counter() - t0:.1f}s: "
                      f"{labels[pid]} ({pid})", file=sys.stderr, flush=True)
        else:
            for pid, err in stream:
                handle(pid, err)
    if collect:
        from dpquant_sim.sweep.collect import collect_sweep

        result.table = collect_sweep(out_dir, accelerators=cfg.accelerators, points=points, devices=cfg.devices,
                                     clipping=cfg.cost_clipping)
    return result
