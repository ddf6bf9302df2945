"""scikit-learn's handwritten digits: 1797 real 8x8 grey images, 10 classes, shipped with scikit-learn (offline).

The train/test split is a fixed seeded permutation (``seed``; default 0), stratified by class so that every
class appears in the test set in proportion.

>>> b = load_digits_bundle()
>>> b.input_shape, b.num_classes, b.n_train + b.n_test
((1, 8, 8), 10, 1797)
"""

from __future__ import annotations

import numpy as np

from dpquant_sim.errors import DatasetError
from dpquant_sim.training.data.common import DatasetBundle, to_dataset


def load_digits_bundle(*, seed: int = 0, test_fraction: float = 0.2) -> DatasetBundle:
    """Load the digits with a stratified seeded split (pixels 0..16 -> [-1, 1])."""
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"digits: test_fraction={test_fraction!r} must be in (0, 1)")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(test_fraction * len(idx)))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    train_idx = rng.permutation(np.flatnonzero(~test_mask))
    test_idx_all = np.flatnonzero(test_mask)
    return DatasetBundle(
        name="digits",
        train=to_dataset(x[train_idx], y[train_idx], scale=16.0),
        test=to_dataset(x[test_idx_all], y[test_idx_all], scale=16.0),
        input_shape=(1, 8, 8),
        num_classes=10,
        info={"source": "sklearn.datasets.load_digits", "split_seed": seed, "test_fraction": test_fraction},
    )
