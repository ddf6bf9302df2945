"""CIFAR-10 from the binary version (cifar-10-binary.tar.gz, extracted), never from the pickled batches.

Expected in ``data_dir`` or ``data_dir/cifar-10-batches-bin``: ``data_batch_1.bin`` .. ``data_batch_5.bin``
and ``test_batch.bin``. Each file is a sequence of 3073-byte records: one label byte (0..9), then 3072 pixel
bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major). Python pickles can run code when loaded, so
the pickled "python version" is refused by design.

>>> # load_cifar10("~/data/cifar10") -> 3x32x32, 10 classes, 50000/10000 examples
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpquant_sim.errors import DatasetError
from dpquant_sim.training.data.common import DatasetBundle, require_dir, to_dataset

RECORD = 1 + 3 * 32 * 32
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels uint8 [N]) from one binary batch file."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        raise DatasetError(f"cifar10: {str(path)!r} has {raw.size} bytes, expected a positive multiple of "
                           f"{RECORD} (1 label byte + 3072 pixel bytes per record)")
    rec = raw.reshape(-1, RECORD)
    labels = rec[:, 0]
    if labels.max() > 9:
        bad = int(np.flatnonzero(labels > 9)[0])
        raise DatasetError(f"cifar10: {str(path)!r} record {bad} has label {labels[bad]}, expected 0..9")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir, *, seed: int = 0) -> DatasetBundle:
    """Load CIFAR-10 (pixels 0..255 -> [-1, 1])."""
    expected = ", ".join(TRAIN_FILES + TEST_FILES) + " (the binary version)"
    root = require_dir(data_dir, "cifar10", expected)
    folder = root / "cifar-10-batches-bin" if (root / "cifar-10-batches-bin").is_dir() else root
    missing = [f for f in TRAIN_FILES + TEST_FILES if not (folder / f).is_file()]
    if missing:
        pickled = (folder / "data_batch_1").exists() or (root / "cifar-10-batches-py").exists()
        hint = " (found the pickled python version, which is refused: download cifar-10-binary.tar.gz)" if pickled else ""
        raise DatasetError(f"cifar10: missing {', '.join(missing)} in {str(folder)!r}; expected {expected}{hint}")
    parts = {}
    for part, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        xs, ys = zip(*(read_cifar_bin(folder / f) for f in files))
        parts[part] = to_dataset(np.concatenate(xs), np.concatenate(ys))
    return DatasetBundle(name="cifar10", train=parts["train"], test=parts["test"], input_shape=(3, 32, 32),
                         num_classes=10, info={"data_dir": str(folder), "classes": list(CLASSES)})
