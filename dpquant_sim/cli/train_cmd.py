"""``dpquant-sim train``: one training run from flags and/or a YAML config.

Flags override the YAML file; anything not given takes the TrainConfig default. Bad values end with one
error line naming the flag as typed (or the YAML file and field the value came from), the value and what is
allowed (exit 2). ``--json`` prints one JSON document on stdout; progress goes to stderr.

    dpquant-sim train --dataset digits --model cnn --epochs 5 --epsilon 8 --delta 1e-5 \\
        --recipe fp8 --schedule static-all --out runs/x
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from dpquant_sim.errors import ConfigError


def _parse_opts(items: list[str] | None, flag: str) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(flag, it, "KEY=VALUE, e.g. temperature=0.5")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def build_config(config: Optional[Path], flags: dict[str, Any], schedule_opts: dict[str, Any],
                 prune: dict[str, Any], drop: dict[str, Any]):
    """Merge YAML (if any) and flags into a validated TrainConfig (raises ConfigError)."""
    from dpquant_sim.training.config import TrainConfig

    data: dict[str, Any] = {}
    if config is not None:
        # Only what the file sets: a --preset given here still fills what neither names.
        data = TrainConfig.from_yaml(config).model_dump(mode="json", exclude_unset=True)
    for k, v in flags.items():
        if v is not None:
            data[k] = v
    sched = dict(data.get("schedule") or {})
    if flags.get("_schedule") is not None and flags["_schedule"] != sched.get("kind"):
        sched = {"kind": flags["_schedule"]}
    sched.update(schedule_opts)
    if sched and "kind" not in sched:  # schedule options without a schedule: the preset's or fp32's
        sched["kind"] = "dpquant" if data.get("preset") == "paper" else "fp32"
    if sched:
        data["schedule"] = sched
    data.pop("_schedule", None)
    for key, extra in (("prune", prune), ("drop", drop)):
        if extra:
            data[key] = {**(data.get(key) or {}), **extra}
    return TrainConfig.parse(data, source="dpquant-sim train")


# The flag that sets each config field (errors name the flag, not the field; see cli/vocab.py).
TRAIN_FIELD_FLAGS: dict[str, str] = {
    "out": "--out", "config": "--config", "schedule": "--schedule", "schedule.kind": "--schedule",
    "schedule.budget": "--budget", "schedule.budget_unit": "--budget-unit", "schedule.estimator": "--estimator",
    "prune.sparsity": "--prune-sparsity", "prune.method": "--prune-method", "prune.structure": "--prune-structure",
    "drop.keep": "--drop-keep", "drop.method": "--drop-method", "private": "--private",
    "eval_quantized": "--eval-quantized",
}
_FLAG_FIELDS = ("dataset", "data_dir", "n_train", "n_test", "model", "epochs", "batch_size", "physical_batch_size",
                "lr", "optimizer", "momentum", "weight_decay", "epsilon", "noise_multiplier", "delta",
                "max_grad_norm", "accountant", "clipping", "secure_noise", "release_train_loss", "recipe", "seed",
                "data_seed", "threads", "device", "preset", "public_fraction")


def train_flag_names():
    """A FlagNames of every config field that a ``train`` flag sets."""
    from dpquant_sim.cli.vocab import FlagNames

    return FlagNames({**{f: "--" + f.replace("_", "-") for f in _FLAG_FIELDS}, **TRAIN_FIELD_FLAGS})


def _yaml_fields(config: Path) -> set[str]:
    """Dotted field names set in a YAML config file (empty when it cannot be read)."""
    import yaml

    from dpquant_sim.training.config import flatten_config

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return set()
    if not isinstance(data, dict):
        return set()
    flat = set(flatten_config(data))
    return flat | {k.split(".")[0] for k in flat}


def train_json(res) -> dict[str, Any]:
    """``train --json``'s document: the run folder, its files, the summary and the per-epoch metrics."""
    import json

    metrics = res.metrics.drop(columns=[c for c in ("plan",) if c in res.metrics.columns])
    return {
        "out": str(res.out_dir),
        "files": {"metrics": str(res.out_dir / "metrics.csv"), "plans": str(res.out_dir / "plans.jsonl"),
                  "summary": str(res.out_dir / "summary.json"), "config": str(res.out_dir / "config.yaml")},
        "summary": res.summary,
        "metrics": json.loads(metrics.to_json(orient="records")),
    }


def _recipe_names() -> str:
    from dpquant_sim.recipe_names import RECIPE_NAMES  # torch-free: `train --help` stays fast

    return ", ".join(RECIPE_NAMES)


def _schedule_kinds() -> str:
    from dpquant_sim.schedules.configs import SCHEDULE_KINDS

    return ", ".join(SCHEDULE_KINDS)


def register(app: typer.Typer) -> None:
    from dpquant_sim.cli.lazy_help import lazy_help_command

    recipes, kinds = "{recipes}", "{kinds}"  # filled in when the help is printed

    @app.command("train", cls=lazy_help_command({"{recipes}": _recipe_names, "{kinds}": _schedule_kinds}))
    def train_cmd(
        out: Path = typer.Option(..., "--out", "-o", help="Run directory (created; rerunning resumes it)."),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of TrainConfig fields; "
                                              "flags given here override it."),
        dataset: Optional[str] = typer.Option(None, help="digits | synthetic | emnist | gtsrb | cifar10 "
                                              "(default digits; the last three read --data-dir)."),
        data_dir: Optional[str] = typer.Option(None, help="Folder with the dataset's files (emnist idx, gtsrb "
                                               "images+CSV, cifar10 binary batches). Nothing is downloaded."),
        n_train: Optional[int] = typer.Option(None, help="Synthetic: training examples (default 2048). Real "
                                              "datasets: keep a seeded subset of this size."),
        n_test: Optional[int] = typer.Option(None, help="As --n-train, for the test set (synthetic default 512)."),
        model: Optional[str] = typer.Option(None, help="mlp | cnn | resnet18 | resnet18-w16 | resnet50 | densenet121 "
                                            "(default cnn)."),
        epochs: Optional[int] = typer.Option(None, help="Training epochs, >= 1 (default 15)."),
        batch_size: Optional[int] = typer.Option(None, help="Expected (Poisson) batch size in examples; sample "
                                                 "rate = batch/n_train; at most the training set size "
                                                 "(default 256)."),
        physical_batch_size: Optional[int] = typer.Option(None, help="Split batches into chunks of at most this "
                                                          "many examples (memory only; same result)."),
        lr: Optional[float] = typer.Option(None, help="Learning rate, > 0 (default 2.0 for DP-SGD)."),
        optimizer: Optional[str] = typer.Option(None, help="sgd | adam (DP-SGD / DP-Adam; default sgd)."),
        momentum: Optional[float] = typer.Option(None, help="SGD momentum in [0, 1) (default 0)."),
        weight_decay: Optional[float] = typer.Option(None, help="Weight decay, >= 0 (default 0)."),
        private: Optional[bool] = typer.Option(None, "--private/--non-private", help="DP-SGD with clipping, "
                                               "noise and accounting (default), or plain training."),
        epsilon: Optional[float] = typer.Option(None, help="Target epsilon (> 0) at --delta for all epochs; the "
                                                "noise multiplier is calibrated to it (default 8)."),
        noise_multiplier: Optional[float] = typer.Option(None, help="Fixed noise multiplier sigma (noise std = "
                                                         "sigma x clip norm) instead of calibrating; with "
                                                         "--epsilon the run refuses to exceed it."),
        delta: Optional[float] = typer.Option(None, help="Delta, 0 < delta < 1 (default 1e-5)."),
        max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", "--clip",
                                                      help="Per-example L2 clipping norm C, > 0 (default 1.0)."),
        accountant: Optional[str] = typer.Option(None, help="rdp | prv (default rdp)."),
        clipping: Optional[str] = typer.Option(None, help="How per-example clipping is computed: hooks | ghost "
                                               "| bk | mixed (same update, different time and memory; "
                                               "default mixed; docs/privacy.md)."),
        secure_noise: bool = typer.Option(False, "--secure-noise", help="Draw DP noise and Poisson sampling "
                                          "from OS entropy, never written (for a release). Default: from "
                                          "--seed (reproducible; epsilon then assumes the seed stays secret)."),
        release_train_loss: bool = typer.Option(False, "--release-train-loss", help="Write a private run's "
                                                "un-noised training loss to metrics.csv; NOT covered by epsilon."),
        recipe: Optional[str] = typer.Option(None, "--recipe",
                                             help=f"Quantization recipe of quantized layers: {recipes} "
                                                  "(default luq_fp4, the DPQuant paper's format)."),
        quantize_old: Optional[str] = typer.Option(None, "--quantize", hidden=True, help="Old name of --recipe."),
        schedule: Optional[str] = typer.Option(None, help=f"Which layers are quantized each epoch: {kinds} "
                                               "(default fp32 = none)."),
        budget: Optional[float] = typer.Option(None, help="Expected quantized share per epoch in (0, 1] (of GEMM "
                                               "FLOPs, or of layers with --budget-unit layers); for "
                                               "static-subset, random, dpquant."),
        budget_unit: Optional[str] = typer.Option(None, help="flops | layers (default flops; layers for dpquant, "
                                                  "whose paper sampler draws round(budget x n) layers)."),
        estimator: Optional[str] = typer.Option(None, help="dpquant's sensitivity estimator: forward (loss deltas "
                                                "at the current weights) | training (the paper's: after short "
                                                "clipped steps per policy; accounted with sensitivity 2C). "
                                                "Default forward."),
        schedule_opt: Optional[list[str]] = typer.Option(None, "--schedule-opt", help="Extra schedule field "
                                                         "KEY=VALUE (repeatable), e.g. beta=50, "
                                                         "interval=2, noise_multiplier=2."),
        prune_sparsity: Optional[float] = typer.Option(None, help="Pre-prune this share of weights, [0, 1)."),
        prune_method: Optional[str] = typer.Option(None, help="random | magnitude | synflow (data-free) | "
                                                   "snip-public (needs --public-fraction)."),
        prune_structure: Optional[str] = typer.Option(None, help="unstructured | channel."),
        drop_keep: Optional[float] = typer.Option(None, help="Gradient dropping: share of coordinates kept per "
                                                  "step, (0, 1]."),
        drop_method: Optional[str] = typer.Option(None, help="random | magnitude (gradient dropping)."),
        public_fraction: Optional[float] = typer.Option(None, help="Hold out this share of the training set, "
                                                        "[0, 1), as a declared public split: never used by "
                                                        "DP-SGD (n_train and the sample rate count the rest); "
                                                        "only data-dependent pruning reads it (default 0)."),
        eval_quantized: Optional[bool] = typer.Option(None, "--eval-quantized/--eval-fp32",
                                                      help="Evaluate with the epoch's plan, or in fp32 (default)."),
        preset: Optional[str] = typer.Option(None, help="paper: the DPQuant paper's method in one word (luq_fp4, "
                                             "dpquant with the paper's sampler and training estimator, budgets "
                                             "in layers, random static subsets); flags given here override it "
                                             "(docs/fidelity.md)."),
        seed: Optional[int] = typer.Option(None, help="Run seed, >= 0: init, sampling, noise, rounding, "
                                           "schedule (default 0)."),
        data_seed: Optional[int] = typer.Option(None, help="Seed of the data split / synthetic data (default 0)."),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: leave as is)."),
        device: Optional[str] = typer.Option(None, help="cpu | cuda (default cpu)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr (default: a bar on a "
                                   "terminal, else one line per epoch)."),
        progress_old: Optional[bool] = typer.Option(None, "--progress/--no-progress", hidden=True,
                                                    help="Old name of --quiet (--no-progress = --quiet)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document (run folder, summary, "
                                     "per-epoch metrics) on stdout instead of the summary line."),
        tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard event files to "
                                         "OUT/tensorboard/ (needs the tensorboard package: pip install "
                                         "'dpquant-sim[tensorboard]')."),
    ) -> None:
        """Train one model with DP-SGD / DP-Adam (or without DP) while a schedule picks quantized layers.

        Writes OUT/config.yaml, run_info.json, metrics.csv (one row per epoch: accuracy, loss, epsilon at delta, noise multiplier, sample rate, steps, quantized layers, FLOP share), plans.jsonl (each epoch's layer plan), checkpoint.pt and, when complete, summary.json. Rerunning the same command resumes an interrupted run.
        """  # noqa: E501
        from dpquant_sim.cli.vocab import merge_alias
        from dpquant_sim.training.engine import train

        names = train_flag_names()
        if quantize_old is not None:
            names.typed("recipe", "--quantize")
        recipe = merge_alias(recipe, quantize_old, new="--recipe", old="--quantize")
        if progress_old is not None:
            quiet = bool(merge_alias(quiet or None, not progress_old, new="--quiet",
                                     old="--progress" if progress_old else "--no-progress"))

        flags = dict(dataset=dataset, data_dir=data_dir, n_train=n_train, n_test=n_test, model=model,
                     epochs=epochs, batch_size=batch_size, physical_batch_size=physical_batch_size, lr=lr,
                     optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, private=private,
                     epsilon=epsilon, noise_multiplier=noise_multiplier, delta=delta, max_grad_norm=max_grad_norm,
                     accountant=accountant, clipping=clipping, secure_noise=secure_noise or None,
                     release_train_loss=release_train_loss or None,
                     recipe=recipe, eval_quantized=eval_quantized, seed=seed, preset=preset,
                     data_seed=data_seed, threads=threads, device=device, _schedule=schedule,
                     public_fraction=public_fraction)
        sopts = _parse_opts(schedule_opt, "--schedule-opt")
        if budget is not None:
            sopts["budget"] = budget
        if budget_unit is not None:
            sopts["budget_unit"] = budget_unit
        if estimator is not None:
            sopts["estimator"] = estimator
        prune = {k: v for k, v in (("sparsity", prune_sparsity), ("method", prune_method),
                                   ("structure", prune_structure)) if v is not None}
        drop = {k: v for k, v in (("keep", drop_keep), ("method", drop_method)) if v is not None}
        given = {k for k, v in flags.items() if v is not None} | {f"schedule.{k}" for k in sopts} \
            | {f"prune.{k}" for k in prune} | {f"drop.{k}" for k in drop}
        if flags.get("_schedule") is not None:
            given |= {"schedule", "schedule.kind"}
        for k in sopts:
            if f"schedule.{k}" not in names.fields:
                names.fields[f"schedule.{k}"] = f"--schedule-opt {k}"
        try:
            cfg = build_config(config, flags, sopts, prune, drop)
            res = train(cfg, out, progress=not quiet, tensorboard=tensorboard)
        except ConfigError as e:
            # a value from the YAML file keeps its field name and the file; a flag's value names the flag
            if config is not None and e.field not in given and e.field in _yaml_fields(config):
                raise ConfigError(e.field, e.value, e.allowed, str(config)) from None
            raise names.rename(e) from None
        s = res.summary
        if as_json:
            from dpquant_sim.cli.output import json_document

            typer.echo(json_document(train_json(res)))
            return
        eps = "inf (non-private)" if not cfg.private else f"{s['epsilon']:.3f} at delta={cfg.delta:g} ({cfg.accountant})"
        msg = (f"{out}: {s['epochs_completed']}/{cfg.epochs} epochs, test_acc={s['test_acc']:.4f}, epsilon={eps}, "
               f"noise_multiplier={s['noise_multiplier']:.4g}, mean quantized FLOP share="
               f"{s['mean_quantized_flop_share']:.3f}")
        if s.get("stopped"):
            msg += f"; stopped: {s['stopped']}"
        typer.echo(msg)
