"""GTSRB (German Traffic Sign Recognition Benchmark) from a local folder: images + CSV annotations, 43 classes.

Two layouts are recognised under ``data_dir``:

* official INI release: training annotations ``.../Final_Training/Images/000NN/GT-000NN.csv`` (one per class,
  ';'-separated: ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``) next to their ``.ppm`` images,
  and the test annotations ``GT-final_test.csv`` (same columns, from GTSRB_Final_Test_GT.zip) anywhere under
  ``data_dir`` with the images in ``.../Final_Test/Images/`` (or next to the CSV);
* the common re-packaging with ``Train.csv`` and ``Test.csv`` in ``data_dir`` (','-separated, columns
  ``Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path``, paths relative to ``data_dir``, PNG images).

PPM (P6/P3) is decoded natively; PNG needs Pillow (``pip install pillow``) and is refused with a clear error
without it. Images are optionally cropped to their ROI, then resized to ``image_size`` (default 32)
with antialiased bilinear interpolation.

Image paths in the CSVs must be relative and stay inside their folder: an absolute path or one with ``..`` is
refused (a CSV must not make the loader read files outside ``data_dir``).

>>> # load_gtsrb("~/data/GTSRB") -> 3x32x32, 43 classes
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch

from dpquant_sim.errors import DatasetError
from dpquant_sim.training.data.common import DatasetBundle, require_dir, resize_images, to_dataset

NUM_CLASSES = 43


def read_ppm(path: Path) -> np.ndarray:
    """Decode a binary (P6) or ASCII (P3) PPM, or P5/P2 grey PGM, to uint8 (H, W, 3)."""
    data = Path(path).read_bytes()
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:  # magic, width, height, maxval, skipping '#' comments
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if pos >= len(data):
            raise DatasetError(f"{str(path)!r}: truncated PPM header")
        if data[pos : pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        end = pos
        while end < len(data) and not data[end : end + 1].isspace():
            end += 1
        tokens.append(data[pos:end])
        pos = end
    magic = tokens[0]
    if magic not in (b"P6", b"P3", b"P5", b"P2"):
        raise DatasetError(f"{str(path)!r}: PPM magic {magic!r}, expected P6 or P3 (or P5/P2 grey)")
    try:
        w, h, maxval = (int(t) for t in tokens[1:4])
    except ValueError:
        raise DatasetError(f"{str(path)!r}: bad PPM header {tokens!r}") from None
    if w < 1 or h < 1 or not 1 <= maxval <= 65535:
        raise DatasetError(f"{str(path)!r}: PPM header width={w}, height={h}, maxval={maxval}; expected width and "
                           "height >= 1 and maxval in 1..65535")
    ch = 3 if magic in (b"P6", b"P3") else 1
    n = w * h * ch
    if magic in (b"P6", b"P5"):
        body = data[pos + 1 :]
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
        if len(body) < n * dtype.itemsize:
            raise DatasetError(f"{str(path)!r}: {len(body)} pixel bytes, expected {n * dtype.itemsize} for {w}x{h}")
        arr = np.frombuffer(body, dtype=dtype, count=n).astype(np.float64)
    else:
        try:
            arr = np.array(data[pos:].split()[:n], dtype=np.float64)
        except ValueError:
            raise DatasetError(f"{str(path)!r}: ASCII PPM with a non-numeric pixel value") from None
        if arr.size < n:
            raise DatasetError(f"{str(path)!r}: {arr.size} values, expected {n}")
    if arr.size and (arr.min() < 0 or arr.max() > maxval):
        raise DatasetError(f"{str(path)!r}: pixel values span {arr.min():g}..{arr.max():g}, expected 0..{maxval} "
                           "(the header's maxval)")
    img = np.round(arr * (255.0 / maxval)).astype(np.uint8).reshape(h, w, ch)
    return np.repeat(img, 3, axis=2) if ch == 1 else img


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) from a .ppm/.pgm (native) or another format via Pillow."""
    if not path.is_file():
        raise DatasetError(f"gtsrb: image {str(path)!r} listed in the CSV does not exist")
    if path.suffix.lower() in (".ppm", ".pgm", ".pnm"):
        return read_ppm(path)
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError(f"gtsrb: {str(path)!r} is {path.suffix} and reading it needs Pillow "
                           "(pip install pillow); PPM images are read without it") from None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"gtsrb: {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                           f"{e.start}); expected a UTF-8 (or ASCII) CSV") from None
    delim = ";" if text.split("\n", 1)[0].count(";") > text.split("\n", 1)[0].count(",") else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delim))
    cols = set(rows[0]) if rows else set()
    if "ClassId" not in cols or not ({"Filename", "Path"} & cols):
        raise DatasetError(f"gtsrb: {str(path)!r} has columns {sorted(cols)}; expected ClassId and Filename "
                           "(official GT-*.csv) or Path (Train.csv/Test.csv)")
    return rows


def _relative_image_path(rel: str | None, source: Path, row: int) -> PurePosixPath:
    """A CSV's image path as a relative path that cannot leave its folder (no absolute path, drive or '..')."""
    if not rel:
        raise DatasetError(f"gtsrb: {str(source)!r} row {row}: empty image path")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or PureWindowsPath(rel).drive or ".." in p.parts:
        raise DatasetError(f"gtsrb: {str(source)!r} row {row}: image path {rel!r} leaves the data folder; expected "
                           "a path relative to the CSV's folder, without '..'")
    return p


def _roi(r: dict[str, str], shape: tuple[int, ...], source: Path, row: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2), inclusive, of a row; DatasetError unless they are integers that crop a non-empty box."""
    keys = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")
    try:
        x1, y1, x2, y2 = (int(r[k]) for k in keys)
    except (KeyError, TypeError, ValueError):
        got = ", ".join(f"{k}={r.get(k)!r}" for k in keys)
        raise DatasetError(f"gtsrb: {str(source)!r} row {row}: ROI {got}; expected four integers") from None
    h, w = shape[:2]
    if not (0 <= x1 <= x2 and 0 <= y1 <= y2 and x1 < w and y1 < h):
        raise DatasetError(f"gtsrb: {str(source)!r} row {row}: ROI ({x1}, {y1})-({x2}, {y2}) crops nothing of a "
                           f"{w}x{h} image; expected 0 <= X1 <= X2, 0 <= Y1 <= Y2 inside the image")
    return x1, y1, x2, y2


def _load_rows(rows, base_dirs: list[Path], image_size: int, crop_roi: bool, source: Path):
    xs, ys = [], []
    for i, r in enumerate(rows):
        rel = _relative_image_path(r.get("Path") or r.get("Filename"), source, i + 2)
        path = next((b / rel for b in base_dirs if (b / rel).is_file()), base_dirs[0] / rel)
        img = read_image(path)
        if crop_roi and r.get("Roi.X1") not in (None, ""):
            x1, y1, x2, y2 = _roi(r, img.shape, source, i + 2)
            img = img[y1 : y2 + 1, x1 : x2 + 1]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        xs.append(resize_images(t, image_size)[0].clamp_(0, 255))
        try:
            y = int(r["ClassId"])
        except ValueError:
            raise DatasetError(f"gtsrb: {str(source)!r} row {i + 2}: ClassId={r['ClassId']!r} is not an integer") from None
        if not 0 <= y < NUM_CLASSES:
            raise DatasetError(f"gtsrb: {str(source)!r} row {i + 2}: ClassId={y}, expected 0..{NUM_CLASSES - 1}")
        ys.append(y)
    if not xs:
        raise DatasetError(f"gtsrb: no annotated images found via {str(source)!r}")
    return to_dataset(torch.stack(xs), np.array(ys))


def load_gtsrb(data_dir, *, image_size: int = 32, crop_roi: bool = False, seed: int = 0) -> DatasetBundle:
    """Load GTSRB train and test sets as 3 x image_size x image_size images in [-1, 1]."""
    expected = ("Train.csv + Test.csv with their images, or Final_Training/Images/000NN/GT-000NN.csv + "
                "GT-final_test.csv with .ppm images")
    root = require_dir(data_dir, "gtsrb", expected)
    if (root / "Train.csv").is_file():
        if not (root / "Test.csv").is_file():
            raise DatasetError(f"gtsrb: found Train.csv but no Test.csv in {str(root)!r}")
        train = _load_rows(_read_csv(root / "Train.csv"), [root], image_size, crop_roi, root / "Train.csv")
        test = _load_rows(_read_csv(root / "Test.csv"), [root], image_size, crop_roi, root / "Test.csv")
        layout = "Train.csv/Test.csv"
    else:
        train_csvs = sorted(p for p in root.rglob("GT-[0-9][0-9][0-9][0-9][0-9].csv"))
        test_csvs = sorted(root.rglob("GT-final_test.csv"))
        if not train_csvs or not test_csvs:
            what = "training GT-000NN.csv files" if not train_csvs else "GT-final_test.csv (test labels)"
            raise DatasetError(f"gtsrb: no {what} under {str(root)!r}; expected {expected}")
        xs, ys = [], []
        for c in train_csvs:
            ds = _load_rows(_read_csv(c), [c.parent], image_size, crop_roi, c)
            xs.append(ds.tensors[0])
            ys.append(ds.tensors[1])
        from torch.utils.data import TensorDataset

        train = TensorDataset(torch.cat(xs), torch.cat(ys))
        tc = test_csvs[0]
        bases = [tc.parent] + sorted(p for p in root.rglob("Images") if "Test" in str(p))
        test = _load_rows(_read_csv(tc), bases, image_size, crop_roi, tc)
        layout = "official GT-*.csv"
    return DatasetBundle(name="gtsrb", train=train, test=test, input_shape=(3, image_size, image_size),
                         num_classes=NUM_CLASSES,
                         info={"data_dir": str(root), "layout": layout, "crop_roi": crop_roi})
