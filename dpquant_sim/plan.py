"""The epoch plan: which layers run in low precision this epoch, and why.

An ``EpochPlan`` is the one object a schedule hands to the training loop, the run writes into
``plans.jsonl`` beside metrics.csv (one JSON line per epoch), and the cost model reads back. Layers missing
from ``quantized`` run in full precision. ``read_plans(run_dir)`` and ``read_metrics(run_dir)`` read a run
folder (also one written before plans.jsonl existed, whose metrics.csv held a ``plan`` JSON column).

>>> p = EpochPlan(epoch=0, quantized={"fc1": "fp8"})
>>> EpochPlan.from_json(p.to_json()) == p
True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

PLANS_FILE = "plans.jsonl"


@dataclass(frozen=True)
class EpochPlan:
    """Per-epoch plan.

    Attributes:
        epoch: 0-based epoch index.
        quantized: layer name -> recipe name (see ``dpquant_sim.nn.config.RECIPES``) for layers in low precision.
        scores: optional per-layer scores the schedule used (e.g. dpquant's noisy sensitivity estimates).
        probs: optional per-layer probability that the layer is quantized this epoch (its inclusion
            probability in the epoch's draw); a schedule's own sampling weights, when they differ (dpquant's
            softmax pi), go under ``info``.
        quantized_flop_share: share (0..1) of quantizable GEMM FLOPs that runs quantized under this plan.
        info: free-form extra facts for the log (e.g. estimator epsilon), JSON-serialisable.
    """

    epoch: int
    quantized: Mapping[str, str] = field(default_factory=dict)
    scores: Mapping[str, float] | None = None
    probs: Mapping[str, float] | None = None
    quantized_flop_share: float | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def recipe_for(self, layer: str) -> str | None:
        """Recipe name for ``layer`` or None if it runs in full precision."""
        return self.quantized.get(layer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "quantized": dict(self.quantized),
            "scores": None if self.scores is None else dict(self.scores),
            "probs": None if self.probs is None else dict(self.probs),
            "quantized_flop_share": self.quantized_flop_share,
            "info": dict(self.info),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EpochPlan":
        return cls(
            epoch=int(d["epoch"]),
            quantized=dict(d.get("quantized") or {}),
            scores=d.get("scores"),
            probs=d.get("probs"),
            quantized_flop_share=d.get("quantized_flop_share"),
            info=dict(d.get("info") or {}),
        )

    @classmethod
    def from_json(cls, s: str) -> "EpochPlan":
        return cls.from_dict(json.loads(s))


def write_plans(path: str | os.PathLike, plans: Sequence[EpochPlan]) -> Path:
    """Write ``plans`` as JSON lines (one per epoch, in order) to ``path``, atomically."""
    from dpquant_sim.io import atomic_write_text

    return atomic_write_text(path, "".join(p.to_json() + "\n" for p in plans))


def read_plans(run_dir: str | os.PathLike) -> list[EpochPlan]:
    """The per-epoch plans of a run folder: ``plans.jsonl``, else the ``plan`` column of an older metrics.csv.

    Raises RunFolderError naming the file and line when a line is not a plan (hand-edited or damaged), and
    FileNotFoundError when the folder has neither.
    """
    from dpquant_sim.errors import RunFolderError

    rd = Path(run_dir)
    f = rd / PLANS_FILE
    if f.is_file():
        plans = []
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                plans.append(EpochPlan.from_json(line))
            except (ValueError, KeyError, TypeError) as e:
                raise RunFolderError(f"{str(f)!r} line {i} is not an epoch plan ({type(e).__name__}: {e}); restore "
                                     "the run folder, or delete it and rerun to retrain") from None
        return plans
    import pandas as pd

    m = rd / "metrics.csv"
    if not m.is_file():
        raise FileNotFoundError(f"{rd}: no {PLANS_FILE} or metrics.csv (not a run directory written by dpquant-sim)")
    metrics = pd.read_csv(m)
    if "plan" not in metrics.columns:
        raise FileNotFoundError(f"{rd}: no {PLANS_FILE} (and metrics.csv has no plan column)")
    return [EpochPlan.from_json(s) for s in metrics["plan"]]


def read_metrics(run_dir: str | os.PathLike) -> "Any":
    """metrics.csv of a run folder as a DataFrame with a ``plan`` column (each epoch's EpochPlan as JSON, joined
    on ``epoch`` from plans.jsonl; None for an epoch without a plan line)."""
    import pandas as pd

    rd = Path(run_dir)
    metrics = pd.read_csv(rd / "metrics.csv")
    if "plan" in metrics.columns or "epoch" not in metrics.columns:
        return metrics  # written before plans.jsonl existed
    try:
        plans = {p.epoch: p.to_json() for p in read_plans(rd)}
    except FileNotFoundError:
        plans = {}
    metrics["plan"] = [plans.get(int(e)) for e in metrics["epoch"]]
    return metrics
