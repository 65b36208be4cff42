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


def test_file_records_find_a_truncated_or_modified_file(tmp_path):
    from components.io import file_records, verify_file_records

    (tmp_path / "a.tar").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 10)
    records = file_records(tmp_path)
    assert set(records) == {"a.tar", "sub/b.bin"} and verify_file_records(tmp_path, records) is None
    (tmp_path / "a.tar").write_bytes(b"x" * 400)
    assert "a.tar has 400 bytes, its manifest says 1000" in verify_file_records(tmp_path, records)
    (tmp_path / "a.tar").write_bytes(b"z" * 1000)
    assert "a.tar differs from the md5" in verify_file_records(tmp_path, records)


def test_holder_lock_names_its_holder_and_is_released_when_the_holder_dies(tmp_path):
    """A real second process holds the lock; SIGKILL of that process frees it and leaves its record behind."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from components.io import HolderLock, LockHeld

    path = tmp_path / "stage.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from components.io import HolderLock\n"
        f"with HolderLock({str(path)!r}, mlflow_run_id='r1'): print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as e:
            HolderLock(path).__enter__()
        assert e.value.holder["pid"] == holder.pid and f"pid {holder.pid} on " in str(e.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel releases the flock with the process
        try:
            with HolderLock(path, mlflow_run_id="r2") as lock:
                assert lock.previous["pid"] == holder.pid and lock.previous["mlflow_run_id"] == "r1"
                break
        except LockHeld:
            assert time.time() < deadline
            time.sleep(0.1)
    assert json.loads(path.read_text())["mlflow_run_id"] == "r2"


def test_a_waiting_holder_lock_is_told_who_holds_it_and_gets_it_when_released(tmp_path):
    import os
    import subprocess
    import sys

    from components.io import HolderLock

    path = tmp_path / "pipeline.lock"
    first = subprocess.Popen([sys.executable, "-c", (
        "import sys; from components.io import HolderLock\n"
        f"with HolderLock({str(path)!r}, purpose='first'): print('held', flush=True); sys.stdin.readline()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert first.stdout.readline().strip() == "held"
        told = []

        def release_after_being_told(holder):
            told.append(holder)
            first.stdin.write("release\n")
            first.stdin.flush()

        with HolderLock(path, purpose="second", on_wait=release_after_being_told) as lock:
            assert [h["pid"] for h in told] == [first.pid] and told[0]["purpose"] == "first"
            assert lock.previous["purpose"] == "first"
    finally:
        first.kill()
        first.wait()


def test_a_stage_stops_when_the_process_that_started_it_through_a_shell_dies(tmp_path):
    """launcher (python) -> sh -> stage: killing the launcher re-parents the shell, and the stage stops itself."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    pid_file, err_file = tmp_path / "stage.pid", tmp_path / "stage.err"
    stage = (f"import os, time; from components.io import exit_with_launcher; exit_with_launcher(0.1); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"subprocess.Popen(['sh', '-c', {sys.executable!r} + ' -c \"$0\" 2> {err_file}; true', {stage!r}])\n"
        "time.sleep(60)")], env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.time() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.05)
    stage_pid = int(pid_file.read_text())
    launcher.kill()
    launcher.wait()

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 10
    try:
        while running(stage_pid):
            assert time.time() < deadline, "the stage outlived its launcher"
            time.sleep(0.05)
    finally:
        if running(stage_pid):
            os.kill(stage_pid, 9)
    assert f"the process that started this stage (pid {launcher.pid}) exited; stopping stage" in err_file.read_text()
