"""Typed sweep configs: a base TrainConfig, a grid, the accelerators to cost it on, and executor settings.

YAML layout (every key optional except ``grid`` entries must be lists)::

    name: schedules-digits
    preset: paper              # optional: the DPQuant paper's method where base/grid leave fields unset
    base:                      # any TrainConfig field (dpquant_sim.training.config.TrainConfig)
      dataset: digits
      model: mlp
      epochs: 3
      private: true
      epsilon: 8
    grid:                      # cartesian product; each value is a list
      schedule:                # schedule configs; a list-valued parameter expands too
        - {kind: fp32}
        - {kind: static-all}
        - {kind: random}
        - {kind: dpquant, beta: [50, 100]}
      budget: [0.5, 0.75]      # applies to schedules that have a budget (random, dpquant, static-subset)
      recipe: [fp8, fp4]       # any other TrainConfig field: model, dataset, seed, epsilon, noise_multiplier...
      seed: [0, 1, 2]
    accelerators: all          # or a list of profile names (dpquant-sim hw list)
    devices: [1, 8]            # data-parallel device counts to cost every run on (default [1])
    cost_clipping: all         # DP clipping algorithm(s) to cost every private run under (default: the one it
                               # ran, the TrainConfig field ``clipping``); every exact algorithm computes the
                               # same update, so costing a run under another is exact
    executor: {kind: local, workers: 2, threads_per_worker: 1}

Every point is a fully resolved TrainConfig; its id is a hash of that config, so ids are stable across
reruns and machines and identical points (e.g. fp32 under two recipes) run once. fp32 points ignore the
recipe (it is normalised to the first recipe of the grid) and budgeted-only grid keys.

>>> cfg = SweepConfig.model_validate({"base": {"epochs": 1}, "grid": {"seed": [0, 1]}})
>>> cfg.grid["seed"]
[0, 1]
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpquant_sim.errors import ConfigError

BUDGETED_KINDS = ("static-subset", "random", "dpquant")


class ExecutorConfig(BaseModel):
    """How points are run: a local process pool or Ray."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["local", "ray"] = "local"
    workers: int | None = Field(None, ge=1, description="parallel points (default: CPU count, capped by points)")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads in each worker")
    address: str | None = Field(None, description="Ray cluster address ('auto', 'ray://host:10001'); None = local")


class SweepConfig(BaseModel):
    """A sweep: ``base`` TrainConfig fields, a ``grid`` of lists, ``accelerators`` to cost on, ``executor``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "sweep"
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    accelerators: Literal["all"] | list[str] = "all"
    devices: list[int] = Field(default_factory=lambda: [1])
    cost_clipping: str | list[str] | None = None
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    preset: Literal["paper"] | None = Field(
        None, description="a preset for every point (dpquant_sim.presets): fills what base and grid leave unset")

    @model_validator(mode="before")
    @classmethod
    def _preset_into_base(cls, raw: Any) -> Any:
        # Every point's TrainConfig resolves the preset itself; base.preset given explicitly wins.
        if isinstance(raw, dict) and raw.get("preset") is not None and isinstance(raw.get("base", {}), dict):
            raw = {**raw, "base": {"preset": raw["preset"], **(raw.get("base") or {})}}
        return raw

    @field_validator("grid")
    @classmethod
    def _grid_nonempty_lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, vals in v.items():
            if len(vals) == 0:
                raise ValueError(f"grid.{k} is an empty list; give at least one value")
        if "schedule" in v:
            for i, s in enumerate(v["schedule"]):
                if not isinstance(s, dict) or "kind" not in s:
                    raise ValueError(f"grid.schedule[{i}]={s!r} must be a mapping with a 'kind' key")
        return v

    @field_validator("devices")
    @classmethod
    def _devices_positive(cls, v: list[int]) -> list[int]:
        if not v or any(isinstance(d, bool) or d < 1 for d in v):
            raise ValueError(f"devices={v!r}: give a non-empty list of positive device counts, e.g. [1, 8]")
        return list(dict.fromkeys(v))

    @field_validator("cost_clipping")
    @classmethod
    def _clipping_names(cls, v):
        from dpquant_sim.clipping_rules import CLIPPING_ALGORITHMS

        if v is None:
            return v
        names = [n.strip() for item in ([v] if isinstance(v, str) else v) for n in str(item).split(",")]
        if not names or any(n not in ("all", *CLIPPING_ALGORITHMS) for n in names):
            raise ValueError("'all' or clipping algorithm names among " + ", ".join(CLIPPING_ALGORITHMS))
        return v

    @field_validator("accelerators")
    @classmethod
    def _accel_nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("accelerators is an empty list; give profile names or 'all'")
        return v

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "SweepConfig":
        """Load and validate a sweep YAML; any problem is one ConfigError naming the key."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("sweep config", str(path), "an existing YAML file") from None
        except yaml.YAMLError as e:
            raise ConfigError("sweep config", str(path), f"valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(raw if raw is not None else {}, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | None = None) -> "SweepConfig":
        if not isinstance(raw, dict):
            raise ConfigError("sweep config", type(raw).__name__, "a mapping at the top level", source)
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as e:
            raise _pydantic_to_config_error(e, raw, source) from None
        cfg.points()  # validates every point against TrainConfig now, not mid-sweep
        if cfg.accelerators != "all":
            cfg.profile_names()
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    # ------------------------------------------------------------------------------------------------------
    def profile_names(self) -> list[str]:
        """The accelerator profile names to cost on ('all' resolved through the profile registry)."""
        try:
            from dpquant_sim.cost.profiles import load_profiles
        except ImportError:  # cost model not installed: keep names as given
            return [] if self.accelerators == "all" else list(self.accelerators)
        profiles = load_profiles()
        names = list(profiles) if isinstance(profiles, dict) else [p.name for p in profiles]
        if self.accelerators == "all":
            return names
        for a in self.accelerators:
            if a not in names:
                raise ConfigError("accelerators", a, names)
        return list(self.accelerators)

    def points(self) -> list["SweepPoint"]:
        """Expand the grid into resolved, de-duplicated points (stable order, stable ids)."""
        from dpquant_sim.training.config import TrainConfig

        known = set(TrainConfig.model_fields)
        for section, keys in (("base", self.base), ("grid", self.grid)):
            for k in keys:
                if k not in known and not (section == "grid" and k == "budget"):
                    allowed = "a TrainConfig field (" + ", ".join(sorted(known)) + ")"
                    if section == "grid":
                        allowed += " or 'budget'"
                    raise ConfigError(f"{section}.{k}", keys[k], allowed)
        grid = dict(self.grid)
        schedules = _expand_schedules(grid.pop("schedule", None), self.base.get("schedule"))
        budgets = grid.pop("budget", None)
        recipes = grid.get("recipe")
        first_recipe = recipes[0] if recipes else self.base.get("recipe")
        keys = list(grid)
        points: list[SweepPoint] = []
        seen: set[str] = set()
        for sched in schedules:
            kind = sched.get("kind") if sched is not None else None
            sched_budgets = budgets if (budgets is not None and kind in BUDGETED_KINDS) else [None]
            for b in sched_budgets:
                s = dict(sched) if sched is not None else None
                if b is not None:
                    s["budget"] = b
                for combo in itertools.product(*(grid[k] for k in keys)):
                    values = dict(zip(keys, combo))
                    resolved = {**self.base, **values}
                    if s is not None:
                        resolved["schedule"] = s
                    if kind == "fp32" and first_recipe is not None:
                        resolved["recipe"] = first_recipe  # recipe is irrelevant to fp32: run it once
                    where = ", ".join(f"{k}={v!r}" for k, v in values.items())
                    if s is not None:
                        where = f"schedule={s!r}" + (", " + where if where else "")
                    tc = TrainConfig.parse(resolved, source=f"sweep point ({where or 'base'})")
                    pid = point_id(tc)
                    if pid in seen:
                        continue
                    seen.add(pid)
                    points.append(SweepPoint(id=pid, config=tc, grid_values=values))
        return points


@dataclass(frozen=True)
class SweepPoint:
    """One resolved point: its stable id, TrainConfig and the grid values that produced it."""

    id: str
    config: Any  # TrainConfig
    grid_values: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short human-readable label, e.g. 'dpquant b=0.5 fp4 mlp/digits seed=0'."""
        p = self.params()
        parts = [str(p["schedule_kind"])]
        if p["schedule_kind"] in BUDGETED_KINDS:
            parts.append(f"b={p['budget']:g}")
        if p["schedule_kind"] != "fp32":
            parts.append(str(p["recipe"]))
        parts.append(f"{p['model']}/{p['dataset']}")
        if p.get("target_epsilon") is not None:
            parts.append(f"eps={p['target_epsilon']:g}")
        elif p.get("noise_multiplier_cfg") is not None:
            parts.append(f"sigma={p['noise_multiplier_cfg']:g}")
        parts.append(f"seed={p['seed']}")
        return " ".join(parts)

    def params(self) -> dict[str, Any]:
        """Flat descriptive columns of the point for the results table."""
        cfg = self.config.model_dump(mode="json")
        sched = cfg.get("schedule") or {"kind": "fp32"}
        kind = sched.get("kind", "fp32")
        budget = sched.get("budget")
        if kind == "fp32":
            budget = 0.0
        elif kind == "static-all":
            budget = 1.0
        out = {
            "point_id": self.id,
            "dataset": cfg.get("dataset"),
            "model": cfg.get("model"),
            "recipe": "none" if kind == "fp32" else cfg.get("recipe"),
            "schedule_kind": kind,
            "budget": budget,
            "seed": cfg.get("seed"),
            "epochs_cfg": cfg.get("epochs"),
            "batch_size": cfg.get("batch_size"),
            "private": cfg.get("private"),
            "target_epsilon": cfg.get("epsilon"),
            "noise_multiplier_cfg": cfg.get("noise_multiplier"),
            "optimizer": cfg.get("optimizer"),
            "schedule_json": json.dumps(sched, sort_keys=True),
        }
        for k, v in self.grid_values.items():  # grid keys not covered above (e.g. lr) get their own column
            if k not in ("dataset", "model", "recipe", "seed", "epsilon", "noise_multiplier", "epochs", "private",
                         "batch_size", "optimizer"):
                out[f"grid_{k}"] = v if isinstance(v, (int, float, str, bool, type(None))) else json.dumps(v)
        return out


def point_id(train_config: Any) -> str:
    """Stable id of a resolved TrainConfig: first 12 hex digits of sha256 of its canonical JSON."""
    blob = json.dumps(train_config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _expand_schedules(entries: list[dict] | None, base_schedule: Any) -> list[dict | None]:
    """Each schedule mapping, with list-valued parameters expanded into their cartesian product."""
    if entries is None:
        return [base_schedule if base_schedule is not None else None]
    out: list[dict | None] = []
    for e in entries:
        fixed = {k: v for k, v in e.items() if not isinstance(v, list)}
        varying = {k: v for k, v in e.items() if isinstance(v, list)}
        for combo in itertools.product(*varying.values()):
            out.append({**fixed, **dict(zip(varying, combo))})
    return out


def _pydantic_to_config_error(e: ValidationError, raw: Any, source: str | None) -> ConfigError:
    """First pydantic error -> ConfigError(key path, offending value, what is allowed)."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    # Drop pydantic's union-member tags (e.g. 'RandomConfig') from the dotted key.
    key = ".".join(x for x in loc if not x[:1].isupper()) or "(top level)"
    value: Any = err.get("input", raw)
    msg = str(err.get("msg", "a valid value"))
    for prefix in ("Value error, ", "Input should be "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if err.get("type") == "extra_forbidden":
        msg = "no such key (unknown field)"
    elif err.get("type") == "missing":
        value, msg = "<missing>", "a value (required)"
    return ConfigError(key, value, msg, source)
