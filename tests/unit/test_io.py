"""Atomic output directories and content digests."""
import pytest

from components.io import atomic_output_dir, remove_stale_temp_dirs, tree_digest


def test_atomic_dir_appears_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_output_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_keeps_previous_output_and_leaves_no_temp(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_success_replaces_previous_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_output_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_stale_temp_dirs_of_killed_runs_are_removed(tmp_path):
    (tmp_path / ".out.tmp-123-abc").mkdir()
    remove_stale_temp_dirs(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_tree_digest_depends_on_content_not_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x.bin").write_bytes(b"123")
        (d / "manifest.json").write_text(str(d))  # excluded: it differs between the copies
    assert tree_digest(a) == tree_digest(b)
    (b / "sub" / "x.bin").write_bytes(b"124")
    assert tree_digest(a) != tree_digest(b)
