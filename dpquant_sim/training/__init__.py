"""dpquant_sim.training: models, datasets, privacy accounting, the typed run config and the training engine.

>>> from dpquant_sim.training import TrainConfig, PrivacyLedger, build_model, load_dataset   # doctest: +SKIP
>>> # train(TrainConfig(dataset="digits", model="cnn", epochs=3, epsilon=8), "runs/x")
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TrainConfig": "dpquant_sim.training.config",
    "config_error": "dpquant_sim.training.config",
    "PrivacyLedger": "dpquant_sim.training.accounting",
    "noise_for_target": "dpquant_sim.training.accounting",
    "build_model": "dpquant_sim.training.models",
    "MODELS": "dpquant_sim.training.models",
    "load_dataset": "dpquant_sim.training.data",
    "DatasetBundle": "dpquant_sim.training.data",
    "train": "dpquant_sim.training.engine",
    "RunResult": "dpquant_sim.training.engine",
}


def __getattr__(name: str) -> Any:  # lazy: importing the package does not import opacus/torch models
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dpquant_sim.training' has no attribute {name!r}")


__all__ = list(_EXPORTS)
