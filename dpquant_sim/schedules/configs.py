"""Typed, frozen schedule configs (pydantic), one per schedule kind, joined in a discriminated union.

Budget semantics are shared by every schedule: ``budget`` is the expected share (0..1] of quantizable GEMM
FLOPs (``budget_unit='flops'``) or of quantizable layers (``budget_unit='layers'``) that runs quantized in an
epoch, so equal budgets mean equal expected quantized compute. ``budget_unit`` defaults to 'flops', except for
dpquant, whose default (paper) sampler draws round(budget x n) layers and so defaults to 'layers'.

>>> from pydantic import TypeAdapter
>>> TypeAdapter(ScheduleConfig).validate_python({"kind": "random", "budget": 0.5}).budget
0.5
"""

from __future__ import annotations

import warnings
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class _Base(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Budgeted(_Base):
    budget: float = Field(0.5, gt=0.0, le=1.0, description="expected quantized share per epoch (0,1]")
    budget_unit: Literal["flops", "layers"] = "flops"


class Fp32Config(_Base):
    """Nothing quantized (baseline)."""

    kind: Literal["fp32"] = "fp32"


class StaticAllConfig(_Base):
    """Every quantizable layer quantized every epoch."""

    kind: Literal["static-all"] = "static-all"


class StaticSubsetConfig(_Budgeted):
    """A fixed set of layers, chosen once: first/last/largest-FLOP layers meeting the budget, a uniformly random
    set meeting it (``select='random'``, the DPQuant paper's static baseline), or named."""

    kind: Literal["static-subset"] = "static-subset"
    select: Literal["first", "last", "largest", "random", "named"] = "first"
    layers: tuple[str, ...] = ()
    subset_seed: int | None = Field(
        None, ge=0, description="select random: seed of the subset (None: derived from the run seed, so each "
        "training seed gets its own subset; set it to hold one subset fixed across training seeds)"
    )


class RandomConfig(_Budgeted):
    """Each epoch a uniformly random subset meeting the budget (rotation without priorities)."""

    kind: Literal["random"] = "random"
    hold_epochs: int = Field(
        1, ge=1, description="keep each drawn set for this many epochs (1: redraw every epoch); an ablation of "
        "how often layers switch precision, at the same expected share"
    )
    pattern: Literal["redraw", "alternate"] = Field(
        "redraw", description="redraw: a fresh draw every hold_epochs epochs; alternate: ONE uniformly random set "
        "of share min(1, 2 x budget), drawn once, quantized every other epoch and in full precision in between "
        "(every layer in it switches precision every epoch; same time-averaged share; needs budget <= 0.5 and "
        "hold_epochs 1)"
    )
    alternate_phase: int = Field(
        0, ge=0, le=1, description="pattern alternate: the set is quantized at epochs e with (e + phase) even "
        "(0: epochs 0, 2, 4, ...; 1: epochs 1, 3, 5, ...)"
    )


class DPQuantConfig(_Budgeted):
    """DPQuant: layers sampled by a DP per-layer loss-sensitivity estimate.

    ``sampler='paper'`` (default, the DPQuant paper): pi = softmax(-beta x EMA(R)) over layers and exactly
    k = round(budget x n) layers drawn per epoch without replacement; the budget counts layers
    (``budget_unit='layers'``, the default for this schedule; 'flops' is refused with this sampler).
    ``sampler='uniform-mix-systematic'``: (1 - u) softmax(-z / tau) + u / L with normalised scores z, and
    systematic sampling meeting an expected share (FLOPs or layers).
    """

    kind: Literal["dpquant"] = "dpquant"
    budget_unit: Literal["flops", "layers"] = "layers"
    sampler: Literal["paper", "uniform-mix-systematic"] = Field(
        "paper", validate_default=True,
        description="paper: softmax(-beta x scores), k = round(budget x n) layers drawn without replacement | "
        "uniform-mix-systematic: (1 - u) softmax(-z / tau) + u / L, systematic sampling to an expected budget"
    )
    beta: float = Field(
        100.0, gt=0.0, description="sampler paper: beta in softmax(-beta x scores), per unit of the scores (raw "
        "loss deltas unless score_scale says otherwise; 100: a layer whose loss rises 0.01 more is e^1 less "
        "likely per draw)"
    )
    interval: int = Field(2, ge=1, description="re-estimate every R epochs")
    sample_rate: float = Field(0.05, gt=0.0, le=1.0, description="Poisson rate of the estimator's sample")
    clip: float = Field(1.0, gt=0.0, description="per-example L2 clip of the L-vector of loss deltas")
    noise_multiplier: float | None = Field(
        None,
        ge=0.0,
        description="sigma_s; noise std = sigma_s * clip. None (auto): with a target epsilon, the smallest sigma_s "
        "whose planned estimates alone spend at most estimator_epsilon_fraction x epsilon; otherwise 1.0",
    )
    estimator_epsilon_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="auto sigma_s: epsilon of the estimator ALONE / target epsilon"
    )
    temperature: float = Field(1.0, gt=0.0, description="sampler uniform-mix-systematic: tau in softmax(-s/tau)")
    uniform_mix: float = Field(
        0.2, ge=0.0, le=1.0, description="sampler uniform-mix-systematic: weight u of the uniform distribution")
    ema: float = Field(0.5, ge=0.0, lt=1.0, description="EMA factor for the smoothed scores (0 = no memory)")
    warmup_epochs: int = Field(
        0, ge=0, description="epochs of uniform rotation before the first estimate, so that the first scores come "
        "from a partly trained model rather than the initialisation (no privacy cost: nothing is estimated)",
    )
    score_scale: Literal["std", "shrink", "clip", "none"] | None = Field(
        None, description="divide centred scores by max(std across layers, noise std) | the same after "
        "shrinking them toward their mean by (1 - noise var / var across layers)+, noise = DP + sampling (a public "
        "bound) | clip | 1 before softmax. None: the sampler's default, 'none' (raw loss deltas, as in the "
        "paper) for sampler paper, 'std' for uniform-mix-systematic"
    )
    estimator: Literal["forward", "training"] = Field(
        "forward", description="how per-example layer sensitivities are measured (dpquant_sim.schedules.estimators): "
        "forward = loss deltas at the current weights, forward only (accounted with sensitivity C); training = the "
        "paper's: loss deltas after estimator_iters short clipped SGD steps per candidate policy, each example on "
        "its own (accounted with sensitivity 2C: ledger noise multiplier sigma_s / 2)",
    )
    estimator_iters: int = Field(1, ge=1, description="training estimator: short SGD steps per candidate policy "
                                 "(the paper: 'a few', number not stated)")
    estimator_lr: float | None = Field(None, ge=0.0, description="training estimator: step size of the short "
                                       "steps; None = the run's lr / batch_size, i.e. one example's share of a "
                                       "DP-SGD step (the paper does not state it)")
    estimator_grad_clip: float | None = Field(None, gt=0.0, description="training estimator: per-example L2 clip "
                                              "of the short steps' gradients; None = the run's max_grad_norm")


    @field_validator("sampler")
    @classmethod
    def _paper_counts_layers(cls, v: str, info: ValidationInfo) -> str:
        if v == "paper" and info.data.get("budget_unit") == "flops":
            raise ValueError("sampler 'uniform-mix-systematic' with budget_unit 'flops' (sampler 'paper' draws "
                             "k = round(budget x n) layers: use budget_unit 'layers')")
        return v

    @field_validator("beta", "temperature", "uniform_mix")
    @classmethod
    def _field_of_the_sampler(cls, v: float, info: ValidationInfo) -> float:
        """A field that only the other sampler reads must stay at its default (it would be silently ignored)."""
        sampler = info.data.get("sampler")
        own = {"beta": "paper", "temperature": "uniform-mix-systematic", "uniform_mix": "uniform-mix-systematic"}
        default = cls.model_fields[info.field_name].default
        if sampler is not None and sampler != own[info.field_name] and v != default:
            raise ValueError(f"its default {default} with sampler {sampler!r} ({info.field_name} is read only by "
                             f"sampler {own[info.field_name]!r})")
        return v


ScheduleConfig = Annotated[
    Union[Fp32Config, StaticAllConfig, StaticSubsetConfig, RandomConfig, DPQuantConfig],
    Field(discriminator="kind"),
]
SCHEDULE_KINDS: tuple[str, ...] = ("fp32", "static-all", "static-subset", "random", "dpquant")


PRUNE_METHODS: tuple[str, ...] = ("random", "magnitude", "synflow", "snip-public")
# criteria that read training examples: only allowed on a declared public split (TrainConfig.public_fraction)
DATA_DEPENDENT_PRUNE_METHODS: tuple[str, ...] = ("snip-public",)
_DEPRECATED_PRUNE_METHODS = {"snip-free": "synflow"}  # accepted for one release, not shown in help
_warned_deprecated: set[str] = set()


class PruneConfig(_Base):
    """Pre-pruning before DP training (arXiv 2306.11754). Only 'channel' structure saves FLOPs.

    ``method``: ``random`` | ``magnitude`` | ``synflow`` (data-free) | ``snip-public`` (SNIP on the public
    split; needs ``TrainConfig.public_fraction > 0``). ``snip-free`` is a deprecated alias of ``synflow``.
    """

    method: Literal["random", "magnitude", "synflow", "snip-public"] = "magnitude"
    structure: Literal["unstructured", "channel"] = "unstructured"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)

    @field_validator("method", mode="before")
    @classmethod
    def _deprecated_alias(cls, v):
        if isinstance(v, str) and v in _DEPRECATED_PRUNE_METHODS:
            new = _DEPRECATED_PRUNE_METHODS[v]
            if v not in _warned_deprecated:
                _warned_deprecated.add(v)
                warnings.warn(f"prune method {v!r} is deprecated and will be removed in the next release; it is "
                              f"{new!r} (one-shot SynFlow, Tanaka et al. 2020): use {new!r}", FutureWarning,
                              stacklevel=2)
            return new
        return v


class DropConfig(_Base):
    """Per-step gradient dropping: keep a share of coordinates, masks applied before clipping; dropped coordinates
    do not move that step (optimizer state included). ``magnitude`` ranks the current WEIGHTS |w| (public: the
    initialisation or post-processing of DP releases), never the private gradients."""

    method: Literal["random", "magnitude"] = "random"
    keep: float = Field(0.5, gt=0.0, le=1.0, description="share of gradient coordinates kept each step")
