"""The epoch plan: which layers run in low precision this epoch, and why.

An ``EpochPlan`` is the one object a schedule hands to the training loop, the run writes into metrics.csv
(as JSON), and the cost model reads back. Layers missing from ``quantized`` run in full precision.

>>> p = EpochPlan(epoch=0, quantized={"fc1": "fp8"})
>>> EpochPlan.from_json(p.to_json()) == p
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping


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
