"""The training run: DP-SGD / DP-Adam (Opacus) with per-epoch quantization plans, honest accounting, resume.

``train(config, out_dir)`` writes a run directory::

    config.yaml      the resolved TrainConfig
    run_info.json    model, dataset, shapes, sample rate, steps per epoch, noise multiplier, quantizable layers
    metrics.csv      one row per finished epoch (columns: METRIC_COLUMNS)
    plans.jsonl      one JSON line per finished epoch: that epoch's EpochPlan (``dpquant_sim.plan.read_plans``)
    tensorboard/     with ``tensorboard=True``: TensorBoard event files, scalars per epoch
    checkpoint.pt    everything needed to resume exactly (torch.load(weights_only=True) loadable)
    summary.json     written last, when the run is complete (or stopped at the privacy budget)
    .lock            while a process writes the folder (its pid); see ``train``

How one run goes:

1. Seeds: ``np.random.SeedSequence(config.seed)`` spawns independent seeds for model init, Poisson sampling,
   DP noise, the schedule's RNG and the estimator's sampling; quantized layers' stochastic rounding is
   seeded by ``nn.convert_model(model, seed=config.seed)``. Same config, same numbers.
2. Model: ``build_model`` -> ``nn.convert_model`` (Q layers, full precision) -> Opacus ``GradSampleModule``
   (hooks mode; our Q layers have registered grad samplers) for private runs. The loss is sum-reduced, so
   every per-example computation (quantizer scales included) sees d loss_i / d y_i whatever the realized
   Poisson batch size; the optimizer divides the noisy clipped sum by the *expected* batch size once.
3. Privacy: sample rate q = batch_size / n_train, steps per epoch = round(1 / q), Poisson sampling with
   Opacus's ``UniformWithReplacementSampler`` rule (each example independently with probability q) from a
   seeded generator. With a target epsilon the noise multiplier is calibrated by bisection over the whole
   planned sequence: every epoch's DP-SGD steps plus the extra mechanisms the schedule declares in advance
   (``schedule.planned_mechanisms(epochs, steps_per_epoch, private=True)``, optional), in the order the run
   records them, so the ledger ends exactly at the calibrated epsilon. Before every epoch the run checks
   that finishing the epoch stays within the target (1e-6 relative slack for floating-point summation
   order) and stops otherwise; a fixed noise multiplier whose planned spend exceeds ``epsilon`` is refused
   up front (PrivacyBudgetExceeded).
4. Each epoch: ``schedule.plan(ctx)`` -> ``nn.apply_plan`` -> train -> evaluate (fp32 by default, or with
   the plan: ``eval_quantized``) -> append a metrics row -> write the checkpoint atomically.
   Optional pre-pruning / gradient dropping (``config.prune`` / ``config.drop``) use
   ``dpquant_sim.schedules.prune_drop``; masks are applied before clipping, noise only goes on kept
   coordinates, and masked coordinates do not move (weights and optimizer state; ``optim.MaskedDPOptimizer``).
   With ``public_fraction`` > 0 a seeded share of the training set is held out as a declared public split
   before anything else reads the data (``_split_public``): n_train, q and every private mechanism use the
   rest; only data-dependent pruning (``snip-public``) reads it; run_info.json records it.
5. Non-private runs (``private=False``) take the same path without the GradSampleModule, clipping and noise;
   epsilon is reported as inf.

``train_loss`` (the mean training loss over the epoch's Poisson batches) is a statistic of private data that no
noise covers, so private runs write it as NaN unless ``release_train_loss`` asks for it. The released outputs
are the model, test metrics, epsilon and plans (docs/privacy.md).

Randomness: DP noise and Poisson sampling come from ``seed`` (reproducible; the epsilon then assumes the seed
stays secret, and run_info.json says so) or, with ``secure_noise``, from OS entropy (never written; the
checkpoint keeps the generator states an unfinished run needs to resume and drops them on completion).

>>> # from dpquant_sim.training import TrainConfig, train
>>> # res = train(TrainConfig(dataset="digits", model="cnn", epochs=3), "runs/x")
>>> # res.summary["test_acc"], res.summary["epsilon"]
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dpquant_sim.errors import ConfigError, PrivacyBudgetExceeded, RunFolderError
from dpquant_sim.io import atomic_write, atomic_write_df, atomic_write_json, clean_stale_temps, file_sha256
from dpquant_sim.locking import folder_lock
from dpquant_sim.plan import PLANS_FILE, EpochPlan, read_metrics, write_plans
from dpquant_sim.schedules.configs import DATA_DEPENDENT_PRUNE_METHODS
from dpquant_sim.training.accounting import DPSGD, Mechanism, PrivacyLedger, calibrate_noise, compose_epsilon
from dpquant_sim.training.config import TrainConfig, check_private_recipe, flatten_config

METRIC_COLUMNS: tuple[str, ...] = (
    "epoch", "train_loss", "test_loss", "test_acc", "epsilon", "delta", "accountant", "noise_multiplier",
    "sample_rate", "steps", "clip_norm", "quantized_layers", "quantized_flop_share", "estimator_epsilon",
    "wall_s",
)  # the epoch's plan goes to plans.jsonl (one JSON line per row), not into a CSV cell
CHECKPOINT_FORMAT = 1
BUDGET_SLACK = 1e-6  # relative; floating-point summation order only, far below the accountants' own error


@dataclass(frozen=True)
class RunResult:
    """What ``train`` returns: the run directory, its config, the per-epoch metrics and the summary.

    ``metrics`` holds metrics.csv's columns plus ``plan``: each epoch's EpochPlan as JSON (from plans.jsonl).
    """

    out_dir: Path
    config: TrainConfig
    metrics: pd.DataFrame
    summary: dict[str, Any]

    @property
    def test_acc(self) -> float:
        return float(self.summary["test_acc"])

    @property
    def epsilon(self) -> float:
        return float(self.summary["epsilon"])


# ------------------------------------------------------------------------------------------------ helpers
# The streams whose secrecy the privacy analysis assumes: the Gaussian noise, and which examples the Poisson
# samplers (DP-SGD's and the estimator's) drew; subsampling amplification needs the sample to be secret.
SECRET_STREAMS: tuple[str, ...] = ("sampler", "noise", "estimator")


def _seeds(seed: int, *, secure: bool = False) -> dict[str, int]:
    """One independent seed per random stream, spawned from ``seed``. With ``secure``, the secret streams are
    seeded from OS entropy instead (``secrets``); those seeds are never returned anywhere else or written."""
    import secrets

    names = ("init", "sampler", "noise", "schedule", "estimator")
    kids = np.random.SeedSequence(seed).spawn(len(names))
    out = {n: int(k.generate_state(1, dtype=np.uint64)[0] >> 1) for n, k in zip(names, kids)}
    if secure:
        out.update({n: secrets.randbits(63) for n in SECRET_STREAMS})
    return out


def _load_data(cfg: TrainConfig):
    from dpquant_sim.training.data import load_dataset

    kw: dict[str, Any] = {}
    if cfg.dataset == "synthetic":
        s = cfg.synthetic
        kw = dict(n_train=cfg.n_train or 2048, n_test=cfg.n_test or 512, channels=s.channels,
                  image_size=s.image_size, num_classes=s.num_classes, noise=s.noise)
    else:
        if cfg.n_train is not None:
            kw["n_train"] = cfg.n_train
        if cfg.n_test is not None:
            kw["n_test"] = cfg.n_test
        if cfg.dataset == "emnist":
            kw["split"] = cfg.emnist_split
        if cfg.dataset == "gtsrb":
            kw["crop_roi"] = cfg.gtsrb_crop_roi
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.data_seed, **kw)


def _extra_at(schedule, epoch: int, epochs: int, spe: int) -> list[Mechanism]:
    """Mechanisms the schedule declares it adds while planning ``epoch`` (difference of cumulative plans)."""
    fn = getattr(schedule, "planned_mechanisms", None)
    if fn is None:
        return []

    def cum(e: int) -> dict[tuple, int]:
        out: dict[tuple, int] = {}
        for name, s, q, t in (fn(e, spe, private=True) if e > 0 else []):
            out[(name, float(s), float(q))] = out.get((name, float(s), float(q)), 0) + int(t)
        return out

    before, after = cum(epoch), cum(epoch + 1)
    return [Mechanism(k[0], k[1], k[2], n - before.get(k, 0)) for k, n in after.items() if n > before.get(k, 0)]


def _planned_sequence(schedule, epochs: int, start: int, sigma: float, q: float, spe: int) -> list[Mechanism]:
    seq: list[Mechanism] = []
    for e in range(start, epochs):
        seq += _extra_at(schedule, e, epochs, spe)
        seq.append(Mechanism(DPSGD, sigma, q, spe))
    return seq


def _jsonable(x: Any) -> Any:
    """Make a state dict JSON-safe (numpy scalars/arrays, tuples) for storage as a string in checkpoints."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def _progress(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
                    console=Console(stderr=True))  # stdout stays for results (train --json)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y), in eval mode."""
    was = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for s in range(0, len(x), batch_size):
            out = model(x[s:s + batch_size])
            loss_sum += float(F.cross_entropy(out.float(), y[s:s + batch_size], reduction="sum"))
            correct += int((out.argmax(1) == y[s:s + batch_size]).sum())
    finally:
        model.train(was)
    n = max(1, len(x))
    return loss_sum / n, correct / n


PUBLIC_SPLIT_TAG = 0x9B11C  # mixed with cfg.seed: the public hold-out has its own stream, the others are unchanged


def _split_public(cfg: TrainConfig, data):
    """(private bundle, public (x, y) or None, run_info record or None).

    ``public_fraction`` F > 0: round(F x n) training examples, drawn by a permutation seeded from
    (seed, PUBLIC_SPLIT_TAG), are declared public and removed from the training set; DP-SGD, its sample rate
    (q = batch_size / n_private) and every other private mechanism see only the rest.
    """
    if cfg.public_fraction <= 0:
        return data, None, None
    import dataclasses

    from torch.utils.data import TensorDataset

    x, y = data.train.tensors
    n = len(y)
    n_pub = int(math.floor(cfg.public_fraction * n + 0.5))
    if n_pub < 1 or n - n_pub < 1:
        raise ConfigError("public_fraction", cfg.public_fraction,
                          f"a share of the {n} training examples that leaves at least one public and one private")
    ss = np.random.SeedSequence([int(cfg.seed), PUBLIC_SPLIT_TAG])
    g = torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))
    perm = torch.randperm(n, generator=g)
    pub, priv = perm[:n_pub].sort().values, perm[n_pub:].sort().values
    private = dataclasses.replace(data, train=TensorDataset(x[priv], y[priv]))
    info = {"fraction": cfg.public_fraction, "n_loaded": n, "n_public": n_pub, "n_private": n - n_pub,
            "selected_by": f"permutation seeded from (seed={cfg.seed}, {PUBLIC_SPLIT_TAG:#x})",
            "used_by": (f"prune.method={cfg.prune.method}" if cfg.prune is not None and
                        cfg.prune.method in DATA_DEPENDENT_PRUNE_METHODS else "nothing (held out only)"),
            "indices": pub.tolist()}
    return private, (x[pub], y[pub]), info


def _prune_drop(cfg: TrainConfig, model: nn.Module, seed: int, input_shape, public=None):
    if cfg.prune is None and cfg.drop is None:
        return None, None
    try:
        from dpquant_sim.schedules import prune_drop
    except ImportError:
        raise NotImplementedError(
            "config.prune / config.drop need dpquant_sim.schedules.prune_drop (apply_pruning, GradDropper), "
            "which is not available in this tree yet") from None
    prune_state = (prune_drop.apply_pruning(model, cfg.prune, seed, input_shape=input_shape, public=public)
                   if cfg.prune is not None else None)
    dropper = prune_drop.GradDropper(cfg.drop, seed) if cfg.drop is not None else None
    return prune_state, dropper


def _named_masks(model: nn.Module, masks: Mapping | None) -> dict[nn.Parameter, torch.Tensor]:
    """Accept masks keyed by parameter or by parameter name; return them keyed by parameter."""
    if not masks:
        return {}
    params = dict(model.named_parameters())
    out = {}
    for k, m in masks.items():
        if isinstance(k, str):
            if k not in params:
                raise ConfigError("mask parameter", k, tuple(params))
            out[params[k]] = m
        else:
            out[k] = m
    return out


# ------------------------------------------------------------------------------------------------ the run
class _Run:
    """State of one run; ``train`` drives it. Split out so that tests and benchmarks can step it."""

    def __init__(self, cfg: TrainConfig, out_dir: Path | None):
        import dpquant_sim.nn as qnn
        from dpquant_sim.nn.shapes import gemm_layers
        from dpquant_sim.schedules import build_schedule
        from dpquant_sim.schedules.base import LayerInfo

        self.cfg, self.out_dir = cfg, out_dir
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", "cuda", "'cpu' (no CUDA device is visible)")
        self.device = torch.device(cfg.device)
        seeds = _seeds(cfg.seed, secure=cfg.secure_noise)

        # the private training set: what a public split (public_fraction) leaves; n is its size
        self.data, self.public, self.public_info = _split_public(cfg, _load_data(cfg))
        n = self.data.n_train
        if cfg.batch_size > n:
            raise ConfigError("batch_size", cfg.batch_size, f"at most the training set size {n}")
        self.x_train, self.y_train = (t.to(self.device) for t in self.data.train.tensors)
        self.x_test, self.y_test = (t.to(self.device) for t in self.data.test.tensors)
        model = build_run_model(cfg, self.data).to(self.device)
        if self.device.type != "cpu":
            qnn.set_generators(model, cfg.seed)
        self.model = model  # the plain (converted) model; plans and checkpoints use its names
        self.layer_shapes = gemm_layers(model, self.data.input_shape)
        self.layers = [LayerInfo(s.name, s.forward_flops) for s in self.layer_shapes]
        public = tuple(t.to(self.device) for t in self.public) if self.public is not None else None
        self.prune_state, self.dropper = _prune_drop(cfg, model, cfg.seed, self.data.input_shape, public)

        # sampling, steps, noise
        self.q = cfg.batch_size / n
        self.spe = max(1, round(1 / self.q))
        if cfg.private and getattr(cfg.schedule, "kind", None) == "dpquant":
            from dpquant_sim.schedules.dpquant import resolve_estimator_noise

            resolved = resolve_estimator_noise(cfg.schedule, epochs=cfg.epochs, epsilon=cfg.epsilon,
                                               delta=cfg.delta, accountant=cfg.accountant)
            self.cfg = cfg = cfg.model_copy(update={"schedule": resolved})
        self.schedule = build_schedule(cfg.schedule)
        self.ledger = PrivacyLedger(cfg.accountant, cfg.delta) if cfg.private else None
        self.sigma = self._noise_multiplier() if cfg.private else 0.0

        base = make_base(cfg, model)
        if cfg.private:
            from opacus.validators import ModuleValidator

            ModuleValidator.validate(model, strict=True)
            self.noise_gen = torch.Generator(device=self.device).manual_seed(seeds["noise"])
        else:
            self.noise_gen = None
        # The loss is summed in every algorithm: each example's output gradient is d loss_i / d y_i, whatever the
        # realized Poisson batch size |B|. A mean-reduced loss would hand every quantizer dy_i / |B|, and a
        # power-of-two (MX) scale rounds that differently for each |B|, so one example's clipped gradient would
        # depend on whether another was sampled. The DP optimizer divides by the *expected* batch size once.
        from dpquant_sim.training.clipping import build_clipping

        dp = dict(noise_multiplier=self.sigma, max_grad_norm=cfg.max_grad_norm, expected_batch_size=cfg.batch_size,
                  generator=self.noise_gen, secure_mode=cfg.secure_noise) if cfg.private else {}
        self.clipper = build_clipping(cfg.clipping if cfg.private else "none", model, base, **dp)
        self.base_optimizer = base
        self.sampler_gen = torch.Generator().manual_seed(seeds["sampler"])
        self.ctx_rng = np.random.default_rng(seeds["schedule"])
        self.est_gen = torch.Generator().manual_seed(seeds["estimator"])
        from dpquant_sim.training.sensitivity import make_loss_delta_fn

        self.loss_deltas = make_loss_delta_fn(model, self.data.train, recipe=cfg.recipe, device=self.device,
                                              dp=cfg.private)
        from dpquant_sim.training.sensitivity_training import make_training_delta_fn

        # the dpquant 'training' estimator's callable: short clipped steps of one example's share of a DP-SGD step
        # (lr / expected batch size) at the run's clip, DP hooks paused
        self.training_deltas = make_training_delta_fn(model, self.data.train, recipe=cfg.recipe,
                                                      lr=cfg.lr / cfg.batch_size,
                                                      grad_clip=cfg.max_grad_norm, device=self.device,
                                                      dp=cfg.private, paused=self.clipper.paused)
        self.epoch = 0  # next epoch to run
        self.global_step = 0
        self.rows: list[dict[str, Any]] = []
        self.wall_s = 0.0

    # -- privacy
    def _noise_multiplier(self) -> float:
        cfg = self.cfg
        build = lambda s: _planned_sequence(self.schedule, cfg.epochs, 0, s, self.q, self.spe)  # noqa: E731
        if cfg.noise_multiplier is not None:
            sigma = float(cfg.noise_multiplier)
            if cfg.epsilon is not None:
                planned = compose_epsilon(build(sigma), cfg.delta, cfg.accountant)
                if planned > cfg.epsilon * (1 + BUDGET_SLACK):
                    raise PrivacyBudgetExceeded(
                        f"refusing to start: noise_multiplier={sigma} for {cfg.epochs} epochs of {self.spe} steps at "
                        f"sample rate {self.q:.4g} (plus the schedule's planned mechanisms) spends epsilon="
                        f"{planned:.3f} > epsilon={cfg.epsilon} at delta={cfg.delta} ({cfg.accountant}); raise "
                        "noise_multiplier, lower epochs, or drop epsilon to let it be reported only")
            return sigma
        return calibrate_noise(cfg.epsilon, cfg.delta, cfg.accountant, build)

    def _within_budget(self, extra: Sequence[Mechanism]) -> tuple[bool, float]:
        if self.ledger is None or self.cfg.epsilon is None:
            return True, float("nan")
        e = self.ledger.projected_epsilon(extra)
        return e <= self.cfg.epsilon * (1 + BUDGET_SLACK), e

    # -- one epoch
    def plan_epoch(self) -> EpochPlan:
        import dpquant_sim.nn as qnn
        from dpquant_sim.schedules.base import ScheduleContext

        cfg = self.cfg
        ctx = ScheduleContext(
            epoch=self.epoch, epochs=cfg.epochs, layers=self.layers, recipe=cfg.recipe, rng=self.ctx_rng,
            private=cfg.private, ledger=self.ledger, loss_deltas=self.loss_deltas, torch_generator=self.est_gen,
            extra={"delta": cfg.delta, "sample_rate": self.q, "steps_per_epoch": self.spe,
                   "noise_multiplier": self.sigma, "n_train": self.data.n_train,
                   "training_deltas": self.training_deltas},
        )
        plan = self.schedule.plan(ctx)
        qnn.apply_plan(self.model, plan, dp=cfg.private)
        return plan

    def _batches(self, idx: torch.Tensor):
        pb = self.cfg.physical_batch_size
        if pb is None or len(idx) <= pb:
            return [idx]
        return list(torch.split(idx, pb))

    def train_step(self) -> tuple[float, int]:
        """One logical (Poisson) batch. Returns (sum of example losses, batch size)."""
        n = self.data.n_train
        mask = torch.rand(n, generator=self.sampler_gen) < self.q  # Opacus's UniformWithReplacementSampler rule
        idx = mask.nonzero().reshape(-1).to(self.device)
        # pruned coordinates are masked like dropped ones: out of the per-sample norm, no noise on them
        masks = self.prune_state.param_masks(self.model) if self.prune_state is not None else None
        if self.dropper is not None:
            masks = _named_masks(self.model, self.dropper.masks(self.model, self.global_step, base=masks))
        chunks = [(self.x_train[ci], self.y_train[ci]) for ci in self._batches(idx)] if len(idx) else []
        loss_sum = self.clipper.step(chunks, masks)
        if self.prune_state is not None:
            self.prune_state.reapply(self.model)
        self.global_step += 1
        return loss_sum, len(idx)

    def evaluate(self) -> tuple[float, float]:
        import dpquant_sim.nn as qnn

        if self.cfg.eval_quantized:
            return evaluate(self.model, self.x_test, self.y_test, self.cfg.eval_batch_size)
        saved = {n: self.model.get_submodule(n).qconfig for n in qnn.quantizable_layers(self.model)}
        try:
            qnn.apply_plan(self.model, {n: None for n in saved}, dp=False)
            return evaluate(self.model, self.x_test, self.y_test, self.cfg.eval_batch_size)
        finally:
            qnn.apply_plan(self.model, saved, dp=self.cfg.private)

    def estimator_epsilon(self) -> float:
        if self.ledger is None:
            return 0.0
        extra = [m for m in self.ledger.entries if m.name != DPSGD]
        return compose_epsilon(extra, self.cfg.delta, self.cfg.accountant) if extra else 0.0

    # -- checkpoint
    def state_dict(self) -> dict[str, Any]:
        import dpquant_sim.nn as qnn

        return {
            "format": CHECKPOINT_FORMAT,
            "config_json": self.cfg.model_dump_json(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "sigma": float(self.sigma),
            "wall_s": float(self.wall_s),
            "model": self.model.state_dict(),
            "optimizer": self.base_optimizer.state_dict(),
            "ledger": self.ledger.state_dict() if self.ledger is not None else None,
            "schedule_json": json.dumps(_jsonable(self.schedule.state_dict())),
            "ctx_rng_json": json.dumps(_jsonable(self.ctx_rng.bit_generator.state)),
            "rng": {
                "sampler": self.sampler_gen.get_state(),
                "estimator": self.est_gen.get_state(),
                "noise": self.noise_gen.get_state() if self.noise_gen is not None else None,
                "torch": torch.get_rng_state(),
            },
            "layer_generators": qnn.generator_states(self.model),
            "prune": self.prune_state.state_dict() if self.prune_state is not None else None,
            "rows": self.rows,
        }

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        import dpquant_sim.nn as qnn

        if st.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError("checkpoint format", st.get("format"), (CHECKPOINT_FORMAT,))
        self.epoch, self.global_step = int(st["epoch"]), int(st["global_step"])
        if self.cfg.private and float(st["sigma"]) != self.sigma:
            raise ConfigError("checkpoint noise_multiplier", st["sigma"], f"{self.sigma} (this config's)")
        self.wall_s = float(st["wall_s"])
        self.model.load_state_dict(st["model"])
        self.base_optimizer.load_state_dict(st["optimizer"])
        if self.ledger is not None:
            self.ledger.load_state_dict(st["ledger"])
        self.schedule.load_state_dict(json.loads(st["schedule_json"]))
        self.ctx_rng.bit_generator.state = json.loads(st["ctx_rng_json"])
        rng = st["rng"]
        if any(rng.get(k) is None for k in ("sampler", "estimator")) or (
                self.noise_gen is not None and rng.get("noise") is None):
            raise ConfigError("checkpoint", "without its secret generator states (a completed secure_noise run "
                              "drops them)", "a checkpoint of an unfinished run")
        self.sampler_gen.set_state(rng["sampler"])
        self.est_gen.set_state(rng["estimator"])
        if self.noise_gen is not None:
            self.noise_gen.set_state(rng["noise"])
        torch.set_rng_state(st["rng"]["torch"])
        qnn.set_generator_states(self.model, st["layer_generators"])
        if st.get("prune") is not None and self.prune_state is not None:
            self.prune_state.load_state_dict(st["prune"])  # random drop masks are a function of (seed, step)
        self.rows = [dict(r) for r in st["rows"]]

    @property
    def releases_train_loss(self) -> bool:
        """Whether metrics.csv / summary.json carry the un-noised training loss (always for non-private runs)."""
        return not self.cfg.private or self.cfg.release_train_loss

    def _randomness_note(self) -> str:
        if self.cfg.secure_noise:
            return ("secure_noise: DP noise and Poisson sampling are seeded from OS entropy, never written; "
                    "checkpoint.pt holds their generator states until the run completes, then drops them")
        return (f"reproducible: DP noise and Poisson sampling are seeded from seed={self.cfg.seed}, which "
                "config.yaml records; the reported epsilon assumes the seed stays secret (use secure_noise "
                "for a release)")

    def run_info(self) -> dict[str, Any]:
        d = self.data
        return {
            "model": self.cfg.model, "dataset": d.name, "input_shape": list(d.input_shape),
            "num_classes": d.num_classes, "n_train": d.n_train, "n_test": d.n_test,
            "batch_size": self.cfg.batch_size, "sample_rate": self.q, "steps_per_epoch": self.spe,
            "epochs": self.cfg.epochs, "private": self.cfg.private, "noise_multiplier": self.sigma,
            "max_grad_norm": self.cfg.max_grad_norm if self.cfg.private else None,
            "accountant": self.cfg.accountant if self.cfg.private else None, "delta": self.cfg.delta,
            "secret_randomness": self._randomness_note() if self.cfg.private else None,
            "train_loss_released": self.releases_train_loss,
            "clipping": self.cfg.clipping if self.cfg.private else None,
            "quantizer_backend": _quantizer_backend(),
            "target_epsilon": self.cfg.epsilon if self.cfg.private else None,
            "planned_mechanisms": [[m.name, m.noise_multiplier, m.sample_rate, m.steps] for m in
                                   _planned_sequence(self.schedule, self.cfg.epochs, 0, self.sigma, self.q, self.spe)
                                   if m.name != DPSGD] if self.cfg.private else [],
            "params": sum(p.numel() for p in self.model.parameters()),
            "quantizable_layers": [
                {"name": s.name, "kind": s.kind, "gemm_mnk": list(s.gemm_mnk), "forward_flops": s.forward_flops,
                 "weight_shape": list(s.weight_shape or ()), "in_shape": list(s.in_shape),
                 "out_shape": list(s.out_shape)} for s in self.layer_shapes],
            "dataset_info": d.info or {},
            "public_split": self.public_info,
            "prune": None if self.prune_state is None else {
                "method": self.prune_state.cfg.method, "structure": self.prune_state.cfg.structure,
                "sparsity": self.prune_state.cfg.sparsity, "density": self.prune_state.density,
                "kept_channel_fraction": self.prune_state.kept_channel_fraction,
                "kept_gemm_flop_share": self.prune_state.kept_flop_share(self.layers)},
        }


def _quantizer_backend() -> str:
    from dpquant_sim.numerics.quantize import AUTO_COMPILE_MIN_NUMEL, default_backend

    b = default_backend()
    return f"auto (compiled for tensors of >= {AUTO_COMPILE_MIN_NUMEL} elements, eager below)" if b == "auto" else b


def make_base(cfg: TrainConfig, model: nn.Module):
    from dpquant_sim.training.optim import make_base_optimizer

    return make_base_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)


def build_run_model(cfg: TrainConfig, data) -> nn.Module:
    """The converted (quantizable, full-precision) model of ``cfg`` for ``data``'s input shape and classes, with
    the run's initial weights (seeded from ``cfg.seed``, torch's global RNG untouched), on CPU."""
    import dpquant_sim.nn as qnn
    from dpquant_sim.training.models import build_model

    c, h, _ = data.input_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seeds(cfg.seed)["init"])
        model = build_model(cfg.model, in_channels=c, num_classes=data.num_classes, image_size=h)
    return qnn.convert_model(model, seed=cfg.seed)


def load_run(run_dir: str | Path):
    """A run directory's (config, data, model with the checkpoint's weights, on CPU), e.g. to analyse a finished
    run. Raises FileNotFoundError naming the missing file."""
    run_dir = Path(run_dir)
    for f in ("config.yaml", "checkpoint.pt"):
        if not (run_dir / f).is_file():
            raise FileNotFoundError(f"{run_dir}: no {f} (not a run directory written by dpquant-sim train)")
    cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    data = _load_data(cfg)
    model = build_run_model(cfg, data)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["model"])
    return cfg, data, model


def _write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts).

    Raises RunFolderError naming the file when it is truncated, damaged or not a dpquant-sim checkpoint.
    """
    path = Path(path)
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - empty (EOFError), truncated (RuntimeError), random (UnpicklingError)
        size = path.stat().st_size
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:100]
        reason = "an empty file" if size == 0 else f"{size} bytes, {type(e).__name__}: {first}"
        raise RunFolderError(
            f"{str(path)!r} is not a readable checkpoint ({reason}; truncated or damaged); restore it, or delete it "
            "to restart that run from epoch 0") from None
    if not isinstance(st, dict) or "config_json" not in st:
        raise RunFolderError(f"{str(path)!r} is not a dpquant-sim checkpoint (no config_json); restore it, or delete "
                             "it to restart that run from epoch 0")
    return st


def _existing_config(out_dir: Path) -> TrainConfig | None:
    p = out_dir / "config.yaml"
    return TrainConfig.from_yaml(p) if p.is_file() else None


# Config fields that cannot change a run's numbers: a resume may change them.
RESULT_NEUTRAL_FIELDS: tuple[str, ...] = ("threads",)
# Fields a run fills in when the config leaves them None (auto); the checkpoint stores the filled-in value.
RESOLVED_BY_RUN: tuple[str, ...] = ("schedule.noise_multiplier",)


def config_diff(stored: TrainConfig, requested: TrainConfig, *, resolved: Sequence[str] = ()) -> list[str]:
    """The fields (dotted, e.g. ``schedule.budget``) where ``stored`` and ``requested`` differ, as
    ``"lr: 1.0 stored, 0.1 requested"``; fields in RESULT_NEUTRAL_FIELDS are ignored, and so are ``resolved``
    fields that ``requested`` leaves None."""
    a, b = flatten_config(stored.model_dump(mode="json")), flatten_config(requested.model_dump(mode="json"))
    out = []
    for k in sorted(a.keys() | b.keys()):
        va, vb = a.get(k, "<unset>"), b.get(k, "<unset>")
        if va == vb or k.split(".")[0] in RESULT_NEUTRAL_FIELDS or (k in resolved and vb is None):
            continue
        out.append(f"{k}: {va!r} stored, {vb!r} requested")
    return out


def _check_resume(out: Path, cfg: TrainConfig) -> tuple[TrainConfig | None, dict[str, Any] | None]:
    """The run folder's config.yaml and checkpoint, once both agree with ``cfg`` (else refuse, naming fields).

    config.yaml is the run's label and the checkpoint holds the state that training continues from; both must
    describe the requested run, or a resume would train with one config and label the result with another.
    """
    prev = _existing_config(out)
    if prev is not None:
        diff = config_diff(prev, cfg)
        if diff:
            raise ConfigError("out", str(out), "an empty folder or a run folder of this same config (it holds "
                              f"another run's config.yaml; {'; '.join(diff)})")
    ck = out / "checkpoint.pt"
    if not ck.is_file():
        return prev, None
    st = load_checkpoint(ck)
    try:
        stored = TrainConfig.model_validate_json(st["config_json"])
    except Exception as e:  # noqa: BLE001 - pydantic ValidationError or a non-string
        raise RunFolderError(f"{str(ck)!r} holds a config that does not load ({str(e).splitlines()[0]}); restore "
                             "it, or delete it to restart that run from epoch 0") from None
    diff = config_diff(stored, cfg, resolved=RESOLVED_BY_RUN)
    if diff:
        edited = " (config.yaml was edited after the checkpoint was written)" if prev is not None else ""
        raise RunFolderError(
            f"{str(ck)!r} was written with other settings than requested{edited}: {'; '.join(diff)}; resuming "
            "would train with the checkpoint's settings under the new label. Rerun with the checkpoint's values "
            "(and restore config.yaml), or use another --out")
    return prev, st


def train(config: TrainConfig | Mapping[str, Any], out_dir: str | Path, *, progress: bool = True,
          stop_after: int | None = None, tensorboard: bool = False) -> RunResult:
    """Run (or resume, or return the finished) training run of ``config`` in ``out_dir``.

    Args:
        config: a TrainConfig or a mapping of its fields.
        out_dir: the run directory (created). A directory of a different config is refused.
        progress: show a progress bar when stderr is a terminal, else one line per epoch on stderr, e.g.
            ``epoch 3/10 acc=0.812 eps=2.31 quantized=5/11 12.4s``.
        stop_after: stop after this many epochs in total (as if interrupted; for tests and time-boxing).
            The run stays resumable and summary.json is not written.
        tensorboard: also write TensorBoard event files to ``out_dir/tensorboard/`` (scalars per epoch: test
            accuracy and loss, training loss when released, epsilon, quantized FLOP share and layer count;
            needs the ``tensorboard`` package). Not part of the config: a resume may switch it on or off.

    While it runs, the process holds ``out_dir/.lock`` (``dpquant_sim.locking``): one writer per run folder.
    A finished run (summary.json present) is only read, without the lock.
    A resume first removes temporary files that a killed writer left, and checks that config.yaml and the
    checkpoint's stored config both match ``config`` (fields in RESULT_NEUTRAL_FIELDS, e.g. threads, may differ).

    Raises:
        ConfigError: bad config, batch larger than the data, out_dir of another run, out_dir not a writable folder.
        DPSafetyError: a private run with a recipe whose activation or gradient scales are batch-wide
            (``luq_fp4_batch``); nothing is written.
        RunFolderError: another process holds out_dir; its checkpoint is unreadable or holds other settings.
        PrivacyBudgetExceeded: a fixed noise multiplier would spend more than ``epsilon``.
        OutputError: a result cannot be written (full disk, read-only folder); finished epochs are kept.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.parse(config)
    check_private_recipe(cfg)  # before anything is written: a batch-wide recipe is refused under DP
    out = Path(out_dir)
    if tensorboard:
        _summary_writer_class()  # a missing package fails before anything is written
    if (out / "summary.json").is_file():  # a finished run is only read (no lock: read-only folders work)
        prev, _ = _check_resume(out, cfg)
        if prev is not None:
            return _result_from_dir(out, cfg)
    with folder_lock(out, what="run folder"):
        clean_stale_temps(out)
        return _train_locked(cfg, out, progress=progress, stop_after=stop_after, tensorboard=tensorboard)


def _summary_writer_class():
    """torch's SummaryWriter; ConfigError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard", True, "the tensorboard package installed (pip install "
                          "'dpquant-sim[tensorboard]'), or no --tensorboard") from None
    return SummaryWriter


def _tensorboard_writer(out: Path, first_epoch: int):
    """A SummaryWriter on ``out/tensorboard`` that drops events a killed earlier process logged for epochs from
    ``first_epoch`` on (they are logged again)."""
    return _summary_writer_class()(str(out / "tensorboard"), purge_step=first_epoch if first_epoch > 0 else None)


def _log_tensorboard(writer, row: Mapping[str, Any]) -> None:
    e = int(row["epoch"])
    for tag, key in (("test/accuracy", "test_acc"), ("test/loss", "test_loss"), ("train/loss", "train_loss"),
                     ("privacy/epsilon", "epsilon"), ("quantization/flop_share", "quantized_flop_share"),
                     ("quantization/layers", "quantized_layers")):
        v = float(row[key])
        if math.isfinite(v):  # an unreleased training loss (NaN) and a non-private epsilon (inf) are left out
            writer.add_scalar(tag, v, e)
    writer.flush()


def progress_line(row: Mapping[str, Any], epochs: int, n_layers: int) -> str:
    """One epoch's progress line (stderr when it is not a terminal).

    >>> progress_line({"epoch": 2, "test_acc": 0.8123, "epsilon": 2.314, "quantized_layers": 5, "wall_s": 12.44},
    ...               10, 11)
    'epoch 3/10 acc=0.812 eps=2.31 quantized=5/11 12.4s'
    """
    eps = row["epsilon"]
    return (f"epoch {int(row['epoch']) + 1}/{epochs} acc={row['test_acc']:.3f} "
            f"eps={'inf' if math.isinf(eps) else f'{eps:.2f}'} quantized={row['quantized_layers']}/{n_layers} "
            f"{row['wall_s']:.1f}s")


def _write_epoch_files(out: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """plans.jsonl, then metrics.csv, each atomically, both from the same rows (the checkpoint's)."""
    write_plans(out / PLANS_FILE, [EpochPlan.from_json(r["plan"]) for r in rows])
    atomic_write_df(out / "metrics.csv", pd.DataFrame(rows, columns=list(METRIC_COLUMNS)))


def _train_locked(cfg: TrainConfig, out: Path, *, progress: bool, stop_after: int | None,
                  tensorboard: bool = False) -> RunResult:
    """``train`` once this process holds the run folder."""
    prev, state = _check_resume(out, cfg)
    if prev is not None and (out / "summary.json").is_file():
        return _result_from_dir(out, cfg)

    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    run = _Run(cfg, out)
    ck = out / "checkpoint.pt"
    if state is not None:
        run.load_state_dict(state)
        _write_epoch_files(out, run.rows)  # a process killed between writing them and the checkpoint: realign
    out.mkdir(parents=True, exist_ok=True)
    if prev is None:
        cfg.to_yaml(out / "config.yaml")
    atomic_write_json(out / "run_info.json", run.run_info())

    stopped: str | None = None
    bar = _progress(progress)
    lines = progress and bar is None  # not a terminal: one line per epoch
    writer = _tensorboard_writer(out, run.epoch) if tensorboard else None
    last = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    try:
        if bar is not None:
            bar.start()
            task = bar.add_task("train", total=(last - run.epoch) * run.spe, info="")
        while run.epoch < last:
            t0 = time.perf_counter()
            if cfg.private:
                extra = _extra_at(run.schedule, run.epoch, cfg.epochs, run.spe)
                ok, e = run._within_budget(extra + [Mechanism(DPSGD, run.sigma, run.q, run.spe)])
                if not ok:
                    stopped = (f"privacy budget: epoch {run.epoch} would reach epsilon={e:.4f} > "
                               f"target {cfg.epsilon}")
                    break
            plan = run.plan_epoch()
            if cfg.private:
                ok, e = run._within_budget([Mechanism(DPSGD, run.sigma, run.q, run.spe)])
                if not ok:
                    stopped = (f"privacy budget: after planning, epoch {run.epoch} would reach epsilon={e:.4f} > "
                               f"target {cfg.epsilon} (the schedule spent more than it declared)")
                    break
            loss_sum, count = 0.0, 0
            for _ in range(run.spe):
                ls, nb = run.train_step()
                loss_sum, count = loss_sum + ls, count + nb
                if bar is not None:
                    info = f"epoch {run.epoch + 1}/{cfg.epochs}"
                    if run.releases_train_loss:
                        info += f" loss {ls / max(nb, 1):.3f}"
                    bar.update(task, advance=1, info=info)
            if run.ledger is not None:
                run.ledger.step(run.sigma, run.q, run.spe)
            test_loss, test_acc = run.evaluate()
            wall = time.perf_counter() - t0
            run.wall_s += wall
            run.rows.append({
                "epoch": run.epoch,
                "train_loss": loss_sum / max(count, 1) if run.releases_train_loss else math.nan,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "epsilon": run.ledger.epsilon() if run.ledger is not None else math.inf,
                "delta": cfg.delta,
                "accountant": cfg.accountant if cfg.private else "none",
                "noise_multiplier": run.sigma,
                "sample_rate": run.q,
                "steps": run.ledger.steps_of(DPSGD) if run.ledger is not None else run.global_step,
                "clip_norm": cfg.max_grad_norm if cfg.private else math.nan,
                "quantized_layers": len(plan.quantized),
                "quantized_flop_share": _flop_share(plan, run.layers),
                "plan": plan.to_json(),
                "estimator_epsilon": run.estimator_epsilon(),
                "wall_s": wall,
            })
            run.epoch += 1
            _write_epoch_files(out, run.rows)
            _write_checkpoint(ck, run.state_dict())
            if writer is not None:
                _log_tensorboard(writer, run.rows[-1])
            if lines:
                print(progress_line(run.rows[-1], cfg.epochs, len(run.layers)), file=sys.stderr, flush=True)
            if bar is not None:
                bar.update(task, info=f"epoch {run.epoch}/{cfg.epochs} acc {test_acc:.3f} "
                                      f"eps {run.rows[-1]['epsilon']:.2f}")
    finally:
        if bar is not None:
            bar.stop()
        if writer is not None:
            writer.close()
    metrics = pd.DataFrame(run.rows, columns=[*METRIC_COLUMNS, "plan"])
    if run.epoch < last and stopped is None:  # pragma: no cover - loop exits only by completion or budget
        stopped = "interrupted"
    if stop_after is not None and stopped is None and run.epoch < cfg.epochs:
        return RunResult(out, cfg, metrics, {"complete": False, "epochs_completed": run.epoch})
    summary = _summary(run, stopped)
    if cfg.secure_noise and cfg.private:  # nothing left to resume: the secret generator states go
        st = run.state_dict()
        st["rng"] = {k: (None if k in SECRET_STREAMS else v) for k, v in st["rng"].items()}
        _write_checkpoint(ck, st)
    if (out / "metrics.csv").is_file():  # lets a later collect detect a hand-edited or damaged metrics.csv
        summary["metrics_sha256"] = file_sha256(out / "metrics.csv")
    if (out / PLANS_FILE).is_file():
        summary["plans_sha256"] = file_sha256(out / PLANS_FILE)
    atomic_write_json(out / "summary.json", summary)
    return RunResult(out, cfg, metrics, summary)


def _flop_share(plan: EpochPlan, layers) -> float:
    if plan.quantized_flop_share is not None:
        return float(plan.quantized_flop_share)
    total = sum(layer.flops for layer in layers)
    return sum(layer.flops for layer in layers if layer.name in plan.quantized) / total if total else 0.0


def _summary(run: _Run, stopped: str | None) -> dict[str, Any]:
    cfg, last = run.cfg, (run.rows[-1] if run.rows else {})
    s: dict[str, Any] = {
        "complete": True,
        "stopped": stopped,
        "epochs_completed": run.epoch,
        "epochs_planned": cfg.epochs,
        "test_acc": last.get("test_acc", math.nan),
        "test_loss": last.get("test_loss", math.nan),
        "best_test_acc": max((r["test_acc"] for r in run.rows), default=math.nan),
        "train_loss": last.get("train_loss", math.nan) if run.releases_train_loss else None,
        "private": cfg.private,
        "epsilon": run.ledger.epsilon() if run.ledger is not None else math.inf,
        "target_epsilon": cfg.epsilon if cfg.private else None,
        "delta": cfg.delta,
        "accountant": cfg.accountant if cfg.private else None,
        "noise_multiplier": run.sigma,
        "sample_rate": run.q,
        "steps": run.global_step,
        "steps_per_epoch": run.spe,
        "clip_norm": cfg.max_grad_norm if cfg.private else None,
        "mean_quantized_flop_share": float(np.mean([r["quantized_flop_share"] for r in run.rows])) if run.rows else 0.0,
        "wall_s": run.wall_s,
    }
    if run.ledger is not None:
        s["epsilon_bounds"] = list(run.ledger.epsilon_bounds())
        s["epsilon_by_mechanism"] = run.ledger.breakdown()
        s["estimator_epsilon"] = run.estimator_epsilon()
    return s


def _result_from_dir(out: Path, cfg: TrainConfig) -> RunResult:
    metrics = read_metrics(out) if (out / "metrics.csv").is_file() else pd.DataFrame()
    summary = json.loads((out / "summary.json").read_text())
    return RunResult(out, cfg, metrics, summary)


__all__ = ["train", "RunResult", "evaluate", "load_checkpoint", "load_run", "build_run_model", "METRIC_COLUMNS"]
