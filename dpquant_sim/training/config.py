"""The typed, frozen configuration of one training run (pydantic), with YAML load/dump.

Every field is validated on construction; a bad value raises ONE ``ConfigError`` naming the field, the value
and what is allowed (``TrainConfig.parse`` / ``from_yaml`` turn pydantic's ValidationError into it).

>>> cfg = TrainConfig.parse({"dataset": "digits", "model": "cnn", "epochs": 2, "epsilon": 8})
>>> cfg.schedule.kind, cfg.recipe, cfg.delta
('fp32', 'luq_fp4', 1e-05)
>>> TrainConfig.parse({"epochs": 0})
Traceback (most recent call last):
...
dpquant_sim.errors.ConfigError: epochs=0 is not allowed; expected a value greater than or equal to 1
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dpquant_sim.errors import ConfigError
from dpquant_sim.schedules.configs import DropConfig, Fp32Config, PruneConfig, ScheduleConfig

DEFAULT_EPSILON = 8.0


class SyntheticConfig(BaseModel):
    """Shape of the synthetic dataset (sizes are ``TrainConfig.n_train`` / ``n_test``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: int = Field(3, ge=1, description="image channels")
    image_size: int = Field(32, ge=4, description="image height = width, pixels")
    num_classes: int = Field(10, ge=2, description="number of classes")
    noise: float = Field(1.0, ge=0.0, description="std of the white noise added to each image")


class TrainConfig(BaseModel):
    """One training run.

    Privacy: with ``private=True`` give ``epsilon`` (the noise multiplier is calibrated so that the planned
    epochs, plus any extra mechanism the schedule declares, spend at most epsilon at delta) or
    ``noise_multiplier`` (then ``epsilon``, if also given, is a cap the run refuses to exceed). Neither given:
    epsilon 8. ``private=False`` trains without clipping or noise (epsilon reported as inf).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # data
    dataset: Literal["digits", "synthetic", "emnist", "gtsrb", "cifar10"] = "digits"
    data_dir: str | None = Field(None, validate_default=True, description="folder holding emnist/gtsrb/cifar10 files")
    n_train: int | None = Field(None, ge=1, description="synthetic: train size (default 2048); real: seeded subset")
    n_test: int | None = Field(None, ge=1, description="synthetic: test size (default 512); real: seeded subset")
    synthetic: SyntheticConfig = SyntheticConfig()
    emnist_split: Literal["balanced", "byclass", "bymerge", "digits", "letters", "mnist"] = "balanced"
    gtsrb_crop_roi: bool = False
    data_seed: int = Field(0, ge=0, description="seed of the train/test split or synthetic generator")
    # model and optimisation
    model: Literal["mlp", "cnn", "resnet18", "resnet18-w16", "resnet50", "densenet121"] = "cnn"
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(256, ge=1, description="expected (logical) batch size; sample rate = batch/n_train")
    physical_batch_size: int | None = Field(None, ge=1, description="split Poisson batches into chunks (memory)")
    lr: float = Field(2.0, gt=0.0, description="learning rate")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0.0)
    # privacy
    private: bool = True
    epsilon: float | None = Field(None, gt=0.0, description="target epsilon at delta")
    noise_multiplier: float | None = Field(None, ge=0.0, validate_default=True,
                                           description="fixed sigma (noise std / clip norm)")
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-example clipping norm C")
    accountant: Literal["rdp", "prv"] = "rdp"
    clipping: Literal["hooks", "ghost", "bk", "mixed"] = Field(
        "mixed", description="how per-example clipping is computed (same update, different cost; "
        "dpquant_sim.clipping_rules)")
    secure_noise: bool = Field(False, description="draw DP noise and Poisson sampling from OS entropy (never "
                               "written; resumable only from checkpoint.pt) instead of from seed")
    release_train_loss: bool = Field(False, description="write the un-noised training loss of private runs to "
                                     "metrics.csv (a statistic of private data that epsilon does not cover)")
    # quantization
    recipe: str = Field("luq_fp4", description="quantization recipe of quantized layers (nn.config.RECIPES); "
                        "default the DPQuant paper's LUQ-FP4 with per-sample scales (DP-safe)")
    schedule: ScheduleConfig = Field(default_factory=Fp32Config)
    prune: PruneConfig | None = None
    drop: DropConfig | None = None
    public_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, validate_default=True, description="share of the training set held out (seeded by "
        "seed), declared public and never used by DP-SGD (the private set, and so the sample rate's n_train, "
        "shrink); only data-dependent pruning (prune.method snip-public) reads it")
    eval_quantized: bool = Field(False, description="evaluate with the epoch's plan (True) or in fp32 (False)")
    preset: Literal["paper"] | None = Field(
        None, description="fill unset fields from a seed paper's method (dpquant_sim.presets, docs/fidelity.md)")
    # run
    seed: int = Field(0, ge=0, description="seeds init, sampling, noise, stochastic rounding, schedule")
    eval_batch_size: int = Field(1024, ge=1)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: leave as is)")
    device: Literal["cpu", "cuda"] = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _default_epsilon(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            from dpquant_sim.presets import apply_preset

            data = apply_preset(data)  # first: a preset only fills fields the user left unset
        if isinstance(data, Mapping) and data.get("private", True):
            if data.get("epsilon") is None and data.get("noise_multiplier") is None:
                data = {**data, "epsilon": DEFAULT_EPSILON}
        return data

    @field_validator("recipe")
    @classmethod
    def _recipe_known(cls, v: str) -> str:
        from dpquant_sim.nn.config import RECIPES

        if v not in RECIPES:
            raise ValueError(f"Input should be one of {', '.join(repr(r) for r in RECIPES)}")
        return v

    @field_validator("epsilon")
    @classmethod
    def _finite_eps(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("Input should be a finite number greater than 0")
        return v

    @field_validator("data_dir")
    @classmethod
    def _data_dir_needed(cls, v: str | None, info: ValidationInfo) -> str | None:
        ds = info.data.get("dataset")
        if ds in ("emnist", "gtsrb", "cifar10") and not v:
            raise ValueError(f"a local folder for dataset {ds!r} (nothing is downloaded)")
        return v

    @field_validator("noise_multiplier")
    @classmethod
    def _noise_positive(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v == 0 and info.data.get("private", True):
            raise ValueError("a value > 0 in a private run (0 gives no privacy; set private: false instead)")
        return v

    @field_validator("public_fraction")
    @classmethod
    def _data_dependent_prune_needs_public(cls, v: float, info: ValidationInfo) -> float:
        from dpquant_sim.schedules.configs import DATA_DEPENDENT_PRUNE_METHODS

        prune = info.data.get("prune")
        if prune is not None and prune.method in DATA_DEPENDENT_PRUNE_METHODS and v <= 0:
            raise ValueError(
                f"a value in (0, 1) with prune.method {prune.method!r} (--public-fraction): a data-dependent "
                "pruning criterion reads training examples, and without a declared public split those would be "
                "private data that no epsilon accounts for; or use a data-free method (random, magnitude, synflow)")
        return v

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def parse(cls, data: Mapping[str, Any], *, source: str | None = None) -> "TrainConfig":
        """Validate a mapping; errors become one ConfigError naming field, value and what is allowed."""
        try:
            cfg = cls.model_validate(dict(data))
        except ValidationError as e:
            raise config_error(e, source) from None
        check_private_recipe(cfg)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Load a YAML file of TrainConfig fields."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError("config", str(p), f"a readable YAML file ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError("config", str(p), f"valid YAML ({e})") from None
        if not isinstance(data, Mapping):
            raise ConfigError("config", str(p), "a YAML mapping of TrainConfig fields")
        return cls.parse(data, source=str(p))

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML (written atomically to ``path`` if given)."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            from dpquant_sim.io import atomic_write_text

            atomic_write_text(path, text)
        return text

    def with_updates(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed (``schedule`` may be a dict)."""
        return TrainConfig.parse({**self.model_dump(mode="python"), **changes})


def check_private_recipe(cfg: TrainConfig) -> None:
    """Refuse (DPSafetyError) a private run whose recipe computes an activation or gradient scale over the
    whole batch (e.g. ``luq_fp4_batch``): it mixes examples before clipping, so the DP guarantee fails."""
    if cfg.private:
        from dpquant_sim.nn.config import get_recipe

        get_recipe(cfg.recipe).check_dp_safe()


def config_error(e: ValidationError, source: str | None = None) -> ConfigError:
    """Turn the first error of a pydantic ValidationError into one ConfigError (field, value, allowed)."""
    errs = e.errors()
    err = errs[0]
    loc = [str(p) for p in err.get("loc", ())]
    # drop the discriminator tag pydantic inserts for unions, e.g. schedule.random.budget -> schedule.budget
    kind_tag = None
    if len(loc) >= 2 and loc[0] == "schedule" and loc[1] in ("fp32", "static-all", "static-subset", "random",
                                                               "dpquant"):
        kind_tag = loc[1]
        loc = [loc[0]] + loc[2:]
    field = ".".join(loc) or "config"
    msg = str(err.get("msg", "a valid value"))
    typ = err.get("type", "")
    value = err.get("input")
    if typ == "extra_forbidden":
        if len(loc) == 1:
            allowed = f"no such field (known: {', '.join(TrainConfig.model_fields)})"
        elif kind_tag is not None:
            from dpquant_sim.schedules import configs as sc

            cls = next(c for c in (sc.Fp32Config, sc.StaticAllConfig, sc.StaticSubsetConfig, sc.RandomConfig,
                                   sc.DPQuantConfig) if c.model_fields["kind"].default == kind_tag)
            fields = [f for f in cls.model_fields if f != "kind"]
            allowed = (f"no such field for schedule kind {kind_tag!r} (its fields: {', '.join(fields) or 'none'})")
        else:
            allowed = "no such field"
    elif typ == "missing":
        allowed = "a value (required)"
    elif typ in ("union_tag_invalid", "union_tag_not_found"):
        from dpquant_sim.schedules.configs import SCHEDULE_KINDS

        allowed = "kind one of " + ", ".join(repr(k) for k in SCHEDULE_KINDS)
    else:
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        if msg.startswith("Input should be "):
            msg = msg[len("Input should be "):]
            if msg.startswith(("greater", "less")):
                msg = "a value " + msg
        allowed = msg
    if len(errs) > 1:
        allowed += f" ({len(errs) - 1} more problem{'s' if len(errs) > 2 else ''} in this config)"
    return ConfigError(field, value, allowed, source)


def flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"dotted.key": leaf}, e.g. {"schedule": {"budget": 0.5}} -> {"schedule.budget": 0.5}."""
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}
