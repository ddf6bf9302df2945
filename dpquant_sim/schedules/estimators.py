"""DPQuant's per-layer sensitivity estimators, registered by name (``DPQuantConfig.estimator``).

An estimator turns the current model and a Poisson sample of the private training set into per-example rows
``d[i, :]`` (one loss delta per quantizable layer). The schedule privatises every estimator the same way: clip
each row to L2 norm C_a (``DPQuantConfig.clip``), sum, add N(0, sigma_s^2 C_a^2 I_L), divide by the expected
sample size q N, and register one Poisson-subsampled Gaussian mechanism in the run's ledger with noise multiplier

    sigma_ledger = sigma_s / sensitivity_factor

(noise std / L2 sensitivity of the clipped sum, in units of C_a). What differs between estimators is how the rows
are computed and the sensitivity they are accounted with:

- ``forward`` (default): ``ScheduleContext.loss_deltas``: d[i, l] = loss(x_i; only l quantized) -
  loss(x_i; full precision) at the current weights, forward only. Sensitivity C_a under add/remove (factor 1).
- ``training`` (the DPQuant paper's estimator): ``ScheduleContext.extra['training_deltas']``: the same
  difference after ``estimator_iters`` short clipped SGD steps per candidate policy from the same weights,
  each example on its own (``dpquant_sim.training.sensitivity_training``). Accounted with sensitivity 2 C_a
  (factor 2), the bound the paper's analysis is stated with.

Proof sketch for ``training`` (why sigma_s / 2 is a valid noise multiplier for the ledger). Let S(D) =
sum_{i in B} clip_{C_a}(d_i) with B the Poisson sample. (1) Row d_i is a function of example i, the public weight
snapshot w0 and public randomness only: the short steps train on example i alone (a batch of one), with fresh
rounding generators seeded from a seed drawn before the sample and the example's index; nothing of any other
example enters. (2) Hence for D' = D minus example j with the same randomness, every other row is unchanged and
S(D) - S(D') = clip(d_j), of L2 norm <= C_a: the add/remove sensitivity is C_a <= 2 C_a. Under replace-one
(D vs D with example j substituted) the difference is clip(d_j) - clip(d'_j), of norm <= 2 C_a. (3) The Gaussian
mechanism S + N(0, sigma_s^2 C_a^2 I) with sensitivity Delta is the unit-sensitivity mechanism with noise
multiplier sigma_s C_a / Delta; with Delta = 2 C_a that is sigma_s / 2, so registering (sigma_s / 2, q, 1) in the
subsampled-Gaussian accountant (Poisson sampling at rate q, as DP-SGD) is an upper bound on the privacy loss
under either neighbouring relation. (4) Composition with DP-SGD and with the other estimates is the ledger's
(RDP or PRV). The factor 2 costs privacy (or, at a fixed budget, doubles sigma_s) relative to the tight C_a
under add/remove; it is kept because it is what the paper's analysis is stated with and it also covers
replace-one. If the short steps trained on the whole sample instead (one step on the batch's summed clipped
gradients, as DP-SGD), removing example j would move the weights every other row is measured at, and S would
have sensitivity up to C_a + 2 C_a (n - 1): no constant bound holds, which is why they do not.

>>> sorted(ESTIMATORS)
['forward', 'training']
>>> ESTIMATORS["training"].sensitivity_factor
2.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from dpquant_sim.errors import ConfigError

# deltas(ctx, names, cfg, generator) -> (d [n, L], n_expected)
DeltasFn = Callable[[Any, Sequence[str], Any, torch.Generator], "tuple[Any, float]"]

# the key under which the engine puts the training estimator's callable in ScheduleContext.extra
TRAINING_DELTAS_KEY = "training_deltas"


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: how its rows are computed, and the L2 sensitivity of the clipped sum it is
    accounted with, in units of the row clip C_a."""

    name: str
    deltas: DeltasFn
    sensitivity_factor: float
    description: str


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, sensitivity_factor: float, description: str) -> Callable[[DeltasFn], DeltasFn]:
    """Decorator: register ``fn(ctx, names, cfg, generator) -> (d, n_expected)`` as estimator ``name``."""

    def deco(fn: DeltasFn) -> DeltasFn:
        ESTIMATORS[name] = Estimator(name, fn, float(sensitivity_factor), description)
        return fn

    return deco


def get_estimator(name: str) -> Estimator:
    """The estimator registered as ``name`` (ConfigError listing the known ones otherwise)."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ConfigError("estimator", name, tuple(ESTIMATORS)) from None


@register_estimator("forward", 1.0, "per-example loss deltas at the current weights (forward only)")
def _forward(ctx, names, cfg, generator):
    if ctx.loss_deltas is None:
        raise ConfigError(
            "ScheduleContext.loss_deltas", None,
            "a LossDeltaFn (dpquant_sim.training.sensitivity.make_loss_delta_fn) for schedule 'dpquant'",
        )
    return ctx.loss_deltas(names, cfg.sample_rate, generator)


@register_estimator("training", 2.0, "per-example loss deltas after short clipped training steps per policy")
def _training(ctx, names, cfg, generator):
    fn = (ctx.extra or {}).get(TRAINING_DELTAS_KEY)
    if fn is None:
        raise ConfigError(
            f"ScheduleContext.extra[{TRAINING_DELTAS_KEY!r}]", None,
            "the training estimator's callable (dpquant_sim.training.sensitivity_training.make_training_delta_fn) "
            "for schedule 'dpquant' with estimator 'training'",
        )
    return fn(names, cfg.sample_rate, generator, iters=cfg.estimator_iters, lr=cfg.estimator_lr,
              grad_clip=cfg.estimator_grad_clip)
