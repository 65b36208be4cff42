"""Write a SourceData into WebDataset tar shards plus a manifest, and read shards back.

Layout: `<out>/{train,val}-%06d.tar` and `<out>/manifest.json`. One tar record = `__key__`, `x.npy` (a block
of k samples: [k, 2] points, [k, D] vectors or [k, C, H, W] images) and `cls.npy` (their k integer classes, when
labelled), with k = `samples_per_record` (the last record of a shard may hold fewer).

Why blocks and not one sample per record: Python's tarfile costs ~0.2 ms per member and a tar header is 512
bytes, so one 8-byte 2-D point per record reads at ~3k samples/s and takes ~4 KB on disk; blocks of 256 read at
hundreds of thousands of samples/s. `samples_per_record: 1` gives the classic one-sample layout (large images).
Shards are byte-reproducible (fixed tar mtime), so DVC sees identical outputs for identical params.
"""
from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from components.data.sources import SourceData
from components.errors import DataError
from components.io import read_json, tree_digest

SPLITS = ("train", "val")
MANIFEST = "manifest.json"


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic shuffled split; both parts non-empty."""
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val > n - 1:
        raise DataError(f"shard.val_fraction={val_fraction} leaves an empty split for {n} samples "
                        f"(val would have {n_val}); use more data or another fraction")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def to_model_range(x: np.ndarray, encoding: str) -> np.ndarray:
    """Stored values -> float32 model inputs (uint8 images map to [-1, 1])."""
    if encoding == "uint8":
        return x.astype(np.float32) / 127.5 - 1.0
    return x.astype(np.float32, copy=False)


def write_array_shards(out_dir: Path | str, prefix: str, arrays: dict[str, Optional[np.ndarray]], *,
                       samples_per_shard: int, samples_per_record: int, keys: Optional[np.ndarray] = None,
                       progress=None) -> list[str]:
    """Write aligned named arrays (axis 0 = sample; None values are skipped) as WebDataset tars
    `<prefix>-%06d.tar` in `out_dir`, and return the shard names.

    One record = a block of up to `samples_per_record` consecutive samples of one shard, one member `<name>.npy`
    per array; its key is `keys[first sample]` (default: the sample's position), 8 digits. Byte-reproducible
    (fixed tar mtime). `progress`: optional object with `update(n)` (a tqdm bar).
    """
    import webdataset as wds

    named = {name: a for name, a in arrays.items() if a is not None}
    n = len(next(iter(named.values())))
    names = []
    for shard_no, start in enumerate(range(0, n, samples_per_shard)):
        name = f"{prefix}-{shard_no:06d}.tar"
        stop = min(start + samples_per_shard, n)
        with wds.TarWriter(str(Path(out_dir) / name), mtime=0.0) as sink:
            for r in range(start, stop, samples_per_record):
                block = slice(r, min(r + samples_per_record, stop))
                key = int(keys[r]) if keys is not None else r
                sink.write({"__key__": f"{key:08d}",
                            **{f"{k}.npy": np.ascontiguousarray(a[block]) for k, a in named.items()}})
                if progress is not None:
                    progress.update(block.stop - block.start)
        names.append(name)
    return names


def read_array_shards(paths: list[Path], limit: Optional[int] = None) -> dict[str, np.ndarray]:
    """The named arrays of WebDataset tars written by `write_array_shards`, concatenated in shard and record
    order: {"x": ..., "cls": ...}. With `limit`, stops after the shard that reaches `limit` samples (the caller
    cuts). Reads the tars directly (no shuffling, no worker splitting), so every caller sees the same order."""
    columns: dict[str, list[np.ndarray]] = {}
    count = 0
    for path in paths:
        try:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    name = member.name.split(".", 1)[1].removesuffix(".npy")  # "<key>.x.npy" -> "x"
                    columns.setdefault(name, []).append(np.load(io.BytesIO(tar.extractfile(member).read())))
        except (tarfile.TarError, OSError, ValueError, IndexError) as e:
            raise DataError(f"corrupt or missing shard {path}: {e.__class__.__name__}: {e}") from None
        count = sum(len(a) for a in next(iter(columns.values()), []))
        if limit is not None and count >= limit:
            break
    if not columns:
        raise DataError(f"no records in the shards {', '.join(str(p) for p in paths[:3])}")
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def write_shards(data: SourceData, out_dir: Path, *, val_fraction: float, samples_per_shard: int,
                 min_shards: int, seed: int, samples_per_record: int = 256, progress: bool = True) -> dict:
    """Split, write both splits as shards into `out_dir` (which must exist), return the manifest dict."""
    n = len(data.x)
    train_idx, val_idx = data.fixed_split or split_indices(n, val_fraction, seed)
    splits_info = {}
    bar = tqdm(total=n, desc="writing shards", unit="sample", disable=not progress, mininterval=1.0)
    for split, idx in zip(SPLITS, (train_idx, val_idx)):
        per_shard = max(1, min(samples_per_shard, math.ceil(len(idx) / min_shards)))
        shards = write_array_shards(out_dir, split, {"x": data.x[idx], "cls": None if data.y is None else data.y[idx]},
                                    samples_per_shard=per_shard, samples_per_record=samples_per_record, keys=idx,
                                    progress=bar)
        n_records = sum(math.ceil(min(per_shard, len(idx) - s) / samples_per_record)
                        for s in range(0, len(idx), per_shard))
        xs = to_model_range(data.x[idx], data.encoding)
        hist = None
        if data.y is not None:
            counts = np.bincount(data.y[idx], minlength=data.num_classes or 0)
            hist = {str(c): int(k) for c, k in enumerate(counts)}
        splits_info[split] = {
            "count": int(len(idx)),
            "shards": shards,
            "samples_per_shard": per_shard,
            "records": n_records,
            "class_histogram": hist,
            "sigma_data": float(xs.std()),
            "mean": float(xs.mean()),
        }
    bar.close()
    return {
        "format": "webdataset",
        "record_keys": ["x.npy", "cls.npy"] if data.y is not None else ["x.npy"],
        "samples_per_record": samples_per_record,
        "shape": list(data.x.shape[1:]),
        "dtype": str(data.x.dtype),
        "encoding": data.encoding,
        "kind": "image" if data.x.ndim == 4 else "points",
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "source": data.description,
        "splits": splits_info,
        "sigma_data": splits_info["train"]["sigma_data"],
        "digest": tree_digest(out_dir),
    }


def read_shard_manifest(shard_dir: Path | str) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"no shard manifest at {path} (run the shard stage first: dvc repro shard)")
    return read_json(path)


def shard_paths(shard_dir: Path | str, split: str) -> list[Path]:
    manifest = read_shard_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise DataError(f"unknown split '{split}' (have {', '.join(manifest['splits'])})")
    paths = [Path(shard_dir) / s for s in manifest["splits"][split]["shards"]]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"shard files listed in the manifest are missing: {', '.join(missing[:3])}")
    return paths


def read_split(shard_dir: Path | str, split: str, limit: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """All samples of a split, in shard order, as float32 model-range arrays (for evaluation references)."""
    manifest = read_shard_manifest(shard_dir)
    arrays = read_array_shards(shard_paths(shard_dir, split), limit)
    x = to_model_range(arrays["x"][:limit], manifest["encoding"])
    y = arrays["cls"][:limit].astype(np.int64) if "cls" in arrays else None
    return x, y
