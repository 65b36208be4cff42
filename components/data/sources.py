"""Data sources: turn `data.*` params into arrays. Nothing is downloaded; everything is generated or local.

Every source returns a `SourceData`: samples `x` (float32 in [-1, 1]-ish for arrays/toys, or uint8 images
[C, H, W] for image files), optional integer labels, and optionally a fixed train/val split (CIFAR-10 keeps
its official test batch as val). Bad input raises `DataError` naming the file or value.
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from components.config import DataParams
from components.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class SourceData:
    x: np.ndarray  # [N, D] float32 (points / arrays) or [N, C, H, W] uint8 (8-bit images)
    y: Optional[np.ndarray]  # [N] int64, or None when unlabelled
    class_names: Optional[list[str]] = None
    # Indices of a split fixed by the source itself (e.g. CIFAR-10's test batch); None -> split by val_fraction.
    fixed_split: Optional[tuple[np.ndarray, np.ndarray]] = None
    description: dict = field(default_factory=dict)

    @property
    def encoding(self) -> str:
        """How stored values map to model inputs: 'float' as is, 'uint8' -> x / 127.5 - 1."""
        return "uint8" if self.x.dtype == np.uint8 else "float"

    @property
    def num_classes(self) -> Optional[int]:
        if self.y is None:
            return None
        return len(self.class_names) if self.class_names else int(self.y.max()) + 1


def load_source(p: DataParams) -> SourceData:
    loaders = {
        "toy2d": _load_toy2d,
        "digits": _load_digits,
        "image_folder": _load_image_folder,
        "npz": _load_npz,
        "cifar10": _load_cifar10,
    }
    if p.source not in loaders:  # the schema already restricts this; kept for direct callers
        raise DataError(f"unknown data.source '{p.source}' (choose from {', '.join(loaders)})")
    data = loaders[p.source](p)
    _check_finite(data.x, p.source)
    if p.max_samples is not None and p.max_samples < len(data.x):
        data = _subsample(data, p.max_samples, p.seed)
    return data


# ----------------------------------------------------------------------------------------------- toy 2-D
def make_toy2d(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Seeded 2-D toy sets, roughly centred with unit-order spread. Labels name the mode/region."""
    rng = np.random.default_rng(seed)
    if name == "checkerboard":
        # 4x4 board on [-2, 2]^2; points fill the 8 "black" squares uniformly.
        col = rng.integers(0, 4, n)
        row = 2 * rng.integers(0, 2, n) + (col % 2)
        x = np.stack([col + rng.random(n), row + rng.random(n)], 1) - 2.0
        label = (row // 2) * 4 + col  # which of the 8 squares
        names = [f"square{i}" for i in range(8)]
    elif name == "moons":
        half = rng.integers(0, 2, n)
        angle = rng.random(n) * np.pi
        upper = np.stack([np.cos(angle), np.sin(angle)], 1)
        lower = np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], 1)
        x = np.where(half[:, None] == 0, upper, lower)
        x = (x - np.array([0.5, 0.25])) * 1.5 + rng.normal(0, 0.05, (n, 2))
        label, names = half, ["upper", "lower"]
    elif name == "eight_gaussians":
        label = rng.integers(0, 8, n)
        angle = label * (np.pi / 4)
        x = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1) + rng.normal(0, 0.15, (n, 2))
        names = [f"mode{i}" for i in range(8)]
    elif name == "spirals":
        label = rng.integers(0, 2, n)
        r = np.sqrt(rng.random(n)) * 3.0
        theta = r * 2.2 + label * np.pi
        x = np.stack([r * np.cos(theta), r * np.sin(theta)], 1) + rng.normal(0, 0.08, (n, 2))
        names = ["arm0", "arm1"]
    else:
        raise DataError(f"unknown toy2d data.name '{name}' (choose from checkerboard, moons, eight_gaussians, spirals)")
    return x.astype(np.float32), label.astype(np.int64), names


def _load_toy2d(p: DataParams) -> SourceData:
    x, y, names = make_toy2d(p.name, p.n_samples, p.seed)
    return SourceData(x, y, names, description={"source": "toy2d", "name": p.name})


# ----------------------------------------------------------------------------------------------- digits
def _load_digits(p: DataParams) -> SourceData:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1], [N, 1, 8, 8]
    return SourceData(x, d.target.astype(np.int64), [str(i) for i in range(10)],
                      description={"source": "digits"})


# ----------------------------------------------------------------------------------------------- images
def _existing_path(p: DataParams) -> Path:
    path = Path(p.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path does not exist: {path}")
    return path


def _load_image_folder(p: DataParams) -> SourceData:
    from PIL import Image, UnidentifiedImageError

    root = _existing_path(p)
    if not root.is_dir():
        raise DataError(f"data.path is not a folder: {root}")
    top = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[Path, int]] = []
    class_names: Optional[list[str]] = None
    if subdirs and not top:
        class_names = []
        for d in subdirs:
            imgs = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if imgs:
                files += [(f, len(class_names)) for f in imgs]
                class_names.append(d.name)
    elif top and subdirs and any(any(d.rglob("*.*")) for d in subdirs):
        raise DataError(f"{root}: has images both at the top level and in subfolders; use one layout "
                        "(class subfolders, or a flat folder)")
    else:
        files = [(f, 0) for f in top]
    if not files:
        raise DataError(f"{root}: no PNG/JPEG images found (empty folder?)")

    arrays, labels, first_size, first_file = [], [], None, None
    for f, label in files:
        try:
            with Image.open(f) as im:
                im.load()
                im = im.convert("L" if p.grayscale else ("L" if im.mode in ("L", "1", "I;16") else "RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"cannot read image {f}: {e.__class__.__name__}") from None
        if first_size is None:
            first_size, first_file = im.size, f
        elif im.size != first_size:
            raise DataError(f"images have mixed sizes: {first_file} is {first_size[0]}x{first_size[1]}, "
                            f"{f} is {im.size[0]}x{im.size[1]} (resize them to one size first)")
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    channels = {a.shape[0] for a in arrays}
    if len(channels) > 1:  # some grey, some colour: promote grey to RGB
        arrays = [np.repeat(a, 3, 0) if a.shape[0] == 1 else a for a in arrays]
    x = np.stack(arrays)
    y = np.array([lab for _, lab in files], dtype=np.int64) if class_names else None
    return SourceData(x, y, class_names, description={"source": "image_folder", "path": str(root)})


def _load_npz(p: DataParams) -> SourceData:
    path = _existing_path(p)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if p.npz_x_key not in keys:
                raise DataError(f"{path}: no array '{p.npz_x_key}' (data.npz_x_key); arrays present: {keys}")
            x = np.asarray(z[p.npz_x_key])
            y = np.asarray(z[p.npz_y_key]) if p.npz_y_key in keys else None
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read npz file {path}: {e.__class__.__name__}: {e}") from None
    if x.ndim < 2 or len(x) < 2:
        raise DataError(f"{path}: '{p.npz_x_key}' must be [N, ...] with N >= 2, got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: '{p.npz_x_key}' must be numeric, got dtype {x.dtype}")
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise DataError(f"{path}: labels '{p.npz_y_key}' must be non-negative integers of shape [{len(x)}], "
                            f"got {y.dtype} {list(y.shape)}")
        y = y.astype(np.int64)
    x = x if x.dtype == np.uint8 else x.astype(np.float32)
    return SourceData(x, y, None, description={"source": "npz", "path": str(path)})


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, bytes/str, ints and numpy arrays/scalars.

    A user-supplied archive is untrusted: plain `pickle.load` would construct (and call) any importable object.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refuses to construct {module}.{name}: only plain arrays, lists, "
                                         "numbers and strings are accepted")
        return super().find_class(module, name)


def _load_cifar10(p: DataParams) -> SourceData:
    """The standard python-format archive (cifar-10-python.tar.gz) or its extracted cifar-10-batches-py folder."""
    path = _existing_path(p)
    wanted = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        for name in wanted:
            f = next(iter(path.rglob(name)), None)
            if f is not None:
                blobs[name] = f.read_bytes()
    else:
        try:
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    base = Path(m.name).name
                    if base in wanted and m.isfile():
                        blobs[base] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path} is not the CIFAR-10 python archive (cannot open as tar: {e.__class__.__name__})") from None
    missing = [n for n in wanted if n not in blobs]
    if missing:
        raise DataError(f"{path} is not the CIFAR-10 python archive: missing {', '.join(missing)} "
                        "(expected cifar-10-python.tar.gz or its cifar-10-batches-py folder)")
    xs, ys = [], []
    for name in wanted:
        try:
            d = _CifarUnpickler(io.BytesIO(blobs[name]), encoding="bytes").load()
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except pickle.UnpicklingError as e:
            raise DataError(f"{path}: '{name}' is not a CIFAR-10 batch ({e})") from None
        except Exception as e:  # any unpickling/shape problem means "not the archive"
            raise DataError(f"{path}: '{name}' is not a CIFAR-10 batch ({e.__class__.__name__})") from None
        xs.append(data)
        ys.append(labels)
    x, y = np.concatenate(xs), np.concatenate(ys)
    n_train = sum(len(a) for a in xs[:5])
    split = (np.arange(n_train), np.arange(n_train, len(x)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return SourceData(x, y, names, fixed_split=split, description={"source": "cifar10", "path": str(path)})


# ----------------------------------------------------------------------------------------------- helpers
def _check_finite(x: np.ndarray, source: str) -> None:
    if x.dtype != np.uint8:
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(1)
        if bad.any():
            idx = np.flatnonzero(bad)
            raise DataError(f"{source} data has NaN/inf in {len(idx)} sample(s) (first at index {idx[0]})")


def _subsample(d: SourceData, n: int, seed: int) -> SourceData:
    rng = np.random.default_rng(seed)
    if d.fixed_split is None:
        keep = np.sort(rng.permutation(len(d.x))[:n])
        return SourceData(d.x[keep], None if d.y is None else d.y[keep], d.class_names, None, d.description)
    train, val = d.fixed_split
    n_val = max(1, round(n * len(val) / (len(train) + len(val))))
    keep_t = np.sort(rng.permutation(train)[: n - n_val])
    keep_v = np.sort(rng.permutation(val)[:n_val])
    keep = np.concatenate([keep_t, keep_v])
    split = (np.arange(len(keep_t)), np.arange(len(keep_t), len(keep)))
    return SourceData(d.x[keep], None if d.y is None else d.y[keep], d.class_names, split, d.description)
