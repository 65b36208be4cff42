"""WebDataset loader for the shards: shuffled batches of tensors, split by node (rank) and worker.

`make_loader` has two modes:
- finite (default): every rank sees its own subset of shards once per epoch (ranks get disjoint shards, workers
  within a rank get disjoint shards of that subset), for evaluation and exact coverage;
- resampled: shards are drawn with replacement forever, each rank and worker with its own seed, cut into
  nominal epochs with `with_epoch`.
`epoch_batches` is what multi-process training reads: exact epochs (each sample at most once per epoch over all
nodes, ranks and workers) in which every rank yields the same number of batches, so no collective operation waits
on a rank that ran out of data.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch

from components.data.shards import read_shard_manifest, shard_paths, to_model_range
from components.errors import DataError
from components.io import world_info

if TYPE_CHECKING:
    from components.config import TrainConfig


def _decode(record: dict) -> tuple[np.ndarray, Optional[np.ndarray]]:
    x = np.load(io.BytesIO(record["x.npy"]))
    y = np.load(io.BytesIO(record["cls.npy"])) if "cls.npy" in record else None
    return x, y


def _rebatch(blocks: Iterator, batch_size: int, shuffle: bool, buffer_size: int, seed: int,
             drop_last: bool) -> Iterator[tuple[np.ndarray, Optional[np.ndarray]]]:
    """Blocks of samples -> batches. When shuffling, samples are permuted within a pool of ~buffer_size samples
    from consecutive blocks, and half the pool is kept back to mix with the next blocks.

    Vectorised (concatenate + permute), so the per-sample cost is a copy, not a Python loop.
    """
    rng = np.random.default_rng(seed)
    fill = max(buffer_size, batch_size) if shuffle else batch_size
    keep = fill // 2 if shuffle else 0
    pool_x: list[np.ndarray] = []
    pool_y: list[Optional[np.ndarray]] = []
    held = 0

    def merged() -> tuple[np.ndarray, Optional[np.ndarray]]:
        x = np.concatenate(pool_x)
        y = None if pool_y[0] is None else np.concatenate(pool_y)
        if shuffle:
            perm = rng.permutation(len(x))
            x, y = x[perm], (None if y is None else y[perm])
        return x, y

    for x, y in blocks:
        pool_x.append(x)
        pool_y.append(y)
        held += len(x)
        if held < fill:
            continue
        x, y = merged()
        n_out = ((len(x) - keep) // batch_size) * batch_size
        for i in range(0, n_out, batch_size):
            yield x[i:i + batch_size], (None if y is None else y[i:i + batch_size])
        pool_x, pool_y, held = [x[n_out:]], [None if y is None else y[n_out:]], len(x) - n_out
    if held:
        x, y = merged()
        for i in range(0, len(x), batch_size):
            if len(x) - i < batch_size and drop_last:
                break
            yield x[i:i + batch_size], (None if y is None else y[i:i + batch_size])


def make_loader(shard_dir: Path | str, split: str, batch_size: int, *, shuffle: bool = True,
                resampled: bool = False, seed: int = 0, num_workers: int = 0, shuffle_buffer: int = 8192,
                batches_per_epoch: Optional[int] = None, drop_last: bool = False):
    """An iterable of batches {"x": float tensor [B, ...], "y": long tensor [B] or None}.

    In resampled mode `batches_per_epoch` (default: one pass worth of batches for this rank) bounds an epoch.
    """
    import webdataset as wds

    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_shard_manifest(shard_dir)
    urls = [str(p) for p in shard_paths(shard_dir, split)]
    rank, world = world_info()
    consumers = world * max(1, num_workers)
    if not resampled and len(urls) < consumers:
        raise DataError(f"{split} has {len(urls)} shard(s) for {world} rank(s) x {max(1, num_workers)} worker(s); "
                        f"re-shard with shard.min_shards >= {consumers} or use resampled mode")
    encoding = manifest["encoding"]
    labelled = manifest.get("num_classes") is not None

    def to_batch(pair):
        x, y = pair
        return {"x": torch.from_numpy(to_model_range(x, encoding)),
                "y": torch.from_numpy(y.astype(np.int64)) if labelled else None}

    ds = wds.WebDataset(
        urls,
        resampled=resampled,
        shardshuffle=(len(urls) if shuffle else False) if not resampled else len(urls),
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        seed=seed + 1000 * rank if resampled else seed,
        empty_check=False,
    ).map(_decode)
    rebatch_seed = seed + 1000 * rank
    ds = ds.compose(lambda blocks: _rebatch(blocks, batch_size, shuffle, shuffle_buffer, rebatch_seed, drop_last))
    ds = ds.map(to_batch)
    if resampled:
        count = manifest["splits"][split]["count"]
        ds = ds.with_epoch(batches_per_epoch or max(1, count // (batch_size * world)))
    if num_workers == 0:
        return ds
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False)


def shard_sample_counts(manifest: dict, split: str) -> list[int]:
    """Samples in each shard of `split`, in shard order (every shard is full but the last)."""
    info = manifest["splits"][split]
    per_shard, count, n = info["samples_per_shard"], info["count"], len(info["shards"])
    return [min(per_shard, count - i * per_shard) for i in range(n)]


def epoch_plan(counts: list[int], readers: int, batch_size: int, seed: int, epoch: int) -> tuple[list[list[int]], int]:
    """(shard indices of each reader, batches every reader yields) for one epoch.

    All readers (rank x worker, numbered rank * workers + worker) compute the same plan from the manifest alone: the
    shards in an epoch-seeded order dealt round-robin, and as many batches each as the reader with the fewest
    samples can fill. The samples beyond that quota in a reader's shards wait for a later epoch; none is read twice.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    owned = [[int(i) for i in order[r::readers]] for r in range(readers)]
    quota = min(sum(counts[i] for i in shards) for shards in owned) // batch_size
    return owned, quota


class _EpochReader(torch.utils.data.IterableDataset):
    """The micro-batches of one rank, epoch after epoch, from its share of the shards (see `epoch_batches`)."""

    def __init__(self, urls: list[str], counts: list[int], encoding: str, labelled: bool, batch_size: int,
                 rank: int, world: int, num_workers: int, seed: int, shuffle_buffer: int) -> None:
        self.urls, self.counts, self.encoding, self.labelled = urls, counts, encoding, labelled
        self.batch_size, self.rank, self.world, self.num_workers = batch_size, rank, world, num_workers
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def __iter__(self):
        import itertools

        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        reader = self.rank * max(1, self.num_workers) + (info.id if info is not None else 0)
        readers = self.world * max(1, self.num_workers)
        same = lambda src: src  # noqa: E731 - the plan already gives this reader its own shards
        for epoch in itertools.count():
            owned, quota = epoch_plan(self.counts, readers, self.batch_size, self.seed, epoch)
            if quota == 0:
                raise DataError(f"one epoch gives a reader {min(sum(self.counts[i] for i in o) for o in owned)} "
                                f"samples, fewer than one batch of {self.batch_size} ({self.world} rank(s) x "
                                f"{max(1, self.num_workers)} worker(s) share {sum(self.counts)} samples)")
            blocks = wds.WebDataset([self.urls[i] for i in owned[reader]], shardshuffle=False, nodesplitter=same,
                                    workersplitter=same, empty_check=False).map(_decode)
            batches = _rebatch(iter(blocks), self.batch_size, True, self.shuffle_buffer,
                               [self.seed, epoch, reader], drop_last=True)
            for x, y in itertools.islice(batches, quota):
                yield {"x": torch.from_numpy(to_model_range(x, self.encoding)),
                       "y": torch.from_numpy(y.astype(np.int64)) if self.labelled else None}


def epoch_batches(shard_dir: Path | str, split: str, batch_size: int, *, seed: int = 0, num_workers: int = 0,
                  shuffle_buffer: int = 8192) -> Iterator[dict]:
    """Endless shuffled micro-batches of `batch_size` for this rank, in exact epochs split by node, rank and worker.

    Per epoch every sample is read at most once across all ranks, and every rank yields the same number of
    batches (`epoch_plan`); with equal shards whose samples divide into whole batches, every sample is read exactly
    once. The stream is a function of (seed, rank, world size) only, so a resumed run can replay it. Fewer shards
    than ranks x workers is a DataError naming both numbers.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_shard_manifest(shard_dir)
    urls = [str(p) for p in shard_paths(shard_dir, split)]
    rank, world = world_info()
    workers = max(1, num_workers)
    if len(urls) < world * workers:
        raise DataError(f"{split} has {len(urls)} shard(s) but {world} rank(s) x {workers} loader worker(s) = "
                        f"{world * workers} readers need one each; re-shard with shard.min_shards >= {world * workers}")
    reader = _EpochReader(urls, shard_sample_counts(manifest, split), manifest["encoding"],
                          manifest.get("num_classes") is not None, batch_size, rank, world, num_workers, seed,
                          shuffle_buffer)
    if num_workers == 0:
        return iter(reader)
    # Workers' batches come back round-robin, so the stream stays a function of the seed.
    return iter(torch.utils.data.DataLoader(reader, batch_size=None, num_workers=num_workers))


def infinite_batches(loader) -> Iterator[dict]:
    """Cycle a loader forever (a fresh pass each time; webdataset reshuffles shards per pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the loader produced no batches (fewer samples than one batch?)")


def shard_batches(shards: Path | str, config: "TrainConfig", world_size: int) -> Iterator[dict]:
    """Endless shuffled micro-batches of the train split for this rank of a training stage. Multi-rank: exact epochs
    split by node and rank, the same number of batches on every rank (no rank waits on another)."""
    micro = config.micro_batch_size(world_size)
    if world_size > 1:
        return epoch_batches(shards, "train", micro, seed=config.seed)
    return infinite_batches(make_loader(shards, "train", micro, shuffle=True, seed=config.seed, drop_last=True))
