"""``dpquant-sim demo``: the end-to-end demo (``make demo``) on the embedded digits data.

Trains fp32, static-all, random and dpquant (one budget, one recipe) with DP-SGD at epsilon 8, costs every
run on several accelerators, writes the HTML report with the Pareto frontiers and prints the headline table.
Resumable: rerunning skips finished runs. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

DEMO_ACCELERATORS = ("h100_sxm", "b200", "mi355x", "gaudi3", "tpu_v6e")


def demo_config(
    *,
    epochs: int = 6,
    seeds: int = 1,
    recipe: str = "luq_fp4",
    budget: float = 0.5,
    epsilon: float = 8.0,
    model: str = "cnn",
    dataset: str = "digits",
    batch_size: int = 64,
    lr: float = 1.0,
    accelerators: tuple[str, ...] | list[str] = DEMO_ACCELERATORS,
    workers: int | None = None,
    n_train: int | None = None,
) -> Any:
    """The demo as a SweepConfig (also usable from Python: ``run_sweep(demo_config(), "runs/demo")``)."""
    from dpquant_sim.sweep.config import SweepConfig

    base: dict[str, Any] = {
        "dataset": dataset, "model": model, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "private": True, "epsilon": epsilon, "recipe": recipe,
    }
    if n_train is not None:
        base["n_train"] = n_train
    return SweepConfig.from_dict(
        {
            "name": "demo",
            "base": base,
            "grid": {
                # both budgeted schedules count layers (dpquant's paper sampler draws round(budget x n) of them)
                "schedule": [{"kind": "fp32"}, {"kind": "static-all"}, {"kind": "random", "budget_unit": "layers"},
                             {"kind": "dpquant"}],
                "budget": [budget],
                "seed": list(range(seeds)),
            },
            "accelerators": list(accelerators),
            "executor": {"kind": "local", "workers": workers, "threads_per_worker": 1},
        },
        source="demo",
    )


def run_demo(out: Path, *, progress: bool = True, **kw: Any) -> tuple[Path, Any]:
    """Run the demo sweep into ``out`` and write the report; returns (report path, headline DataFrame)."""
    from dpquant_sim.analysis.report import build_report, headline_table, run_summary
    from dpquant_sim.errors import DPQuantError
    from dpquant_sim.sweep.runner import run_sweep

    cfg = demo_config(**kw)
    res = run_sweep(cfg, out, progress=progress)
    if res.failed:
        pid, err = next(iter(res.failed.items()))
        raise DPQuantError(f"demo run {pid} failed ({len(res.failed)} in all); last lines:\n"
                           + "\n".join(err.strip().splitlines()[-3:]))
    report = build_report(out, title=f"dpquant-sim demo: DP-SGD (epsilon {cfg.base.get('epsilon', 8.0):g}) on "
                                      f"{cfg.base.get('dataset', 'digits')}, schedules x accelerators")
    head = headline_table(run_summary(res.table), list(cfg.accelerators) if cfg.accelerators != "all" else None)
    return report, head


def _demo_flags():
    from dpquant_sim.cli.vocab import FlagNames

    # config fields (as the demo's sweep names them) -> the demo's flags, so errors name the flag
    return FlagNames({"recipe": "--recipe", "schedule.budget": "--budget", "budget": "--budget",
                      "epsilon": "--epsilon", "model": "--model", "epochs": "--epochs", "n_train": "--n-train",
                      "accelerators": "--accelerators", "workers": "--workers", "executor.workers": "--workers"})


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="demo folder (rerun resumes)"),
    epochs: int = typer.Option(6, min=1, help="training epochs per run"),
    seeds: int = typer.Option(1, min=1, help="seeds per schedule (mean +- std in the report)"),
    recipe: str = typer.Option("luq_fp4", help="quantization recipe (luq_fp4: the paper's; fp8, fp6, fp4, mxfp4, "
                               "nvfp4, int8, ...)"),
    budget: float = typer.Option(0.5, help="quantized share of layers for random and dpquant (0, 1]"),
    epsilon: float = typer.Option(8.0, help="target epsilon (delta 1e-5)"),
    model: str = typer.Option("cnn", help="mlp, cnn, resnet18, ..."),
    accelerators: str = typer.Option(",".join(DEMO_ACCELERATORS), help="comma-separated profile names"),
    workers: Optional[int] = typer.Option(None, min=1, help="parallel runs (default: CPU count)"),
    n_train: Optional[int] = typer.Option(None, min=64, help="train on a seeded subset of digits (quicker)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Run the end-to-end demo and print where the report is plus the headline comparison."""
    from rich.console import Console

    from dpquant_sim.cli.tables import print_fitting
    from dpquant_sim.cli.vocab import rename_config_errors

    accs = [a.strip() for a in accelerators.split(",") if a.strip()]
    report, head = rename_config_errors(
        _demo_flags(), run_demo, out, progress=not quiet, epochs=epochs, seeds=seeds, recipe=recipe, budget=budget,
        epsilon=epsilon, model=model, accelerators=accs, workers=workers, n_train=n_train)
    # borderless, short headers; columns that would not fit the terminal go to a continuation table (with the
    # schedule repeated), so no cell is cut off at 80 columns
    short = {"accuracy": "acc", "epsilon": "eps"}
    console = Console()
    from dpquant_sim.training.config import TrainConfig

    delta = TrainConfig.model_fields["delta"].default
    print_fitting(console, f"demo: {model} on digits, DP-SGD epsilon {epsilon:g} delta {delta:g}, {recipe}, "
                           f"budget {budget:g}",
                  [short.get(str(c), str(c)) for c in head.columns],
                  [[str(v) for v in row] for row in head.itertuples(index=False)],
                  fixed=list(head.columns).index("schedule") + 1 if "schedule" in head.columns else 1,
                  left=("schedule", "model", "dataset"))
    console.print("per-accelerator columns: theoretical speedup over the same run in bf16 (peak FLOP ratios, the "
                  "paper's convention); roofline numbers and energy are in the report (dollars too for profiles "
                  "that set price_per_hour).")
    console.print(f"report: [bold]{report}[/]")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
