"""Datasets: the embedded digits, the synthetic generator, and tiny files in each real on-disk format."""

from __future__ import annotations

import gzip
import re
import struct
import zlib

import numpy as np
import pytest
import torch

from dpquant_sim.errors import ConfigError, DatasetError
from dpquant_sim.training.data import load_dataset
from dpquant_sim.training.data.gtsrb import read_ppm


# ------------------------------------------------------------------------------------------------ embedded
def test_digits_split_and_values():
    from sklearn.datasets import load_digits

    b = load_dataset("digits")
    x, y = b.train.tensors
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10
    assert b.n_train + b.n_test == 1797 and abs(b.n_test - 0.2 * 1797) <= 10
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.min() == -1 and x.max() == 1
    # every example is a real digit, pixel for pixel (0..16 -> [-1, 1])
    raw = load_digits()
    pix = {tuple(r) for r in (raw.data / 16 * 2 - 1).astype(np.float32).round(5).tolist()}
    assert all(tuple(r) in pix for r in x.flatten(1).numpy().round(5).tolist()[:50])
    assert set(torch.unique(b.test.tensors[1]).tolist()) == set(range(10))
    # same seed same split, another seed another split
    assert torch.equal(load_dataset("digits").train.tensors[0], x)
    assert not torch.equal(load_dataset("digits", seed=1).train.tensors[0], x)


def test_synthetic_shapes_determinism_and_learnability():
    kw = dict(n_train=300, n_test=100, channels=1, image_size=8, num_classes=3)
    a, b = load_dataset("synthetic", seed=3, **kw), load_dataset("synthetic", seed=3, **kw)
    assert a.train.tensors[0].shape == (300, 1, 8, 8) and a.input_shape == (1, 8, 8)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], load_dataset("synthetic", seed=4, **kw).train.tensors[0])
    # a nearest-class-mean classifier beats chance clearly but is not perfect
    x, y = a.train.tensors
    means = torch.stack([x[y == k].mean(0).flatten() for k in range(3)])
    xt, yt = a.test.tensors
    acc = ((xt.flatten(1) @ means.T - 0.5 * (means**2).sum(1)).argmax(1) == yt).float().mean()
    assert 0.5 < acc < 1.0


def test_unknown_dataset_and_subset():
    with pytest.raises(ConfigError, match="dataset='mnist'"):
        load_dataset("mnist")
    assert load_dataset("digits", n_train=100, n_test=20).n_train == 100


# ------------------------------------------------------------------------------------------------ EMNIST idx
def write_idx(path, arr: np.ndarray, magic: int, gz: bool):
    data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_emnist(tmp_path, split="balanced", n=(12, 5), gz=True, classes=47):
    rng = np.random.default_rng(0)
    imgs = {}
    for part, k in zip(("train", "test"), n):
        x = rng.integers(0, 256, (k, 28, 28))
        y = rng.integers(0, classes, k) + (1 if split == "letters" else 0)
        write_idx(tmp_path / f"emnist-{split}-{part}-images-idx3-ubyte", x, 0x803, gz)
        write_idx(tmp_path / f"emnist-{split}-{part}-labels-idx1-ubyte", y, 0x801, gz)
        imgs[part] = (x, y)
    return imgs


@pytest.mark.parametrize("gz", [True, False])
def test_emnist_reads_idx_and_transposes(tmp_path, gz):
    imgs = make_emnist(tmp_path, gz=gz)
    b = load_dataset("emnist", data_dir=tmp_path)
    x, y = b.train.tensors
    assert b.num_classes == 47 and b.input_shape == (1, 28, 28) and len(x) == 12 and b.n_test == 5
    want = torch.tensor(imgs["train"][0].transpose(0, 2, 1), dtype=torch.float32) / 255 * 2 - 1
    assert torch.allclose(x[:, 0], want) and torch.equal(y, torch.tensor(imgs["train"][1]))


def test_emnist_letters_shift_labels(tmp_path):
    imgs = make_emnist(tmp_path, split="letters", classes=26, gz=False)
    b = load_dataset("emnist", data_dir=tmp_path, split="letters")
    assert b.num_classes == 26 and torch.equal(b.test.tensors[1], torch.tensor(imgs["test"][1] - 1))


def test_emnist_errors(tmp_path):
    with pytest.raises(DatasetError, match="data_dir is required"):
        load_dataset("emnist")
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset("emnist", data_dir=tmp_path / "nope")
    with pytest.raises(DatasetError, match="emnist-balanced-train-images-idx3-ubyte"):
        load_dataset("emnist", data_dir=tmp_path)
    make_emnist(tmp_path, gz=False)
    # swap an images file for a labels file: wrong magic
    p = tmp_path / "emnist-balanced-test-images-idx3-ubyte"
    p.write_bytes((tmp_path / "emnist-balanced-test-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DatasetError, match="magic 0x00000801, expected 0x00000803"):
        load_dataset("emnist", data_dir=tmp_path)
    make_emnist(tmp_path, gz=False)
    raw = (tmp_path / "emnist-balanced-train-images-idx3-ubyte").read_bytes()
    (tmp_path / "emnist-balanced-train-images-idx3-ubyte").write_bytes(raw[:-3])
    with pytest.raises(DatasetError, match="expected .* for dims"):
        load_dataset("emnist", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="split"):
        load_dataset("emnist", data_dir=tmp_path, split="weird")


# ------------------------------------------------------------------------------------------------ CIFAR-10
def make_cifar(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    files = {}
    for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        pix = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        (folder / f).write_bytes(np.concatenate([labels[:, None], pix], 1).tobytes())
        files[f] = (labels, pix)
    return files


def test_cifar10_binary_records(tmp_path):
    files = make_cifar(tmp_path / "cifar-10-batches-bin")
    b = load_dataset("cifar10", data_dir=tmp_path)
    assert b.n_train == 20 and b.n_test == 4 and b.input_shape == (3, 32, 32)
    labels, pix = files["data_batch_2.bin"]
    x, y = b.train.tensors
    # record 0 of batch 2 is example 4; channel planes R, G, B of 1024 row-major bytes each
    assert int(y[4]) == labels[0]
    assert x[4, 1, 0, 5] == pytest.approx(pix[0, 1024 + 5] / 255 * 2 - 1)
    assert x[4, 2, 31, 31] == pytest.approx(pix[0, 3071] / 255 * 2 - 1)


def test_cifar10_errors(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(DatasetError, match="missing test_batch.bin"):
        load_dataset("cifar10", data_dir=tmp_path)
    make_cifar(tmp_path)
    with open(tmp_path / "data_batch_3.bin", "ab") as f:
        f.write(b"\x00\x01")
    with pytest.raises(DatasetError, match="multiple of 3073"):
        load_dataset("cifar10", data_dir=tmp_path)
    make_cifar(tmp_path)
    raw = bytearray((tmp_path / "data_batch_1.bin").read_bytes())
    raw[3073] = 12
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="record 1 has label 12"):
        load_dataset("cifar10", data_dir=tmp_path)
    py = tmp_path / "py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(b"pickle")
    with pytest.raises(DatasetError, match="pickled python version, which is refused"):
        load_dataset("cifar10", data_dir=py)


# ------------------------------------------------------------------------------------------------ GTSRB
def write_ppm(path, img: np.ndarray, comment=True):
    h, w, _ = img.shape
    head = b"P6\n" + (b"# made by a test\n" if comment else b"") + f"{w} {h}\n255\n".encode()
    path.write_bytes(head + img.astype(np.uint8).tobytes())


def test_read_ppm_binary_and_ascii(tmp_path):
    img = np.arange(2 * 3 * 3).reshape(2, 3, 3).astype(np.uint8) * 9
    write_ppm(tmp_path / "a.ppm", img)
    assert np.array_equal(read_ppm(tmp_path / "a.ppm"), img)
    (tmp_path / "b.ppm").write_text("P3\n3 2\n255\n" + " ".join(str(v) for v in img.flatten()) + "\n")
    assert np.array_equal(read_ppm(tmp_path / "b.ppm"), img)
    (tmp_path / "c.ppm").write_bytes(b"P7\n1 1\n255\n\x00\x00\x00")
    with pytest.raises(DatasetError, match="expected P6 or P3"):
        read_ppm(tmp_path / "c.ppm")


def make_gtsrb_official(root, per_class=2, classes=(0, 5)):
    rng = np.random.default_rng(2)
    for c in classes:
        d = root / "GTSRB" / "Final_Training" / "Images" / f"{c:05d}"
        d.mkdir(parents=True)
        lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(per_class):
            h, w = rng.integers(30, 40, 2)
            write_ppm(d / f"{i:05d}_00000.ppm", rng.integers(0, 256, (h, w, 3)))
            lines.append(f"{i:05d}_00000.ppm;{w};{h};5;5;{w - 6};{h - 6};{c}")
        (d / f"GT-{c:05d}.csv").write_text("\n".join(lines) + "\n")
    t = root / "GTSRB" / "Final_Test" / "Images"
    t.mkdir(parents=True)
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(3):
        write_ppm(t / f"{i:05d}.ppm", np.full((32, 32, 3), 40 * i))
        lines.append(f"{i:05d}.ppm;32;32;0;0;31;31;{(7 * i) % 43}")
    (root / "GT-final_test.csv").write_text("\n".join(lines) + "\n")


def test_gtsrb_official_layout(tmp_path):
    make_gtsrb_official(tmp_path)
    b = load_dataset("gtsrb", data_dir=tmp_path)
    assert b.num_classes == 43 and b.input_shape == (3, 32, 32) and b.n_train == 4 and b.n_test == 3
    assert b.train.tensors[1].tolist() == [0, 0, 5, 5] and b.test.tensors[1].tolist() == [0, 7, 14]
    # a constant 32x32 image stays constant through the resize: 80/255 -> [-1, 1]
    assert torch.allclose(b.test.tensors[0][2], torch.full((3, 32, 32), 80 / 255 * 2 - 1), atol=1e-5)
    assert load_dataset("gtsrb", data_dir=tmp_path, crop_roi=True, image_size=16).input_shape == (3, 16, 16)


def test_gtsrb_train_csv_layout_and_errors(tmp_path):
    (tmp_path / "Train" / "3").mkdir(parents=True)
    (tmp_path / "Test").mkdir()
    write_ppm(tmp_path / "Train" / "3" / "a.ppm", np.zeros((20, 25, 3)))
    write_ppm(tmp_path / "Test" / "b.ppm", np.full((32, 32, 3), 255))
    head = "Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path\n"
    (tmp_path / "Train.csv").write_text(head + "25,20,1,1,20,18,3,Train/3/a.ppm\n")
    (tmp_path / "Test.csv").write_text(head + "32,32,0,0,31,31,42,Test/b.ppm\n")
    b = load_dataset("gtsrb", data_dir=tmp_path)
    assert b.train.tensors[1].tolist() == [3] and b.test.tensors[1].tolist() == [42]
    assert torch.allclose(b.test.tensors[0], torch.ones(1, 3, 32, 32))
    (tmp_path / "Test.csv").write_text(head + "32,32,0,0,31,31,43,Test/b.ppm\n")
    with pytest.raises(DatasetError, match="ClassId=43, expected 0..42"):
        load_dataset("gtsrb", data_dir=tmp_path)
    (tmp_path / "Test.csv").write_text(head + "32,32,0,0,31,31,1,Test/missing.ppm\n")
    with pytest.raises(DatasetError, match="missing.ppm.*does not exist"):
        load_dataset("gtsrb", data_dir=tmp_path)
    (tmp_path / "Test.csv").write_text(head + "32,32,0,0,31,31,1,Test/b.png\n")
    (tmp_path / "Test" / "b.png").write_bytes(b"\x89PNG")
    try:
        import PIL  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetError, match="needs Pillow"):
            load_dataset("gtsrb", data_dir=tmp_path)
    (tmp_path / "Test.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="expected ClassId"):
        load_dataset("gtsrb", data_dir=tmp_path)


def test_gtsrb_missing(tmp_path):
    with pytest.raises(DatasetError, match="no training GT-000NN.csv"):
        load_dataset("gtsrb", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ bad inputs
def _gtsrb_csv_layout(root):
    (root / "Train" / "3").mkdir(parents=True)
    (root / "Test").mkdir()
    write_ppm(root / "Train" / "3" / "a.ppm", np.zeros((20, 25, 3)))
    write_ppm(root / "Test" / "b.ppm", np.full((32, 32, 3), 255))
    head = "Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path\n"
    (root / "Train.csv").write_text(head + "25,20,1,1,20,18,3,Train/3/a.ppm\n")
    return head


@pytest.mark.parametrize("where", ["absolute", "dotdot", "dotdot-inside", "backslash"])
def test_gtsrb_paths_cannot_leave_the_data_folder(tmp_path, where):
    """Reproducer: a CSV path that is absolute or climbs with '..' used to be read from outside data_dir."""
    root, outside = tmp_path / "data", tmp_path / "secret"
    outside.mkdir()
    write_ppm(outside / "s.ppm", np.full((32, 32, 3), 7))
    head = _gtsrb_csv_layout(root)
    path = {"absolute": str(outside / "s.ppm"), "dotdot": "../secret/s.ppm",
            "dotdot-inside": "Test/../../secret/s.ppm", "backslash": "..\\secret\\s.ppm"}[where]
    (root / "Test.csv").write_text(head + f"32,32,0,0,31,31,4,{path}\n")
    with pytest.raises(DatasetError, match=r"Test.csv' row 2: image path .* leaves the data folder"):
        load_dataset("gtsrb", data_dir=root)
    # the official layout's Filename column is confined the same way
    make_gtsrb_official(tmp_path / "official")
    gt = tmp_path / "official" / "GT-final_test.csv"
    gt.write_text(gt.read_text().replace("00001.ppm", str(outside / "s.ppm")))
    with pytest.raises(DatasetError, match="leaves the data folder"):
        load_dataset("gtsrb", data_dir=tmp_path / "official")


def test_gtsrb_csv_not_utf8_and_bad_roi(tmp_path):
    head = _gtsrb_csv_layout(tmp_path)
    (tmp_path / "Test.csv").write_bytes((head + "32,32,0,0,31,31,4,Test/b\xe9.ppm\n").encode("latin-1"))
    with pytest.raises(DatasetError, match=r"Test.csv' is not UTF-8 text \(byte 0xe9 at offset 78\)"):
        load_dataset("gtsrb", data_dir=tmp_path)
    (tmp_path / "Test.csv").write_text(head + "32,32,x,0,31,31,4,Test/b.ppm\n")
    load_dataset("gtsrb", data_dir=tmp_path)  # the ROI is read only when cropping
    with pytest.raises(DatasetError, match=r"row 2: ROI Roi.X1='x', Roi.Y1='0', .*; expected four integers"):
        load_dataset("gtsrb", data_dir=tmp_path, crop_roi=True)
    for roi in ("20,0,10,31", "0,0,-1,31", "40,0,45,31"):  # inverted, negative, outside the 32x32 image
        (tmp_path / "Test.csv").write_text(head + f"32,32,{roi},4,Test/b.ppm\n")
        with pytest.raises(DatasetError, match=r"row 2: ROI .* crops nothing of a 32x32 image"):
            load_dataset("gtsrb", data_dir=tmp_path, crop_roi=True)


@pytest.mark.parametrize("header,needle", [
    (b"P6\n2 2\n0\n", "maxval=0; expected width and height >= 1 and maxval in 1..65535"),
    (b"P6\n0 2\n255\n", "width=0"),
    (b"P6\n2 2\n70000\n", "maxval=70000"),
    (b"P3\n1 1\n15\n", "pixel values span 0..200, expected 0..15"),
    (b"P3\n1 1\n255\n", "non-numeric pixel value"),
])
def test_ppm_bad_header_values(tmp_path, header, needle):
    body = {b"P3\n1 1\n15\n": b"0 0 200\n", b"P3\n1 1\n255\n": b"0 x 1\n"}.get(header, bytes(12))
    (tmp_path / "z.ppm").write_bytes(header + body)
    with pytest.raises(DatasetError, match=re.escape(needle)):
        read_ppm(tmp_path / "z.ppm")


def test_emnist_gz_with_a_bad_deflate_stream(tmp_path):
    """Reproducer: a flipped byte inside the deflate stream raised zlib.error, not a DatasetError."""
    make_emnist(tmp_path, gz=True)
    p = tmp_path / "emnist-balanced-train-images-idx3-ubyte.gz"
    good = p.read_bytes()

    def inflate_error(off):
        raw = bytearray(good)
        raw[off] ^= 0xFF
        try:
            gzip.decompress(bytes(raw))
        except zlib.error:
            return bytes(raw)
        except Exception:  # noqa: BLE001 - header or CRC damage: not this reproducer
            return None

    bad = next(b for b in map(inflate_error, range(10, len(good) - 8)) if b is not None)
    p.write_bytes(bad)
    with pytest.raises(DatasetError, match=r"cannot read '.*train-images-idx3-ubyte.gz': .*invalid"):
        load_dataset("emnist", data_dir=tmp_path)
