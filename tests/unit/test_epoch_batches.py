"""Multi-rank training data (`epoch_batches`): shards split by node, rank and worker; each sample read once per
epoch across all readers; the same number of batches on every rank; a clear error when shards are too few."""
import itertools

import pytest
import torch

from components.data.loader import epoch_batches, epoch_plan, shard_sample_counts
from components.data.shards import read_split
from components.errors import DataError
from tests.unit.test_shards_loader import _shard


def _rows(batches):
    return [tuple(r) for b in batches for r in b["x"].numpy().round(6)]


def _epochs_of_every_rank(out, monkeypatch, world, workers, batch, per_rank_per_epoch, epochs=2):
    """{rank: [rows of epoch 0, rows of epoch 1, ...]} as each rank (RANK/WORLD_SIZE, like torchrun sets) reads."""
    seen = {}
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        stream = epoch_batches(out, "train", batch, seed=5, num_workers=workers)
        seen[rank] = [_rows(itertools.islice(stream, per_rank_per_epoch)) for _ in range(epochs)]
    return seen


@pytest.mark.parametrize("world, workers", [(4, 1), (2, 2)])  # 2 nodes x 2 ranks; 2 ranks x 2 workers
def test_each_sample_is_read_once_per_epoch_across_ranks_and_workers(tmp_path, monkeypatch, world, workers):
    out, m, _ = _shard(tmp_path, n=400, per_shard=25)  # 300 training samples in 12 shards of 25
    counts = shard_sample_counts(m, "train")
    assert counts == [25] * 12
    _, quota = epoch_plan(counts, world * workers, 25, seed=5, epoch=0)
    assert quota == 3  # 3 shards of 25 per reader, batches of 25
    seen = _epochs_of_every_rank(out, monkeypatch, world, workers, 25, quota * workers)
    full = sorted(tuple(r) for r in read_split(out, "train")[0].round(6))
    for epoch in range(2):
        rows = [r for rank in range(world) for r in seen[rank][epoch]]
        assert sorted(rows) == full, f"epoch {epoch}: {len(rows)} rows, {len(set(rows))} distinct, {len(full)} samples"
    assert seen[0][0] != seen[0][1]  # reshuffled between epochs


def test_uneven_shards_give_equal_batches_and_no_repeats(tmp_path, monkeypatch):
    out, m, _ = _shard(tmp_path, n=400, per_shard=40)  # 300 samples: 7 shards of 40 and one of 20
    counts = shard_sample_counts(m, "train")
    assert counts == [40] * 7 + [20] and sum(counts) == m["splits"]["train"]["count"]
    owned, quota = epoch_plan(counts, 3, 16, seed=5, epoch=0)
    assert quota == min(sum(counts[i] for i in o) for o in owned) // 16
    seen = _epochs_of_every_rank(out, monkeypatch, 3, 0, 16, quota, epochs=1)
    rows = [r for rank in range(3) for r in seen[rank][0]]
    assert len(rows) == 3 * quota * 16 and len(set(rows)) == len(rows)  # equal per rank, nothing twice


def test_the_stream_replays_identically_for_a_resume(tmp_path, monkeypatch):
    out, _, _ = _shard(tmp_path, n=400, per_shard=25)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    a = _rows(itertools.islice(epoch_batches(out, "train", 10, seed=3), 40))
    b = _rows(itertools.islice(epoch_batches(out, "train", 10, seed=3), 40))
    assert a == b and len(set(a[:150])) == 150


def test_fewer_shards_than_ranks_times_workers_names_both_numbers(tmp_path, monkeypatch):
    out, _, _ = _shard(tmp_path, n=400, per_shard=100, min_shards=3)  # 3 training shards
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DataError) as e:
        epoch_batches(out, "train", 8, num_workers=2)
    assert str(e.value).startswith("train has 3 shard(s) but 2 rank(s) x 2 loader worker(s) = 4 readers")
