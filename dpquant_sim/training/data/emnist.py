"""EMNIST from the original idx files in a local folder (no download).

Expected files in ``data_dir`` (each may also be gzipped, with a ``.gz`` suffix), for ``split`` one of
balanced, byclass, bymerge, digits, letters, mnist::

    emnist-<split>-train-images-idx3-ubyte   emnist-<split>-train-labels-idx1-ubyte
    emnist-<split>-test-images-idx3-ubyte    emnist-<split>-test-labels-idx1-ubyte

(the layout of the "gzip" archive from NIST; a ``gzip/`` sub-folder is looked into too). The classic MNIST
names ``train-images-idx3-ubyte`` etc. are accepted for ``split="mnist"``. EMNIST images are stored
transposed; they are turned upright here. ``letters`` labels 1..26 become 0..25.

>>> # load_emnist("~/data/emnist", split="balanced")  -> 47 classes, 1x28x28
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpquant_sim.errors import DatasetError
from dpquant_sim.training.data.common import DatasetBundle, find_file, read_bytes, require_dir, to_dataset

SPLIT_CLASSES = {"balanced": 47, "byclass": 62, "bymerge": 47, "digits": 10, "letters": 26, "mnist": 10}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def read_idx(path: Path, *, expect_magic: int) -> np.ndarray:
    """Parse an idx file (big-endian header: magic, then one uint32 per dimension; uint8 payload)."""
    raw = read_bytes(path)
    if len(raw) < 8:
        raise DatasetError(f"{str(path)!r}: too short for an idx header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expect_magic:
        raise DatasetError(f"{str(path)!r}: idx magic {magic:#010x}, expected {expect_magic:#010x} "
                           f"({'images, uint8, 3 dims' if expect_magic == IMAGES_MAGIC else 'labels, uint8, 1 dim'})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DatasetError(f"{str(path)!r}: {len(raw)} bytes, expected {expected} for dims {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_emnist(data_dir, *, split: str = "balanced", seed: int = 0) -> DatasetBundle:
    """Load one EMNIST split as 1x28x28 images in [-1, 1]."""
    if split not in SPLIT_CLASSES:
        from dpquant_sim.errors import ConfigError

        raise ConfigError("split", split, tuple(SPLIT_CLASSES))
    expected = f"emnist-{split}-{{train,test}}-{{images-idx3,labels-idx1}}-ubyte[.gz]"
    root = require_dir(data_dir, "emnist", expected)
    folder = root / "gzip" if not any(root.glob("*-ubyte*")) and (root / "gzip").is_dir() else root
    parts = {}
    for part in ("train", "test"):
        names_img = [f"emnist-{split}-{part}-images-idx3-ubyte"]
        names_lab = [f"emnist-{split}-{part}-labels-idx1-ubyte"]
        if split == "mnist":
            mn = "t10k" if part == "test" else "train"
            names_img.append(f"{mn}-images-idx3-ubyte")
            names_lab.append(f"{mn}-labels-idx1-ubyte")
        img_path = find_file(folder, names_img, "emnist", f"{part} images")
        x = read_idx(img_path, expect_magic=IMAGES_MAGIC)
        y = read_idx(find_file(folder, names_lab, "emnist", f"{part} labels"), expect_magic=LABELS_MAGIC)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(f"emnist {part}: {x.shape[0] if x.ndim else 0} images of shape {x.shape[1:]} vs "
                               f"{len(y)} labels; expected N images of 28x28 and N labels")
        y = y.astype(np.int64)
        if split == "letters":
            y = y - 1
        k = SPLIT_CLASSES[split]
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise DatasetError(f"emnist {part}: labels span {y.min()}..{y.max()}, expected 0..{k - 1} for split {split!r}")
        if img_path.name.startswith("emnist-"):
            x = np.ascontiguousarray(np.transpose(x, (0, 2, 1)))  # EMNIST stores images transposed
        parts[part] = to_dataset(x[:, None], y)
    h, w = parts["train"].tensors[0].shape[-2:]
    return DatasetBundle(name=f"emnist-{split}", train=parts["train"], test=parts["test"],
                         input_shape=(1, int(h), int(w)), num_classes=SPLIT_CLASSES[split],
                         info={"data_dir": str(root), "split": split})
