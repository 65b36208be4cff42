"""Batches from tensors already in memory (couplings, preference pairs): the in-memory counterpart of the
WebDataset loader, for data a stage has just generated or read whole."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from components.errors import DataError


def shuffled_batches(tensors: dict[str, Optional[Tensor]], batch_size: int, seed: int,
                     what: str = "samples") -> Iterator[dict[str, Optional[Tensor]]]:
    """Endless minibatches of the given aligned tensors (None values pass through as None), a fresh seeded
    permutation per epoch and only full batches, so a resumed Trainer that skips the consumed batches sees exactly
    the batches of an uninterrupted run."""
    n = len(next(t for t in tensors.values() if t is not None))
    if n < batch_size:
        raise DataError(f"{n} {what} are fewer than one batch of {batch_size}; lower the batch size")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield {k: (None if t is None else t[idx]) for k, t in tensors.items()}
