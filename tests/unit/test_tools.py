"""`make clean` removes every pipeline output and says so; `make bench`'s runner finds every benchmark; every
benchmark starts as the README shows it (`python benchmarks/<name>.py`), from any directory."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, copy_project, project_env


def test_clean_removes_every_pipeline_output_and_lists_it(tmp_path):
    import yaml

    root = copy_project(tmp_path / "project")
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    written = []
    for name, stage in dvc.items():
        for entry in (stage.get("outs") or []) + (stage.get("metrics") or []):
            rel = entry if isinstance(entry, str) else next(iter(entry))
            path = root / rel
            if path.suffix == ".json":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "part.bin").write_bytes(b"x" * 1000)
            written.append(rel)
        (root / "data" / name).mkdir(parents=True, exist_ok=True)
        (root / "data" / name / "run.json").write_text("{}")
    (root / "checkpoints/teacher/abc").mkdir(parents=True)
    (root / "checkpoints/teacher/abc/mp_rank_00_model_states.pt").write_bytes(b"y" * 100)
    (root / "mlflow.db").write_bytes(b"tracking store")

    r = subprocess.run([sys.executable, "-m", "flows.clean"], cwd=root, env=project_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for rel in written + ["checkpoints"] + [f"data/{name}/run.json" for name in dvc]:
        assert not (root / rel).exists(), rel
        assert f"removed {rel} (" in r.stdout, rel
    assert (root / "mlflow.db").exists() and (root / "params.yaml").exists() and (root / "dvc.yaml").exists()


def test_every_benchmark_starts_as_a_script_and_the_runner_lists_it(tmp_path):
    benchmarks = sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py"))
    listed = subprocess.run([sys.executable, str(REPO / "benchmarks/run_all.py"), "--list"], cwd=tmp_path,
                            env=project_env(), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and listed.stdout.split() == benchmarks, listed.stderr
    for name in benchmarks:  # from another directory: imports resolve without PYTHONPATH or `-m`
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--help"], cwd=tmp_path,
                           env=project_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (name, r.stderr[-1500:])


def test_the_runner_records_skips_and_refuses_unknown_names(tmp_path):
    root = copy_project(tmp_path / "project")
    r = subprocess.run([sys.executable, "benchmarks/run_all.py", "--only", "digits"], cwd=root, env=project_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((root / "benchmarks/results/run_all.json").read_text())
    assert summary["bench_digits"]["status"] == "skipped" and "make demo-digits" in summary["bench_digits"]["reason"]
    bad = subprocess.run([sys.executable, "benchmarks/run_all.py", "--only", "nope"], cwd=root, env=project_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no benchmark bench_nope")
