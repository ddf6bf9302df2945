"""Schedule registry: ``build_schedule(cfg)`` dispatches on ``cfg.kind`` (Opacus-style registry by key).

>>> from dpquant_sim.schedules import build_schedule
>>> type(build_schedule({"kind": "random", "budget": 0.5})).__name__
'RandomRotationSchedule'
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from pydantic import TypeAdapter, ValidationError

from dpquant_sim.errors import ConfigError
from dpquant_sim.schedules.base import Schedule
from dpquant_sim.schedules.configs import SCHEDULE_KINDS, ScheduleConfig

_REGISTRY: dict[str, Callable[[Any], Schedule]] = {}
_ADAPTER: TypeAdapter = TypeAdapter(ScheduleConfig)
T = TypeVar("T")


def register_schedule(kind: str) -> Callable[[T], T]:
    """Class decorator: ``@register_schedule("random")`` makes ``build_schedule`` construct it as ``cls(cfg)``."""

    def deco(cls: T) -> T:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ConfigError("kind", kind, "a schedule kind not registered yet")
        _REGISTRY[kind] = cls  # type: ignore[assignment]
        return cls

    return deco


def _load_builtin() -> None:
    # Importing the modules runs their @register_schedule decorators.
    from dpquant_sim.schedules import dpquant, random_rotation, static  # noqa: F401


def parse_schedule_config(cfg: "ScheduleConfig | Mapping[str, Any]") -> ScheduleConfig:
    """Validate a dict (e.g. from YAML or CLI flags) into a typed schedule config; errors name the field."""
    if isinstance(cfg, Mapping):
        kind = cfg.get("kind")
        if kind not in SCHEDULE_KINDS:
            raise ConfigError("schedule.kind", kind, SCHEDULE_KINDS)
        try:
            return _ADAPTER.validate_python(dict(cfg))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"][1:]) or "schedule"
            raise ConfigError(f"schedule.{field}", err.get("input"), err["msg"]) from None
    return cfg


def build_schedule(cfg: "ScheduleConfig | Mapping[str, Any]") -> Schedule:
    """Build the schedule for a typed config (or a dict with a ``kind`` key)."""
    _load_builtin()
    cfg = parse_schedule_config(cfg)
    kind = getattr(cfg, "kind", None)
    try:
        cls = _REGISTRY[kind]
    except KeyError:
        raise ConfigError("schedule.kind", kind, tuple(sorted(_REGISTRY))) from None
    return cls(cfg)


def registered_kinds() -> tuple[str, ...]:
    """Kinds with a registered schedule class (built-ins plus any user registrations)."""
    _load_builtin()
    return tuple(_REGISTRY)
