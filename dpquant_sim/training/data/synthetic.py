"""A seeded synthetic image-classification dataset of any size.

Each class has a smooth random prototype (a low-resolution Gaussian pattern upsampled bilinearly, per
channel). An example of class y is ``a * shift(P_y) + b * P_z + noise``: the class prototype with a random
amplitude ``a`` in [0.6, 1.4] and a random circular shift of up to ``image_size // 8`` pixels, plus a
distractor prototype of a random other class z with weight ``b`` in [0, 0.5], plus white Gaussian noise of
std ``noise``. Learnable (the prototypes differ) but not trivial (shifts, distractors, noise).
The same arguments always give the same tensors.

>>> b = make_synthetic(n_train=64, n_test=32, channels=3, image_size=16, num_classes=4, seed=1)
>>> b.train.tensors[0].shape, b.num_classes
(torch.Size([64, 3, 16, 16]), 4)
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from dpquant_sim.errors import DatasetError
from dpquant_sim.training.data.common import DatasetBundle


def _make_split(n: int, protos: torch.Tensor, noise: float, g: torch.Generator) -> TensorDataset:
    k, c, s, _ = protos.shape
    y = torch.randint(0, k, (n,), generator=g)
    z = (y + torch.randint(1, k, (n,), generator=g)) % k if k > 1 else y
    a = 0.6 + 0.8 * torch.rand(n, generator=g)
    b = 0.5 * torch.rand(n, generator=g)
    m = max(1, s // 8)
    sh = torch.randint(-m, m + 1, (n, 2), generator=g)
    x = torch.empty(n, c, s, s)
    for i in range(n):  # per-example roll; n is at most a few hundred thousand
        x[i] = torch.roll(protos[y[i]], shifts=(int(sh[i, 0]), int(sh[i, 1])), dims=(-2, -1))
    x = a.view(-1, 1, 1, 1) * x + b.view(-1, 1, 1, 1) * protos[z]
    x += noise * torch.randn(x.shape, generator=g)
    return TensorDataset(x.float().contiguous(), y.long().contiguous())


def make_synthetic(
    *,
    n_train: int = 2048,
    n_test: int = 512,
    channels: int = 3,
    image_size: int = 32,
    num_classes: int = 10,
    noise: float = 1.0,
    seed: int = 0,
) -> DatasetBundle:
    """Generate the dataset (see module docstring); values are roughly zero-mean, unit scale."""
    for field, v, lo in (("n_train", n_train, 1), ("n_test", n_test, 1), ("channels", channels, 1),
                         ("image_size", image_size, 4), ("num_classes", num_classes, 2)):
        if not isinstance(v, int) or v < lo:
            raise DatasetError(f"synthetic: {field}={v!r} must be an integer >= {lo}")
    if noise < 0:
        raise DatasetError(f"synthetic: noise={noise!r} must be >= 0")
    g = torch.Generator().manual_seed(seed)
    low = max(2, image_size // 4)
    base = torch.randn(num_classes, channels, low, low, generator=g)
    protos = torch.nn.functional.interpolate(base, size=(image_size, image_size), mode="bilinear",
                                             align_corners=False)
    protos = protos / protos.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    return DatasetBundle(
        name="synthetic",
        train=_make_split(n_train, protos, noise, g),
        test=_make_split(n_test, protos, noise, g),
        input_shape=(channels, image_size, image_size),
        num_classes=num_classes,
        info={"seed": seed, "noise": noise},
    )
