"""Data sources: determinism, the shapes and ranges they promise, and one clear error per bad input."""
import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from components.config import DataParams
from components.data.sources import load_source, make_toy2d
from components.errors import DataError


@pytest.mark.parametrize("name", ["checkerboard", "moons", "eight_gaussians", "spirals"])
def test_toy2d_is_seeded(name):
    a, ya, _ = make_toy2d(name, 500, seed=3)
    b, yb, _ = make_toy2d(name, 500, seed=3)
    c, _, _ = make_toy2d(name, 500, seed=4)
    assert a.shape == (500, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a, c)


def test_checkerboard_points_lie_on_black_squares_with_matching_labels():
    x, y, names = make_toy2d("checkerboard", 4000, seed=0)
    col, row = np.floor(x[:, 0] + 2).astype(int), np.floor(x[:, 1] + 2).astype(int)
    assert ((col + row) % 2 == 0).all()  # only the 8 "black" cells of the 4x4 board
    assert np.abs(x).max() <= 2.0
    np.testing.assert_array_equal(y, (row // 2) * 4 + col)
    assert len(names) == 8 and set(np.unique(y)) == set(range(8))


def test_digits_are_real_images_scaled_to_unit_range():
    d = load_source(DataParams(source="digits"))
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == np.float32
    assert d.x.min() == -1.0 and d.x.max() == 1.0
    assert d.num_classes == 10 and sorted(np.unique(d.y)) == list(range(10))


def _png(path, size=(8, 8), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    for cls, value in (("cat", 10), ("dog", 200)):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", value=value)
    d = load_source(DataParams(source="image_folder", path=str(tmp_path)))
    assert d.x.shape == (6, 1, 8, 8) and d.x.dtype == np.uint8
    assert d.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(d.y, [0, 0, 0, 1, 1, 1])
    assert d.x[0].max() == 10 and d.x[5].min() == 200


def test_image_folder_flat_rgb_has_no_labels(tmp_path):
    for i in range(2):
        _png(tmp_path / f"{i}.jpg", size=(16, 16), mode="RGB", value=(1, 2, 3))
    d = load_source(DataParams(source="image_folder", path=str(tmp_path)))
    assert d.x.shape == (2, 3, 16, 16) and d.y is None


def _write_cifar(path, n_per_batch=4, as_dir=False):
    rng = np.random.default_rng(0)
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        members[name] = pickle.dumps({b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                                      b"labels": list(rng.integers(0, 10, n_per_batch))})
    if as_dir:
        (path / "cifar-10-batches-py").mkdir(parents=True)
        for name, blob in members.items():
            (path / "cifar-10-batches-py" / name).write_bytes(blob)
        return path
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.mark.parametrize("as_dir", [False, True])
def test_cifar10_archive_keeps_official_split(tmp_path, as_dir):
    path = _write_cifar(tmp_path / ("c" if as_dir else "cifar-10-python.tar.gz"), as_dir=as_dir)
    d = load_source(DataParams(source="cifar10", path=str(path)))
    assert d.x.shape == (24, 3, 32, 32) and d.x.dtype == np.uint8
    train, val = d.fixed_split
    assert len(train) == 20 and len(val) == 4 and d.num_classes == 10


class _RunsCode:  # what a hostile archive would pickle: unpickling it calls os.system
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar10_unpickler_refuses_arbitrary_objects(tmp_path):
    path = _write_cifar(tmp_path / "c", as_dir=True)
    (path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode(), b"labels": []}))
    with pytest.raises(DataError, match=r"test_batch' is not a CIFAR-10 batch \(refuses to construct posix.system"):
        load_source(DataParams(source="cifar10", path=str(path)))


def _bad_inputs(tmp_path):
    """(params, expected fragment of the one-line error) for every bad input the shard issue lists."""
    cases = {}
    cases["missing path"] = (DataParams(source="npz", path=str(tmp_path / "nope.npz")), "does not exist")
    (tmp_path / "empty").mkdir()
    cases["empty folder"] = (DataParams(source="image_folder", path=str(tmp_path / "empty")), "no PNG/JPEG")
    corrupt = tmp_path / "corrupt"
    _png(corrupt / "ok.png")
    (corrupt / "bad.png").write_bytes(b"not an image")
    cases["corrupt image"] = (DataParams(source="image_folder", path=str(corrupt)), "cannot read image")
    mixed = tmp_path / "mixed"
    _png(mixed / "a.png", size=(8, 8))
    _png(mixed / "b.png", size=(9, 8))
    cases["mixed sizes"] = (DataParams(source="image_folder", path=str(mixed)), "mixed sizes")
    nan = tmp_path / "nan.npz"
    arr = np.zeros((5, 2), np.float32)
    arr[3, 1] = np.nan
    np.savez(nan, x=arr)
    cases["nan"] = (DataParams(source="npz", path=str(nan)), "NaN/inf in 1 sample(s) (first at index 3)")
    inf = tmp_path / "inf.npz"
    np.savez(inf, x=np.full((4, 2), np.inf, np.float32))
    cases["inf"] = (DataParams(source="npz", path=str(inf)), "NaN/inf")
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_bytes(b"garbage")
    cases["corrupt npz"] = (DataParams(source="npz", path=str(bad_npz)), "cannot read npz")
    nokey = tmp_path / "nokey.npz"
    np.savez(nokey, images=np.zeros((4, 2)))
    cases["npz key"] = (DataParams(source="npz", path=str(nokey)), "no array 'x'")
    not_cifar = tmp_path / "not-cifar.tar.gz"
    with tarfile.open(not_cifar, "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        tar.addfile(info, io.BytesIO(b""))
    cases["cifar wrong tar"] = (DataParams(source="cifar10", path=str(not_cifar)), "not the CIFAR-10 python archive")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    cases["cifar junk"] = (DataParams(source="cifar10", path=str(junk)), "not the CIFAR-10 python archive")
    return cases


def test_every_bad_input_gets_one_clear_line(tmp_path):
    for label, (params, fragment) in _bad_inputs(tmp_path).items():
        with pytest.raises(DataError) as e:
            load_source(params)
        assert fragment in str(e.value), f"{label}: {e.value}"
        assert "\n" not in str(e.value), label


def test_max_samples_keeps_a_seeded_subset():
    a = load_source(DataParams(n_samples=1000, max_samples=100, seed=1))
    b = load_source(DataParams(n_samples=1000, max_samples=100, seed=1))
    assert len(a.x) == 100
    np.testing.assert_array_equal(a.x, b.x)
