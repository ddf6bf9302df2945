"""Named presets: one word that sets every element of a seed paper's method (docs/fidelity.md).

A preset fills in only what the user left unset: fields given explicitly (flags, YAML, sweep grid) always win.
It is applied when a TrainConfig is validated, so it works the same from ``train --preset paper``, a train YAML
(``preset: paper``) and a sweep (``preset: paper`` at the top of the sweep YAML, or in ``base``). The resolved
fields are what config.yaml records, beside ``preset`` itself, so a run's folder says exactly what ran.

``paper`` (DPQuant, Gao et al., ICLR 2026; see docs/fidelity.md for what the paper leaves unstated):

- recipe ``luq_fp4`` (SAWB INT4 forward, radix-2 FP4 gradients, per-sample scales: the DP-safe LUQ);
- schedule ``dpquant`` when none is named, with the paper's sampler (softmax(-beta * EMA(R)), exactly
  k = round(ratio * n) layers drawn without replacement), budgets in layers, and the training estimator
  (loss difference after short training iterations), re-estimated every 2 epochs;
- ``random`` and ``static-subset`` baselines budgeted in layers, the static subsets drawn at random
  (the paper reports mean +- std over random fixed subsets).

>>> apply_preset({"preset": "paper"})["recipe"]
'luq_fp4'
>>> apply_preset({"preset": "paper", "recipe": "fp8", "schedule": {"kind": "random"}})["schedule"]
{'kind': 'random', 'budget_unit': 'layers'}
"""

from __future__ import annotations

from typing import Any, Mapping

PRESET_NAMES: tuple[str, ...] = ("paper",)

# Top-level TrainConfig fields each preset fills when unset.
_TOP: dict[str, dict[str, Any]] = {
    "paper": {"recipe": "luq_fp4", "schedule": {"kind": "dpquant"}},
}

# Schedule fields per schedule kind; a field the schedule's config class does not have is skipped, so a
# preset never invents fields.
_SCHEDULE: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "dpquant": {"sampler": "paper", "budget_unit": "layers", "estimator": "training", "interval": 2},
        "random": {"budget_unit": "layers"},
        "static-subset": {"select": "random", "budget_unit": "layers"},
    },
}


def _schedule_fields(kind: str) -> set[str] | None:
    from dpquant_sim.schedules import configs

    for cls in (configs.Fp32Config, configs.StaticAllConfig, configs.StaticSubsetConfig, configs.RandomConfig,
                configs.DPQuantConfig):
        if cls.model_fields["kind"].default == kind:
            return set(cls.model_fields)
    return None


def apply_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``data`` with the named preset's fields filled in where unset (no preset: unchanged copy).

    An unknown preset name is left for validation to reject (it names the field and the allowed values).
    """
    out = dict(data)
    name = out.get("preset")
    if name not in PRESET_NAMES:
        return out
    for key, value in _TOP[name].items():
        if out.get(key) is None:
            out[key] = dict(value) if isinstance(value, dict) else value
    sched = out.get("schedule")
    if isinstance(sched, Mapping):
        kind = sched.get("kind", "fp32")
        known = _schedule_fields(kind) or set()
        defaults = {k: v for k, v in _SCHEDULE[name].get(kind, {}).items() if k in known}
        out["schedule"] = {**dict(sched), **{k: v for k, v in defaults.items() if k not in sched}}
    return out
