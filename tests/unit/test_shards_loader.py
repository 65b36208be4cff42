"""Shards: readable by plain tar and plain webdataset, reproducible, and a loader that splits by rank/worker."""
import hashlib
import tarfile

import numpy as np
import pytest
import torch

from components.config import DataParams
from components.data.loader import infinite_batches, make_loader
from components.data.shards import read_split, write_shards
from components.data.sources import SourceData, load_source
from components.errors import DataError
from components.io import write_json


def _shard(tmp_path, data=None, n=400, per_shard=50, min_shards=4, name="shards", per_record=8):
    data = data or load_source(DataParams(n_samples=n, seed=0))
    out = tmp_path / name
    out.mkdir()
    manifest = write_shards(data, out, val_fraction=0.25, samples_per_shard=per_shard, min_shards=min_shards,
                            seed=0, samples_per_record=per_record, progress=False)
    write_json(out / "manifest.json", manifest)
    return out, manifest, data


def test_plain_tar_and_plain_webdataset_read_the_manifest_counts(tmp_path):
    import webdataset as wds

    out, m, _ = _shard(tmp_path)
    for split in ("train", "val"):
        files = sorted(out.glob(f"{split}-*.tar"))
        assert [f.name for f in files] == m["splits"][split]["shards"]
        records = [r for f in files for r in tarfile.open(f).getnames() if r.endswith(".x.npy")]
        assert len(records) == m["splits"][split]["records"]
        ds = wds.WebDataset([str(f) for f in files], shardshuffle=False, empty_check=False).decode()
        blocks = [(r["x.npy"], r["cls.npy"]) for r in ds]
        assert len(blocks) == len(records)
        assert all(len(x) == len(y) <= m["samples_per_record"] for x, y in blocks)
        assert sum(len(x) for x, _ in blocks) == m["splits"][split]["count"]
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 400
    assert sum(m["splits"]["train"]["class_histogram"].values()) == 300


def test_round_trip_and_manifest_statistics(tmp_path):
    out, m, data = _shard(tmp_path)
    x_val, y_val = read_split(out, "val")
    x_tr, _ = read_split(out, "train")
    assert x_val.shape == (100, 2)
    both = np.concatenate([x_tr, x_val])
    np.testing.assert_allclose(np.sort(both, axis=0), np.sort(data.x, axis=0))  # nothing lost or duplicated
    assert m["sigma_data"] == pytest.approx(float(x_tr.std()), rel=1e-5)
    assert m["splits"]["val"]["sigma_data"] == pytest.approx(float(x_val.std()), rel=1e-5)


def test_shards_are_byte_reproducible(tmp_path):
    a, ma, _ = _shard(tmp_path, name="a")
    b, mb, _ = _shard(tmp_path, name="b")
    for f in a.glob("*.tar"):
        assert hashlib.md5(f.read_bytes()).hexdigest() == hashlib.md5((b / f.name).read_bytes()).hexdigest()
    assert ma["digest"] == mb["digest"]


def test_one_sample_per_record_layout(tmp_path):
    out, m, data = _shard(tmp_path, per_record=1)
    assert m["splits"]["train"]["records"] == m["splits"]["train"]["count"] == 300
    x, _ = read_split(out, "train")
    assert x.shape == (300, 2)


def test_min_shards_gives_enough_shards_for_ranks_and_workers(tmp_path):
    _, m, _ = _shard(tmp_path, per_shard=10_000, min_shards=4)
    assert len(m["splits"]["train"]["shards"]) == 4 and len(m["splits"]["val"]["shards"]) == 4


def _keys_seen(out, rank, world, monkeypatch, **kw):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    xs = [b["x"] for b in make_loader(out, "train", 16, **kw)]
    return {tuple(np.round(r, 6)) for r in torch.cat(xs).numpy()}


def test_two_ranks_see_disjoint_samples_covering_the_split(tmp_path, monkeypatch):
    out, m, _ = _shard(tmp_path)
    r0 = _keys_seen(out, 0, 2, monkeypatch)
    r1 = _keys_seen(out, 1, 2, monkeypatch)
    full = {tuple(np.round(r, 6)) for r in read_split(out, "train")[0]}
    assert r0 and r1 and not (r0 & r1)
    assert r0 | r1 == full and len(full) == m["splits"]["train"]["count"]


def test_worker_splitting_covers_the_split_once(tmp_path, monkeypatch):
    out, m, _ = _shard(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rows = torch.cat([b["x"] for b in make_loader(out, "train", 32, num_workers=2)])
    assert len(rows) == m["splits"]["train"]["count"]
    assert len({tuple(r) for r in rows.numpy().round(6)}) == len(rows)


def test_shuffle_changes_order_but_not_content(tmp_path, monkeypatch):
    out, _, _ = _shard(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    a = torch.cat([b["x"] for b in make_loader(out, "train", 50, shuffle=False)])
    b = torch.cat([b["x"] for b in make_loader(out, "train", 50, shuffle=True, seed=1)])
    assert not torch.equal(a, b)
    assert torch.equal(a.sort(0).values, b.sort(0).values)


def test_resampled_mode_yields_a_fixed_number_of_batches_per_rank(tmp_path, monkeypatch):
    out, _, _ = _shard(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    batches = list(make_loader(out, "train", 8, resampled=True, batches_per_epoch=7, drop_last=True))
    assert len(batches) == 7 and all(b["x"].shape == (8, 2) for b in batches)
    assert batches[0]["y"].dtype == torch.long
    # rank 1 of 2 owns 150 of the 300 training samples: batches 100, 50, then the stream wraps around
    stream = infinite_batches(make_loader(out, "train", 100, shuffle=False))
    assert [len(next(stream)["x"]) for _ in range(5)] == [100, 50, 100, 50, 100]


def test_too_few_shards_for_ranks_is_a_clear_error(tmp_path, monkeypatch):
    out, _, _ = _shard(tmp_path, min_shards=1, per_shard=10_000)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DataError, match="1 shard"):
        make_loader(out, "train", 8)


def test_uint8_images_are_mapped_to_unit_range(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 3, 4, 4), dtype=np.uint8)
    x[0] = 0
    x[1] = 255
    out, m, _ = _shard(tmp_path, data=SourceData(x, rng.integers(0, 3, 40), ["a", "b", "c"]), per_shard=5)
    assert m["encoding"] == "uint8" and m["kind"] == "image" and m["shape"] == [3, 4, 4]
    batch = torch.cat([b["x"] for b in make_loader(out, "train", 64, shuffle=False)]
                      + [b["x"] for b in make_loader(out, "val", 64, shuffle=False)])
    assert batch.min() == -1.0 and batch.max() == 1.0 and batch.shape[1:] == (3, 4, 4)
