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


def write_shards(data: SourceData, out_dir: Path, *, val_fraction: float, samples_per_shard: int,
                 min_shards: int, seed: int, samples_per_record: int = 256, progress: bool = True) -> dict:
    """Split, write both splits as shards into `out_dir` (which must exist), return the manifest dict."""
    import webdataset as wds

    n = len(data.x)
    train_idx, val_idx = data.fixed_split or split_indices(n, val_fraction, seed)
    splits_info = {}
    bar = tqdm(total=n, desc="writing shards", unit="sample", disable=not progress, mininterval=1.0)
    for split, idx in zip(SPLITS, (train_idx, val_idx)):
        per_shard = max(1, min(samples_per_shard, math.ceil(len(idx) / min_shards)))
        n_records = 0
        for shard_no, start in enumerate(range(0, len(idx), per_shard)):
            shard_idx = idx[start:start + per_shard]
            with wds.TarWriter(str(out_dir / f"{split}-{shard_no:06d}.tar"), mtime=0.0) as sink:
                for r in range(0, len(shard_idx), samples_per_record):
                    block = shard_idx[r:r + samples_per_record]
                    record = {"__key__": f"{block[0]:08d}", "x.npy": np.ascontiguousarray(data.x[block])}
                    if data.y is not None:
                        record["cls.npy"] = data.y[block]
                    sink.write(record)
                    n_records += 1
                    bar.update(len(block))
        shards = sorted(p.name for p in out_dir.glob(f"{split}-*.tar"))
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
    """All samples of a split, in shard order, as float32 model-range arrays (for evaluation references).

    Reads the tars directly (no shuffling, no worker splitting), so every caller sees the same order.
    """
    manifest = read_shard_manifest(shard_dir)
    xs, ys, n = [], [], 0
    for path in shard_paths(shard_dir, split):
        try:
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".x.npy"):
                        xs.append(np.load(io.BytesIO(tar.extractfile(m).read())))
                        n += len(xs[-1])
                    elif m.name.endswith(".cls.npy"):
                        ys.append(np.load(io.BytesIO(tar.extractfile(m).read())))
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataError(f"corrupt shard {path}: {e.__class__.__name__}: {e}") from None
        if limit is not None and n >= limit:
            break
    x = to_model_range(np.concatenate(xs)[:limit], manifest["encoding"])
    y = np.concatenate(ys)[:limit].astype(np.int64) if ys else None
    return x, y
