"""Orchestration cost: no-op `dvc repro`, and the pipeline flow's overhead over plain `dvc repro`.

    python benchmarks/bench_orchestration.py [--targets shard ...] [--repeats 3] [--no-forced]

Works in a temp copy of the repo (git + DVC, tiny data params), built once with the pipeline flow (which also
starts the copy's project-local Prefect server, so server start-up is not timed). Then, median of `--repeats`:
- noop_dvc_repro_s:     `dvc repro <targets>` with everything up to date (goal < 5 s);
- noop_pipeline_s:      `python -m flows pipeline <targets>` with everything up to date;
- forced_dvc_repro_s / forced_pipeline_s: the same with --force (every stage reruns), unless --no-forced.
overhead = pipeline - dvc repro (goal < 10 s for the whole DAG). Also the median CPU seconds (user + sys, the
command and its children) of each, which a busy shared machine inflates less than wall time.
Writes benchmarks/results/orchestration.json.
Targets default to every stage in dvc.yaml; name fewer while later stages are slow or not yet runnable.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tests.project_copy import REPO, copy_project
RESULTS = REPO / "benchmarks" / "results"
TINY = {"data": {"n_samples": 600}, "shard": {"samples_per_shard": 100}}


def copy_repo(dest: Path) -> Path:
    """A fresh git copy of the project with tiny data params, committed."""
    copy_project(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in TINY.items():
        params.setdefault(section, {}).update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "tiny params"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DVC_ROOT")}
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["DVC_NO_ANALYTICS"] = "true"
    return e


CPU_SECONDS: dict[str, list[float]] = {}  # label -> CPU s (user+sys) of the command and all its descendants


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(root: Path, *args: str, label: str = "") -> float:
    """Wall seconds of one command; its CPU seconds go to CPU_SECONDS[label] (less sensitive to a busy box)."""
    cpu, start = child_cpu(), time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=root, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"`{' '.join(args)}` failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    CPU_SECONDS.setdefault(label, []).append(child_cpu() - cpu)
    return seconds


def median_of(repeats: int, root: Path, *args: str, label: str) -> float:
    return round(statistics.median(timed(root, *args, label=label) for _ in range(repeats)), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="*", default=[], help="stages (default: all of dvc.yaml)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-forced", action="store_true", help="skip the forced (everything reruns) comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        root = copy_repo(Path(tmp))
        try:
            build_s = timed(root, "-m", "flows", "pipeline", *args.targets, label="build")
            result = {"targets": args.targets or ["all"], "repeats": args.repeats, "build_s": round(build_s, 2),
                      "noop_dvc_repro_s": median_of(args.repeats, root, "-m", "dvc", "repro", *args.targets,
                                                    label="noop_dvc_repro"),
                      "noop_pipeline_s": median_of(args.repeats, root, "-m", "flows", "pipeline", *args.targets,
                                                   label="noop_pipeline")}
            result["noop_overhead_s"] = round(result["noop_pipeline_s"] - result["noop_dvc_repro_s"], 3)
            if not args.no_forced:
                result["forced_dvc_repro_s"] = median_of(args.repeats, root, "-m", "dvc", "repro", "--force",
                                                         *args.targets, label="forced_dvc_repro")
                result["forced_pipeline_s"] = median_of(args.repeats, root, "-m", "flows", "pipeline", "--force",
                                                        *args.targets, label="forced_pipeline")
                result["forced_overhead_s"] = round(result["forced_pipeline_s"] - result["forced_dvc_repro_s"], 3)
        finally:
            subprocess.run([sys.executable, "-m", "flows", "server", "stop"], cwd=root, env=env(),
                           capture_output=True)
    result["cpu_s"] = {label: round(statistics.median(v), 3) for label, v in CPU_SECONDS.items()}
    result["goals"] = {"noop_dvc_repro_s": 5.0, "overhead_s": 10.0}
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)  # shared machines: context for the numbers
    result["cpu_count"] = os.cpu_count()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "orchestration.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
