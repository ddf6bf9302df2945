"""Datasets: ``load_dataset(name, *, data_dir=None, seed=0, **kw) -> DatasetBundle``.

=========  =====================================================  ==============  =======
name       source                                                 input shape     classes
=========  =====================================================  ==============  =======
digits     scikit-learn's embedded handwritten digits (offline)   1 x 8 x 8       10
synthetic  seeded generator (n_train, n_test, channels, ...)      C x S x S       any
emnist     idx files in data_dir (``split=`` balanced, ...)       1 x 28 x 28     47 ...
gtsrb      images + CSV in data_dir, resized (``image_size=``)    3 x 32 x 32     43
cifar10    binary batches in data_dir (never unpickled)           3 x 32 x 32     10
=========  =====================================================  ==============  =======

Images are float32 NCHW in [-1, 1] (fixed public constants, see ``common``), labels int64. ``n_train`` /
``n_test`` keyword arguments keep a seeded subset of a real dataset (the synthetic one generates that many).

>>> b = load_dataset("digits")
>>> b.train.tensors[0].dtype, b.train.tensors[1].dtype
(torch.float32, torch.int64)
"""

from __future__ import annotations

from typing import Any, Callable

from dpquant_sim.errors import ConfigError
from dpquant_sim.training.data.common import DatasetBundle, seeded_subset

DATASETS: tuple[str, ...] = ("digits", "synthetic", "emnist", "gtsrb", "cifar10")


def _digits(data_dir, seed, **kw):
    from dpquant_sim.training.data.digits import load_digits_bundle

    return load_digits_bundle(seed=seed, **kw)


def _synthetic(data_dir, seed, **kw):
    from dpquant_sim.training.data.synthetic import make_synthetic

    return make_synthetic(seed=seed, **kw)


def _emnist(data_dir, seed, **kw):
    from dpquant_sim.training.data.emnist import load_emnist

    return load_emnist(data_dir, seed=seed, **kw)


def _gtsrb(data_dir, seed, **kw):
    from dpquant_sim.training.data.gtsrb import load_gtsrb

    return load_gtsrb(data_dir, seed=seed, **kw)


def _cifar10(data_dir, seed, **kw):
    from dpquant_sim.training.data.cifar10 import load_cifar10

    return load_cifar10(data_dir, seed=seed, **kw)


_LOADERS: dict[str, Callable[..., DatasetBundle]] = {
    "digits": _digits, "synthetic": _synthetic, "emnist": _emnist, "gtsrb": _gtsrb, "cifar10": _cifar10,
}


def load_dataset(name: str, *, data_dir=None, seed: int = 0, **kw: Any) -> DatasetBundle:
    """Load a dataset by name (see the table above). Unknown names raise ConfigError; a missing or malformed
    folder raises DatasetError saying what was expected where."""
    if name not in _LOADERS:
        raise ConfigError("dataset", name, DATASETS)
    n_train = kw.pop("n_train", None) if name != "synthetic" else None
    n_test = kw.pop("n_test", None) if name != "synthetic" else None
    try:
        bundle = _LOADERS[name](data_dir, seed, **kw)
    except TypeError as e:  # an unexpected keyword argument
        raise ConfigError(f"{name} option", str(e).split("argument")[-1].strip(" '"),
                          "the options documented for this dataset") from None
    if n_train is not None or n_test is not None:
        from dataclasses import replace

        bundle = replace(bundle, train=seeded_subset(bundle.train, n_train, seed),
                         test=seeded_subset(bundle.test, n_test, seed + 1))
    return bundle


__all__ = ["DATASETS", "DatasetBundle", "load_dataset"]
