"""Shared pieces of the dataset loaders: the bundle type, normalization, file checks, subsetting.

Normalization uses fixed, public constants (pixels in [0, 1] mapped to [-1, 1]), never statistics of the
training set: a mean/std computed on private data would be an unaccounted, data-dependent release.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dpquant_sim.errors import DatasetError


@dataclass(frozen=True)
class DatasetBundle:
    """A loaded dataset.

    Attributes:
        name: dataset name (e.g. 'digits', 'emnist-balanced').
        train / test: TensorDatasets of (float32 images [N, C, H, W], int64 labels [N]).
        input_shape: per-example shape (C, H, W).
        num_classes: number of classes; labels are 0 .. num_classes-1.
        info: extra facts for run_info.json (source files, split, normalization).
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, int, int]
    num_classes: int
    info: dict | None = None

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_test(self) -> int:
        return len(self.test)


def to_dataset(images_u8_or_unit: np.ndarray | torch.Tensor, labels, *, scale: float = 255.0) -> TensorDataset:
    """Images (N, C, H, W) with values in [0, scale] -> TensorDataset of float32 in [-1, 1], int64 labels."""
    x = torch.as_tensor(np.asarray(images_u8_or_unit), dtype=torch.float32)
    x = x.div_(scale).sub_(0.5).div_(0.5).contiguous()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64).contiguous()
    return TensorDataset(x, y)


def require_dir(data_dir, dataset: str, expected: str) -> Path:
    """The dataset folder as a Path; DatasetError when it is not given or not a folder."""
    if data_dir is None:
        raise DatasetError(f"{dataset}: data_dir is required (a local folder holding {expected}); nothing is downloaded")
    p = Path(data_dir).expanduser()
    if not p.is_dir():
        raise DatasetError(f"{dataset}: data_dir {str(p)!r} is not a folder; expected a folder holding {expected}")
    return p


def find_file(folder: Path, names: list[str], dataset: str, what: str) -> Path:
    """First existing ``folder/name`` (also trying ``name.gz``); DatasetError listing every name tried."""
    tried = []
    for n in names:
        for cand in (n, n + ".gz"):
            tried.append(cand)
            if (folder / cand).is_file():
                return folder / cand
    raise DatasetError(f"{dataset}: missing {what} in {str(folder)!r}; expected one of: {', '.join(tried)}")


def read_bytes(path: Path) -> bytes:
    """File content, gunzipped when the name ends in .gz (DatasetError on a corrupt archive)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream inside the .gz
        raise DatasetError(f"cannot read {str(path)!r}: {e}") from None


def seeded_subset(ds: TensorDataset, n: int | None, seed: int) -> TensorDataset:
    """The first ``n`` examples of a seeded permutation (all of them when n is None or >= len)."""
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise DatasetError(f"subset size must be >= 1, got {n}")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(*(t[idx] for t in ds.tensors))


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (N, C, H, W) -> (N, C, size, size), bilinear with antialiasing (no image library needed)."""
    if x.shape[-2:] == (size, size):
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True)
