"""Collect a sweep folder into one tidy table: one row per (run, epoch, accelerator).

Columns: the point's descriptive columns (``point_id``, ``label``, dataset, model, recipe, schedule_kind,
budget, seed, target_epsilon, ...), every column of the run's metrics.csv (epoch, test_acc, epsilon,
noise_multiplier, quantized_layers, ...), and the cost model's columns for that epoch on that accelerator
(``dpquant_sim.cost.run.cost_run``; a cost column whose name clashes with a metrics column gets the suffix
``_cost``). Written atomically as ``results.csv`` and ``results.parquet``.

Each epoch's plan (the run's plans.jsonl) is the in-memory table's last column, ``plan`` (JSON); on disk it goes to
``results.plans.jsonl`` beside the table (one line per run and epoch: ``point_id``, then the EpochPlan's
fields), never into a CSV cell; ``load_table`` joins it back.

A finished run enters the table only when its metrics.csv agrees with its summary.json (the SHA-256 that the
engine records there, else the epoch count and the last epoch's accuracy and epsilon); a hand-edited or damaged
run folder is refused with one line naming it, never silently tabulated.

Example: ``df = collect_sweep("runs/tiny")``.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from dpquant_sim.errors import RunFolderError
from dpquant_sim.io import atomic_write_df, atomic_write_text, file_sha256
from dpquant_sim.plan import PLANS_FILE

TABLE_CSV = "results.csv"
TABLE_PARQUET = "results.parquet"


def _resolve_profiles(accelerators: Any) -> list[Any]:
    """Profile objects for 'all' or a list of names (empty when the cost model is unavailable)."""
    from dpquant_sim.cost.profiles import get_profile, load_profiles

    if accelerators is None or accelerators == "all":
        profiles = load_profiles()
        return list(profiles.values()) if isinstance(profiles, dict) else list(profiles)
    return [get_profile(a) for a in accelerators]


def _points_frame(out_dir: Path, points: Sequence[Any] | None) -> pd.DataFrame:
    if points is not None:
        df = pd.DataFrame([{**p.params(), "label": p.label} for p in points])
        # Round-trip through CSV so dtypes match a later collect from points.csv (None -> NaN etc.).
        return pd.read_csv(io.StringIO(df.to_csv(index=False)))
    idx = out_dir / "points.csv"
    if idx.is_file():
        return pd.read_csv(idx)
    # A bare folder of run dirs (e.g. a demo): describe each from its config.yaml.
    rows = []
    for rd in sorted((out_dir / "runs").glob("*/")):
        rows.append(_describe_run_dir(rd))
    return pd.DataFrame(rows)


def _describe_run_dir(rd: Path) -> dict[str, Any]:
    from dpquant_sim.sweep.config import SweepPoint
    from dpquant_sim.training.config import TrainConfig

    import yaml

    cfg = TrainConfig.model_validate(yaml.safe_load((rd / "config.yaml").read_text()))
    p = SweepPoint(id=rd.name, config=cfg)
    return {**p.params(), "label": p.label}


def _same(a: Any, b: Any) -> bool:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)
    return (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=1e-12)


def check_run_consistent(run_dir: str | Path) -> dict[str, Any]:
    """Return a finished run's summary.json after checking that its metrics.csv is the one the run wrote.

    Checks the SHA-256 of metrics.csv that the engine records in summary.json (``metrics_sha256``), and, for
    every summary field present, that ``epochs_completed`` is the number of rows and ``test_acc`` / ``epsilon``
    are the last row's. Raises RunFolderError naming the run dir and the first disagreement.
    """
    rd = Path(run_dir)
    fix = "restore the run folder, or delete it and rerun the sweep to retrain that point"
    try:
        summary = json.loads((rd / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{str(rd)!r}: summary.json is unreadable ({e}); {fix}") from None
    if not isinstance(summary, dict):
        raise RunFolderError(f"{str(rd)!r}: summary.json is not a JSON object; {fix}")
    sha = summary.get("metrics_sha256")
    if sha is not None and file_sha256(rd / "metrics.csv") != sha:
        raise RunFolderError(f"{str(rd)!r}: metrics.csv is not the file the run wrote (its SHA-256 differs from "
                             f"the one in summary.json: edited or damaged); {fix}")
    try:
        metrics = pd.read_csv(rd / "metrics.csv")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise RunFolderError(f"{str(rd)!r}: metrics.csv is unreadable ({str(e).splitlines()[0]}); {fix}") from None
    plans = rd / PLANS_FILE
    psha = summary.get("plans_sha256")
    if psha is not None and (not plans.is_file() or file_sha256(plans) != psha):
        raise RunFolderError(f"{str(rd)!r}: {PLANS_FILE} is not the file the run wrote (missing, or its SHA-256 "
                             f"differs from the one in summary.json: edited or damaged); {fix}")
    if plans.is_file():
        n_plans = sum(1 for ln in plans.read_text(encoding="utf-8").splitlines() if ln.strip())
        if n_plans != len(metrics):
            raise RunFolderError(f"{str(rd)!r}: {PLANS_FILE} has {n_plans} plans for {len(metrics)} rows of "
                                 f"metrics.csv; {fix}")
    checks = [("epochs_completed", len(metrics), "rows")]
    for col in ("test_acc", "epsilon"):
        if col in metrics.columns and len(metrics):
            checks.append((col, metrics[col].iloc[-1], "last row"))
    for key, have, what in checks:
        if key in summary and not _same(summary[key], have):
            raise RunFolderError(f"{str(rd)!r}: metrics.csv disagrees with summary.json ({key}={summary[key]!r} in "
                                 f"summary.json, {have!r} in metrics.csv's {what}); {fix}")
    return summary


def run_table(run_dir: Path, profiles: Sequence[Any], devices: Sequence[int] = (1,),
              clipping: Any = None) -> pd.DataFrame:
    """metrics.csv of one run joined with its cost per accelerator (one row per epoch x accelerator x device
    count x clipping algorithm costed). ``clipping``: the algorithm(s) to cost the run under (None: the one it
    ran). ``accelerator`` names the option: 'h100_sxm', 'h100_sxm x8' with several devices, 'h100_sxm (bk)'
    when several clipping algorithms are costed; ``hw``, ``devices`` and ``clipping_costed`` keep its parts."""
    from dpquant_sim.plan import read_metrics

    metrics = read_metrics(run_dir)
    if not profiles:
        return metrics
    from dpquant_sim.cost.clipping import parse_clipping
    from dpquant_sim.cost.run import cost_run

    cost = cost_run(run_dir, profiles, devices=tuple(devices), clipping=clipping)
    several = clipping is not None and len(parse_clipping(clipping)) > 1
    if "hw" in cost.columns and "devices" in cost.columns and "accelerator" not in cost.columns:
        cost["accelerator"] = [h if n == 1 else f"{h} x{n}" for h, n in zip(cost["hw"], cost["devices"])]
        if several and "clipping_costed" in cost.columns:
            cost["accelerator"] = [f"{a} ({c if c != 'none' else 'non-private'})"
                                   for a, c in zip(cost["accelerator"], cost["clipping_costed"])]
    if "accelerator" not in cost.columns:
        for alt in ("hw", "profile", "hardware", "name"):
            if alt in cost.columns:
                cost = cost.rename(columns={alt: "accelerator"})
                break
    if "examples" not in cost.columns and {"steps", "batch"} <= set(cost.columns):
        cost["examples"] = cost["steps"] * cost["batch"]  # training examples processed in the epoch
    if "epoch" not in cost.columns:  # whole-run cost: broadcast over epochs
        return metrics.merge(cost, how="cross", suffixes=("", "_cost"))
    return metrics.merge(cost, on="epoch", how="left", suffixes=("", "_cost"))


def collect_sweep(
    out_dir: str | Path,
    *,
    accelerators: Any = "all",
    points: Sequence[Any] | None = None,
    include_partial: bool = False,
    write: bool = True,
    devices: Sequence[int] = (1,),
    clipping: Any = None,
) -> pd.DataFrame:
    """Build (and by default write) the tidy table of a sweep folder.

    Args:
        out_dir: the sweep (or demo) folder holding ``runs/<id>/``.
        accelerators: "all" or profile names to cost on; None or [] skips costing.
        points: the sweep's points (default: ``points.csv``, else every run dir's config.yaml).
        include_partial: also include runs without summary.json (their finished epochs), flagged
            ``complete=False``.
        write: write ``results.csv`` and ``results.parquet`` atomically.
        devices: data-parallel device counts to cost every run on.
        clipping: DP clipping algorithm(s) to cost every private run under ('all', names); None: the one each
            run used.
    """
    out_dir = Path(out_dir)
    pts = _points_frame(out_dir, points)
    profiles: list[Any] = []
    if accelerators:
        try:
            profiles = _resolve_profiles(accelerators)
        except ImportError:
            warnings.warn("dpquant_sim.cost is not available: the table has no accelerator columns", stacklevel=2)
    frames = []
    for row in pts.to_dict("records"):
        rd = out_dir / "runs" / str(row["point_id"])
        complete = (rd / "summary.json").is_file()
        if not (rd / "metrics.csv").is_file() or not (complete or include_partial):
            continue
        summary = check_run_consistent(rd) if complete else {}
        t = run_table(rd, profiles, devices, clipping)
        desc = pd.DataFrame({(k if k not in t.columns else f"{k}_point"): [v] * len(t) for k, v in row.items()})
        t = pd.concat([desc, t.reset_index(drop=True)], axis=1)
        t["complete"] = complete
        if complete:
            t["wall_s_total"] = summary.get("wall_s", summary.get("wall_s_total"))
        frames.append(t)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(pts.columns) + ["epoch"])
    # Stable row order: point order of the sweep, then epoch, then accelerator.
    order = {pid: i for i, pid in enumerate(pts["point_id"])} if len(pts) else {}
    if len(table):
        table["_o"] = table["point_id"].map(order)
        sort_cols = ["_o", "epoch"] + (["accelerator"] if "accelerator" in table.columns else [])
        table = table.sort_values(sort_cols, kind="stable").drop(columns="_o").reset_index(drop=True)
    if "plan" in table.columns:  # last, as load_table joins it back from results.plans.jsonl
        table = table[[c for c in table.columns if c != "plan"] + ["plan"]]
    if write:
        write_table(table, out_dir / TABLE_CSV)
    return table


def plans_path(csv_path: str | Path) -> Path:
    """Where a table's plans go: ``results.csv`` -> ``results.plans.jsonl``."""
    return Path(csv_path).with_suffix(".plans.jsonl")


def write_table(table: pd.DataFrame, csv_path: str | Path) -> Path:
    """Write ``table`` atomically as ``csv_path`` and as the .parquet file of the same stem; return csv_path.

    A ``plan`` column (JSON per row) goes to ``plans_path(csv_path)`` instead: one line per (point_id, epoch).
    """
    csv_path = Path(csv_path)
    if "plan" in table.columns:
        lines = []
        if len(table):
            for r in table.drop_duplicates(["point_id", "epoch"]).itertuples(index=False):
                if isinstance(r.plan, str) and r.plan.strip():
                    lines.append(json.dumps({"point_id": str(r.point_id), **json.loads(r.plan)}, sort_keys=True))
        atomic_write_text(plans_path(csv_path), "".join(ln + "\n" for ln in lines))
        table = table.drop(columns="plan")
    atomic_write_df(csv_path, table)
    atomic_write_df(csv_path.with_suffix(".parquet"), _parquet_safe(table))
    return csv_path


def _join_plans(table: pd.DataFrame, csv_path: Path) -> pd.DataFrame:
    f = plans_path(csv_path)
    if "plan" in table.columns or not f.is_file() or "point_id" not in table.columns:
        return table  # a table written before plans were split out keeps its own column
    plans: dict[tuple[str, int], str] = {}
    for line in f.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            pid = str(d.pop("point_id"))
            plans[(pid, int(d["epoch"]))] = json.dumps(d, sort_keys=True)
    table = table.copy()
    table["plan"] = [plans.get((str(p), int(e))) for p, e in zip(table["point_id"], table["epoch"])]
    return table


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns with mixed types (e.g. None and floats) -> strings, so pyarrow can write them."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            kinds = {type(v) for v in out[c].dropna()}
            if len(kinds) > 1:
                out[c] = out[c].map(lambda v: None if v is None else str(v))
    return out


def sweep_status(out_dir: str | Path) -> tuple[int, int, str]:
    """(points, finished points, one phrase) of a sweep folder, e.g. '3 points: 1 finished, 1 failed (traceback
    in runs/<id>/error.txt), 1 not run'. Points from points.csv, else the run dirs."""
    out_dir = Path(out_dir)
    try:
        ids = [str(i) for i in pd.read_csv(out_dir / "points.csv")["point_id"]]
    except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        runs = out_dir / "runs"
        ids = sorted(d.name for d in runs.iterdir() if d.is_dir()) if runs.is_dir() else []
    finished = [i for i in ids if (out_dir / "runs" / i / "summary.json").is_file()]
    failed = [i for i in ids if i not in finished and (out_dir / "runs" / i / "error.txt").is_file()]
    fail = f"{len(failed)} failed (traceback in runs/{failed[0]}/error.txt)" if failed else "0 failed"
    unrun = len(ids) - len(finished) - len(failed)
    return len(ids), len(finished), f"{len(ids)} points: {len(finished)} finished, {fail}, {unrun} not run"


def load_table(out_dir: str | Path) -> pd.DataFrame:
    """Read a collected table (parquet if present, else CSV), with its ``plan`` column joined back from
    ``results.plans.jsonl``.

    Raises RunFolderError when the folder has no table or the table has no rows (no point has finished: the
    message counts finished, failed and unrun points and names a failed point's traceback file); warns when
    the table holds fewer points than the sweep has (it holds the finished ones).
    """
    out_dir = Path(out_dir)
    if (out_dir / TABLE_PARQUET).is_file():
        table = pd.read_parquet(out_dir / TABLE_PARQUET)
    elif (out_dir / TABLE_CSV).is_file():
        table = pd.read_csv(out_dir / TABLE_CSV)
    else:
        raise RunFolderError(
            f"{str(out_dir)!r} has no results table ({TABLE_CSV}): run the sweep with --out there first, or rebuild "
            f"the table from its run dirs with `dpquant-sim report {out_dir} --recollect`")
    n_points, _, status = sweep_status(out_dir)
    if table.empty:
        raise RunFolderError(
            f"{str(out_dir)!r}: the results table is empty because no point of the sweep has finished ({status}); "
            "fix the cause and rerun the sweep")
    if "point_id" in table.columns and table["point_id"].nunique() < n_points:
        warnings.warn(f"{str(out_dir)!r}: the results table holds the finished points only ({status})", stacklevel=2)
    return _join_plans(table, out_dir / TABLE_CSV)
