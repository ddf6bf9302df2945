"""DPQuant: probabilistic layer rotation weighted by a differentially private loss-sensitivity estimate.

Every ``interval`` epochs, from epoch ``warmup_epochs`` on (epoch 0 by default), the estimator runs once
(DESIGN.md section 1); the warm-up epochs before the first estimate rotate layers uniformly (the random
schedule's sampling, at the same budget), so the first scores are measured on a partly trained model:

1. ``d, n_exp``: per-example loss deltas d[i, l] = loss(x_i; only layer l quantized) - loss(x_i; full precision)
   on a Poisson sample (rate q) of the private training set, n_exp = q * N its expected size, from the estimator
   named by ``estimator`` (``dpquant_sim.schedules.estimators``): ``forward`` (default: ``ctx.loss_deltas``,
   at the current weights, see ``dpquant_sim.training.sensitivity``) or ``training`` (the paper's: after short
   clipped training steps per candidate policy, see ``dpquant_sim.training.sensitivity_training``).
2. Clip each example's L-vector to L2 norm C: d_i * min(1, C / ||d_i||); sum over examples. Adding or removing
   one example changes the sum by at most C in L2, so the Gaussian noise below gives a subsampled Gaussian
   mechanism with noise multiplier sigma and sample rate q (one "step" per estimate).
3. Add N(0, sigma^2 C^2 I_L) (private runs only) and divide by n_exp: the raw estimate r_l.
4. EMA: s <- ema * s + (1 - ema) * r (the first estimate initialises s).
5. Register the mechanism: ``ctx.ledger.add_mechanism("dpquant-estimator", sigma / f, q, steps=1)``, with f the
   estimator's sensitivity factor (the clipped sum's L2 sensitivity in units of C: 1 for ``forward``, 2 for
   ``training``). An auto sigma is calibrated so that the accounted sigma / f meets the estimator's budget.

Every epoch, from the current smoothed scores s, one of two samplers (``sampler``):

``'paper'`` (default; the DPQuant paper's rule, DESIGN.md section 1):

- pi = softmax(-beta * s) over the n layers (``beta``, default 100 per unit of loss delta). The scores enter
  raw, as in the paper (``score_scale`` None means ``'none'`` for this sampler; softmax ignores the centring);
  any ``score_scale`` below may be set instead, and then beta is per unit of the normalised score.
- exactly k = round(budget * n) layers (halves up, at least 1; ``budget_unit`` must be ``'layers'``, the
  default of this schedule), drawn one at a time without replacement, each draw proportional to the pi of the
  layers not drawn yet (``budget.successive_draw``).
- Such draws do NOT include layer l with probability proportional to pi_l: without replacement they are
  flatter (a layer cannot be drawn twice). The plan's ``probs`` are the exact inclusion probabilities of the
  draw, P(l among the k) (``budget.successive_inclusion_probabilities``, summing to k); ``info.pi_softmax``
  holds pi and ``info.draw_order`` the drawn layers in order.
- Warm-up epochs draw k layers uniformly (inclusion k / n).

``'uniform-mix-systematic'`` (the earlier rule of this tool; temperature, uniform_mix and an expected FLOP or
layer budget):

- normalise (``score_scale``): ``'std'`` (default) z_l = (s_l - mean s) / max(std s, sigma C / n_exp), so
  the temperature is in units of the spread between layers (loss deltas are small numbers, 1e-3..1, whose
  scale depends on model, data and format; a raw softmax(-s/1) would be almost uniform); the floor at the
  noise's standard deviation keeps pure noise from being blown up into strong preferences. ``'shrink'``
  also multiplies z by the James-Stein factor (1 - v_noise / var s)+, with v_noise a public upper bound on
  a smoothed score's noise variance, DP noise plus Poisson-sampling noise (``score_noise_var``): when the
  spread between layers is no larger than the noise, the weights are uniform (the schedule is ``random``),
  and with a strong signal they approach ``'std'``'s.
  ``'clip'`` divides by C, ``'none'`` uses s as is.
- p_l = (1 - u) softmax(-z_l / tau) + u / L (u > 0: every layer keeps rotating; p_l >= u / L).
- inclusion probabilities pi_l = min(1, c p_l) meeting the budget exactly in expectation
  (``budget.inclusion_probabilities``), and the set drawn by systematic sampling (``budget.draw_subset``).

The plan records ``scores`` (smoothed, un-normalised loss deltas), ``probs`` (the probability that
layer l is quantized this epoch), and in ``info`` the sampler, its weights (``pi_softmax`` for 'paper',
``sampling_weights`` p_l for 'uniform-mix-systematic'), the expected/realised shares,
whether this epoch estimated, the estimator's expected sample size q*N (never the realised size: that is
data), and its own epsilon so far (the ledger's ``breakdown()``, else opacus RDP at the ledger's delta; the run's
total is the engine's to record).

Non-private runs (``ctx.private=False``): no noise, no accounting. A private run with noise_multiplier 0, or
without a ledger, is refused (DPSafetyError): the estimator reads private data.

>>> import numpy as np, torch
>>> from dpquant_sim.schedules.base import LayerInfo, ScheduleContext
>>> from dpquant_sim.schedules.configs import DPQuantConfig
>>> def deltas(names, q, g):   # layer "b" is fragile
...     d = torch.tensor([[0.01, 0.5, 0.02]]).repeat(50, 1)
...     return d, 50.0
>>> s = DPQuantSchedule(DPQuantConfig(budget=0.5, budget_unit="layers"))
>>> ctx = ScheduleContext(0, 4, [LayerInfo(n, 100) for n in "abc"], "fp4", np.random.default_rng(0),
...                       private=False, loss_deltas=deltas)
>>> p = s.plan(ctx).probs
>>> p["b"] < min(p["a"], p["c"])
True
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from dpquant_sim.errors import ConfigError, DPSafetyError
from dpquant_sim.plan import EpochPlan
from dpquant_sim.schedules.base import ScheduleContext
from dpquant_sim.schedules.budget import (
    build_plan, draw_subset, expected_share, inclusion_probabilities, layer_count, layer_sizes, realized_share,
    softmax_weights, successive_draw, successive_inclusion_probabilities,
)
from dpquant_sim.schedules.configs import DPQuantConfig
from dpquant_sim.schedules.random_rotation import OwnRng
from dpquant_sim.schedules.registry import register_schedule

MECHANISM_NAME = "dpquant-estimator"
DEFAULT_DELTA = 1e-5


def clipped_sum(d: torch.Tensor, clip: float) -> torch.Tensor:
    """Sum over examples of each row of ``d`` [n, L] clipped to L2 norm ``clip`` (float64).

    One example changes the result by at most ``clip`` in L2 norm (its clipped row).

    >>> [round(v, 6) for v in clipped_sum(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0).tolist()]
    [0.9, 1.2]
    """
    d = torch.as_tensor(d).detach().to("cpu", torch.float64)
    if d.ndim != 2:
        raise ConfigError("loss_deltas", tuple(d.shape), "a [n_examples, n_layers] tensor")
    if not torch.isfinite(d).all():
        # A NaN/inf loss (e.g. a quantized layer overflowing) must not poison the sum: treat it as the
        # largest allowed delta in that coordinate; clipping below bounds its influence anyway.
        d = torch.nan_to_num(d, nan=clip, posinf=clip, neginf=-clip)
    norms = d.norm(dim=1, keepdim=True)
    factor = torch.clamp(clip / torch.clamp(norms, min=1e-300), max=1.0)
    return (d * factor).sum(dim=0)


def sampling_weights(
    scores: Sequence[float], *, temperature: float, uniform_mix: float, scale: float
) -> np.ndarray:
    """p_l = (1 - u) softmax(-(s_l - mean s) / (scale * tau)) + u / L (float64, sums to 1).

    >>> sampling_weights([0.0, 0.0], temperature=1.0, uniform_mix=0.2, scale=1.0).tolist()
    [0.5, 0.5]
    """
    s = np.asarray(scores, dtype=np.float64)
    L = s.size
    if scale <= 0 or not np.isfinite(scale):
        z = np.zeros(L)
    else:
        z = (s - s.mean()) / scale
    logits = -z / temperature
    logits -= logits.max()
    e = np.exp(logits)
    soft = e / e.sum()
    return (1.0 - uniform_mix) * soft + uniform_mix / L


def score_scale_mode(cfg: DPQuantConfig) -> str:
    """The score normalisation in force: ``cfg.score_scale``, or the sampler's default when it is None
    ('none', raw loss deltas as in the paper, for sampler 'paper'; 'std' for 'uniform-mix-systematic')."""
    if cfg.score_scale is not None:
        return cfg.score_scale
    return "none" if cfg.sampler == "paper" else "std"


_MIX_ONLY = {f: DPQuantConfig.model_fields[f].default for f in ("temperature", "uniform_mix")}
_PAPER_ONLY = {f: DPQuantConfig.model_fields[f].default for f in ("beta",)}


def check_sampler_fields(cfg: DPQuantConfig) -> None:
    """Refuse settings the chosen sampler would silently ignore (a field away from its default that only the
    other sampler reads), and a FLOP budget with the paper sampler (it draws a number of layers)."""
    if cfg.sampler == "paper":
        if cfg.budget_unit != "layers":
            raise ConfigError("schedule.budget_unit", cfg.budget_unit, "'layers' with sampler 'paper' (it draws "
                              "k = round(budget x n) layers each epoch); for a FLOP budget use sampler "
                              "'uniform-mix-systematic'")
        for f, d in _MIX_ONLY.items():
            if getattr(cfg, f) != d:
                raise ConfigError(f"schedule.{f}", getattr(cfg, f), f"its default {d} with sampler 'paper' (it is "
                                  "read only by sampler 'uniform-mix-systematic'; the paper sampler's sharpness is "
                                  "beta)")
    else:
        for f, d in _PAPER_ONLY.items():
            if getattr(cfg, f) != d:
                raise ConfigError(f"schedule.{f}", getattr(cfg, f), f"its default {d} with sampler "
                                  f"{cfg.sampler!r} (it is read only by sampler 'paper'; this sampler's sharpness "
                                  "is temperature)")


def num_estimates(epochs: int, interval: int, warmup: int = 0) -> int:
    """Estimates in a run of ``epochs`` epochs: at epochs W, W + R, W + 2R, ... (= ceil((epochs - W) / R)).

    >>> num_estimates(10, 2), num_estimates(10, 2, warmup=3), num_estimates(3, 2, warmup=3)
    (5, 4, 0)
    """
    active = int(epochs) - int(warmup)
    return -(-active // int(interval)) if active > 0 else 0


def estimator_epsilon(noise_multiplier: float, sample_rate: float, estimates: int, delta: float) -> float:
    """Epsilon of the estimator alone (opacus RDP accountant) after ``estimates`` runs; 0 if none."""
    if estimates <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history.append((float(noise_multiplier), float(sample_rate), int(estimates)))
    return float(acc.get_epsilon(delta))


@register_schedule("dpquant")
class DPQuantSchedule(OwnRng):
    """DPQuant schedule (see the module docstring for the exact estimator and sampling rule)."""

    def __init__(self, cfg: DPQuantConfig):
        super().__init__()
        self.cfg = cfg
        check_sampler_fields(cfg)
        self.scores: dict[str, float] | None = None  # EMA-smoothed estimates, by layer name
        self.estimates = 0  # number of estimator runs so far (each one accounted mechanism in private runs)
        self.last_estimate_epoch: int | None = None
        self.sample_size: int | None = None
        self.expected_size: float | None = None

    # --- privacy -------------------------------------------------------------------------------------
    @property
    def sigma(self) -> float:
        """The estimator's noise multiplier sigma_s (1.0 when the config leaves it to auto and nothing resolved
        it; the training engine resolves auto from the target epsilon, see ``resolve_estimator_noise``)."""
        return 1.0 if self.cfg.noise_multiplier is None else float(self.cfg.noise_multiplier)

    @property
    def accounted_sigma(self) -> float:
        """The noise multiplier the ledger accounts one estimate with: sigma_s / the estimator's sensitivity factor
        (noise std sigma_s C over an L2 sensitivity of factor x C; see ``dpquant_sim.schedules.estimators``)."""
        from dpquant_sim.schedules.estimators import get_estimator

        return self.sigma / get_estimator(self.cfg.estimator).sensitivity_factor

    def planned_mechanisms(
        self, epochs: int, steps_per_epoch: int = 0, *, private: bool = True
    ) -> list[tuple[str, float, float, int]]:
        """Mechanisms the run will add to its ledger: [(name, noise_multiplier, sample_rate, steps)].

        The engine composes these with DP-SGD's steps when it calibrates the training noise to a target
        epsilon. ``steps_per_epoch`` is accepted for a uniform signature. Warm-up epochs estimate nothing.

        >>> DPQuantSchedule(DPQuantConfig(interval=2)).planned_mechanisms(5)
        [('dpquant-estimator', 1.0, 0.05, 3)]
        """
        if not private:
            return []
        self._check_private_noise()
        n = num_estimates(epochs, self.cfg.interval, self.cfg.warmup_epochs)
        return [(MECHANISM_NAME, float(self.accounted_sigma), float(self.cfg.sample_rate), n)] if n else []

    def _check_private_noise(self) -> None:
        if self.sigma <= 0:
            raise DPSafetyError(
                "dpquant: the sensitivity estimator reads private training data, so a private run needs "
                f"schedule.noise_multiplier > 0 (got {self.sigma}); set it (or leave it unset: auto) or "
                "run without DP."
            )

    # --- estimation ----------------------------------------------------------------------------------
    def _estimate(self, ctx: ScheduleContext, names: list[str], rng: np.random.Generator) -> None:
        from dpquant_sim.schedules.estimators import get_estimator

        cfg = self.cfg
        estimator = get_estimator(cfg.estimator)
        if ctx.private:
            self._check_private_noise()
            if ctx.ledger is None:
                raise DPSafetyError(
                    "dpquant: a private run must pass its PrivacyLedger in ScheduleContext.ledger so the "
                    "estimator's use of private data is accounted."
                )
        sample_gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        noise_gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        d, n_exp = estimator.deltas(ctx, names, cfg, sample_gen)
        d = torch.as_tensor(d)
        if d.ndim != 2 or d.shape[1] != len(names):
            raise ConfigError("loss_deltas", tuple(d.shape), f"a [n_examples, {len(names)}] tensor")
        if not n_exp or n_exp <= 0:
            raise ConfigError("n_expected", n_exp, "the expected sample size q * N > 0")
        total = clipped_sum(d, cfg.clip)
        if ctx.private:
            noise = torch.normal(0.0, self.sigma * cfg.clip, size=(len(names),), generator=noise_gen,
                                 dtype=torch.float64)
            total = total + noise
            ctx.ledger.add_mechanism(MECHANISM_NAME, self.accounted_sigma, cfg.sample_rate, steps=1)
        raw = (total / float(n_exp)).tolist()
        if self.scores is None or set(self.scores) != set(names):
            self.scores = dict(zip(names, raw))
        else:
            a = cfg.ema
            self.scores = {n: a * self.scores[n] + (1 - a) * r for n, r in zip(names, raw)}
        self.estimates += 1
        self.last_estimate_epoch = ctx.epoch
        self.sample_size = int(d.shape[0])
        self.expected_size = float(n_exp)

    def _scale(self, s: np.ndarray, private: bool) -> float:
        mode = score_scale_mode(self.cfg)
        if mode == "none":
            return 1.0
        if mode == "clip":
            return float(self.cfg.clip)
        noise_sd = 0.0
        if private and self.expected_size:
            noise_sd = self.sigma * self.cfg.clip / self.expected_size
        scale = float(max(s.std(), noise_sd))
        if mode == "shrink":
            var = float(s.var())
            v = self.score_noise_var(len(s), private)
            factor = max(0.0, 1.0 - v / var) if var > 0 else 0.0
            return scale / factor if factor > 0 else math.inf  # inf: z = 0, uniform weights
        return scale

    def score_noise_var(self, n_layers: int, private: bool) -> float:
        """Upper bound on the noise variance of one smoothed score, from public quantities only (no privacy
        cost): w2 * [(sigma C / n_exp)^2 + (1 - q) C^2 / (n_exp L)].

        The second term bounds the Poisson-sampling variance averaged over layers: the estimate's variance
        for layer l is q (1 - q) sum_i dc_il^2 / (q N)^2 and sum_l dc_il^2 <= C^2 after clipping. It is usually
        the larger term (on digits with 21 layers: 6e-4 vs 2e-4). w2 = sum of the squared EMA weights of
        the estimates so far (1 after one estimate; (1 - a) / (1 + a) in the limit).

        >>> from dpquant_sim.schedules.configs import DPQuantConfig
        >>> s = DPQuantSchedule(DPQuantConfig(noise_multiplier=1.0, sample_rate=0.05, clip=1.0))
        >>> s.expected_size, s.estimates = 50.0, 1
        >>> round(s.score_noise_var(4, private=True), 6)  # (1/50)^2 + 0.95/(50*4)
        0.00515
        """
        if not self.expected_size or not self.estimates:
            return 0.0
        a, c, n = self.cfg.ema, self.cfg.clip, float(self.expected_size)
        w2 = a ** (2 * (self.estimates - 1)) + sum((1 - a) ** 2 * a ** (2 * j) for j in range(self.estimates - 1))
        v = (1 - self.cfg.sample_rate) * c * c / (n * max(n_layers, 1))
        if private:
            v += (self.sigma * c / n) ** 2
        return w2 * v

    # --- planning ------------------------------------------------------------------------------------
    def plan(self, ctx: ScheduleContext) -> EpochPlan:
        cfg = self.cfg
        names = [layer.name for layer in ctx.layers]
        rng = self.rng(ctx)
        estimated = False
        warming = ctx.epoch < cfg.warmup_epochs
        due = (ctx.epoch - cfg.warmup_epochs) % cfg.interval == 0
        if names and not warming and (due or self.scores is None or set(self.scores) != set(names)):
            self._estimate(ctx, names, rng)
            estimated = True
        if cfg.sampler == "paper":
            return self._plan_paper(ctx, names, rng, estimated=estimated, warming=warming)
        sizes = layer_sizes([layer.flops for layer in ctx.layers], cfg.budget_unit) if names else np.zeros(0)
        if warming:  # uniform rotation until the first estimate: the random schedule's sampling
            s = np.zeros(len(names))
            weights = np.full(len(names), 1.0 / len(names)) if names else np.zeros(0)
        else:
            s = np.array([self.scores[n] for n in names]) if names else np.zeros(0)
            weights = sampling_weights(s, temperature=cfg.temperature, uniform_mix=cfg.uniform_mix,
                                       scale=self._scale(s, ctx.private)) if names else np.zeros(0)
        pi = inclusion_probabilities(weights, sizes, cfg.budget) if names else np.zeros(0)
        mask = draw_subset(pi, rng) if names else np.zeros(0, dtype=bool)
        info: dict[str, Any] = {
            "schedule": "dpquant",
            "sampler": cfg.sampler,
            "budget": cfg.budget,
            "budget_unit": cfg.budget_unit,
            "estimated": estimated,
            "warmup": warming,
            "estimates": self.estimates,
            # the expected size q*N only: the realised Poisson sample size is not released (it is data)
            "estimator_expected_size": self.expected_size,
            "sampling_weights": {n: float(w) for n, w in zip(names, weights)},
            "expected_share": expected_share(pi, sizes) if names else 0.0,
            "realized_share": realized_share(mask, sizes) if names else 0.0,
        }
        self._record_estimator_epsilon(ctx, info)
        return build_plan(ctx, mask, scores=dict(self.scores or {}), probs={n: float(p) for n, p in zip(names, pi)},
                          info=info)

    def _plan_paper(self, ctx: ScheduleContext, names: list[str], rng: np.random.Generator, *, estimated: bool,
                    warming: bool) -> EpochPlan:
        """The paper's sampler: pi = softmax(-beta x scaled scores), k = round(budget x n) layers drawn one at a
        time without replacement, each draw proportional to the remaining pi (see the module docstring)."""
        cfg = self.cfg
        n = len(names)
        if not names:
            return build_plan(ctx, np.zeros(0, dtype=bool), scores={}, probs={}, info={"schedule": "dpquant"})
        if warming:  # uniform rotation until the first estimate
            logits = np.zeros(n)
        else:
            s = np.array([self.scores[nm] for nm in names])
            scale = self._scale(s, ctx.private)
            z = np.zeros(n) if (scale <= 0 or not np.isfinite(scale)) else (s - s.mean()) / scale
            logits = -cfg.beta * z
        k = layer_count(cfg.budget, n)
        pi = softmax_weights(logits)
        incl = successive_inclusion_probabilities(logits, k)
        drawn = successive_draw(logits, k, rng)
        mask = np.zeros(n, dtype=bool)
        mask[drawn] = True
        sizes = layer_sizes([layer.flops for layer in ctx.layers], "layers")
        info: dict[str, Any] = {
            "schedule": "dpquant",
            "sampler": "paper",
            "budget": cfg.budget,
            "budget_unit": "layers",
            "k": k,
            "beta": cfg.beta,
            "score_scale": score_scale_mode(cfg),
            "estimated": estimated,
            "warmup": warming,
            "estimates": self.estimates,
            "estimator_expected_size": self.expected_size,
            # pi: the softmax weights each draw is proportional to (among the layers not drawn yet); the plan's
            # ``probs`` are the draw's exact inclusion probabilities P(layer quantized this epoch), sum = k
            "pi_softmax": {nm: float(w) for nm, w in zip(names, pi)},
            "draw_order": [names[i] for i in drawn],
            "expected_share": float(incl.sum() / n),
            "realized_share": realized_share(mask, sizes),
        }
        self._record_estimator_epsilon(ctx, info)
        return build_plan(ctx, mask, scores=dict(self.scores or {}), probs={nm: float(p) for nm, p in zip(names, incl)},
                          info=info)

    def _record_estimator_epsilon(self, ctx: ScheduleContext, info: dict[str, Any]) -> None:
        cfg = self.cfg
        if ctx.private:
            delta = getattr(ctx.ledger, "delta", None) or ctx.extra.get("delta", DEFAULT_DELTA)
            eps_est = None
            breakdown = getattr(ctx.ledger, "breakdown", None)
            if callable(breakdown):  # the ledger's own accountant (RDP or PRV), estimator alone
                eps_est = breakdown().get(MECHANISM_NAME)
            if eps_est is None:
                eps_est = estimator_epsilon(self.accounted_sigma, cfg.sample_rate, self.estimates, float(delta))
            info["estimator_epsilon"] = float(eps_est)
            info["estimator_delta"] = float(delta)
        else:
            info["estimator_epsilon"] = 0.0

    # --- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng_state(),
            "scores": None if self.scores is None else dict(self.scores),
            "estimates": self.estimates,
            "last_estimate_epoch": self.last_estimate_epoch,
            "sample_size": self.sample_size,
            "expected_size": self.expected_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_rng_state(state.get("rng"))
        sc = state.get("scores")
        self.scores = None if sc is None else {str(k): float(v) for k, v in sc.items()}
        self.estimates = int(state.get("estimates", 0))
        self.last_estimate_epoch = state.get("last_estimate_epoch")
        self.sample_size = state.get("sample_size")
        self.expected_size = state.get("expected_size")


def resolve_estimator_noise(
    cfg: DPQuantConfig, *, epochs: int, epsilon: float | None, delta: float, accountant: str = "rdp"
) -> DPQuantConfig:
    """Fill in an auto (None) ``noise_multiplier``: with a target ``epsilon``, the smallest sigma_s such that
    the run's planned estimates, composed ALONE, spend at most ``cfg.estimator_epsilon_fraction * epsilon``
    at ``delta``; without a target, 1.0. A set value is returned unchanged.

    Composition is far from additive in this regime, so the estimator's marginal cost in the whole run is much
    smaller than that fraction (about 1% of epsilon at the default 0.25; see docs/schedules.md).

    >>> c = resolve_estimator_noise(DPQuantConfig(), epochs=10, epsilon=8.0, delta=1e-5)
    >>> c.noise_multiplier > 0
    True
    """
    if cfg.noise_multiplier is not None:
        return cfg
    n = num_estimates(epochs, cfg.interval, cfg.warmup_epochs)
    if epsilon is None or n == 0:
        return cfg.model_copy(update={"noise_multiplier": 1.0})
    from dpquant_sim.training.accounting import noise_for_target

    # noise_for_target calibrates a "DP-SGD" sequence of n steps at the estimator's sample rate: exactly the
    # estimator's own planned mechanism.
    sigma = noise_for_target(cfg.estimator_epsilon_fraction * epsilon, delta, cfg.sample_rate, n, accountant)
    # that sigma is the accounted one; the noise std is sigma_s C with sigma_s = factor x accounted sigma
    from dpquant_sim.schedules.estimators import get_estimator

    sigma *= get_estimator(cfg.estimator).sensitivity_factor
    return cfg.model_copy(update={"noise_multiplier": float(sigma)})
